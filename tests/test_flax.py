"""Real Flax training loops: NNX (nnx.Optimizer + nnx.jit) and Linen TrainState."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optax_ramda
from optax_ramda import presets


def toy_images(n=64, seed=0):
  """Two classes of 8x8 one-channel images: a bright left or right half + noise."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  x = rng.normal(0, 0.3, (n, 8, 8, 1)).astype(np.float32)
  x[y == 0, :, :4] += 1.0
  x[y == 1, :, 4:] += 1.0
  return jnp.asarray(x), jnp.asarray(y)


class CNN(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.fc1 = nnx.Linear(8 * 4 * 4, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))


OPTS = {
    "ramda": lambda reg: optax_ramda.ramda(0.05, strength=1e-3, regularizer=reg, momentum=0.1),
    "rmda": lambda reg: optax_ramda.rmda(0.05, strength=1e-3, regularizer=reg, momentum=0.1),
    "prox_adamw": lambda reg: optax_ramda.prox_adamw(1e-2, strength=1e-3, regularizer=reg),
    "prox_sgd": lambda reg: optax_ramda.prox_sgd(0.1, strength=1e-3, regularizer=reg),
}


@pytest.mark.parametrize("name", sorted(OPTS))
def test_nnx_optimizer_trains_cnn(name):
  x, y = toy_images()
  model = CNN(nnx.Rngs(0))
  reg = presets.from_nnx(model)
  optimizer = nnx.Optimizer(model, OPTS[name](reg), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(30)]
  # The task is separable; 30 full-batch steps must at least halve the loss
  # (observed: far more). Guards against an update that is a no-op.
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(optimizer.step[...]) == 30
  # The regularizer sees the arrays nnx.Optimizer passes (paths ending .value).
  rep = optax_ramda.structure(nnx.state(model, nnx.Param), reg)
  assert len(rep.per_leaf) == 3  # conv, fc1, fc2 kernels; biases and BatchNorm not


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(2)(x)


def test_linen_train_state_ramda():
  x, y = toy_images()
  model = LinenCNN()
  params = model.init(jax.random.key(0), x[:1])["params"]
  reg = presets.from_params(params)
  # Strong strength and the paper's schedule; the momentum ramp
  # c = min(0.5 sqrt(n), 1) reaches c = 1 from epoch 12 (step 24) on, so x = z
  # and the prox's exact zero groups show in the params (ALGORITHMS.md §7).
  tx = optax_ramda.ramda(
      0.05, strength=0.05, regularizer=reg, momentum=0.5, milestones=(10,), steps_per_epoch=2
  )
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def train_step(state, x, y):
    def loss_fn(p):
      logits = state.apply_fn({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(60):
    state, loss = train_step(state, x, y)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  rep = optax_ramda.structure(state.params, reg)
  # Groups of Dense_0 rows / Conv_0 input channels zeroed by the prox.
  assert float(rep.group_sparsity) > 0, rep
