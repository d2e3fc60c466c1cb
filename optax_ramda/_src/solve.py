"""The subproblem stage: from a :class:`Subproblem` to the new point ``z``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from optax._src import base

from optax_ramda._src import nuclear, solvers, validation
from optax_ramda._src.groups import UNREGULARIZED, GroupLeaf
from optax_ramda._src.regularizers import Regularizer
from optax_ramda._src.subproblem import Subproblem


class SolveState(NamedTuple):
  """Solver diagnostics of the last step, one scalar per parameter leaf.

  Read them with ``optax.tree_utils.tree_get``, e.g.
  ``optax.tree_utils.tree_get(opt_state, "residual")`` gives a tree like the
  params. They are a by-product of the solve (the exact solver's residual
  comes from its last Newton evaluation; the PG solvers add one elementwise
  pass per step for it), so reading them costs nothing.

  Attributes:
    iterations: solver iterations used for each leaf at the last step: PG
      sweeps, or for ``solver="exact"`` the Newton steps of the leaf's slowest
      group. 0 for unregularized leaves, closed-form leaves and leaves whose
      groups were all screened.
    relative_decrease: PG: ``(prev - cur) / (|cur| + 1)`` at the stop (0
      where no iteration ran, and for the exact solver).
    residual: how far the returned ``z`` is from optimal: the norm of the
      minimum-norm subgradient of the subproblem objective ``Q`` at ``z``
      (ALGORITHMS.md §6; 0 at the exact solution), summed over groups in
      quadrature. Same units as ``V``. 0 for closed-form leaves, unregularized
      leaves and nuclear-norm leaves (not measured there).
    solve_count: number of solves so far (scalar int32); the argument of a
      ``subgradient_tol`` schedule.
  """

  iterations: Any
  relative_decrease: Any
  residual: Any
  solve_count: jax.Array


def compute_dtype(dtype: Any) -> jnp.dtype:
  """Solves run in at least float32 (bf16/fp16 leaves are promoted)."""
  return jnp.promote_types(dtype, jnp.float32)


def solve_subproblem(
    regularizer: Regularizer | None = None,
    strength: Any = 0.0,
    rtol: Any = 1e-8,
    max_iters: Any = 100,
    min_iters: Any = 2,
    solver: str = "pg",
    subgradient_tol: base.ScalarOrSchedule | None = None,
) -> base.GradientTransformation:
  r"""Solves the :class:`Subproblem` passed in and outputs ``z`` (not updates).

  For each leaf, with threshold ``t = scale * strength * sqrt(|g|)``:

  * unregularized leaf, or ``t == 0``: ``z = centre - linear / metric``;
  * scalar metric (RMDA, ProxSGD): closed-form block soft-thresholding;
  * diagonal metric (RAMDA, ProxGen), group-LASSO leaf: ``solver``;
    ``"pg"`` is the paper's proximal-gradient solver (ALGORITHMS.md §6, see
    ``solvers.pg_solve``) with stopping hyperparameters ``rtol``,
    ``max_iters``, ``min_iters``; ``"exact"`` is the exact scaled prox
    (screening + Newton on the secular equation, ``exact.exact_solve``),
    which ignores them;
  * nuclear-norm leaf (:func:`nuclear_norm`): closed-form SVD prox with a
    scalar metric, the paper's nuclear PG with a diagonal one (its stopping
    rule is set on the regularizer).

  Follow it with :func:`interpolate`, which turns ``z`` into updates.

  Stopping rules of the PG solvers. By default (``subgradient_tol=None``)
  the paper's experiments' rule: relative decrease of ``Q`` below ``rtol``.
  With ``subgradient_tol = eps_t`` (a number or a schedule of the solve count
  ``t``), the paper's formal inexactness condition (§6): stop once the
  minimum-norm subgradient of ``Q`` at ``z`` has norm ``<= eps_t`` and
  ``Q(z) <= Q(warm start)``, or at ``max_iters``. Prefer it when you rely on
  the convergence/identification theory (use a square-summable schedule, e.g.
  :func:`inexact.summable_tolerance`) or want a tolerance in the units of the
  gradient rather than of ``Q``; note the scale of ``Q`` grows with ``alpha``
  in RAMDA, so a fixed ``eps_t`` gets harder to meet as training goes on.

  Example::

    solve = optax_ramda.solve_subproblem(reg, strength=1e-3, solver="exact")

  Args:
    regularizer: a regularizer (``group_lasso``, ``l1``, ``nuclear_norm``),
      or ``None`` for no regularizer. (``static_args``.)
    strength: ``lambda`` (>= 0), a schedulable hyperparameter.
    rtol: relative-decrease stopping tolerance (>= 0).
    max_iters: iteration cap per step (>= 1).
    min_iters: iterations before the first stopping test (the paper: 2).
    solver: ``"pg"`` (one fused loop for all leaves), ``"pg_per_leaf"`` (one
      loop per leaf) or ``"exact"``. (``static_args``.)
    subgradient_tol: ``None``, or ``eps_t`` for the formal stopping rule of
      the PG solvers (a number >= 0 or a schedule).

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
  if not isinstance(solver, str):
    raise TypeError(
        f"solver must be a name, one of {sorted(solvers.SOLVERS)}, got {solver!r}."
    )
  if solver == "exact" and isinstance(regularizer, nuclear.NuclearNorm):
    raise ValueError(
        "solver='exact' solves the group LASSO only and does not fit the nuclear norm. "
        "Use solver='pg' (nuclear leaves then use the nuclear PG solver configured by "
        "optax_ramda.nuclear_norm(rtol=..., max_iters=...))."
    )
  if solver == "exact" and subgradient_tol is not None:
    raise ValueError(
        "subgradient_tol is a stopping rule of the PG solvers; solver='exact' has none. "
        "Use solver='pg' or leave subgradient_tol=None."
    )
  if regularizer is None and validation.concrete_float(strength):
    raise ValueError(
        "strength > 0 was given without a regularizer. Pass "
        "regularizer=optax_ramda.group_lasso(spec) (or l1())."
    )
  if solver not in solvers.SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(solvers.SOLVERS)}.")
  solve_many = solvers.SOLVERS[solver]

  def leaf_tree(params):
    if regularizer is None:
      return jax.tree.map(lambda _: UNREGULARIZED, params)
    return regularizer.leaves(params)

  def init_fn(params):
    leaf_tree(params)  # validates the regularizer against the params
    zeros = lambda x: jnp.zeros([], compute_dtype(jnp.result_type(x)))
    return SolveState(
        iterations=jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params),
        relative_decrease=jax.tree.map(zeros, params),
        residual=jax.tree.map(zeros, params),
        solve_count=jnp.zeros([], jnp.int32),
    )

  def update_fn(sub: Subproblem, state, params=None):
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    leaves_tree = leaf_tree(params)
    leaves, treedef = jax.tree.flatten(leaves_tree)
    fields = [
        treedef.flatten_up_to(f)
        for f in (sub.centre, sub.linear, sub.metric, sub.warm_start)
    ]
    results: list[solvers.LeafSolution | None] = [None] * len(leaves)
    pending, pending_leaves, pending_idx = [], [], []
    for i, (leaf, x0, v, p, w) in enumerate(zip(leaves, *fields)):
      dt = compute_dtype(jnp.result_type(v))
      if isinstance(leaf, GroupLeaf):
        t = jnp.asarray(sub.scale * strength * leaf.weight, dt)
      elif isinstance(leaf, nuclear.NuclearLeaf):
        t = jnp.asarray(sub.scale * strength, dt)
      else:
        t = jnp.zeros([], dt)
      prob = solvers.LeafProblem(
          x0.astype(dt), v.astype(dt), jnp.asarray(p, dt), w.astype(dt), t
      )
      if isinstance(leaf, nuclear.NuclearLeaf):
        if prob.metric.ndim == 0:
          results[i] = nuclear.nuclear_closed_form(leaf, prob)
        else:
          results[i] = nuclear.nuclear_pg(leaf, prob)
      elif not isinstance(leaf, GroupLeaf):
        z = solvers.unregularized_point(prob)
        zero = jnp.zeros([], dt)
        results[i] = solvers.LeafSolution(z, jnp.zeros([], jnp.int32), zero, zero)
      elif prob.metric.ndim == 0:
        results[i] = solvers.closed_form(leaf, prob)
      else:
        pending.append(prob)
        pending_leaves.append(leaf)
        pending_idx.append(i)
    tol = subgradient_tol
    if callable(tol):
      tol = tol(state.solve_count)
    sols = solve_many(pending_leaves, pending, rtol, max_iters, min_iters, tol)
    for i, sol in zip(pending_idx, sols):
      results[i] = sol
    z = treedef.unflatten([r.z for r in results])
    new_state = SolveState(
        iterations=treedef.unflatten([r.iterations for r in results]),
        relative_decrease=treedef.unflatten([r.relative_decrease for r in results]),
        residual=treedef.unflatten([r.residual for r in results]),
        solve_count=state.solve_count + 1,
    )
    return z, new_state

  return base.GradientTransformation(init_fn, update_fn)
