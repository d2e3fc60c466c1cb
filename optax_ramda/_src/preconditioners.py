"""Metrics for the dual-averaged subproblem: RAMDA's cube root, RMDA's sqrt(k)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import base

from optax_ramda._src import validation
from optax_ramda._src.schedule import StageSchedule
from optax_ramda._src.subproblem import DualAverage, Subproblem


def cube_root(u: jax.Array) -> jax.Array:
  """``cbrt(u)`` for ``u >= 0``, fast on every backend (``cbrt(0) = 0``).

  XLA's CPU ``cbrt`` is not vectorised: on 1e6 float32 entries it took 7.9 ms
  against 0.16 ms for a multiply (BENCHMARKS.md, "Cube root"), which made it
  the largest elementwise cost of a RAMDA update. Here ``exp(log(u) / 3)``
  (vectorised) is refined by one Newton step for ``y^3 = u``,
  ``y <- y - (y - u / y^2) / 3``, which brings it to within about 1 ulp of the
  correctly rounded root, as accurate as ``jnp.cbrt`` (measured over
  1e-20..1e20: max 1.25 ulp in float32, 2 ulp in float64, where
  ``jnp.cbrt`` had 0.96 and 3). Low-precision inputs are computed in float32.
  """
  dt = u.dtype
  work = jnp.promote_types(dt, jnp.float32)
  u = u.astype(work)
  pos = u > 0
  safe = jnp.where(pos, u, 1)
  y = jnp.exp(jnp.log(safe) * (1 / 3))
  y = y - (y - safe / (y * y)) * (1 / 3)
  return jnp.where(pos, y, 0).astype(dt)


class CubeRootMetricState(NamedTuple):
  """State of :func:`cube_root_metric`: ``U``, the weighted sum of ``g * g``."""

  sum_sq_grad: base.Updates


def cube_root_metric(
    eps: Any = 1e-6,
    schedule: StageSchedule | None = None,
    accumulator_dtype: Any | None = None,
) -> base.GradientTransformation:
  r"""RAMDA's adaptive diagonal metric (ALGORITHMS.md §2).

  Takes the :class:`DualAverage` of :func:`dual_averaging` and returns the
  :class:`Subproblem`::

    U <- U + s * g * g          (U = 0 at a restart)
    P  = cbrt(U) + eps          (eps outside the cube root)

  with centre ``x0``, linear term ``V``, scale ``alpha`` and the current
  params as warm start. ``eps`` is multiplied by the schedule's ``gamma`` at
  each milestone, as in the paper.

  Args:
    eps: ``eps`` (> 0).
    schedule: the stage-wise schedule; ``None``: one stage.
    accumulator_dtype: dtype of ``U``; ``None``: the params'.

  References:
    Huang & Lee, NeurIPS 2024, arXiv:2403.14398.
  """
  validation.check_positive("eps", eps)
  schedule = schedule or StageSchedule()
  acc = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)

  def init_fn(params):
    return CubeRootMetricState(optax.tree.zeros_like(params, dtype=acc))

  def update_fn(da: DualAverage, state, params=None):
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    s = da.weight

    def accumulate(u, g):
      g = g.astype(u.dtype)
      return jnp.where(da.restart, 0, u) + s.astype(u.dtype) * g * g

    sum_sq = jax.tree.map(accumulate, state.sum_sq_grad, da.grad)
    eps_t = schedule.decay(jnp.asarray(eps, s.dtype), da.count)
    metric = jax.tree.map(lambda u: cube_root(u) + eps_t.astype(u.dtype), sum_sq)
    sub = Subproblem(
        centre=da.centre, linear=da.linear, metric=metric, scale=da.alpha,
        warm_start=params,
    )
    return sub, CubeRootMetricState(sum_sq)

  return base.GradientTransformation(init_fn, update_fn)


def sqrt_count_metric() -> base.GradientTransformation:
  r"""RMDA's scalar metric ``P = beta = sqrt(k)`` (ALGORITHMS.md §3).

  Takes the :class:`DualAverage` of :func:`dual_averaging` and returns the
  :class:`Subproblem` with a scalar metric, which the solve stage answers in
  closed form: ``z = prox_{(alpha/beta) psi}(x0 - V / beta)``. Stateless.

  References:
    Huang & Lee, ICLR 2022, arXiv:2112.02612.
  """

  def init_fn(params):
    del params
    return base.EmptyState()

  def update_fn(da: DualAverage, state, params=None):
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    metric = jax.tree.map(lambda _: da.beta, da.centre)
    sub = Subproblem(
        centre=da.centre, linear=da.linear, metric=metric, scale=da.alpha,
        warm_start=params,
    )
    return sub, state

  return base.GradientTransformation(init_fn, update_fn)
