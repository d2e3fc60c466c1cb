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
cancellation-prone division by a tiny root is ever made. (A tighter start,
Jensen's bound ``(1 - tau) / sum_i u_i^2 ph_i``, saved at most one Newton
evaluation on the benchmark data but cost as much in its extra sum, even
stacked with the sum of ``||b||``: not used.) The Newton step is
``rh += S2 (sqrt(S2) - 1) / S3`` with ``S2 = sum q_i^2`` and
``S3 = sum q_i^2 ph_i / (ph_i rh + tau)``. All groups of all leaves share one
``lax.while_loop``, capped at ``max_newton`` steps; large batches on a single
CPU device run one such loop per chunk of their groups (:func:`_chunking`).

Stopping. A group stops on its own, never on ``phi == 0``, and then keeps its
bits, so its answer does not depend on the other groups (the same under
``jit``, ``vmap`` and any batching of leaves). It stops after a step known to
land within about ``eps_machine * rh`` of the root, with no evaluation to
confirm it. From the left, the root lies at most about ``1.5 step^2 / rh``
beyond the new iterate (up to a factor ``1 + O(step / rh)``):
``phi'' / phi' = -3 (S4 / S3 - S3 / S2)`` with
``S4 = sum q_i^2 (ph_i / (ph_i rh + tau))^2``, and ``S4 / S3`` is a weighted
mean of ``ph_i / (ph_i rh + tau) < 1 / rh``, so ``|phi''| < 3 phi' / rh``
between the iterate and the root (``phi'`` decreases). A step with
``1.5 step^2 <= eps rh^2`` is therefore the last one needed; a step at
rounding level (``step <= 4 eps rh``) stops the group too. Stopping only on
the latter cost one more evaluation per solve, the one that sees the tiny
step (BENCHMARKS.md, "Newton's last evaluation").

Diagnostics. At the root ``p * (z - y) + t z / ||z|| = 0``; at an iterate
``rh`` the residual of that optimality condition is
``t |1 / ||q(rh)|| - 1|`` per group, i.e. the secular residual times ``t``;
the leaf's ``residual`` is the Euclidean norm of these over its groups (the
norm of the minimum-norm subgradient of ``Q`` at ``z``, see
``solvers.subgradient_norm``), from the last Newton evaluation, so it costs
nothing extra. A group that stopped on a step that landed but was larger
than rounding level reports instead the bound ``phi'(rh) 1.5 step^2 / rh``
of the secular residual at the point it returns (``phi' = S3 / S2^(3/2)``),
which is at most ``eps phi'(rh) rh``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_ramda._src import varying
from optax_ramda._src.groups import GroupLeaf
from optax_ramda._src.solvers import (
    LeafProblem,
    LeafSolution,
    VectorSolution,
    unregularized_point,
)

DEFAULT_MAX_NEWTON = 40

MAX_STACK = 8
"""Most same-shape leaves in one stacked batch of the exact solver.

XLA's CPU backend fuses nothing into a concatenation of more than 8 operands
(``kMaxConcatenateArguments`` of its instruction fusion). A stack of more
leaves is therefore a plain copy of each leaf's stored ``P`` (and ``x0``,
``V``), where a stack of at most 8 computes each leaf's metric (RAMDA's cube
root) as it writes the stack. Smaller batches also keep each Newton pass's
arrays smaller (better in cache), at the price of more kernels per pass and
more compile time. Measured in BENCHMARKS.md, "Stacks of at most 8 leaves".
"""


class _Scaled(NamedTuple):
  """One leaf's scaled problem: full-size inputs and per-group scalars only.

  ``u = b / ||b||`` and ``ph = p / pmax`` are never stored: every pass
  multiplies ``b`` and ``p`` by per-group factors inside its own fusion.
  Storing them cost two full-size temporaries (and ``b / pmax`` a third) and
  a full-size write each (BENCHMARKS.md, "Profile").
  """

  b: jax.Array  # P * x0 - V (full shape)
  p: jax.Array  # P (full shape)
  inv_nb: jax.Array  # 1 / ||b|| per group (keepdims), 0 where not kept
  inv_pmax: jax.Array  # 1 / pmax per group (keepdims)
  tau: jax.Array  # t / ||b|| per group (keepdims)
  keep: jax.Array  # per group: ||b|| > t and t > 0


def _scale(leaf: GroupLeaf, b: jax.Array, p: jax.Array, t: jax.Array
           ) -> tuple[_Scaled, jax.Array]:
  """Per-group scalars of ``b = P x0 - V`` and ``P`` (``t`` broadcasts)."""
  nb = leaf.norm(b)
  keep = (nb > t) & (t > 0)
  # Per-group reciprocals, so the full-size arrays need multiplies only.
  inv_nb = jnp.where(keep, 1 / jnp.where(keep, nb, 1), 0)
  pmax = leaf.max(p)
  inv_pmax = 1 / jnp.where(pmax > 0, pmax, 1)
  tau = jnp.where(keep, t * inv_nb, 1)
  rh0 = jnp.where(keep, 1 - tau, 0)
  return _Scaled(b, p, inv_nb, inv_pmax, tau, keep), rh0


def _stacked(leaf: GroupLeaf, n: int) -> GroupLeaf:
  """The grouping of ``n`` same-shape leaves stacked on a new leading axis."""
  return dataclasses.replace(
      leaf, reduce_axes=tuple(a + 1 for a in leaf.reduce_axes), num_groups=n * leaf.num_groups
  )


def _secular(leaf: GroupLeaf, s: _Scaled, rh: jax.Array):
  """``S2 = sum q^2`` and ``S3 = sum q^2 ph / (ph rh + tau)`` per group.

  Written so that every full-size operation depends on ``rh`` (the per-group
  factors ``rh / pmax``, ``1 / ||b||`` and ``1 / pmax`` multiply full-size
  loop-variant values): XLA's loop-invariant code motion would otherwise
  hoist ``u = b / ||b||`` and ``ph = p / pmax`` out of the loop as two
  full-size temporaries. Both sums come from one reduction over a stacked
  pair, which XLA's CPU backend runs as a single fast reduction; two separate
  sums measured 1.7x slower (BENCHMARKS.md, "Profile").
  """
  w = 1 / (s.p * (s.inv_pmax * rh) + s.tau)  # 1 / (ph rh + tau)
  q = s.b * (s.inv_nb * w)  # u / (ph rh + tau)
  q2 = q * q
  pair = jnp.stack([q2, q2 * (s.p * (s.inv_pmax * w))])
  if leaf.reduce_axes:
    pair = jnp.sum(pair, axis=tuple(a + 1 for a in leaf.reduce_axes), keepdims=True)
  return pair[0], pair[1]


def _newton_step(leaf: GroupLeaf, s: _Scaled, rh: jax.Array):
  """One guarded Newton step: ``(new rh, converged, secular residual)``.

  ``converged`` when the new ``rh`` is within about ``eps * rh`` of the root,
  known without another evaluation (module docstring, "Stopping"): the step
  is at rounding level (``step <= 4 eps rh_new``) or it lands close enough
  (``1.5 step^2 <= eps rh^2``). The residual is the measured
  ``|1 / ||q(rh)|| - 1|`` at ``rh``, except for a group that stops on the
  second test only, which gets the bound ``phi'(rh) 1.5 step^2 / rh`` of the
  residual at the new ``rh``, the point it returns. (A group cut off by
  ``max_newton`` keeps the measurement: the bound is only that close for a
  step that landed.)
  """
  s2, s3 = _secular(leaf, s, rh)
  root = jnp.sqrt(s2)
  ok = s.keep & (s3 > 0) & (s2 > 0)
  step = jnp.where(ok, s2 * (root - 1) / jnp.where(ok, s3, 1), 0)
  # Monotone from the left: a non-positive step means rounding already put us
  # at the root; never step backwards.
  rh_new = jnp.where(step > 0, rh + step, rh)
  measured = jnp.where(s.keep & (s2 > 0), jnp.abs(1 / jnp.where(s2 > 0, root, 1) - 1), 0)
  eps = jnp.finfo(rh.dtype).eps
  settled = step <= 4 * eps * rh_new
  landed = 1.5 * step * step <= eps * rh * rh
  # phi'(rh) = S3 / S2^(3/2); the root is at most 1.5 step^2 / rh beyond rh_new.
  bound = jnp.where(ok, s3 / jnp.where(ok, s2 * root * rh, 1) * (1.5 * step * step), 0)
  return rh_new, settled | landed, jnp.where(landed & ~settled, bound, measured)


def _finish(p: LeafProblem, s: _Scaled, rh: jax.Array) -> jax.Array:
  """``z`` from the roots: one elementwise pass (fused by XLA with what follows).

  ``z_i = (b_i / pmax) rh / (ph_i rh + tau)`` on kept groups, 0 on screened
  ones. With ``t == 0`` the leaf is unregularized (spec §6 item 7) and never
  pushed through the prox: ``z = x0 - V / P``. The choice is on the scalar
  ``t``, inside the same elementwise pass (both branches read the same
  ``x0, V, P``), so it costs arithmetic, not memory traffic.
  """
  return jnp.where(p.threshold > 0, _regularized_z(s, rh), unregularized_point(p))


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
  """Exact scaled group-LASSO prox for several leaves, every group on its own.

  ``rtol``, ``max_iters``, ``min_iters`` and ``subgradient_tol`` (the PG
  solvers' stopping rules) are accepted for a common signature and ignored:
  each group's Newton iteration stops on its own relative step, with at most
  ``max_newton`` steps (static) for all. ``track_residual`` is ignored too:
  the residual is a by-product of the last Newton evaluation and is always
  returned.

  Example::

    leaf = group_leaf(GroupSpec((1,)), x0, "w")
    z = exact_solve([leaf], [LeafProblem(x0, V, P, x0, t)])[0].z

  Leaves with the same grouping, shape and dtype are solved stacked, in
  batches of up to :data:`MAX_STACK` leaves (each group is independent, so
  every leaf's result equals its solo solve up to rounding: XLA may order a
  group's sums differently in a stacked, a single or a chunked layout, and
  the last bits of ``z`` can then differ, e.g. 1-2 ulps in a few hundred of
  the entries of a ``(64, 32)`` leaf in float64; ``tests/test_exact.py``,
  ``tests/test_performance_exact.py``). Adding a leaf of the same shape to a
  model can therefore change other leaves' trajectories in the last bits. Batches share one
  ``lax.while_loop``, except large batches on a single CPU device (at least
  :data:`CHUNK_FROM` entries), which are solved chunk by chunk of their
  groups, each chunk's whole solve while it is in cache (:func:`_chunking`).

  Returns, per leaf, ``z``, the Newton steps taken by its slowest group
  (``iterations``), ``relative_decrease = 0`` and ``residual``, the norm of
  ``t (1/||q|| - 1)`` over its groups at the last evaluation.
  """
  del rtol, max_iters, min_iters, subgradient_tol, track_residual
  sol = exact_solve_vectors(leaves, problems, max_newton)
  where = {i: m for m, i in enumerate(sol.order)}  # leaf -> its entry of the vectors
  return [
      LeafSolution(z, _pick(sol.iterations, where[i]), jnp.zeros([], z.dtype),
                   _pick(sol.residual, where[i]).astype(z.dtype))
      for i, z in enumerate(sol.z)
  ]


def exact_solve_vectors(
    leaves: Sequence[GroupLeaf],
    problems: Sequence[LeafProblem],
    max_newton: int = DEFAULT_MAX_NEWTON,
) -> VectorSolution:
  """:func:`exact_solve` with the diagnostics of all leaves as vectors.

  The same solve, bit for bit (``relative_decrease`` is 0); it is
  ``solvers.SOLVERS["exact"]``, with which the solve stage writes
  ``SolveState``'s vectors straight from the batches' per-leaf vectors.
  Picking each leaf's scalars out of its batch (:func:`_pick`) cost one small
  kernel per leaf and field at every update (BENCHMARKS.md, "Diagnostics
  without per-leaf kernels").

  Example::

    sol = exact_solve_vectors([leaf], [LeafProblem(x0, V, P, x0, t)])
    z, steps = sol.z[0], sol.iterations[sol.order.index(0)]
  """
  if not problems:
    return VectorSolution.of_leaves([])
  # Leaves with the same grouping, shape and dtype are solved as one stacked
  # array (ALGORITHMS.md §6: groups are independent, so a leaf's bits do not
  # depend on its batch-mates). A Transformer's 72 kernels have 3 shapes:
  # XLA then compiles 3 sets of solver passes instead of 72 (measured 10x
  # faster compile and 2x faster run for 48 (64, 64) kernels, BENCHMARKS.md
  # "Profile"), in batches of at most MAX_STACK leaves. P is stacked, and b
  # formed from the stacks of P, x0 and V, so that each leaf's P is written
  # only into the stack, by the fusion that computes it. Inside shard_map
  # (check_vma=True) leaves that vary along different mesh axes are not
  # stacked: a replicated leaf stacked with a sharded one would come out
  # typed as sharded (varying.py).
  batches: dict[Any, list[int]] = {}
  for i, (leaf, p) in enumerate(zip(leaves, problems)):
    axes = frozenset().union(*map(varying.varying_axes, (p.centre, p.linear, p.metric)))
    batches.setdefault((leaf, p.metric.shape, p.metric.dtype, axes), []).append(i)
  done, looped = [], []  # (idx, t, (z, iterations, secular)); the batches left for one loop
  for (leaf, shape, _, _), idx in batches.items():
    ps = [problems[i] for i in idx]
    bleaf = _stacked(leaf, len(idx))
    t = jnp.stack([p.threshold for p in ps]).reshape((len(idx),) + (1,) * len(shape))
    chunks = _chunking(bleaf, (len(idx), *shape))
    if chunks is not None:
      axis, k = chunks
      solve = _solve_chunked_leaves if len(idx) > 1 and axis > 0 else _solve_chunked
      done.append((idx, t, solve(bleaf, ps, t, axis, k, max_newton)))
      continue
    ps = [p.folded() for p in ps]  # x0 and V as arrays: the loop reads them only through b
    for part in _stack_slices(len(idx)):
      pp = ps[part]
      p_stack = jnp.stack([p.metric for p in pp])
      b = p_stack * jnp.stack([p.centre for p in pp]) - jnp.stack([p.linear for p in pp])
      sleaf = _stacked(leaf, len(pp))
      s, rh = _scale(sleaf, b, p_stack, t[part])
      looped.append((idx[part], pp, sleaf, t[part], s, rh))
  rhs, iters, secs = _newton([(sleaf, s, rh) for _, _, sleaf, _, s, rh in looped], max_newton)
  for (idx, ps, _, t, s, _), rh, it, sec in zip(looped, rhs, iters, secs):
    z: list[jax.Array] | jax.Array  # per leaf, or the batch (leaves slice it)
    if len(ps) == 1:
      z = [_finish(ps[0], jax.tree.map(lambda a: a[0], s), rh[0])]
    else:
      z = _finish_batch(ps, s, rh, t)
    done.append((idx, t, (z, it, sec)))
  zs: list[Any] = [None] * len(problems)
  its, ress, order = [], [], []
  for idx, t, (z, it, sec) in done:
    # A group the screen zeroed has sec == 0 exactly: its term is 0 even for t = inf.
    term = jnp.where(sec == 0, 0, t * sec)
    ress.append(jnp.sqrt(jnp.sum(jnp.square(term), axis=tuple(range(1, sec.ndim)))))
    its.append(jnp.max(it.reshape(len(idx), -1), axis=1, initial=0).astype(jnp.int32))
    order.extend(idx)
    for j, i in enumerate(idx):
      zs[i] = z[j]
  rdt = jnp.result_type(*ress)
  cat = lambda vs: vs[0] if len(vs) == 1 else jnp.concatenate(vs)
  res = cat([r.astype(rdt) for r in ress])
  return VectorSolution(zs, cat(its), jnp.zeros_like(res), res, tuple(order))


def _stack_slices(n: int) -> list[slice]:
  """``n`` same-shape leaves cut into the fewest stacks of at most :data:`MAX_STACK`.

  The stacks are as equal as possible (sizes differ by at most 1), so that
  their solver kernels, and the kernels that read a leaf at its offset in a
  stack, are mostly the same kernels, which XLA compiles once.
  """
  k = -(-n // MAX_STACK)
  bounds = [n * i // k for i in range(k + 1)]
  return [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]


def _newton(batches: Sequence[tuple[GroupLeaf, _Scaled, jax.Array]], max_newton: int):
  """Roots of the secular equations of several batches in one ``lax.while_loop``.

  Returns per batch the roots ``rh``, the Newton steps of each group and its
  secular residual at the last evaluation (all per group, keepdims). A group
  stops when its step is not larger than ``4 eps rh`` and then keeps its bits.
  """
  if not batches:
    return (), (), ()
  dones = tuple(jnp.logical_not(s.keep) for _, s, _ in batches)
  # zeros_like: started from the data, as the loop updates them (varying.py).
  iters = tuple(jnp.zeros_like(rh, jnp.int32) for _, _, rh in batches)
  secs = tuple(jnp.zeros_like(rh) for _, _, rh in batches)

  def cond(carry):
    i, _, done, _, _ = carry
    return (i < max_newton) & jnp.logical_not(jnp.all(jnp.stack([jnp.all(d) for d in done])))

  def body(carry):
    i, rhs, dones, iters, secs = carry
    out = ([], [], [], [])
    for (bleaf, s, _), rh, done, it, sec in zip(batches, rhs, dones, iters, secs):
      rh_new, stop, sec_new = _newton_step(bleaf, s, rh)
      out[0].append(jnp.where(done, rh, rh_new))
      out[1].append(done | stop)
      out[2].append(jnp.where(done, it, it + 1))
      out[3].append(jnp.where(done, sec, sec_new))
    return (i + 1, *(tuple(o) for o in out))

  carry = (jnp.zeros([], jnp.int32), tuple(rh for _, _, rh in batches), dones, iters, secs)
  _, rhs, _, iters, secs = lax.while_loop(cond, body, carry)
  return rhs, iters, secs


CHUNK_FROM = 1 << 21
"""Entries of a stacked batch from which it is solved chunk by chunk (one CPU device only)."""
CHUNK_ENTRIES = 1 << 19
"""Largest chunk, in entries (2 MiB per float32 array: the working set stays in cache)."""
MIN_CHUNK_ENTRIES = 1 << 16
"""Smallest chunk worth a trip through the chunk loop."""


def _chunking(bleaf: GroupLeaf, shape: tuple[int, ...]) -> tuple[int, int] | None:
  """``(axis, chunks)`` to solve a stacked batch chunk by chunk, or ``None``.

  The Newton loop reads ``b`` and ``P`` and writes the per-element terms of
  its two sums at every step. On a batch larger than the CPU's caches each of
  those passes streams through memory; solved a chunk of groups at a time,
  the chunk's ``||b||``, ``max P``, Newton steps and ``z`` all run on data in
  cache, and only the chunk's inputs and ``z`` cross the memory bus; ``z``
  overwrites ``P`` chunk by chunk, so it needs no buffer of its own
  (BENCHMARKS.md, "Chunked solves").

  A chunk is a slice along a group axis (not a reduce axis), so it holds
  whole groups and solves exactly the same equations. Its group sums may be
  added in another order than over the whole array (XLA picks the reduction's
  loop order by shape), so results can differ from the unchunked solve in
  the last bits of the sums, and ``z`` by what that rounding moves the root
  (measured: up to 1.9e-5 of a group's norm in float32, within the solve's
  own float32 error, with both layouts equally far from a float64 solve).
  Chunks divide the axis evenly (one compiled chunk shape). The leaves' own
  axes are tried before the stacking axis 0: cut along a leaf axis, a batch
  of several leaves needs no full-size stack of ``b`` and ``P``
  (:func:`_solve_chunked_leaves`; RAMDA exact on the 1e7 Transformer: XLA
  temporaries 2.30 -> 1.15 parameter copies, update 5.6-6.1x -> 4.0-4.2x
  adamw with glibc's allocator, compile 0.3-1.1 s longer, BENCHMARKS.md
  "Chunked solves of stacked batches"); whole leaves per
  chunk (axis 0) remain for batches whose leaves cannot be cut evenly. Only
  on a single CPU device (:func:`_chunking_pays`). Measured on the benchmark
  machine (2 cores): chunks of 65K-131K entries made the update of the
  1e6-parameter CNN (largest leaf 518,400 entries) 12-14% slower, hence
  :data:`CHUNK_FROM`.
  """
  size = math.prod(shape)
  if size < CHUNK_FROM or not _chunking_pays():
    return None
  for axis in [*range(1, len(shape)), 0]:  # the leaves' own axes first
    n = shape[axis]
    if axis in bleaf.reduce_axes:
      continue
    k = next((k for k in range(2, n + 1) if n % k == 0 and size // k <= CHUNK_ENTRIES), None)
    if k is not None and size // k >= MIN_CHUNK_ENTRIES:
      return axis, k
  return None


def _chunking_pays() -> bool:
  """Whether chunked solves are used here: one CPU device.

  A GPU's memory is not behind a small cache this way, and a sequential
  chunk loop would leave it idle. With several devices the leaves may be
  sharded along the chunked axis, which is not visible at trace time, and
  GSPMD then gathers every chunk: an update of a 4.5M-parameter model sharded
  8 ways over simulated CPU devices took 1.0-1.3 s chunked against
  0.06-0.09 s unchunked (BENCHMARKS.md, "Chunked solves"). Replicated or
  ``shard_map`` per-device updates would not suffer, but cannot be told apart
  here, so they keep the unchunked solve too.
  """
  return jax.default_backend() == "cpu" and jax.device_count() == 1


def _regularized_z(s: _Scaled, rh: jax.Array) -> jax.Array:
  """``z_i = (b_i / pmax) rh / (ph_i rh + tau)`` on kept groups, 0 elsewhere."""
  c = s.inv_pmax * rh  # per group
  return jnp.where(s.keep, s.b * c / (s.p * c + s.tau), 0)


def _b_or_answer(p: LeafProblem) -> jax.Array:
  """``b = P x0 - V``, or, for a leaf without strength, its answer ``x0 - V / P``.

  A leaf with ``t == 0`` is unregularized (spec §6 item 7): its slot of a
  chunked solve (:func:`_solve_chunked`, :func:`_solve_chunked_leaves`)
  holds its answer instead of ``b`` and passes it through. The
  choice is on the scalar ``t`` inside the same elementwise pass (arithmetic,
  not traffic), with no ``lax.cond``, whose branch returning the loop's ``z``
  would copy it.
  """
  return jnp.where(
      p.threshold > 0, p.metric * p.scaled_centre() - p.scaled_linear(), unregularized_point(p)
  )


def _solve_chunk(bleaf: GroupLeaf, b: jax.Array, p: jax.Array, t: jax.Array, max_newton: int):
  """The whole solve of one chunk (stacked): ``(z, iterations, secular)``.

  ``||b||``, ``max P``, the chunk's own Newton loop and ``z``. A leaf with
  ``t == 0`` keeps no group, whatever its slot holds (its answer,
  :func:`_b_or_answer`), and that slot is its ``z``.
  """
  s, rh0 = _scale(bleaf, b, p, t)
  (rh,), (it,), (sec,) = _newton([(bleaf, s, rh0)], max_newton)
  return jnp.where(t > 0, _regularized_z(s, rh), b), it, sec


def _chunk_diagnostics(bleaf: GroupLeaf, shape: tuple[int, ...], like: jax.Array):
  """Zeroed per-group Newton steps and secular residuals of a stacked batch.

  ``zeros_like`` the batch's data ``like`` (its dtype), as the chunks write
  them (varying.py).
  """
  gshape = tuple(1 if a in bleaf.reduce_axes else n for a, n in enumerate(shape))
  return (jnp.zeros_like(like, jnp.int32, shape=gshape),
          jnp.zeros_like(like, shape=gshape))


def _solve_chunked(bleaf: GroupLeaf, ps: Sequence[LeafProblem], t: jax.Array, axis: int,
                   chunks: int, max_newton: int):
  """One batch solved chunk by chunk along ``axis``: ``(z, iterations, secular)``.

  A ``lax.fori_loop`` over the chunks; each runs the whole solve (scaling,
  its own Newton loop, ``z``) on its slice and writes ``z`` and the per-group
  diagnostics in place. A single leaf's ``b`` is formed inside the chunk from
  ``x0``, ``V`` and ``P`` (no full-size ``b``); a stacked batch chunked by
  whole leaves (``axis == 0``) stacks ``b`` and ``P`` as the loop does (one
  cut along a leaf's own axis goes to :func:`_solve_chunked_leaves` instead).
  Either way a leaf with ``t == 0`` holds ``x0 - V / P`` (spec §6 item 7) in
  the place of ``b`` (:func:`_b_or_answer`), and that is its ``z``.
  """
  single = len(ps) == 1
  if single:
    ins = tuple(a[None] for a in (ps[0].centre, ps[0].linear, ps[0].metric))
  else:
    ins = (jnp.stack([_b_or_answer(p) for p in ps]), jnp.stack([p.metric for p in ps]))
  shape = ins[0].shape
  width = shape[axis] // chunks

  def body(c, carry):
    def cut(a):
      if a.shape[axis] == 1:
        return a
      return lax.dynamic_slice_in_dim(a, c * width, width, axis)

    tc = cut(t)
    z_all, it_all, sec_all = carry
    # P is read from the carry, where the chunks' z replace it (chunks are
    # disjoint): z takes P's buffer instead of one of its own.
    p = cut(z_all)
    if single:
      b = _b_or_answer(ps[0]._replace(centre=cut(ins[0]), linear=cut(ins[1]), metric=p,
                                       warm_start=p, threshold=tc))
    else:
      b = cut(ins[0])
    z, it, sec = _solve_chunk(bleaf, b, p, tc, max_newton)
    put = lambda buf, val: lax.dynamic_update_slice_in_dim(buf, val, c * width, axis)
    return put(z_all, z), put(it_all, it), put(sec_all, sec)

  init = (ins[-1], *_chunk_diagnostics(bleaf, shape, ins[-1]))
  return lax.fori_loop(0, chunks, body, init)


def _solve_chunked_leaves(bleaf: GroupLeaf, ps: Sequence[LeafProblem], t: jax.Array,
                          axis: int, chunks: int, max_newton: int):
  """A batch of several leaves solved chunk by chunk along a leaf axis, unstacked.

  The same chunks and the same solve as :func:`_solve_chunked` (``axis >=
  1``: every leaf of the batch is cut at the same offset along its own axis
  ``axis - 1``), but no full-size stack of ``b`` or ``P`` is made: the loop
  carries each leaf's ``P``, which its ``z`` overwrites chunk by chunk, and
  each chunk stacks only its slices of the leaves, forming ``b`` from each
  leaf's ``x0``, ``V`` and ``P`` as a single leaf's chunk does. ``z`` comes
  out as one array per leaf, so no per-leaf slice of a stacked ``z`` follows.
  Full-size temporaries: one ``P`` per leaf instead of the stacks of ``b``
  and ``P`` (:func:`_chunking`). ``b`` here is computed from the very ``P``
  of the solve; a stacked ``b`` fused with its producers may be computed with
  a ``P`` recomputed in another fusion, which XLA may round differently by an
  ulp (measured on RAMDA's cube root), so results may differ from the stacked
  layout's in the last bits.
  """
  shape = (len(ps), *ps[0].metric.shape)
  la, width = axis - 1, shape[axis] // chunks
  at = lambda c, a: lax.dynamic_slice_in_dim(a, c * width, width, la)

  def body(c, carry):
    zs, it_all, sec_all = carry
    pc = [at(c, z) for z in zs]  # each leaf's P, where its chunks' z replace it
    b = jnp.stack([
        _b_or_answer(p._replace(centre=at(c, p.centre), linear=at(c, p.linear), metric=m,
                                warm_start=m))
        for p, m in zip(ps, pc)
    ])
    z, it, sec = _solve_chunk(bleaf, b, jnp.stack(pc), t, max_newton)
    zs = tuple(lax.dynamic_update_slice_in_dim(zj, z[j], c * width, la)
               for j, zj in enumerate(zs))
    put = lambda buf, val: lax.dynamic_update_slice_in_dim(buf, val, c * width, axis)
    return zs, put(it_all, it), put(sec_all, sec)

  init = (tuple(p.metric for p in ps), *_chunk_diagnostics(bleaf, shape, ps[0].metric))
  zs, it, sec = lax.fori_loop(0, chunks, body, init)
  return list(zs), it, sec


def _pick(v: jax.Array, j: int) -> jax.Array:
  """``v[j]`` of a short per-leaf vector, exactly, as a masked sum.

  ``v[j]`` would be a slice at a leaf-specific offset, one distinct kernel per
  leaf for XLA to compile (the per-leaf diagnostics of a 72-leaf Transformer
  cost about 1 s of compile time that way); the masked sum compiles to one
  kernel shape for all leaves. It adds zeros to ``v[j]``, so it is exact.
  (Only :func:`exact_solve`'s per-leaf answers use it; the solve stage takes
  the vectors of :func:`exact_solve_vectors`.)
  """
  if v.shape[0] == 1:
    return v[0]
  return jnp.sum(jnp.where(np.arange(v.shape[0]) == j, v, 0))


def _finish_batch(ps: Sequence[LeafProblem], s: _Scaled, rh: jax.Array, t: jax.Array
                  ) -> jax.Array:
  """``z`` of a stacked batch of leaves: one pass over the batch (leaves slice it).

  A per-leaf pass would read its leaf's per-group factors out of the stacked
  arrays at a leaf-specific offset, which makes each leaf's kernel distinct,
  and XLA compiles every distinct kernel (about 30 ms each for this one on
  the benchmark machine; identical kernels are compiled once). Here the
  batch's ``z`` is one kernel and the leaves' consumers (the interpolation)
  only slice it. The ``t == 0`` case (spec §6 item 7, ``z = x0 - V / P``) is
  a ``lax.cond`` on the batch's scalars, so the unregularized points (and the
  stacking of ``x0`` and ``V`` they need) are computed only when some leaf
  of the batch has no strength.
  """
  def regularized():
    return _regularized_z(s, rh)

  def mixed():
    # From the stacked P, so that P is only ever written into the stack.
    stack = lambda f: jnp.stack([f(p) for p in ps])
    unreg = unregularized_point(
        LeafProblem(stack(lambda p: p.centre), stack(lambda p: p.linear), s.p, s.p, t)
    )
    return jnp.where(t > 0, regularized(), unreg)

  return lax.cond(jnp.all(t > 0), regularized, mixed)


def exact_group_prox(leaf: GroupLeaf, problem: LeafProblem) -> jax.Array:
  """``z`` of :func:`exact_solve` for a single leaf (convenience)."""
  return exact_solve([leaf], [problem])[0].z
