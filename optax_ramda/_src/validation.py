"""Early, clear checks of hyperparameters.

Hyperparameters are checked when an optimizer is built, but only when their
value is concrete: ``optax.inject_hyperparams`` rebuilds the optimizer inside
``update`` with traced values, and a schedule is a callable. Neither can be
checked on the host without a sync, so they are left alone.
"""

from __future__ import annotations

import math
import os
import sys
import types
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _concrete_number(value: Any) -> np.ndarray | None:
  """The value as a numeric numpy array, or None when it is traced, a schedule or not numeric."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None
  return arr if np.issubdtype(arr.dtype, np.number) else None


def concrete_float(value: Any) -> float | None:
  """The value as a Python float, or None when it is traced or a schedule."""
  arr = _concrete_number(value)
  return None if arr is None or arr.ndim != 0 else float(arr)


def concrete_scalar(name: str, value: Any) -> float | None:
  """:func:`concrete_float`, but a concrete numeric array that is not a scalar raises.

  An array hyperparameter such as ``np.array([0.1])`` would skip the checks
  below and change the shapes of the state's scalars.
  """
  arr = _concrete_number(value)
  if arr is not None and arr.ndim != 0:
    raise ValueError(
        f"{name} must be a scalar (or a schedule), got an array of shape "
        f"{arr.shape}. Pass a Python float or a 0-d array."
    )
  return None if arr is None else float(arr)


def _scheduled_zero(value: Any, v: float) -> bool:
  """Whether ``v == 0`` may be a scheduled value rather than a constant that is a mistake.

  ``optax.inject_hyperparams`` rebuilds the optimizer with every hyperparameter as a
  ``jax.Array`` (eagerly: a concrete one), and schedules such as
  ``optax.warmup_cosine_decay_schedule(0.0, ...)`` pass through 0. A learning rate
  or momentum of 0 gives a finite step (with lr = 0, RAMDA/RMDA still move ``x``
  toward the solution of the last subproblem, ProxSGD and ProxGen stand still;
  with momentum 0, RAMDA/RMDA keep ``x`` and ProxSGD's average takes in no
  gradient), so a ``jax.Array`` 0 is accepted: it cannot be told from a
  schedule's value. A Python or NumPy 0, the likely mistake, is refused.
  """
  return v == 0 and isinstance(value, jax.Array)


def check_positive(name: str, value: Any, scheduled_zero: bool = False) -> None:
  """``0 < value < inf``; with ``scheduled_zero``, a ``jax.Array`` 0 also passes."""
  v = concrete_scalar(name, value)
  if v is not None and not 0 < v < math.inf and not (scheduled_zero and _scheduled_zero(value, v)):
    also = " (a schedule may pass through 0)" if scheduled_zero else ""
    raise ValueError(
        f"{name} must be finite and > 0, got {v}. Pass a positive {name}{also}.")


def check_non_negative(name: str, value: Any) -> None:
  v = concrete_scalar(name, value)
  if v is not None and not 0 <= v < math.inf:
    raise ValueError(f"{name} must be finite and >= 0, got {v}. Pass {name} >= 0.")


def check_momentum(name: str, value: Any) -> None:
  """``0 < value <= 1``; a ``jax.Array`` 0 (a scheduled value) also passes."""
  v = concrete_scalar(name, value)
  if v is not None and not 0 < v <= 1 and not _scheduled_zero(value, v):
    raise ValueError(
        f"{name} (the interpolation weight c) must lie in (0, 1], got {v}. "
        "c = 1 makes x equal the subproblem solution z; small c (0.01-0.1) "
        "averages; a constant c = 0 would never move x (RAMDA/RMDA) or let "
        "ProxSGD's average take in no gradient (a schedule may pass through 0). "
        "Note this is 1 - (MADGRAD/SGD momentum)."
    )


def check_unit_interval(name: str, value: Any) -> None:
  v = concrete_scalar(name, value)
  if v is not None and not 0 <= v < 1:
    raise ValueError(f"{name} must lie in [0, 1), got {v}.")


def check_iterations(max_iters: Any, min_iters: Any) -> None:
  hi = concrete_scalar("max_iters", max_iters)
  lo = concrete_scalar("min_iters", min_iters)
  if hi is not None and (hi < 1 or hi != int(hi)):
    raise ValueError(f"max_iters must be an integer >= 1, got {max_iters}.")
  if lo is not None and (lo < 0 or lo != int(lo)):
    raise ValueError(f"min_iters must be an integer >= 0, got {min_iters}.")
  if hi is not None and lo is not None and lo > hi:
    raise ValueError(
        f"min_iters ({min_iters}) must not exceed max_iters ({max_iters})."
    )


def accumulator_dtype(value: Any) -> Any:
  """``accumulator_dtype`` as a ``jnp.dtype`` (None stays None); a real float type."""
  if value is None:
    return None
  try:
    dt = jnp.dtype(value)
  except TypeError as e:
    raise ValueError(
        f"accumulator_dtype must be a floating-point dtype such as jnp.float32, "
        f"got {value!r}."
    ) from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(
        f"accumulator_dtype must be a real floating-point dtype such as "
        f"jnp.float32, got {dt}."
    )
  return dt


def _name(path: Any) -> str:
  return jax.tree_util.keystr(path) or "(the params array)"


def _library_dirs() -> tuple[str, ...]:
  """Folders of this package and of the libraries that call into it (jax,
  optax, flax, when imported), each ending in a separator."""
  dirs = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
  for name in ("jax", "optax", "flax", "chex"):
    path = getattr(sys.modules.get(name), "__file__", None)
    if path:
      dirs.append(os.path.dirname(os.path.abspath(path)))
  return tuple(os.path.join(d, "") for d in dirs)


def warn_user(message: str) -> None:
  """``warnings.warn(message, UserWarning)`` attributed to the user's code.

  The line shown (and the one ``-W`` filters and the once-per-location
  registry use) is the first caller outside this package, jax, optax, flax
  and chex, so a warning raised at ``init``, inside ``optax.chain`` or
  ``jax.jit``, points at the user's call instead of into the library (a
  notebook cell, ``python -c`` and doctests included).
  """
  internal = _library_dirs()
  if sys.version_info >= (3, 12):
    warnings.warn(message, UserWarning, skip_file_prefixes=internal)
    return
  # Python 3.11: count the frames to skip, as warnings.warn counts them
  # (it passes over importlib's bootstrap frames without counting them).
  frame: types.FrameType | None = sys._getframe(1)
  level = 2  # warn_user is level 1, its caller level 2
  while frame is not None:
    name = frame.f_code.co_filename
    if not ("importlib" in name and "_bootstrap" in name):
      if not os.path.abspath(name).startswith(internal):
        break
      level += 1
    frame = frame.f_back
  warnings.warn(message, UserWarning, stacklevel=level if frame is not None else 2)


def check_dual_average_dtypes(params: Any) -> None:
  """Low-precision params need a wider accumulator for the dual averages.

  ``V = sum_i s_i g_i`` and ``U = sum_i s_i g_i^2`` with ``s_i = lr sqrt(i)``
  grow like ``k^1.5`` within a stage. In float16 they can pass its largest value
  (65504) after a few thousand steps, and then the params become NaN: refused.
  In bfloat16 (8 significant bits) an increment below half an ulp of the sum is
  lost, so after a few hundred comparable steps the sums stop taking in new
  gradients: a warning, unless the bfloat16 state was asked for
  (``accumulator_dtype=jnp.bfloat16``; this check only runs without one).
  """
  bf16 = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if jnp.result_type(leaf) == jnp.float16:
      raise ValueError(
          f"parameter {_name(path)} is float16. The dual averages "
          "V and U (ALGORITHMS.md §2-3) grow with the step count and can leave "
          "float16's range (65504) within a few thousand steps. Pass "
          "accumulator_dtype=jnp.float32 (x0, V and U in float32; the params "
          "stay float16), or use bfloat16 params."
      )
    if jnp.result_type(leaf) == jnp.bfloat16:
      bf16.append(_name(path))
  if bf16:
    more = f" (and {len(bf16) - 1} more)" if len(bf16) > 1 else ""
    warn_user(
        f"parameter {bf16[0]}{more} is bfloat16, so the dual averages V and U "
        "(ALGORITHMS.md §2-3) would be summed in bfloat16: once a step's increment "
        "is below half an ulp of the sum (8 significant bits, after a few hundred "
        "steps) new gradients are lost and training stalls. Pass "
        "accumulator_dtype=jnp.float32 (x0, V and U in float32, the params stay "
        "bfloat16), or accumulator_dtype=jnp.bfloat16 to keep bfloat16 state "
        "knowingly and silence this warning."
    )
