"""Exact solver of the diagonally-scaled group-LASSO subproblem (ALGORITHMS.md §6).

For one group with ``b = P * x0 - V`` (so the centre is ``y = b / P``),
metric ``p_i > 0`` and threshold ``t > 0``, the minimiser of
``Q_g(z) = 1/2 <z - y, p (z - y)> + t ||z||`` is (spec §6, "Exact solution"):

* ``z = 0`` iff ``||b|| <= t`` (the screening test of the paper's solver);
* otherwise ``z_i = b_i r / (p_i r + t)`` with ``r = ||z|| > 0`` the unique
  root of the secular equation ``sum_i (b_i / (p_i r + t))^2 = 1``.

Scaling. With ``pmax = max_i p_i``, ``nb = ||b||``, ``tau = t / nb`` (in
``(0, 1)`` for a kept group), ``u = b / nb`` (a unit vector), ``ph = p / pmax``
(in ``[0, 1]``) and ``rh = r * pmax / nb`` the equation reads::

  phi(rh) = 1 / ||q(rh)|| - 1 = 0,     q_i = u_i / (ph_i rh + tau)

in numbers of order one whatever the magnitudes of ``p``, ``b`` and ``t``
(metrics spanning 1e-8..1e8 do not overflow float32), and
``z_i = (b_i / pmax) rh / (ph_i rh + tau)``.

Newton. ``phi`` is increasing and concave, so Newton's method from any point
left of the root climbs monotonically to it. We start at the lower bound
``rh0 = 1 - tau`` (from ``||q(rh)|| >= 1 / (rh + tau)``), which is the root
itself when all ``p_i`` are equal (then 0 Newton steps), and is near 0
exactly at the screening boundary, where the root is near 0 too: no
cancellation-prone division by a tiny root is ever made. The Newton step is
``rh += S2 (sqrt(S2) - 1) / S3`` with ``S2 = sum q_i^2`` and
``S3 = sum q_i^2 ph_i / (ph_i rh + tau)``. A group stops on its own when its
step is not larger than ``4 eps_machine * rh`` (never on ``phi == 0``), and
then keeps its bits, so its answer does not depend on the other groups (the
same under ``jit``, ``vmap`` and any batching of leaves). All groups of all
leaves share one ``lax.while_loop``, capped at ``max_newton`` steps.

Diagnostics. At the root ``p * (z - y) + t z / ||z|| = 0``; at an iterate
``rh`` the residual of that optimality condition is
``t |1 / ||q(rh)|| - 1|`` per group, i.e. the secular residual times ``t``;
the leaf's ``residual`` is the Euclidean norm of these over its groups (the
norm of the minimum-norm subgradient of ``Q`` at ``z``, see
``solvers.subgradient_norm``), from the last Newton evaluation, so it costs
nothing extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from optax_ramda._src.groups import GroupLeaf
from optax_ramda._src.solvers import LeafProblem, LeafSolution, unregularized_point

DEFAULT_MAX_NEWTON = 40


class _Scaled(NamedTuple):
  u: jax.Array  # b / ||b|| (full shape)
  ph: jax.Array  # p / pmax (full shape)
  tau: jax.Array  # t / ||b|| per group (keepdims)
  keep: jax.Array  # per group: ||b|| > t and t > 0
  b_over_pmax: jax.Array  # full shape


def _scale(leaf: GroupLeaf, p: LeafProblem) -> tuple[_Scaled, jax.Array]:
  t = p.threshold
  b = p.metric * p.centre - p.linear
  nb = leaf.norm(b)
  keep = (nb > t) & (t > 0)
  # Per-group reciprocals, so the full-size arrays need multiplies only.
  inv_nb = jnp.where(keep, 1 / jnp.where(keep, nb, 1), 0)
  pmax = leaf.max(p.metric)
  inv_pmax = 1 / jnp.where(pmax > 0, pmax, 1)
  tau = jnp.where(keep, t * inv_nb, 1)
  rh0 = jnp.where(keep, 1 - tau, 0)
  return _Scaled(b * inv_nb, p.metric * inv_pmax, tau, keep, b * inv_pmax), rh0


def _secular(leaf: GroupLeaf, s: _Scaled, rh: jax.Array):
  w = 1 / (s.ph * rh + s.tau)
  q = s.u * w
  q2 = q * q
  s2 = leaf.sum(q2)
  s3 = leaf.sum(q2 * (s.ph * w))
  return s2, s3


def _newton_step(leaf: GroupLeaf, s: _Scaled, rh: jax.Array):
  """One guarded Newton step; returns (new rh, step, secular residual)."""
  s2, s3 = _secular(leaf, s, rh)
  root = jnp.sqrt(s2)
  ok = s.keep & (s3 > 0) & (s2 > 0)
  step = jnp.where(ok, s2 * (root - 1) / jnp.where(ok, s3, 1), 0)
  # Monotone from the left: a non-positive step means rounding already put us
  # at the root; never step backwards.
  rh_new = jnp.where(step > 0, rh + step, rh)
  secular = jnp.where(s.keep & (s2 > 0), jnp.abs(1 / jnp.where(s2 > 0, root, 1) - 1), 0)
  return rh_new, step, secular


def _finish(leaf: GroupLeaf, p: LeafProblem, s: _Scaled, rh: jax.Array) -> jax.Array:
  z = s.b_over_pmax * rh / (s.ph * rh + s.tau)
  z = jnp.where(s.keep, z, 0)
  # t == 0: the leaf is unregularized (spec §6 item 7), never pushed through the prox.
  return jnp.where(p.threshold > 0, z, unregularized_point(p))


def exact_solve(
    leaves: Sequence[GroupLeaf],
    problems: Sequence[LeafProblem],
    rtol: Any = None,
    max_iters: Any = None,
    min_iters: Any = None,
    subgradient_tol: Any = None,
    track_residual: bool = False,
    max_newton: int = DEFAULT_MAX_NEWTON,
) -> list[LeafSolution]:
  """Exact scaled group-LASSO prox for several leaves in one ``lax.while_loop``.

  ``rtol``, ``max_iters``, ``min_iters`` and ``subgradient_tol`` (the PG
  solvers' stopping rules) are accepted for a common signature and ignored:
  each group's Newton iteration stops on its own relative step, with at most
  ``max_newton`` steps (static) for all. ``track_residual`` is ignored too:
  the residual is a by-product of the last Newton evaluation and is always
  returned.

  Example::

    leaf = group_leaf(GroupSpec((1,)), x0, "w")
    z = exact_solve([leaf], [LeafProblem(x0, V, P, x0, t)])[0].z

  Returns, per leaf, ``z``, the Newton steps taken by its slowest group
  (``iterations``), ``relative_decrease = 0`` and ``residual``, the norm of
  ``t (1/||q|| - 1)`` over its groups at the last evaluation.
  """
  del rtol, max_iters, min_iters, subgradient_tol, track_residual
  if not problems:
    return []
  scaled, rhs = zip(*(_scale(leaf, p) for leaf, p in zip(leaves, problems)))
  dones = tuple(jnp.logical_not(s.keep) for s in scaled)
  iters = tuple(jnp.zeros(jnp.shape(r), jnp.int32) for r in rhs)
  secs = tuple(jnp.zeros_like(r) for r in rhs)

  def cond(carry):
    i, _, done, _, _ = carry
    return (i < max_newton) & jnp.logical_not(jnp.all(jnp.stack([jnp.all(d) for d in done])))

  def body(carry):
    i, rhs, dones, iters, secs = carry
    out = ([], [], [], [])
    for leaf, s, rh, done, it, sec in zip(leaves, scaled, rhs, dones, iters, secs):
      rh_new, step, sec_new = _newton_step(leaf, s, rh)
      eps = jnp.finfo(rh.dtype).eps
      stop = step <= 4 * eps * rh_new
      out[0].append(jnp.where(done, rh, rh_new))
      out[1].append(done | stop)
      out[2].append(jnp.where(done, it, it + 1))
      out[3].append(jnp.where(done, sec, sec_new))
    return (i + 1, *(tuple(o) for o in out))

  carry = (jnp.zeros([], jnp.int32), tuple(rhs), dones, iters, secs)
  _, rhs, _, iters, secs = lax.while_loop(cond, body, carry)
  sols = []
  for leaf, p, s, rh, it, sec in zip(leaves, problems, scaled, rhs, iters, secs):
    z = _finish(leaf, p, s, rh)
    res = jnp.sqrt(jnp.sum(jnp.square(p.threshold * sec)))
    sols.append(
        LeafSolution(
            z,
            jnp.max(it, initial=0).astype(jnp.int32),
            jnp.zeros([], z.dtype),
            res.astype(z.dtype),
        )
    )
  return sols


def exact_group_prox(leaf: GroupLeaf, problem: LeafProblem) -> jax.Array:
  """``z`` of :func:`exact_solve` for a single leaf (convenience)."""
  return exact_solve([leaf], [problem])[0].z
