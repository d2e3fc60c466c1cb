"""The subproblem stage: from a :class:`Subproblem` to the new point ``z``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from optax._src import base

from optax_ramda._src import solvers, validation
from optax_ramda._src.groups import UNREGULARIZED, GroupLeaf
from optax_ramda._src.regularizers import GroupLasso
from optax_ramda._src.subproblem import Subproblem


class SolveState(NamedTuple):
  """Solver diagnostics of the last step, one scalar per parameter leaf.

  Read them with ``optax.tree_utils.tree_get(opt_state, "iterations")``.

  Attributes:
    iterations: solver iterations used for each leaf (0 for unregularized
      leaves, closed-form leaves and leaves whose groups were all screened).
    relative_decrease: ``(prev - cur) / (|cur| + 1)`` at the stop (0 where
      no iteration ran).
  """

  iterations: Any
  relative_decrease: Any


def compute_dtype(dtype: Any) -> jnp.dtype:
  """Solves run in at least float32 (bf16/fp16 leaves are promoted)."""
  return jnp.promote_types(dtype, jnp.float32)


def solve_subproblem(
    regularizer: GroupLasso | None = None,
    strength: Any = 0.0,
    rtol: Any = 1e-8,
    max_iters: Any = 100,
    min_iters: Any = 2,
    solver: str = "pg",
) -> base.GradientTransformation:
  r"""Solves the :class:`Subproblem` passed in and outputs ``z`` (not updates).

  For each leaf, with threshold ``t = scale * strength * sqrt(|g|)``:

  * unregularized leaf, or ``t == 0``: ``z = centre - linear / metric``;
  * scalar metric (RMDA, ProxSGD): closed-form block soft-thresholding;
  * diagonal metric (RAMDA, ProxGen): ``solver``; ``"pg"`` is the paper's
    proximal-gradient solver (ALGORITHMS.md §6, see ``solvers.pg_solve``)
    with stopping hyperparameters ``rtol``, ``max_iters``, ``min_iters``.

  Follow it with :func:`interpolate`, which turns ``z`` into updates.

  Args:
    regularizer: a :class:`GroupLasso` (``group_lasso``, ``l1``), or
      ``None`` for no regularizer. (``static_args``.)
    strength: ``lambda`` (>= 0), a schedulable hyperparameter.
    rtol: relative-decrease stopping tolerance (>= 0).
    max_iters: iteration cap per step (>= 1).
    min_iters: iterations before the first stopping test (the paper: 2).
    solver: ``"pg"`` (one fused loop for all leaves) or ``"pg_per_leaf"``
      (one loop per leaf). (``static_args``.)

  References:
    Huang & Lee, NeurIPS 2024, arXiv:2403.14398, Algorithm 2.
  """
  validation.check_non_negative("strength", strength)
  validation.check_non_negative("rtol", rtol)
  validation.check_iterations(max_iters, min_iters)
  if regularizer is not None and not isinstance(regularizer, GroupLasso):
    raise TypeError(
        f"regularizer must be made by optax_ramda.group_lasso or optax_ramda.l1, "
        f"got {regularizer!r}."
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
    return SolveState(
        iterations=jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params),
        relative_decrease=jax.tree.map(
            lambda x: jnp.zeros([], compute_dtype(jnp.result_type(x))), params
        ),
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
      else:
        t = jnp.zeros([], dt)
      prob = solvers.LeafProblem(
          x0.astype(dt), v.astype(dt), jnp.asarray(p, dt), w.astype(dt), t
      )
      if not isinstance(leaf, GroupLeaf):
        z = solvers.unregularized_point(prob)
        results[i] = solvers.LeafSolution(z, jnp.zeros([], jnp.int32), jnp.zeros([], dt))
      elif prob.metric.ndim == 0:
        results[i] = solvers.closed_form(leaf, prob)
      else:
        pending.append(prob)
        pending_leaves.append(leaf)
        pending_idx.append(i)
    for i, sol in zip(
        pending_idx, solve_many(pending_leaves, pending, rtol, max_iters, min_iters)
    ):
      results[i] = sol
    z = treedef.unflatten([r.z for r in results])
    new_state = SolveState(
        iterations=treedef.unflatten([r.iterations for r in results]),
        relative_decrease=treedef.unflatten([r.relative_decrease for r in results]),
    )
    return z, new_state

  return base.GradientTransformation(init_fn, update_fn)
