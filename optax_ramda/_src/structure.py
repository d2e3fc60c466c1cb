"""How structured a model is (ALGORITHMS.md §8), measured on the weights ``x``.

All counts use exact ``== 0``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_ramda._src import tied
from optax_ramda._src.groups import GroupLeaf
from optax_ramda._src.regularizers import GroupLasso


class LeafStructure(NamedTuple):
  zero_groups: jax.Array  # number of all-zero groups
  num_groups: int
  group_size: int
  zero_entries: jax.Array
  size: int


class StructureReport(NamedTuple):
  """The structure of a params tree under a regularizer's groups.

  Attributes:
    weighted_group_sparsity: over regularized leaves, the fraction of their
      entries lying in all-zero groups (the paper's headline number).
    group_sparsity: fraction of groups that are all zero.
    unstructured_sparsity: fraction of exactly-zero entries over all params.
    per_leaf: ``{path: LeafStructure}`` for every regularized leaf, keyed by
      ``jax.tree_util.keystr`` of its path.
  """

  weighted_group_sparsity: jax.Array
  group_sparsity: jax.Array
  unstructured_sparsity: jax.Array
  per_leaf: dict[str, LeafStructure]


def structure(params: Any, regularizer: GroupLasso) -> StructureReport:
  """Measures :class:`StructureReport` (jit-able; returns arrays).

  A joint group of tied leaves (``GroupSpec(tie=...)``) is zero iff all its
  slices are, and counts once in ``group_sparsity``. Its leaves still get
  their own ``per_leaf`` entries, each with its own ``num_groups`` and
  ``group_size`` (its slices) and ``zero_groups`` the number of its slices
  that lie in all-zero joint groups.
  """
  leaves_tree = regularizer.leaves(params)
  flat_leaves, treedef = jax.tree.flatten(leaves_tree)
  flat_params = treedef.flatten_up_to(params)  # type: ignore[attr-defined, unused-ignore]
  paths = [
      jax.tree_util.keystr(path)
      for path, _ in jax.tree_util.tree_flatten_with_path(leaves_tree)[0]
  ]
  plan = tied.packing(flat_leaves, [jnp.shape(x) for x in flat_params])
  per_leaf = {}
  zero_w: Any = 0  # traced counts (arrays) and static totals (ints)
  zero_g: Any = 0
  zero_entries: Any = 0
  total_w = total_g = total_entries = 0
  zeros = [jnp.sum(x == 0) for x in flat_params]
  for x, z in zip(flat_params, zeros):
    zero_entries = zero_entries + z
    total_entries += x.size
  for leaf, x, idx in zip(plan.leaves, plan.pack(flat_params), plan.members):
    if not isinstance(leaf, GroupLeaf):
      continue
    if leaf.reduce_axes:
      zero_group = jnp.all(x == 0, axis=leaf.reduce_axes)
    else:
      zero_group = x == 0
    zg = jnp.sum(zero_group)
    for i in idx:
      member = flat_leaves[i]
      per_leaf[paths[i]] = LeafStructure(
          zg, member.num_groups, member.group_size, zeros[i], flat_params[i].size
      )
    zero_w = zero_w + zg * leaf.group_size
    total_w += leaf.num_groups * leaf.group_size
    zero_g = zero_g + zg
    total_g += leaf.num_groups
  ratio = lambda a, b: jnp.asarray(a / b if b else 0.0)
  return StructureReport(
      weighted_group_sparsity=ratio(zero_w, total_w),
      group_sparsity=ratio(zero_g, total_g),
      unstructured_sparsity=ratio(zero_entries, total_entries),
      per_leaf=per_leaf,
  )
