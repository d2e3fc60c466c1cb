"""The last stage: move the params towards ``z`` and emit updates."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from optax._src import base, numerics

from optax_ramda._src import validation
from optax_ramda._src.schedule import StageSchedule
from optax_ramda._src.subproblem import NewPoint, check_stage_input


class InterpolateState(NamedTuple):
  count: jax.Array  # type: ignore[assignment]  # int32, steps taken (for the momentum ramp)


def interpolate(
    momentum: Any = 1.0, schedule: StageSchedule | None = None
) -> base.GradientTransformation:
  r"""``x <- (1 - c) x + c z``, returned as the update ``x_new - x``.

  Takes the :class:`NewPoint` ``z`` of :func:`solve_subproblem`. ``c`` is
  ``momentum``, ramped in the schedule's last stage (ALGORITHMS.md §7). With
  ``c == 1`` the new params are exactly ``z`` (IEEE: ``0 * x + 1 * z``), and a
  zero group of ``z`` lands as exact zeros after ``optax.apply_updates``
  because ``x + (0 - x) == 0``. The new point is computed in ``z``'s dtype
  and rounded to the param dtype before the difference is taken.

  Args:
    momentum: ``c`` in ``(0, 1]``; RAMDA/RMDA default 0.01, ProxGen/ProxSGD 1.
    schedule: the stage-wise schedule whose last stage ramps ``c``.
  """
  validation.check_momentum("momentum", momentum)
  schedule = schedule or StageSchedule()

  def init_fn(params):
    del params
    return InterpolateState(jnp.zeros([], jnp.int32))

  def update_fn(new_point: NewPoint, state, params=None):
    check_stage_input("interpolate", new_point, NewPoint)
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    c = schedule.momentum(jnp.asarray(momentum, jnp.result_type(float)), state.count)

    def step(zz, x):
      cc = c.astype(zz.dtype)
      new = ((1 - cc) * x.astype(zz.dtype) + cc * zz).astype(x.dtype)
      return new - x

    updates = jax.tree.map(step, new_point.z, params)
    return updates, InterpolateState(numerics.safe_increment(state.count))

  return base.GradientTransformation(init_fn, update_fn)
