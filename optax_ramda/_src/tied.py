"""Joint groups across parameter leaves ("ties"), by packing (ALGORITHMS.md §1).

A group of the group LASSO is a slice of one array. Some natural groups span
several arrays: an attention head is a slice of each of the query, key, value
and out kernels. ``GroupSpec(reduce_axes, tie=name)`` joins the leaves that
share ``name``: the ``i``-th group of each (groups counted in row-major order
of the leaf's non-reduced axes) together form one *joint group*, whose norm
runs over all its slices and whose weight is ``sqrt`` of its total size::

  psi = sum_i sqrt(sum_l |g_l|) * sqrt(sum_l ||x_{l, g_i}||^2)

Every leaf of a tie must have the same number of groups; :func:`check_ties`
enforces it when a spec is resolved, naming the paths.

The group math is unchanged: before it runs, :class:`Packing` packs the
leaves of each tie into one array of shape ``(num_groups, sum_l |g_l|)``
(each leaf's group axes moved first and flattened, its reduce axes flattened,
then concatenated), described by a single :class:`GroupLeaf` with reduce
axes ``(1,)``; afterwards it unpacks the results into the original leaves.
Packing and unpacking only move data (transpose, reshape, concatenate,
slice), so the round trip is bit-exact. Everything about a packing is static
(shapes and axes, computed at trace time); leaves without a tie, and ties
with a single leaf, pass through untouched, so a regularizer without ties
computes exactly what it did before.

Used by the solve stage (every per-leaf array of the subproblem is packed and
``z`` is unpacked), by :meth:`Regularizer.value`, :meth:`Regularizer.prox`
and by :func:`structure`. In the solve stage the diagnostics of a joint
group's solve (iterations, relative decrease, residual) are reported for
each of its leaves. A scalar metric (RMDA, ProxSGD) is the same for every
leaf of the step, so a tie whose leaves all have scalar metrics uses the
first one's (closed form); a mix of scalar and diagonal metrics is broadcast
to diagonal.

Under ``optax.masked`` / ``optax.partition`` only the leaves of a tie that the
optimizer sees are joined: keep all the leaves of a tie in the same partition.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_ramda._src.groups import GroupLeaf


@dataclasses.dataclass(frozen=True)
class _Part:
  """How one leaf of a tie sits in the packed array."""

  index: int  # position in the flat list of leaves
  shape: tuple[int, ...]  # the leaf's shape
  perm: tuple[int, ...]  # group axes (in order), then reduce axes
  size: int  # |g| of the leaf's groups

  def pack(self, x: jax.Array, num_groups: int) -> jax.Array:
    if self.perm != tuple(range(len(self.perm))):
      x = jnp.transpose(x, self.perm)
    return jnp.reshape(x, (num_groups, self.size))

  def unpack(self, piece: jax.Array) -> jax.Array:
    moved = tuple(self.shape[a] for a in self.perm)
    x = jnp.reshape(piece, moved)
    if self.perm != tuple(range(len(self.perm))):
      x = jnp.transpose(x, tuple(np.argsort(self.perm)))
    return x


@dataclasses.dataclass(frozen=True)
class Packing:
  """The static packing of a flat list of resolved leaves.

  Attributes:
    leaves: the packed leaves: one per untied leaf (itself, in order) and
      one :class:`GroupLeaf` per tie of two or more leaves (at the position
      of the tie's first leaf), with reduce axes ``(1,)``.
    members: per packed leaf, the positions of its original leaves.
    parts: per packed leaf, ``None`` (untied: passed through) or the layout of
      each of its original leaves in the packed array.
    size: the number of original leaves.
  """

  leaves: tuple[Any, ...]
  members: tuple[tuple[int, ...], ...]
  parts: tuple[tuple[_Part, ...] | None, ...]
  size: int

  @property
  def trivial(self) -> bool:
    """Whether nothing is packed (no tie of two or more leaves)."""
    return all(p is None for p in self.parts)

  def pack(self, arrays: Sequence[Any]) -> list[Any]:
    """Packs one array per original leaf (a tied leaf's array may be a
    scalar that stands for a multiple of the identity, e.g. a metric)."""
    if self.trivial:
      return list(arrays)
    out = []
    for leaf, idx, parts in zip(self.leaves, self.members, self.parts):
      if parts is None:
        out.append(arrays[idx[0]])
        continue
      xs = [arrays[p.index] for p in parts]
      scalar = [jnp.ndim(x) == 0 and len(p.shape) > 0 for x, p in zip(xs, parts)]
      if all(scalar):
        out.append(xs[0])
        continue
      xs = [jnp.broadcast_to(x, p.shape) if s else x for x, p, s in zip(xs, parts, scalar)]
      out.append(
          jnp.concatenate([p.pack(x, leaf.num_groups) for x, p in zip(xs, parts)], axis=1)
      )
    return out

  def unpack(self, packed: Sequence[Any]) -> list[Any]:
    """The inverse of :meth:`pack` for full-size arrays (bit-exact)."""
    if self.trivial:
      return list(packed)
    out: list[Any] = [None] * self.size
    for x, idx, parts in zip(packed, self.members, self.parts):
      if parts is None:
        out[idx[0]] = x
        continue
      for p, piece in zip(parts, split(x, parts)):
        out[p.index] = p.unpack(piece)
    return out

def split(x: jax.Array, parts: Sequence[_Part]) -> list[jax.Array]:
  """The columns of a packed array that belong to each part."""
  bounds = [0, *itertools.accumulate(p.size for p in parts)]
  return [x[:, a:b] for a, b in itertools.pairwise(bounds)]


def _ties(leaves: Sequence[Any]) -> dict[str, list[int]]:
  """``{tie name: positions of its leaves}`` over the resolved leaves."""
  ties: dict[str, list[int]] = {}
  for i, leaf in enumerate(leaves):
    if isinstance(leaf, GroupLeaf) and leaf.tie is not None:
      ties.setdefault(leaf.tie, []).append(i)
  return ties


def packing(leaves: Sequence[Any], shapes: Sequence[Sequence[int]]) -> Packing:
  """The :class:`Packing` of resolved leaves with the given array shapes."""
  ties = _ties(leaves)
  joined = {idx[0]: idx for idx in ties.values() if len(idx) > 1}
  skip = {i for idx in joined.values() for i in idx[1:]}
  out_leaves: list[Any] = []
  members: list[tuple[int, ...]] = []
  parts: list[tuple[_Part, ...] | None] = []
  for i, leaf in enumerate(leaves):
    if i in skip:
      continue
    if i not in joined:
      out_leaves.append(leaf)
      members.append((i,))
      parts.append(None)
      continue
    idx = joined[i]
    ps = []
    for j in idx:
      shape = tuple(int(s) for s in shapes[j])
      red = leaves[j].reduce_axes
      perm = tuple(a for a in range(len(shape)) if a not in red) + tuple(red)
      ps.append(_Part(j, shape, perm, leaves[j].group_size))
    total = sum(p.size for p in ps)
    out_leaves.append(GroupLeaf((1,), math.sqrt(total), total, leaf.num_groups, leaf.tie))
    members.append(tuple(idx))
    parts.append(tuple(ps))
  return Packing(tuple(out_leaves), tuple(members), tuple(parts), len(leaves))


def check_ties(
    names: Sequence[str], leaves: Sequence[Any], masked: Mapping[str, str] | None = None
) -> None:
  """Raises if the leaves of a tie do not have the same number of groups, or if
  some of them are masked out.

  Args:
    names: the leaves' paths (for the message).
    leaves: the resolved leaves, in the same order.
    masked: ``{tie: path}`` of ties with a leaf that ``optax.masked`` or
      ``optax.partition`` keeps from this optimizer.
  """
  masked = masked or {}
  for tie, idx in _ties(leaves).items():
    if tie in masked:
      raise ValueError(
          f"tie={tie!r} joins {names[idx[0]]} with {masked[tie]}, which is masked out "
          "here (optax.masked or optax.partition keeps it from this optimizer). A joint "
          "group must be seen whole by one optimizer, or this one would solve its "
          "visible part as a group of its own. Keep all leaves of a tie in the same "
          "partition, or untie them (tie=None) in this optimizer's spec."
      )
    members = [(names[i], leaves[i]) for i in idx]
    if len({leaf.num_groups for _, leaf in members}) > 1:
      listed = "\n".join(
          f"  {name}: {leaf.num_groups} groups (reduce axes {leaf.reduce_axes})"
          for name, leaf in members
      )
      raise ValueError(
          f"the parameters tied by tie={tie!r} have different numbers of groups:\n"
          f"{listed}\nThe i-th groups of tied parameters form one joint group, so "
          "every parameter of a tie needs the same number of groups (the product of "
          "its non-reduced axes, matched in row-major order). Fix the reduce axes, or "
          "give these parameters different tie names (or none)."
      )


def pack_problem(
    leaves: Sequence[Any], fields: Sequence[Sequence[Any]]
) -> tuple[list[Any], list[list[Any]], Callable[[Sequence[Any]], list[Any]], tuple[int, ...]]:
  """Packs a subproblem's per-leaf fields for the solve stage.

  Args:
    leaves: the flat resolved leaves.
    fields: per-leaf lists ``[centre, linear, metric, warm_start]``; the shapes
      come from the first (full size).

  Returns:
    The packed leaves, the packed fields, a function mapping the packed
    leaves' full-size solutions back to one per original leaf
    (:meth:`Packing.unpack`), and for each original leaf the index of its
    packed leaf (every leaf of a tie reports the joint solve's diagnostics).
  """
  plan = packing(leaves, [jnp.shape(x) for x in fields[0]])
  source = [0] * plan.size
  for k, idx in enumerate(plan.members):
    for i in idx:
      source[i] = k
  if plan.trivial:
    return list(leaves), [list(f) for f in fields], list, tuple(source)
  return list(plan.leaves), [plan.pack(f) for f in fields], plan.unpack, tuple(source)


__all__ = ["Packing", "check_ties", "pack_problem", "packing"]
