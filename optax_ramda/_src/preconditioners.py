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
    metric = jax.tree.map(lambda u: jnp.cbrt(u) + eps_t.astype(u.dtype), sum_sq)
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
