"""The subproblem stage: from a :class:`Subproblem` to the new point ``z``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from optax._src import base

from optax_ramda._src import nuclear, solvers, tied, validation, varying
from optax_ramda._src.groups import UNREGULARIZED, GroupLeaf
from optax_ramda._src.non_float import is_real_float
from optax_ramda._src.regularizers import Regularizer
from optax_ramda._src.subproblem import NewPoint, Subproblem, check_stage_input


class SolveState(NamedTuple):
  """Solver diagnostics of the last step, one entry per parameter leaf.

  Each of ``iterations``, ``relative_decrease`` and ``residual`` is a vector
  with one entry per leaf of the params, in the order of
  ``jax.tree.leaves(params)``. :func:`solve_diagnostics` returns them as trees
  like the params::

    d = optax_ramda.solve_diagnostics(opt_state, params)
    d.iterations["dense"]["kernel"]

  (``optax.tree_utils.tree_get(opt_state, "iterations")`` gives the vector.)
  Vectors rather than trees of scalars: every array of the state is an
  argument of the jitted step, and each costs its dispatch about 2 us per
  call on the benchmark machine. A jitted step that only passes the state of
  RAMDA for a 68-leaf Transformer through took 1.76 ms with three scalars per
  leaf and 1.22 ms with three vectors (AdamW's state: 1.01 ms; BENCHMARKS.md,
  "Per-leaf scalars").

  ``iterations`` and ``relative_decrease`` are by-products of every solve,
  and so is the exact solver's ``residual``; the PG solvers' residual costs
  one more elementwise pass with group reductions per step and is computed
  only on request (``track_residual=True``) or when it is the stopping
  quantity (``subgradient_tol``). Unread, the diagnostics cost three small
  vectors of state.

  Attributes:
    iterations: int32, per leaf: solver iterations used at the last step: PG
      sweeps, or for the exact solver the Newton steps of the leaf's slowest
      group. 0 for unregularized leaves, closed-form leaves and leaves whose
      groups were all screened.
    relative_decrease: per leaf, PG (group and nuclear): ``(prev - cur) /
      (|cur| + 1)`` at the stop, the quantity of the paper's stopping test (0
      where no iteration ran, and for the exact solver).
    residual: per leaf, how far the returned ``z`` is from optimal, in the units
      of ``V``, summed over groups in quadrature. PG solvers: the norm of the
      minimum-norm subgradient of the subproblem objective ``Q`` at ``z``
      (ALGORITHMS.md §6; 0 at the exact solution). Exact solver: the residual of
      each group's secular equation at its last Newton evaluation, ``t (1/||q||
      - 1)``, which does not include the rounding of ``z`` itself;
      ``solvers.subgradient_norm`` measures that (e.g. 8.4e-13 reported against
      a subgradient norm of 1.1e-7 on a float64 leaf with ``P`` over 1e-8..1e8
      and ``||b||`` about 1e9: both at round-off level, but not the same
      quantity, so compare solvers with ``subgradient_norm``). 0 for closed-form
      leaves (scalar metric), unregularized leaves and leaves needing no
      iteration (all groups screened). ``-1`` (``solvers.NOT_MEASURED``; a norm
      is never negative, and -1 keeps the state finite, unlike NaN, which would
      trip ``jax_debug_nans``) where it was not measured: PG leaves without
      ``track_residual`` or ``subgradient_tol``, nuclear-norm PG leaves (which
      report only ``relative_decrease``), and every leaf before the first step.
    solve_count: number of solves so far (scalar int32); the argument of a
      ``subgradient_tol`` schedule.

  ``relative_decrease`` and ``residual`` have the solves' compute dtype (at
  least float32; float64 if any leaf solves in float64).

  Inside ``jax.shard_map`` with ``check_vma=True``, a leaf sharded over mesh
  axes gets the entries of the whole leaf, the same on every device: the
  largest ``iterations`` and ``relative_decrease`` of its blocks and their
  ``residual`` in quadrature (``varying.combine_leaf_diagnostics``). With
  ``check_vma=False`` each device keeps its own block's.
  """

  iterations: jax.Array
  relative_decrease: jax.Array
  residual: jax.Array
  solve_count: jax.Array


def solve_diagnostics(opt_state: Any, params: Any) -> SolveState:
  """The last step's solver diagnostics of ``opt_state`` as trees like ``params``.

  Finds the one :class:`SolveState` in ``opt_state`` (inside ``optax.chain``,
  ``optax.inject_hyperparams``, ``optax.MultiSteps`` and the like) and
  returns it with ``iterations``, ``relative_decrease`` and ``residual`` as
  trees of scalars like ``params``. Works inside and outside ``jit``.

  Example::

    opt_state = opt.init(params)
    ...
    d = optax_ramda.solve_diagnostics(opt_state, params)
    print(d.iterations["conv1"]["kernel"], d.residual["conv1"]["kernel"])

  Raises:
    ValueError: ``opt_state`` holds no solve stage, or several (pass the
      state of one of them), or ``params`` has another number of leaves
      than the stage saw (under ``optax.masked``, pass the masked params).
      Integer and boolean leaves, which the stages never see, get zeros.
  """
  found = [
      s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SolveState))
      if isinstance(s, SolveState)
  ]
  if len(found) != 1:
    raise ValueError(
        f"solve_diagnostics needs an optimizer state with exactly one solve stage; "
        f"this one has {len(found)}. Pass the state of the optax_ramda optimizer "
        "(or of the one solve stage you want to read)."
    )
  state = found[0]
  leaves, treedef = jax.tree.flatten(params)
  n = len(leaves)
  shape = jnp.shape(state.iterations)
  if len(shape) != 1:
    raise ValueError(
        f"the solve stage's diagnostics have shape {shape}, not one entry per leaf: a "
        "batched state (e.g. from jax.vmap over an ensemble). Pass one member's state, "
        "e.g. jax.tree.map(lambda x: x[i], opt_state)."
    )
  # The optimizers hand their stages only the real floating-point leaves
  # (non_float.py); the others, never regularized, get zeros here.
  floats = [i for i, x in enumerate(leaves) if is_real_float(x)]
  if shape[0] == n:
    index: list[int | None] = list(range(n))
  elif shape[0] == len(floats):
    position = {leaf: k for k, leaf in enumerate(floats)}
    index = [position.get(i) for i in range(n)]
  else:
    raise ValueError(
        f"the solve stage saw {shape[0]} parameter leaves, params has {n}"
        f"{f' ({len(floats)} floating-point)' if len(floats) != n else ''}. Pass the "
        "params the optimizer was initialised with (under optax.masked, the masked params)."
    )
  tree = lambda v: jax.tree.unflatten(
      treedef, [v[i] if i is not None else jnp.zeros((), v.dtype) for i in index])
  return SolveState(
      tree(state.iterations), tree(state.relative_decrease), tree(state.residual),
      state.solve_count,
  )


def compute_dtype(dtype: Any) -> jnp.dtype:
  """Solves run in at least float32 (bf16/fp16 leaves are promoted)."""
  return jnp.promote_types(dtype, jnp.float32)


def diagnostics_dtype(xs: Any) -> jnp.dtype:
  """Dtype of the float diagnostics: every leaf's compute dtype (float32 at least)."""
  return jnp.result_type(jnp.float32, *(compute_dtype(jnp.result_type(x)) for x in xs))


def _diagnostic_vectors(
    scalars: list[solvers.LeafSolution | None],
    from_vectors: tuple[solvers.VectorSolution, list[int]],
    source: tuple[int, ...],
    dt: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``SolveState``'s three vectors, one entry per original leaf.

  ``scalars`` holds each packed leaf's diagnostics as scalars, or ``None``
  where they are entries of ``from_vectors = (the group solver's
  VectorSolution, packed index of each of its entries)``; ``source`` maps
  each original leaf to its packed leaf (a tie reports its joint solve). The
  vectors are one concatenation of the pieces and one gather with constant
  indices, instead of one kernel per leaf and field (BENCHMARKS.md,
  "Diagnostics without per-leaf kernels").
  """
  vsol, idx = from_vectors
  kept = [i for i, s in enumerate(scalars) if s is not None]
  pos = np.zeros(len(scalars), np.int64)  # packed leaf -> entry of the concatenation
  pos[idx] = np.arange(len(idx))
  pos[kept] = len(idx) + np.arange(len(kept))
  take = pos[np.asarray(source, np.int64)]
  out = []
  for field, fdt in (("iterations", jnp.int32), ("relative_decrease", dt), ("residual", dt)):
    v = jnp.concatenate([
        getattr(vsol, field).astype(fdt),
        jnp.asarray([getattr(scalars[i], field) for i in kept], fdt).reshape(-1),
    ])
    out.append(v if np.array_equal(take, np.arange(len(v))) else v[take])
  return out[0], out[1], out[2]


def solve_subproblem(
    regularizer: Regularizer | None = None,
    strength: Any = 0.0,
    rtol: Any = 1e-8,
    max_iters: Any = 100,
    min_iters: Any = 2,
    solver: str | None = None,
    subgradient_tol: base.ScalarOrSchedule | None = None,
    track_residual: bool = False,
) -> base.GradientTransformation:
  r"""Solves the :class:`Subproblem` passed in and outputs :class:`NewPoint` ``z``.

  For each leaf, with threshold ``t = scale * strength * sqrt(|g|)``, the
  minimiser of (ALGORITHMS.md §6)

  .. math::

    Q(z) = \langle V, z - x_0 \rangle + \tfrac12 \langle z - x_0, P (z - x_0)
    \rangle + t \sum_g \|z_g\|

  is found as follows:

  * unregularized leaf, or ``t == 0``: ``z = centre - linear / metric``;
  * scalar metric (RMDA, ProxSGD): closed-form block soft-thresholding;
  * diagonal metric (RAMDA, ProxGen), group-LASSO leaf: the group solver
    named by ``solver``. ``"exact"`` is the exact scaled prox (screening +
    Newton on the secular equation, §6 "Exact solution",
    ``exact.exact_solve``), which ignores ``rtol``, ``max_iters`` and
    ``min_iters``; ``"pg"`` is the paper's proximal-gradient solver (§6,
    ``solvers.pg_solve``) with those stopping hyperparameters. ``None`` (the
    default) means ``"exact"``: it was measured faster per solve than the
    paper's PG at its settings and about six orders of magnitude more
    accurate (BENCHMARKS.md, "Subproblem solvers"). Use ``"pg"`` to
    reproduce the paper (the reference traces are its semantics);
  * nuclear-norm leaf (:func:`nuclear_norm`): closed-form SVD prox with a
    scalar metric, the paper's nuclear PG (§6 "Nuclear norm") with a diagonal
    one, whatever ``solver`` names (there is no exact nuclear solver; its
    stopping rule ``rtol``, ``max_iters`` is set on the regularizer,
    ``nuclear_norm(rtol=1e-3, max_iters=5)``). So with the default
    ``solver=None`` a :func:`nuclear_norm` regularizer works as is (its
    :class:`GroupSpec` leaves, if any, get the exact solver); an explicit
    ``solver="exact"`` with a nuclear norm is an error, because it asks for
    a group solver on a regularizer it does not fit.

  Follow it with :func:`interpolate`, which turns ``z`` into updates. ``z`` is
  a point, not an update: a chain that ends here returns the
  :class:`NewPoint`, which ``optax.apply_updates`` refuses (with an error
  naming ``NewPoint``) rather than adding ``z`` to the params.

  Stopping rules of the group PG solvers. By default (``subgradient_tol=None``)
  the paper's experiments' rule: relative decrease of ``Q`` below ``rtol``.
  With ``subgradient_tol = eps_t`` (a number or a schedule of the solve count
  ``t``), the paper's formal inexactness condition (§6): stop once the
  minimum-norm subgradient of ``Q`` at ``z`` has norm ``<= eps_t`` and
  ``Q(z) <= Q(warm start)``, or at ``max_iters``. Prefer it when you rely on
  the convergence/identification theory (use a square-summable schedule, e.g.
  :func:`summable_tolerance`) or want a tolerance in the units of the
  gradient rather than of ``Q``; note the scale of ``Q`` grows with ``alpha``
  in RAMDA, so a fixed ``eps_t`` gets harder to meet as training goes on.
  It needs ``solver="pg"`` (or ``"pg_fused"``); nuclear leaves keep their
  own relative-decrease rule.

  Diagnostics are in the returned :class:`SolveState` (read them with
  ``optax.tree_utils.tree_get``); see there for when ``residual`` is measured.

  Example::

    solve = optax_ramda.solve_subproblem(reg, strength=1e-3)  # exact solver
    paper = optax_ramda.solve_subproblem(reg, strength=1e-3, solver="pg")

  Args:
    regularizer: a regularizer (``group_lasso``, ``l1``, ``nuclear_norm``),
      or ``None`` for no regularizer. (``static_args``.)
    strength: ``lambda`` (>= 0), a schedulable hyperparameter.
    rtol: relative-decrease stopping tolerance of the group PG solvers (>= 0).
    max_iters: their iteration cap per step (>= 1).
    min_iters: their iterations before the first stopping test (the paper: 2).
    solver: the group-LASSO solver for a diagonal metric: ``None`` (default,
      the exact solver), ``"exact"``, ``"pg"`` (the paper's solver, one
      ``while_loop`` per leaf) or ``"pg_fused"`` (the same, all leaves in one
      loop: compiles faster, runs slower; BENCHMARKS.md "Solver loop layout").
      (A string or None: kept static by ``inject_hyperparams``.)
    subgradient_tol: ``None``, or ``eps_t`` for the formal stopping rule of
      the PG solvers (a number >= 0 or a schedule of the solve count).
    track_residual: a Python bool (static: ``inject_hyperparams`` keeps bools
      static). ``True`` makes the PG solvers compute ``residual`` at every
      step (one more elementwise pass with reductions); it is computed anyway
      when ``subgradient_tol`` is set, and always by the exact solver.

  Raises:
    ValueError: ``solver="exact"`` with a nuclear norm; ``subgradient_tol``
      without a PG solver; negative ``strength``, ``rtol`` or
      ``subgradient_tol``; ``max_iters < 1``; an unknown solver name.
    TypeError: ``solver`` not a name; ``track_residual`` not a bool.

  References:
    Huang & Lee, NeurIPS 2024, arXiv:2403.14398, Algorithm 2 and §6 of
    ALGORITHMS.md.
  """
  validation.check_non_negative("strength", strength)
  validation.check_non_negative("rtol", rtol)
  validation.check_iterations(max_iters, min_iters)
  if subgradient_tol is not None and not callable(subgradient_tol):
    validation.check_non_negative("subgradient_tol", subgradient_tol)
  if regularizer is not None and not isinstance(regularizer, Regularizer):
    raise TypeError(
        "regularizer must be made by optax_ramda.group_lasso, optax_ramda.l1 or "
        f"optax_ramda.nuclear_norm, got {regularizer!r}."
    )
  if solver is not None and not isinstance(solver, str):
    raise TypeError(
        f"solver must be a name or None, one of {sorted(solvers.SOLVERS)}, got {solver!r}."
    )
  if not isinstance(track_residual, (bool, np.bool_)):
    raise TypeError(
        "track_residual must be a Python bool (it decides what is computed, so it is "
        f"static), got {track_residual!r}."
    )
  if solver == "exact" and isinstance(regularizer, nuclear.NuclearNorm):
    raise ValueError(
        "solver='exact' solves the group LASSO only and does not fit the nuclear norm. "
        "Leave solver=None (nuclear leaves use the nuclear PG solver configured by "
        "optax_ramda.nuclear_norm(rtol=..., max_iters=...), group leaves the exact "
        "solver) or use solver='pg'."
    )
  if solver in (None, "exact") and subgradient_tol is not None:
    raise ValueError(
        "subgradient_tol is a stopping rule of the PG solvers; the "
        f"{'default (exact)' if solver is None else 'exact'} solver has none. "
        "Pass solver='pg' with it, or leave subgradient_tol=None."
    )
  if regularizer is None and validation.concrete_float(strength):
    raise ValueError(
        "strength > 0 was given without a regularizer. Pass "
        "regularizer=optax_ramda.group_lasso(spec) (or l1())."
    )
  if solver is None:
    solver = solvers.DEFAULT_SOLVER
  if solver not in solvers.SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(solvers.SOLVERS)}.")
  solve_many = solvers.SOLVERS[solver]

  def leaf_tree(params):
    if regularizer is None:
      return jax.tree.map(lambda _: UNREGULARIZED, params)
    return regularizer.leaves(params)

  def init_fn(params):
    leaf_tree(params)  # validates the regularizer against the params
    xs = jax.tree.leaves(params)
    dt = diagnostics_dtype(xs)
    return SolveState(
        iterations=jnp.zeros([len(xs)], jnp.int32),
        relative_decrease=jnp.zeros([len(xs)], dt),
        residual=jnp.full([len(xs)], solvers.NOT_MEASURED, dt),
        solve_count=jnp.zeros([], jnp.int32),
    )

  def update_fn(sub: Subproblem, state, params=None):
    check_stage_input("solve_subproblem", sub, Subproblem)
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    leaves_tree = leaf_tree(params)
    leaves, treedef = jax.tree.flatten(leaves_tree)
    fields = [
        treedef.flatten_up_to(f)  # type: ignore[attr-defined, unused-ignore]
        for f in (sub.centre, sub.linear, sub.metric, sub.warm_start)
    ]
    leaves, fields, unpack, source = tied.pack_problem(leaves, fields)  # joint groups (tie)
    zs: list[Any] = [None] * len(leaves)
    # Diagnostics per packed leaf: a LeafSolution, or None where the group
    # solver's vectors hold them (``from_vectors``).
    scalars: list[solvers.LeafSolution | None] = [None] * len(leaves)
    pending, pending_leaves, pending_idx = [], [], []
    # Closed-form group leaves: fused (no stored y) from FUSED_PROX_FROM bytes on.
    fused = sum(
        x0.size * jnp.dtype(compute_dtype(jnp.result_type(v))).itemsize
        for leaf, x0, v, p in zip(leaves, *fields[:3])
        if isinstance(leaf, GroupLeaf) and jnp.ndim(p) == 0
    ) >= solvers.FUSED_PROX_FROM
    for i, (leaf, x0, v, p, w) in enumerate(zip(leaves, *fields)):
      dt = compute_dtype(jnp.result_type(v))
      if isinstance(leaf, GroupLeaf):
        t = jnp.asarray(sub.scale * strength * leaf.weight, dt)
      elif isinstance(leaf, nuclear.NuclearLeaf):
        t = jnp.asarray(sub.scale * strength, dt)
      else:
        t = jnp.zeros([], dt)
      prob = solvers.LeafProblem(
          x0, v, p, w, t, sub.linear_scale, sub.centre_scale
      )
      if not (isinstance(leaf, GroupLeaf) and x0.dtype == v.dtype == dt):
        prob = prob.folded()  # the scales stay where solve_many or closed_form takes them
      prob = prob._replace(centre=prob.centre.astype(dt), linear=prob.linear.astype(dt),
                           metric=jnp.asarray(p, dt), warm_start=w.astype(dt))
      if isinstance(leaf, nuclear.NuclearLeaf):
        if prob.metric.ndim == 0:
          sol = nuclear.nuclear_closed_form(leaf, prob)
        else:
          sol = nuclear.nuclear_pg(leaf, prob)
      elif not isinstance(leaf, GroupLeaf):
        sol = solvers.direct_solution(solvers.unregularized_point(prob))
      elif prob.metric.ndim == 0:
        sol = solvers.closed_form(leaf, prob, fused)
      else:
        pending.append(prob)
        pending_leaves.append(leaf)
        pending_idx.append(i)
        continue
      zs[i], scalars[i] = sol.z, sol
    tol = subgradient_tol
    if callable(tol):
      tol = tol(state.solve_count)
    vsol = solve_many(
        pending_leaves, pending, rtol, max_iters, min_iters, tol, bool(track_residual)
    )
    for k, i in enumerate(pending_idx):
      zs[i] = vsol.z[k]
    from_vectors = (vsol, [pending_idx[k] for k in vsol.order])
    z = jax.tree.unflatten(treedef, unpack(zs))
    its, rels, ress = _diagnostic_vectors(scalars, from_vectors, source, state.residual.dtype)
    # Inside shard_map (check_vma=True): a sharded leaf's diagnostics of the whole leaf.
    axes = [frozenset().union(*map(varying.varying_axes, f)) for f in zip(*fields)]
    its, rels, ress = varying.combine_leaf_diagnostics(
        its, rels, ress, [axes[j] for j in source], solvers.NOT_MEASURED
    )
    new_state = SolveState(its, rels, ress, solve_count=state.solve_count + 1)
    return NewPoint(z), new_state

  return base.GradientTransformation(init_fn, update_fn)
