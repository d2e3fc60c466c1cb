"""Momentum stages of ProxGen (Adam moments) and ProxSGD (ALGORITHMS.md §4, §5).

Each turns gradients into the :class:`Subproblem` centred at the current
params, for the solve stage.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import base, numerics

from optax_ramda._src import validation
from optax_ramda._src.dual_averaging import scalar_dtype
from optax_ramda._src.schedule import StageSchedule
from optax_ramda._src.subproblem import Subproblem, check_stage_input


def _learning_rate(learning_rate, schedule: StageSchedule, t: jax.Array) -> jax.Array:
  lr = learning_rate(t) if callable(learning_rate) else learning_rate
  return schedule.decay(jnp.asarray(lr, scalar_dtype()), t)


class AdamSubproblemState(NamedTuple):
  count: jax.Array  # type: ignore[assignment]  # int32, steps taken
  mu: base.Updates  # m
  nu: base.Updates  # v


def adam_subproblem(
    learning_rate: base.ScalarOrSchedule,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    schedule: StageSchedule | None = None,
    accumulator_dtype: Any | None = None,
) -> base.GradientTransformation:
  r"""ProxGen's subproblem from AdamW moments (ALGORITHMS.md §4).

  With ``k`` the 1-based step and ``x`` the params::

    centre = x * (1 - lr * weight_decay)           (decoupled decay first)
    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g * g
    D = sqrt(v) / sqrt(1 - b2^k) + eps
    linear = (lr / (1 - b1^k)) * m ;  metric = D ;  scale = lr

  (``linear`` is passed as ``m`` with ``linear_scale = lr / (1 - b1^k)``,
  and ``centre`` as ``x`` with ``centre_scale = 1 - lr * weight_decay``: see
  :class:`Subproblem`.)

  The warm start is the centre. ``lr`` decays by the schedule's ``gamma`` at
  each milestone (no restart).

  References:
    Yun, Lozano & Yang, *Adaptive Proximal Gradient Methods for Structured
    Neural Networks*, NeurIPS 2021.
  """
  validation.check_positive("learning_rate", learning_rate, scheduled_zero=True)
  validation.check_unit_interval("b1", b1)
  validation.check_unit_interval("b2", b2)
  validation.check_positive("eps", eps)
  validation.check_non_negative("weight_decay", weight_decay)
  schedule = schedule or StageSchedule()
  acc = validation.accumulator_dtype(accumulator_dtype)

  def init_fn(params):
    return AdamSubproblemState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=acc),
        nu=optax.tree.zeros_like(params, dtype=acc),
    )

  def update_fn(updates, state, params=None):
    check_stage_input("adam_subproblem", updates, None)
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    t = state.count
    lr = _learning_rate(learning_rate, schedule, t)
    dt = lr.dtype
    k = (t + 1).astype(dt)
    b1_, b2_ = jnp.asarray(b1, dt), jnp.asarray(b2, dt)
    bc1 = 1 - b1_**k
    bc2 = 1 - b2_**k
    a = lr / bc1
    decay = 1 - lr * jnp.asarray(weight_decay, dt)
    # Exactly 1 but not a constant, so the metric ends in a division (exact):
    # XLA's CPU backend then stores D once for its readers (the exact solver's
    # stacked P, b = D x0 - V, the final pass) instead of storing sqrt(v) and
    # recomputing the rest in each, one parameter copy more (BENCHMARKS.md,
    # "ProxGen's linear term", last paragraph).
    one = 1 + 0 * k

    def moments(m, v, g):
      # In at least float32: in bfloat16 b2 = 0.999 rounds to 1, and v would
      # stay 0 (the metric then eps, the step lr * m / eps). float32 and
      # float64 moments are computed in their own dtype, as before.
      w = jnp.promote_types(m.dtype, jnp.float32)
      g = g.astype(w)
      c1, c2 = b1_.astype(w), b2_.astype(w)
      m_new = c1 * m.astype(w) + (1 - c1) * g
      v_new = c2 * v.astype(w) + (1 - c2) * g * g
      return m_new.astype(m.dtype), v_new.astype(v.dtype)

    mv = jax.tree.map(moments, state.mu, state.nu, updates)
    mu = jax.tree.map(lambda _, pair: pair[0], state.mu, mv)
    nu = jax.tree.map(lambda _, pair: pair[1], state.nu, mv)
    sub = Subproblem(
        centre=params,  # times centre_scale, and linear times linear_scale: the
        linear=mu,  # solve stage forms x * decay and a * m where it uses them
        linear_scale=a,
        centre_scale=decay,
        metric=jax.tree.map(
            lambda v: (jnp.sqrt(v) / jnp.sqrt(bc2).astype(v.dtype) + jnp.asarray(eps, v.dtype))
            / one.astype(v.dtype),
            nu,
        ),
        scale=lr,
        warm_start=jax.tree.map(lambda x: x * decay.astype(x.dtype), params),
    )
    return sub, AdamSubproblemState(numerics.safe_increment(t), mu, nu)

  return base.GradientTransformation(init_fn, update_fn)


class SgdSubproblemState(NamedTuple):
  count: jax.Array  # type: ignore[assignment]  # int32, steps taken
  momentum_buffer: base.Updates  # buf


def sgd_subproblem(
    learning_rate: base.ScalarOrSchedule,
    momentum: Any = 0.1,
    schedule: StageSchedule | None = None,
    accumulator_dtype: Any | None = None,
) -> base.GradientTransformation:
  r"""ProxSGD's subproblem (ALGORITHMS.md §5).

  ``buf <- (1 - c) buf + c g`` (from ``buf = 0``, no bias correction), then
  centre ``x``, linear ``lr * buf``, scalar metric 1, scale ``lr``: the solve
  stage returns ``prox_{lr psi}(x - lr buf)``.

  The linear term is passed as ``linear = buf`` with ``linear_scale = lr``,
  and ``lr`` as a run-time scalar (``lr + 0 * count``, exactly ``lr``): the
  group prox then multiplies ``buf`` by a scalar in each of its two passes
  instead of reading a stored ``lr * buf``. XLA's CPU backend does not fuse a
  compile-time constant into its library reductions, so with a constant
  ``lr`` it stored ``lr * buf`` as a parameter-sized temporary (BENCHMARKS.md,
  "Scalar-metric prox without a temporary").

  References:
    Yang, Yuan, Chatzimichailidis, van Sloun, Lei & Chatzinotas, *ProxSGD:
    Training Structured Neural Networks under Regularization and
    Constraints*, ICLR 2020.
  """
  validation.check_positive("learning_rate", learning_rate, scheduled_zero=True)
  validation.check_momentum("momentum", momentum)
  schedule = schedule or StageSchedule()
  acc = validation.accumulator_dtype(accumulator_dtype)

  def init_fn(params):
    return SgdSubproblemState(
        jnp.zeros([], jnp.int32), optax.tree.zeros_like(params, dtype=acc)
    )

  def update_fn(updates, state, params=None):
    check_stage_input("sgd_subproblem", updates, None)
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    t = state.count
    lr = _learning_rate(learning_rate, schedule, t)
    c = jnp.asarray(momentum, lr.dtype)
    lr = lr + 0 * t.astype(lr.dtype)  # exactly lr, but not a constant (docstring)

    def ema(b, g):
      cc = c.astype(b.dtype)
      return (1 - cc) * b + cc * g.astype(b.dtype)

    buf = jax.tree.map(ema, state.momentum_buffer, updates)
    sub = Subproblem(
        centre=params,
        linear=buf,
        metric=jax.tree.map(lambda b: jnp.ones([], b.dtype), buf),
        scale=lr,
        warm_start=params,
        linear_scale=lr,
    )
    return sub, SgdSubproblemState(numerics.safe_increment(t), buf)

  return base.GradientTransformation(init_fn, update_fn)
