"""Solvers of the diagonally-scaled group-LASSO subproblem (ALGORITHMS.md §6).

For one regularized leaf with centre ``x0``, linear term ``V``, diagonal
metric ``P`` and per-group threshold ``t = scale * strength * sqrt(|g|)``::

  Q(z) = <V, z - x0> + 1/2 <z - x0, P * (z - x0)> + t * sum_g ||z_g||

:func:`pg_solve` is the proximal-gradient solver of the paper's experiments,
with the exact semantics of the reference traces:

1. screening: group g is 0 iff ``||(P * x0 - V)_g|| <= t``; screened groups
   never enter the iteration (they stay exactly 0);
2. no kept group: ``z = 0`` with 0 iterations;
3. per-group step ``eta_g = 1 / max_{i in g} P_i``;
4. start from the warm start on kept groups, ``prev = Q(start)`` summed over
   kept groups only;
5. ``z <- z - eta * (V + P * (z - x0))``, then block soft-threshold with
   ``eta_g * t``; ``cur = Q(z)`` (regulariser term from the post-prox norms);
   stop when ``i + 1 >= min_iters`` and ``(prev - cur) / (|cur| + 1) < rtol``
   or when ``i + 1 == max_iters``;
6. each leaf stops on its own;
7. with ``t == 0`` (no strength) the leaf is unregularized:
   ``z = x0 - V / P``.

Loop layout. Each leaf stops on its own in either of two layouts, with the
same bits per leaf: :func:`pg_solve_per_leaf` runs one ``lax.while_loop`` per
leaf (``solver="pg"``); :func:`pg_solve` runs all leaves in one
``lax.while_loop`` whose carry holds a ``done`` flag per leaf, a finished
leaf being frozen with ``jnp.where`` (``solver="pg_fused"``). Measured in
BENCHMARKS.md "Solver loop layout" (60, 200 and 8 leaves, paper settings):
per-leaf loops ran 1.1-2.3x faster per update and compiled 1.1-1.7x slower.
The fused loop does every leaf's arithmetic until the slowest leaf stops and
streams all leaves through memory on every sweep; a per-leaf loop sweeps one
leaf's arrays, which stay in cache, only until that leaf stops. Run time is
paid every step and compile time once, so ``"pg"`` is per leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from optax_ramda._src.groups import GroupLeaf


class LeafProblem(NamedTuple):
  """One regularized leaf's subproblem, in its compute dtype.

  The linear term ``V`` is ``linear``, or ``linear_scale * linear`` when
  ``linear_scale`` (a scalar) is given, and the centre ``x0`` likewise
  ``centre * centre_scale``: ProxGen's ``(lr / (1 - b1^k)) m`` and
  ``x (1 - lr weight_decay)`` come unmultiplied, so that the exact solver's
  chunked solves form them a chunk at a time instead of as full-size
  temporaries (BENCHMARKS.md, "ProxGen's linear term").
  :meth:`scaled_linear` is ``V`` and :meth:`scaled_centre` is ``x0``; the PG
  solvers take :meth:`folded` problems.
  """

  centre: jax.Array  # x0, or x0 / centre_scale
  linear: jax.Array  # V, or V / linear_scale
  metric: jax.Array  # P (diagonal, same shape)
  warm_start: jax.Array
  threshold: jax.Array  # t (scalar): scale * strength * sqrt(|g|)
  linear_scale: jax.Array | None = None  # None, or a scalar: V = linear_scale * linear
  centre_scale: jax.Array | None = None  # None, or a scalar: x0 = centre * centre_scale

  def scaled_linear(self) -> jax.Array:
    """``V``: ``linear_scale * linear`` in ``linear``'s dtype, or ``linear``."""
    if self.linear_scale is None:
      return self.linear
    return jnp.asarray(self.linear_scale).astype(self.linear.dtype) * self.linear

  def scaled_centre(self) -> jax.Array:
    """``x0``: ``centre * centre_scale`` in ``centre``'s dtype, or ``centre``."""
    if self.centre_scale is None:
      return self.centre
    return self.centre * jnp.asarray(self.centre_scale).astype(self.centre.dtype)

  def folded(self) -> LeafProblem:
    """The same problem with ``x0`` and ``V`` in ``centre`` and ``linear`` (no scales)."""
    if self.linear_scale is None and self.centre_scale is None:
      return self
    return self._replace(centre=self.scaled_centre(), linear=self.scaled_linear(),
                         linear_scale=None, centre_scale=None)


NOT_MEASURED = -1.0
"""The ``residual`` of a leaf whose optimality residual was not computed.

A norm is never negative, so -1 cannot be mistaken for a measurement; it is
finite, so optimizer states stay finite (``jax_debug_nans`` and
``chex.assert_tree_all_finite`` on the state keep working).
"""


class LeafSolution(NamedTuple):
  """A solver's answer for one leaf, with diagnostics."""

  z: jax.Array
  iterations: jax.Array  # int32 scalar
  relative_decrease: jax.Array  # scalar; (prev - cur) / (|cur| + 1) at the stop
  # scalar; norm of the minimum-norm subgradient of Q at z, or NOT_MEASURED
  residual: jax.Array


def unregularized_point(p: LeafProblem) -> jax.Array:
  """``y = x0 - V / P``: the subproblem's solution without regularizer.

  The metric is positive (ALGORITHMS.md §6), so ``|P| == P`` bit for bit; the
  ``abs`` only hides from XLA that ``P`` may end in a division (the fast cube
  root of RAMDA's metric does, by design): its simplifier rewrites
  ``V / (B / C)`` as ``(V * C) / B``, which made every pass that reads ``P``
  recompute the cube root from its intermediates, stored as three extra
  full-size temporaries (BENCHMARKS.md, "Profile").
  """
  return p.scaled_centre() - p.scaled_linear() / jnp.abs(p.metric)


def subgradient_norm(leaf: GroupLeaf, p: LeafProblem, z: jax.Array) -> jax.Array:
  """``dist(0, dQ(z))``: the norm of the minimum-norm subgradient of ``Q`` at ``z``.

  With ``G = V + P * (z - x0)`` (the gradient of the smooth part), per group:
  ``||G_g + t z_g / ||z_g||||`` where ``z_g != 0`` and ``max(||G_g|| - t, 0)``
  where ``z_g == 0``; the leaf's value is the Euclidean norm over groups. It is
  0 exactly at the minimiser (ALGORITHMS.md §6 optimality conditions) and is
  the quantity of the paper's formal inexactness condition (§6). With
  ``t == 0`` the leaf is unregularized and its ``z`` exact: 0.
  """
  t = p.threshold
  g = p.linear + p.metric * (z - p.centre)
  nz = leaf.norm(z)
  nonzero = nz > 0
  unit = z / jnp.where(nonzero, nz, 1)
  on = leaf.norm(g + t * unit)
  off = jnp.maximum(leaf.norm(g) - t, 0)
  per_group = jnp.where(nonzero, on, off)
  return jnp.where(t > 0, jnp.sqrt(jnp.sum(per_group * per_group)), 0)


def _smooth(p: LeafProblem, z: jax.Array, keep: jax.Array) -> jax.Array:
  d = z - p.centre
  return jnp.sum(jnp.where(keep, p.linear * d + 0.5 * (d * (p.metric * d)), 0))


class _PGLeaf(NamedTuple):
  keep: jax.Array  # per group, keepdims
  eta: jax.Array  # per group, keepdims
  active: jax.Array  # scalar bool: t > 0


def _pg_setup(leaf: GroupLeaf, p: LeafProblem):
  t = p.threshold
  keep = leaf.norm(p.metric * p.centre - p.linear) > t
  eta = 1 / leaf.max(p.metric)
  z = jnp.where(keep, p.warm_start, 0)
  prev = _smooth(p, z, keep) + t * jnp.sum(jnp.where(keep, leaf.norm(z), 0))
  active = t > 0
  done = jnp.logical_not(active & jnp.any(keep))
  return _PGLeaf(keep, eta, active), z, prev, done


def _pg_step(leaf: GroupLeaf, p: LeafProblem, s: _PGLeaf, z: jax.Array):
  z = z - s.eta * (p.linear + p.metric * (z - p.centre))
  z, r = leaf.shrink(z, s.eta * p.threshold)
  z = jnp.where(s.keep, z, 0)
  cur = _smooth(p, z, s.keep) + p.threshold * jnp.sum(jnp.where(s.keep, r, 0))
  return z, cur


def pg_solve(
    leaves: Sequence[GroupLeaf],
    problems: Sequence[LeafProblem],
    rtol: Any,
    max_iters: Any,
    min_iters: Any,
    subgradient_tol: Any = None,
    track_residual: bool = False,
) -> list[LeafSolution]:
  """The paper's PG solver for several leaves in one ``lax.while_loop``.

  With ``subgradient_tol = None`` it stops on the relative decrease of ``Q``
  (the rule of the paper's experiments, module docstring). With a number
  ``eps_t`` it uses instead the paper's formal inexactness condition
  (ALGORITHMS.md §6): a leaf stops at the first iteration ``i + 1 >=
  min_iters`` where ``subgradient_norm(z) <= eps_t`` and ``Q(z) <=
  Q(warm start)`` (the latter over kept groups, which implies it for the full
  ``Q`` because 0 minimises each screened group's part), or at ``max_iters``.
  ``rtol`` is then unused. The returned point is always post-prox, so zeros
  are exact.

  Diagnostics per leaf: ``iterations`` (sweeps), ``relative_decrease`` at the
  stop (free: the stopping quantity of the default rule) and ``residual``,
  ``subgradient_norm`` at the returned ``z``. The residual costs an extra
  elementwise pass with group reductions, so it is computed only when asked
  (``track_residual=True``, static) or when it is the stopping quantity
  (``subgradient_tol`` set: then it is the value of the last stopping test,
  no extra pass). Otherwise it is :data:`NOT_MEASURED` (-1), except on leaves
  that needed no iteration (every group screened, or ``t == 0``), whose ``z``
  is exact: 0 there.
  """
  if not problems:
    return []
  setups, zs, prevs, dones = zip(*(_pg_setup(leaf, p) for leaf, p in zip(leaves, problems)))
  starts = prevs
  # zeros_like the leaf's data, as the loop updates them (varying.py).
  iters = tuple(jnp.zeros_like(prev, jnp.int32) for prev in prevs)
  rels = tuple(jnp.zeros_like(prev) for prev in prevs)
  # The residual at z, carried only when it is the stopping quantity. Leaves
  # done before the first sweep are exact (all screened, or t == 0): 0.
  ress = tuple(jnp.zeros_like(prev) for prev in prevs)

  def cond(carry):
    done = carry[3]
    return jnp.logical_not(jnp.all(jnp.stack(done)))

  def body(carry):
    i, zs, prevs, dones, iters, rels, ress = carry
    i1 = i + 1
    out = ([], [], [], [], [], [])
    for leaf, p, s, z, prev, done, it, rel, res, start in zip(
        leaves, problems, setups, zs, prevs, dones, iters, rels, ress, starts
    ):
      z_new, cur = _pg_step(leaf, p, s, z)
      rel_new = (prev - cur) / (jnp.abs(cur) + 1)
      if subgradient_tol is None:
        small = rel_new < rtol
        res_new = res
      else:
        res_new = subgradient_norm(leaf, p, z_new)
        small = (res_new <= subgradient_tol) & (cur <= start)
      stop = ((i1 >= min_iters) & small) | (i1 >= max_iters)
      out[0].append(jnp.where(done, z, z_new))
      out[1].append(jnp.where(done, prev, cur))
      out[2].append(done | stop)
      out[3].append(jnp.where(done, it, i1))
      out[4].append(jnp.where(done, rel, rel_new))
      out[5].append(jnp.where(done, res, res_new))
    return (i1, *(tuple(o) for o in out))

  carry = (jnp.zeros([], jnp.int32), tuple(zs), tuple(prevs), tuple(dones), iters, rels, ress)
  _, zs, _, _, iters, rels, ress = lax.while_loop(cond, body, carry)
  sols = []
  for leaf, s, p, z, it, rel, res, done0 in zip(
      leaves, setups, problems, zs, iters, rels, ress, dones
  ):
    z = jnp.where(s.active, z, unregularized_point(p))
    if subgradient_tol is None:
      if track_residual:
        res = subgradient_norm(leaf, p, z)
      else:
        res = jnp.where(done0, 0, jnp.asarray(NOT_MEASURED, res.dtype))
    sols.append(LeafSolution(z, it, rel, res))
  return sols


def pg_solve_per_leaf(
    leaves, problems, rtol, max_iters, min_iters, subgradient_tol=None, track_residual=False
) -> list[LeafSolution]:
  """The same solver with one ``lax.while_loop`` per leaf (``solver="pg"``).

  Each leaf's result is bit-identical to :func:`pg_solve`'s; see the module
  docstring ("Loop layout") for why this is the default layout.
  """
  return [
      pg_solve([leaf], [p], rtol, max_iters, min_iters, subgradient_tol, track_residual)[0]
      for leaf, p in zip(leaves, problems)
  ]


class VectorSolution(NamedTuple):
  """Several leaves' answers: ``z`` per leaf, the diagnostics as vectors.

  Entry ``m`` of ``iterations``, ``relative_decrease`` and ``residual``
  belongs to leaf ``order[m]``, so the solve stage writes ``SolveState``'s
  vectors with one gather instead of one kernel per leaf and field
  (BENCHMARKS.md, "Diagnostics without per-leaf kernels"). What every entry
  of :data:`SOLVERS` returns.
  """

  z: list[jax.Array]  # per leaf, in the problems' order
  iterations: jax.Array  # (n,) int32
  relative_decrease: jax.Array  # (n,)
  residual: jax.Array  # (n,)
  order: tuple[int, ...]  # the problem index of each entry of the vectors

  @classmethod
  def of_leaves(cls, sols: Sequence[LeafSolution]) -> VectorSolution:
    """From per-leaf answers (in order); empty vectors for none."""
    if not sols:
      empty = jnp.zeros([0], jnp.float32)
      return cls([], jnp.zeros([0], jnp.int32), empty, empty, ())
    return cls(
        [s.z for s in sols], jnp.stack([s.iterations for s in sols]).astype(jnp.int32),
        jnp.stack([s.relative_decrease for s in sols]), jnp.stack([s.residual for s in sols]),
        tuple(range(len(sols))),
    )


def direct_solution(z: jax.Array) -> LeafSolution:
  """A solution computed without iterating: 0 iterations, exact (residual 0)."""
  zero = jnp.zeros([], z.dtype)
  return LeafSolution(z, jnp.zeros([], jnp.int32), zero, zero)


def scalar_metric_prox(
    prox: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]], p: LeafProblem
) -> LeafSolution:
  """Exact solution when the metric is a scalar ``p`` (RMDA, ProxSGD).

  ``z = prox_{(t / p) psi}(x0 - V / p)`` with ``prox(y, threshold) -> (z, _)``
  the identity-metric prox of the leaf's regularizer (``t == 0``: ``y``).
  The nuclear norm's closed form, and the group LASSO's unfused one
  (:func:`closed_form`).
  """
  y = unregularized_point(p)
  thr = p.threshold / p.metric
  z, _ = prox(y, thr)
  return direct_solution(jnp.where(thr > 0, z, y))


FUSED_PROX_FROM = 1 << 25
"""Bytes of closed-form group-LASSO leaves in one update from which
:func:`closed_form` is fused (32 MiB: glibc's largest ``mmap`` threshold)."""


def closed_form(leaf: GroupLeaf, p: LeafProblem, fused: bool = False) -> LeafSolution:
  """Scalar metric, group LASSO: block soft-thresholding of ``y = x0 - V / p``.

  ``z = y * f`` with ``thr = t / p``, ``r = max(||y_g|| - thr, 0)`` and ``f =
  r / (r + thr)`` per group (``f = 1`` where ``thr == 0``, spec §6 item 7).

  ``fused=False``: ``y`` is formed once and read by both full-size passes
  (the norms' reduction and ``z``); XLA's CPU backend stores it, one
  parameter-sized temporary. ``fused=True``: ``z = x0 * f - V * (f / p)``
  and the norms of ``x0 - V * (1 / p)``, with ``V = linear_scale * linear``
  and ``x0 = centre * centre_scale`` never formed either: the two passes share
  no full-size value and XLA stores none. The solve stage fuses once the
  closed-form leaves of an update reach :data:`FUSED_PROX_FROM` bytes:
  glibc's ``malloc`` maps blocks that large afresh at every call, so the
  stored ``y`` cost RMDA and ProxSGD 1.9-2.5x adamw's update on the 1e7
  models, against 0.9-1.3x fused; on the 1e6 models, where the block is
  reused, the fused passes were 10-13% slower (XLA runs the reduction with
  its elementwise inputs in one library kernel). BENCHMARKS.md,
  "Scalar-metric prox without a temporary". The two forms differ by rounding.
  """
  if not fused:
    return scalar_metric_prox(leaf.shrink, p)
  x0, v = p.centre, p.linear
  cv = 1 / p.metric
  if p.linear_scale is not None:
    cv = jnp.asarray(p.linear_scale).astype(v.dtype) * cv
  thr = p.threshold / p.metric
  f, _ = leaf.shrink_factor(leaf.norm(p.scaled_centre() - v * cv), thr)
  f = jnp.where(thr > 0, f, 1)
  fx = f if p.centre_scale is None else jnp.asarray(p.centre_scale).astype(x0.dtype) * f
  return direct_solution(x0 * fx - v * (cv * f))


def _per_leaf(solve: Callable[..., list[LeafSolution]]) -> Callable[..., VectorSolution]:
  """A PG solver as an entry of :data:`SOLVERS`; its loop reads ``x0`` and ``V`` folded."""

  def solve_vectors(leaves, problems, *args, **kwargs) -> VectorSolution:
    return VectorSolution.of_leaves(
        solve(leaves, [p.folded() for p in problems], *args, **kwargs)
    )

  return solve_vectors


def _exact(leaves, problems, rtol, max_iters, min_iters, subgradient_tol=None,
           track_residual=False) -> VectorSolution:
  """``exact.exact_solve_vectors``; the PG stopping rules do not apply to it."""
  from optax_ramda._src import exact  # exact.py imports this module

  del rtol, max_iters, min_iters, subgradient_tol, track_residual
  return exact.exact_solve_vectors(leaves, problems)


SOLVERS: dict[str, Callable[..., VectorSolution]] = {
    "pg": _per_leaf(pg_solve_per_leaf), "pg_fused": _per_leaf(pg_solve), "exact": _exact
}
"""Diagonal-metric group-LASSO solvers by name: ``f(leaves, problems, rtol,
max_iters, min_iters, subgradient_tol=None, track_residual=False) ->
VectorSolution``."""

DEFAULT_SOLVER = "exact"
"""The group-LASSO solver of ``solver=None`` (measured in BENCHMARKS.md,
"Subproblem solvers": faster per solve than the paper's PG at its settings
and about six orders of magnitude more accurate)."""
