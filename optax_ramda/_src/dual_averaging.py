"""Dual-averaged gradient accumulation (ALGORITHMS.md §2, §3, §7)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import base, numerics

from optax_ramda._src import validation
from optax_ramda._src.schedule import StageSchedule
from optax_ramda._src.subproblem import DualAverage, check_stage_input


def scalar_dtype() -> jnp.dtype:
  """float64 when ``jax_enable_x64`` is on, else float32."""
  return jnp.result_type(float)


class DualAveragingState(NamedTuple):
  """State of :func:`dual_averaging`.

  ``alpha`` is a Kahan-compensated running sum (``alpha_compensation`` holds
  the rounding error), so it does not drift in float32 over long stages.
  """

  count: jax.Array  # type: ignore[assignment]  # int32, 0-based steps taken (t)
  alpha: jax.Array
  alpha_compensation: jax.Array
  centre: base.Params  # x0
  sum_grad: base.Updates  # V


def dual_averaging(
    learning_rate: base.ScalarOrSchedule,
    schedule: StageSchedule | None = None,
    accumulator_dtype: Any | None = None,
) -> base.GradientTransformation:
  r"""Weighted dual averages of the gradients, with stage-wise restarts.

  Per step, with ``k`` the step within the current stage::

    s      = lr * sqrt(k)
    alpha <- alpha + s
    V     <- V + s * g

  and at a restart (the first step, and each milestone of ``schedule``)
  ``k = 1, alpha = 0, V = 0, x0 = params`` before the update. ``lr`` is
  ``learning_rate`` (a constant, an injected hyperparameter or a schedule of
  the step count) times the schedule's stage decay.

  Outputs a :class:`DualAverage` (not updates): follow it with
  :func:`cube_root_metric` (RAMDA) or :func:`sqrt_count_metric` (RMDA).

  Args:
    learning_rate: ``lr`` (> 0).
    schedule: the stage-wise schedule (milestones, gamma); ``None``: one stage.
    accumulator_dtype: dtype of ``x0`` and ``V`` (a real float dtype);
      ``None``: the params', which ``init`` refuses for float16 (``V`` grows
      like ``k^1.5`` and can leave float16's range within a few thousand steps).
      (``static_args`` under ``optax.inject_hyperparams``.)

  References:
    Huang & Lee, NeurIPS 2024 (RAMDA), arXiv:2403.14398; Huang & Lee, ICLR
    2022 (RMDA), arXiv:2112.02612.
  """
  validation.check_positive("learning_rate", learning_rate, scheduled_zero=True)
  schedule = schedule or StageSchedule()
  acc = validation.accumulator_dtype(accumulator_dtype)

  def init_fn(params):
    if acc is None:
      validation.check_dual_average_dtypes(params)
    dt = scalar_dtype()
    # A copy, never the params' own buffer: a step that donates both the params
    # and the state must not be handed the same buffer twice.
    cast = lambda x: jnp.array(x, dtype=acc, copy=True)
    return DualAveragingState(
        count=jnp.zeros([], jnp.int32),
        alpha=jnp.zeros([], dt),
        alpha_compensation=jnp.zeros([], dt),
        centre=jax.tree.map(cast, params),
        sum_grad=optax.tree.zeros_like(params, dtype=acc),
    )

  def update_fn(updates, state, params=None):
    check_stage_input("dual_averaging", updates, None)
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    dt = scalar_dtype()
    t = state.count
    restart = schedule.is_restart(t)
    lr = learning_rate(t) if callable(learning_rate) else learning_rate
    lr = schedule.decay(jnp.asarray(lr, dt), t)
    k = (t - schedule.stage_start(t) + 1).astype(dt)
    beta = jnp.sqrt(k)
    s = lr * beta
    # alpha <- alpha + s, Kahan-compensated.
    alpha0 = jnp.where(restart, 0, state.alpha)
    comp0 = jnp.where(restart, 0, state.alpha_compensation)
    y = s - comp0
    alpha = alpha0 + y
    comp = (alpha - alpha0) - y

    # x0 changes only at a restart: a scalar branch, not an elementwise
    # select, so the other steps do not read x and x0 and write x0 back (with
    # the state donated, the untaken branch is the old buffer, no copy). The
    # averages' resets below are selects fused into the passes that write V
    # and U anyway, so they cost no extra memory traffic (BENCHMARKS.md,
    # "Profile").
    centre = jax.lax.cond(
        restart,
        lambda: jax.tree.map(lambda c, x: x.astype(c.dtype), state.centre, params),
        lambda: state.centre,
    )
    sum_grad = jax.tree.map(
        lambda v, g: jnp.where(restart, 0, v) + s.astype(v.dtype) * g.astype(v.dtype),
        state.sum_grad,
        updates,
    )
    out = DualAverage(
        grad=updates,
        weight=s,
        beta=beta,
        alpha=alpha,
        centre=centre,
        linear=sum_grad,
        restart=restart,
        count=t,
    )
    return out, DualAveragingState(
        numerics.safe_increment(t), alpha, comp, centre, sum_grad
    )

  return base.GradientTransformation(init_fn, update_fn)
