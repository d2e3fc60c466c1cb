"""Replays a reference trace (``shared/reference-traces/README.md``) in JAX.

Everything is read from the file: data, model, optimizer, hyperparameters,
schedule, grouping, initial params. Parameters keep the stored (PyTorch)
layout, and the models compute exactly the PyTorch layers, so the trace's
reduce axes apply unchanged.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_ramda

SHARED_TRACES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "reference-traces"


def trace_files() -> list[pathlib.Path]:
  """Every shared trace, then every ``*.npz`` under ``$OPTAX_RAMDA_EXTRA_TRACES``."""
  files = sorted(SHARED_TRACES.glob("*.npz"))
  extra = os.environ.get("OPTAX_RAMDA_EXTRA_TRACES")
  if extra:
    files += sorted(pathlib.Path(extra).glob("*.npz"))
  return files


# ---------------------------------------------------------------- models


def _linear(x, w, b):
  return x @ w.T + b


def mlp(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  h = jax.nn.relu(_linear(x, params["fc1.weight"], params["fc1.bias"]))
  return _linear(h, params["fc2.weight"], params["fc2.bias"])


def cnn(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  w = params["conv.weight"]  # (out, in, kh, kw)
  x = x.reshape(x.shape[0], w.shape[1], 2, 2)  # NCHW, C order
  h = jax.lax.conv_general_dilated(
      x, w, window_strides=(1, 1), padding="VALID",
      dimension_numbers=("NCHW", "OIHW", "NCHW"),
      precision=jax.lax.Precision.HIGHEST,
  )
  h = jax.nn.relu(h + params["conv.bias"][None, :, None, None])
  h = h.reshape(h.shape[0], -1)
  return _linear(h, params["fc.weight"], params["fc.bias"])


MODELS: dict[str, Callable] = {"mlp": mlp, "cnn": cnn}


def cross_entropy(model, params, x, y):
  logits = model(params, x)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


# ---------------------------------------------------------------- optimizers

# hyperparameters JSON key -> optimizer keyword, per optimizer
_HP = {
    "ramda": {"epsilon": "eps", "max_iters": "max_iters", "rtol": "rtol", "min_iters": "min_iters"},
    "rmda": {},
    "prox_adamw": {
        "b1": "b1", "b2": "b2", "epsilon": "eps", "weight_decay": "weight_decay",
        "max_iters": "max_iters", "rtol": "rtol", "min_iters": "min_iters",
    },
    "prox_sgd": {},
}
_FACTORIES = {
    "ramda": optax_ramda.ramda,
    "rmda": optax_ramda.rmda,
    "prox_adamw": optax_ramda.prox_adamw,
    "prox_sgd": optax_ramda.prox_sgd,
}


class Trace:
  """A loaded trace file."""

  def __init__(self, path: pathlib.Path):
    self.path = pathlib.Path(path)
    d = np.load(self.path, allow_pickle=False)
    self.data = {k: d[k] for k in d.files}
    g = lambda k: self.data[k][()]
    self.optimizer = str(g("optimizer"))
    self.model = str(g("model"))
    self.names = [str(n) for n in self.data["param_names"]]
    self.shapes = [tuple(s) for s in json.loads(str(g("param_shapes")))]
    self.group_axes = {k: tuple(v) for k, v in json.loads(str(g("group_axes"))).items()}
    self.hyperparameters = json.loads(str(g("hyperparameters")))
    self.learning_rate = float(g("learning_rate"))
    self.strength = float(g("strength"))
    self.momentum = float(g("momentum"))
    self.milestones = tuple(int(m) for m in self.data["milestones"])
    self.gamma = float(g("gamma"))
    self.batch_size = int(g("batch_size"))
    self.X = self.data["X"]
    self.y = self.data["y"]
    self.params = self.data["params"]
    unknown = set(self.group_axes) - set(self.names)
    if unknown:
      raise ValueError(f"{self.path.name}: group_axes names unknown params {unknown}")
    if self.optimizer not in _FACTORIES:
      raise ValueError(f"{self.path.name}: unknown optimizer {self.optimizer!r}")
    if self.model not in MODELS:
      raise ValueError(f"{self.path.name}: unknown model {self.model!r}")

  @property
  def steps(self) -> int:
    return self.params.shape[0] - 1

  def unflatten(self, flat: np.ndarray) -> dict[str, jax.Array]:
    out, i = {}, 0
    for name, shape in zip(self.names, self.shapes):
      n = int(np.prod(shape))
      out[name] = jnp.asarray(flat[i : i + n].reshape(shape))
      i += n
    assert i == flat.size, "param_shapes do not cover the flattened params"
    return out

  def flatten(self, params: dict[str, jax.Array]) -> np.ndarray:
    return np.concatenate([np.asarray(params[n]).reshape(-1) for n in self.names])

  def regularizer(self) -> optax_ramda.GroupLasso:
    spec = {
        n: optax_ramda.GroupSpec(self.group_axes[n]) if n in self.group_axes else None
        for n in self.names
    }
    return optax_ramda.group_lasso(spec)

  def optimizer_kwargs(self) -> dict[str, Any]:
    mapping = _HP[self.optimizer]
    unknown = set(self.hyperparameters) - set(mapping)
    if unknown:
      raise ValueError(
          f"{self.path.name}: hyperparameters {sorted(unknown)} are not supported "
          f"for {self.optimizer}"
      )
    kw = {mapping[k]: v for k, v in self.hyperparameters.items()}
    kw.update(
        learning_rate=self.learning_rate,
        strength=self.strength,
        regularizer=self.regularizer(),
        milestones=self.milestones,
        gamma=self.gamma,
    )
    if self.optimizer != "prox_adamw":
      kw["momentum"] = self.momentum
    if self.optimizer in ("ramda", "prox_adamw"):
      # The traces are the paper's PG solver (ALGORITHMS.md §6), not the
      # aliases' default exact solver: name it, so the default may change.
      kw["solver"] = "pg"
    return kw

  def make_optimizer(self) -> optax.GradientTransformation:
    return _FACTORIES[self.optimizer](**self.optimizer_kwargs())

  def batch(self, t: int) -> tuple[jax.Array, jax.Array]:
    n_batches = self.X.shape[0] // self.batch_size
    i = t % n_batches
    sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
    return jnp.asarray(self.X[sl]), jnp.asarray(self.y[sl])


def replay(trace: Trace, optimizer: optax.GradientTransformation | None = None):
  """Runs the trace's training; returns (params per step (steps+1, n), batch losses)."""
  opt = optimizer or trace.make_optimizer()
  model = MODELS[trace.model]
  params = trace.unflatten(trace.params[0])
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(lambda p: cross_entropy(model, p, x, y))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  history, losses = [trace.flatten(params)], []
  for t in range(trace.steps):
    x, y = trace.batch(t)
    params, state, loss = step(params, state, x, y)
    history.append(trace.flatten(params))
    losses.append(float(loss))
  return np.stack(history), np.asarray(losses), state


def write_trace(path: pathlib.Path, template: Trace, **overrides: Any) -> None:
  """Writes a trace file in the reference format (for harness self-tests)."""
  data = dict(template.data)
  data.update(overrides)
  np.savez(path, **data)
