"""Metrics for the dual-averaged subproblem: RAMDA's cube root, RMDA's sqrt(k)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import base

from optax_ramda._src import validation
from optax_ramda._src.schedule import StageSchedule
from optax_ramda._src.subproblem import DualAverage, Subproblem, check_stage_input

# Per working dtype: unsigned int of the same width, the bias of the bit-level
# first guess (FreeBSD's s_cbrtf.c / s_cbrt.c ``B1``, for float64 in the high
# word), the range ``[2^-k, 2^k]`` outside which ``u`` is rescaled by
# ``2^(-+3m)`` (result by ``2^(+-m)``) so that no intermediate overflows or
# goes subnormal, and the number of Halley steps before the Newton correction.
_CBRT = {
    jnp.dtype(jnp.float32): (jnp.uint32, 709958130, 60, 30, 1),
    jnp.dtype(jnp.float64): (jnp.uint64, 715094163 << 32, 900, 300, 2),
}


@jax.jit
def cube_root(u: jax.Array, offset: Any = 0) -> jax.Array:
  """``cbrt(u) + offset`` for ``u >= 0``, fast on every backend (``cbrt(0) = 0``).

  ``offset`` (a scalar, e.g. RAMDA's ``eps``) is added inside the last
  operation (see 5.): for float32 and float64 ``u`` bit for bit
  ``cube_root(u) + offset``; low-precision ``u`` is rounded once, after the
  addition.

  RAMDA's metric ``P = cbrt(U) + eps`` (ALGORITHMS.md §2) is computed over
  every parameter at every step. XLA's CPU ``cbrt`` is not vectorised (3.9-7.9
  ms on 1e6 float32 entries against 0.13-0.19 ms for a multiply), and ``exp(log(u) /
  3)`` costs a ``log`` and two ``exp`` (XLA rewrites the Newton step's
  division into a third transcendental) and is materialised in three passes
  (BENCHMARKS.md, "Cube root"). Here only multiplies, adds and divides, which
  vectorise and fuse with the rest of the update:

  1. ``u`` outside ``[2^-k, 2^k]`` is scaled by a power of ``2^3`` (exact;
     the root by its cube root), so no intermediate below overflows or
     becomes subnormal;
  2. first guess from the bits, ``bits(u) / 3 + B1`` (relative error < 4%,
     the classic bit trick of FreeBSD's ``cbrt``);
  3. Halley steps ``y <- y (y^3 + 2u) / (2 y^3 + u)`` (cubic convergence:
     one in float32, two in float64);
  4. one Newton correction ``y <- y - (y - u / y^2) / 3``, which rounds to
     within about 1 ulp (measured 0.73 ulp in both float32 and float64 over
     1e-20..1e20, where ``jnp.cbrt`` had 0.95 and 3.2);
  5. the result is ``(y * [u > 0] + offset * 2^s) / 2^s``, with ``2^s`` the
     inverse of step 1's scaling of the root: a division by a power of two,
     so exact, and it makes a division the last operation, which XLA does
     not duplicate into the several passes that read the metric (the exact
     solver's); it materialises ``P`` once instead of re-reading the cube
     root's intermediates in each pass (BENCHMARKS.md, "Profile").

  ``+inf`` gives ``+inf`` and NaN gives NaN, as ``jnp.cbrt`` does. Low-precision
  inputs are computed in float32. Jitted: inside an update it
  is traced once per leaf shape and dtype instead of once per leaf (a
  third of the trace time of a 196-leaf update), and XLA inlines it.
  """
  dt = u.dtype
  work = jnp.promote_types(dt, jnp.float32)
  u = u.astype(work)
  utype, bias, k, m, halley = _CBRT[jnp.dtype(work)]
  pos = u > 0
  small = u < 2.0**-k
  big = u > 2.0**k
  c = lambda e: jnp.asarray(2.0**e, work)
  scale_in = jnp.where(small, c(3 * m), jnp.where(big, c(-3 * m), c(0)))
  unscale = jnp.where(small, c(m), jnp.where(big, c(-m), c(0)))
  a = jnp.where(pos, u, 1) * scale_in
  bits = jax.lax.bitcast_convert_type(a, utype)
  y = jax.lax.bitcast_convert_type(bits // 3 + jnp.asarray(bias, utype), work)
  for _ in range(halley):
    y3 = y * y * y
    y = y * ((y3 + 2 * a) / (2 * y3 + a))
  y = y - (y - a / (y * y)) * (1 / 3)
  # Step 5: exact, as scaling by a power of two commutes with rounding. A
  # non-finite u passes through (cbrt(inf) = inf, NaN stays NaN): an overflowed
  # U gives P = inf, a zero step for an unregularized entry (as madgrad), and NaN
  # from the group solvers for a regularized one, where a NaN P made the screen
  # zero the group silently.
  off = jnp.asarray(offset, work)
  num = jnp.where(jnp.isfinite(u), y * pos.astype(work) + off * unscale, u)
  return (num / unscale).astype(dt)


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
  acc = validation.accumulator_dtype(accumulator_dtype)

  def init_fn(params):
    return CubeRootMetricState(optax.tree.zeros_like(params, dtype=acc))

  def update_fn(da: DualAverage, state, params=None):
    check_stage_input("cube_root_metric", da, DualAverage)
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    s = da.weight

    def accumulate(u, g):
      g = g.astype(u.dtype)
      return jnp.where(da.restart, 0, u) + s.astype(u.dtype) * g * g

    sum_sq = jax.tree.map(accumulate, state.sum_sq_grad, da.grad)
    eps_t = schedule.decay(jnp.asarray(eps, s.dtype), da.count)
    metric = jax.tree.map(lambda u: cube_root(u, eps_t.astype(u.dtype)), sum_sq)
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
    check_stage_input("sqrt_count_metric", da, DualAverage)
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    metric = jax.tree.map(lambda _: da.beta, da.centre)
    sub = Subproblem(
        centre=da.centre, linear=da.linear, metric=metric, scale=da.alpha,
        warm_start=params,
    )
    return sub, state

  return base.GradientTransformation(init_fn, update_fn)
