"""Structure-inducing regularizers as values (ALGORITHMS.md §1).

A regularizer is static structure: *which* leaves are regularized and *how*
(their groups). Its strength ``lambda`` is not part of it: every optimizer
takes ``strength`` as a numeric hyperparameter, so ``optax.inject_hyperparams``
can schedule it.

Each regularizer knows

* its value ``psi(x)`` (:meth:`GroupLasso.value`, without ``lambda``),
* its closed-form prox under the identity metric (:meth:`GroupLasso.prox`),
* what the scaled-prox solvers need: :meth:`GroupLasso.leaves` resolves it
  against a params tree into per-leaf static objects (:class:`GroupLeaf`)
  with vectorised group reductions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_ramda._src import groups as groups_lib
from optax_ramda._src import tied
from optax_ramda._src.groups import UNREGULARIZED, GroupLeaf, GroupSpec, SpecLike


@dataclasses.dataclass(frozen=True, eq=False)
class Regularizer:
  """Base of the structure-inducing regularizers: a spec tree resolved per leaf.

  A subclass says how one spec leaf becomes a static per-leaf object
  (:meth:`make_leaf`); the solvers dispatch on that object's type
  (:class:`GroupLeaf`: group LASSO; ``nuclear.NuclearLeaf``: nuclear norm), so
  one regularizer tree can mix kinds. Non-group leaf kinds implement
  ``psi(x)`` (their value) and ``prox(y, threshold)`` (identity-metric prox).
  """

  groups: SpecLike

  def make_leaf(self, spec: Any, leaf: Any, path: str) -> Any:
    """The static per-leaf object of one spec leaf (default: group LASSO)."""
    return groups_lib._default_make_leaf(spec, leaf, path)

  def leaves(self, params: Any) -> Any:
    """Resolves the spec against ``params`` (static; see ``groups.resolve``)."""
    return groups_lib.resolve(self.groups, params, self.make_leaf)

  def value(self, params: Any) -> jax.Array:
    """``psi(params)``, summed over all regularized leaves (no lambda).

    A joint group of tied leaves (``GroupSpec(tie=...)``) counts once, with
    its norm over all its slices. For the group LASSO and L1, ``jax.grad``
    of it is finite at finite params: 0 on the entries of an all-zero group
    (:func:`leaf_value`).
    """
    leaves, xs = _flat(self.leaves(params), params)
    plan = tied.packing(leaves, [jnp.shape(x) for x in xs])
    terms = [
        leaf_value(leaf, x)
        for leaf, x in zip(plan.leaves, plan.pack(xs))
        if isinstance(leaf, GroupLeaf) or hasattr(leaf, "psi")
    ]
    return sum(terms, jnp.zeros([], jnp.result_type(float)))

  def prox(self, params: Any, threshold: jax.Array | float) -> Any:
    r"""Closed-form ``prox_{threshold * psi}`` under the identity metric.

    ``argmin_z 1/2 ||z - y||^2 + threshold * psi(z)``: each group is shrunk
    by ``threshold * sqrt(|g|)`` (block soft-thresholding), each nuclear-norm
    leaf has its singular values shrunk by ``threshold``; unregularized
    leaves are returned unchanged. A joint group of tied leaves is shrunk as
    one block (its norm over all its slices, threshold times ``sqrt`` of its
    total size).
    """
    leaves_tree = self.leaves(params)
    leaves, ys = _flat(leaves_tree, params)
    plan = tied.packing(leaves, [jnp.shape(y) for y in ys])
    zs = [shrink_leaf(leaf, y, threshold) for leaf, y in zip(plan.leaves, plan.pack(ys))]
    zs = [z.astype(jnp.result_type(y)) for z, y in zip(plan.unpack(zs), ys)]
    return jax.tree.unflatten(jax.tree.structure(leaves_tree), zs)


@dataclasses.dataclass(frozen=True, eq=False)
class GroupLasso(Regularizer):
  r"""The group LASSO ``psi(x) = sum_g sqrt(|g|) ||x_g||_2`` (ALGORITHMS.md §1).

  The optimizer multiplies it by ``strength`` (lambda).

  Attributes:
    groups: a pytree matching the params with a :class:`GroupSpec` (or
      ``None``: not regularized) per leaf, a single :class:`GroupSpec` for
      every leaf, or a function ``params -> spec tree``.

  Example::

    reg = optax_ramda.group_lasso({"w": GroupSpec((1,)), "b": None})
    reg.value({"w": jnp.ones((3, 4)), "b": jnp.ones(4)})  # 3 * 2 * 2 = 12
  """

  groups: SpecLike


def _flat(leaves_tree: Any, params: Any) -> tuple[list[Any], list[Any]]:
  """The resolved leaves and the params leaves, flat and aligned."""
  leaves, treedef = jax.tree.flatten(leaves_tree)
  return leaves, treedef.flatten_up_to(params)  # type: ignore[attr-defined, unused-ignore]


def leaf_value(leaf: Any, x: jax.Array) -> jax.Array:
  """``psi`` of one leaf without lambda (0 for an unregularized leaf).

  Differentiable everywhere with ``jax.grad``: at an all-zero group the
  gradient is 0, the minimum-norm subgradient of ``||x_g||`` there (the plain
  ``sqrt`` of the sum of squares would give NaN).
  """
  if isinstance(leaf, GroupLeaf):
    if not leaf.reduce_axes:  # L1: jax.grad of abs is 1 at 0
      return leaf.weight * jnp.sum(jnp.where(x == 0, 0, jnp.abs(x)))
    sq = jnp.sum(x * x, axis=leaf.reduce_axes, keepdims=True)
    nonzero = sq != 0  # True for NaN: a NaN group stays NaN
    norms = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1)), 0)
    return leaf.weight * jnp.sum(norms)
  if hasattr(leaf, "psi"):
    return leaf.psi(x)
  return jnp.zeros([], jnp.result_type(float))


def shrink_leaf(leaf: Any, y: jax.Array, threshold: jax.Array | float) -> jax.Array:
  """Identity-metric prox of one leaf with scale ``threshold`` (no-op if 0)."""
  if not isinstance(leaf, GroupLeaf):
    return leaf.prox(y, threshold) if hasattr(leaf, "prox") else y
  t = jnp.asarray(threshold * leaf.weight, y.dtype)
  z, _ = leaf.shrink(y, t)
  # threshold 0 is "no regularizer": y itself, never pushed through the prox.
  return jnp.where(t > 0, z, y)


def group_lasso(groups: SpecLike) -> GroupLasso:
  """The group LASSO over the groups described by ``groups`` (see GroupLasso)."""
  return GroupLasso(groups)


def l1(mask: Any = True) -> GroupLasso:
  """The L1 norm ``sum_i |x_i|``: every entry its own group, weight 1.

  Args:
    mask: ``True`` (every leaf), a pytree of booleans matching the params, or
      a function ``params -> tree of booleans``.
  """

  def entry(b: Any) -> GroupSpec | None:
    if np.ndim(b) != 0:
      raise ValueError(
          f"l1's mask holds one bool per parameter leaf, got an array of shape "
          f"{np.shape(b)}. Entries of one leaf cannot be masked separately: "
          "give the whole leaf True or False (or split the parameter into two leaves)."
      )
    return GroupSpec(()) if b else None

  def to_spec(m: Any) -> Any:
    return jax.tree.map(entry, m)

  if mask is True:
    return GroupLasso(GroupSpec(()))
  if callable(mask):
    return GroupLasso(lambda params: to_spec(mask(params)))
  return GroupLasso(to_spec(mask))


__all__ = [
    "UNREGULARIZED",
    "GroupLasso",
    "Regularizer",
    "group_lasso",
    "l1",
    "leaf_value",
    "shrink_leaf",
]
