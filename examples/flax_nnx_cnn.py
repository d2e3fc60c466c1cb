"""A Flax NNX CNN on scikit-learn's 8x8 digits with RAMDA and the paper's groups.

``presets.from_nnx`` gives Conv kernels channel-wise groups and Dense kernels
input-wise groups (ALGORITHMS.md §9); BatchNorm and biases stay
unregularized. ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` drives the
optimizer inside ``nnx.jit``; the stage-wise schedule's last stage ramps the
momentum to 1 so the trained model has exact zero channels/rows::

  python3 examples/flax_nnx_cnn.py --epochs 10
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import optax_ramda
from optax_ramda import presets


class CNN(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.fc1 = nnx.Linear(32 * 4 * 4, 64, rngs=rngs)
    self.fc2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--epochs", type=int, default=10)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--strength", type=float, default=5e-4)
  args = ap.parse_args(argv)
  if args.epochs < 5:
    # The last stage starts at epochs // 2 and c reaches 1 in its third epoch: with 3
    # or 4 epochs the run ends before any group is exactly zero.
    ap.error("--epochs must be >= 5 (c reaches 1 in the third epoch of the last stage)")

  digits = load_digits()
  x = jnp.asarray(digits.images[..., None] / 16.0, jnp.float32)
  y = jnp.asarray(digits.target)
  steps_per_epoch = len(x) // args.batch

  model = CNN(nnx.Rngs(0))
  reg = presets.from_nnx(model)  # conv: channel-wise, linear: input-wise
  # momentum c0 = 0.5: the last stage's ramp c = min(c0 sqrt(n), 1) reaches
  # 1 three epochs after the milestone (the paper uses c0 = 0.01 over
  # hundreds of epochs).
  tx = optax_ramda.ramda(
      0.05, strength=args.strength, regularizer=reg, momentum=0.5,
      milestones=(args.epochs // 2,), steps_per_epoch=steps_per_epoch,
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, xb, yb):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(0)
  for epoch in range(args.epochs):
    perm = rng.permutation(len(x))
    losses = [
        float(train_step(model, optimizer, x[idx], y[idx]))
        for idx in perm[: steps_per_epoch * args.batch].reshape(steps_per_epoch, -1)
    ]
    rep = optax_ramda.structure(nnx.state(model, nnx.Param), reg)
    print(f"epoch {epoch:2d}  loss {np.mean(losses):.4f}  "
          f"group sparsity {float(rep.weighted_group_sparsity):.3f}")
  model.eval()
  acc = float(jnp.mean(jnp.argmax(model(x), -1) == y))
  print(f"train accuracy {acc:.3f}")
  for path, leaf in rep.per_leaf.items():
    print(f"  {path}: {int(leaf.zero_groups)}/{leaf.num_groups} zero groups")


if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")
  main()
