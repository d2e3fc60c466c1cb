"""Early, clear checks of hyperparameters.

Hyperparameters are checked when an optimizer is built, but only when their
value is concrete: ``optax.inject_hyperparams`` rebuilds the optimizer inside
``update`` with traced values, and a schedule is a callable. Neither can be
checked on the host without a sync, so they are left alone.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def concrete_float(value: Any) -> float | None:
  """The value as a Python float, or None when it is traced or a schedule."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None
  if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
    return None
  return float(arr)


def check_positive(name: str, value: Any) -> None:
  v = concrete_float(value)
  if v is not None and not v > 0:
    raise ValueError(f"{name} must be > 0, got {v}. Pass a positive {name}.")


def check_non_negative(name: str, value: Any) -> None:
  v = concrete_float(value)
  if v is not None and not v >= 0:
    raise ValueError(f"{name} must be >= 0, got {v}. Pass {name} >= 0.")


def check_momentum(name: str, value: Any) -> None:
  v = concrete_float(value)
  if v is not None and not 0 < v <= 1:
    raise ValueError(
        f"{name} (the interpolation weight c) must lie in (0, 1], got {v}. "
        "c = 1 makes x equal the subproblem solution z; small c (0.01-0.1) "
        "averages. Note this is 1 - (MADGRAD/SGD momentum)."
    )


def check_unit_interval(name: str, value: Any) -> None:
  v = concrete_float(value)
  if v is not None and not 0 <= v < 1:
    raise ValueError(f"{name} must lie in [0, 1), got {v}.")


def check_iterations(max_iters: Any, min_iters: Any) -> None:
  hi, lo = concrete_float(max_iters), concrete_float(min_iters)
  if hi is not None and (hi < 1 or hi != int(hi)):
    raise ValueError(f"max_iters must be an integer >= 1, got {max_iters}.")
  if lo is not None and (lo < 0 or lo != int(lo)):
    raise ValueError(f"min_iters must be an integer >= 0, got {min_iters}.")
  if hi is not None and lo is not None and lo > hi:
    raise ValueError(
        f"min_iters ({min_iters}) must not exceed max_iters ({max_iters})."
    )
