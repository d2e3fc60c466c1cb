"""Groups of a parameter array, described by reduce axes (ALGORITHMS.md §1, §9).

A group is a slice of one parameter array. A :class:`GroupSpec` names the axes
a group's norm runs over ("reduce axes"); every index of the remaining axes is
one group, so all groups of one array have the same size ``|g|``. Empty
reduce axes make every entry its own group (the L1 norm).

A spec tree holds one :class:`GroupSpec` (or ``None``: not regularized) per
parameter leaf, or is a function ``params -> spec tree``. :func:`resolve`
checks it against the params once, at trace time, and turns it into a tree of
:class:`GroupLeaf` values that carry everything static the solvers need (the
normalised axes and the weight ``sqrt(|g|)``); nothing about the grouping is
recomputed per step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

MaskedNode = optax.MaskedNode


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """The reduce axes of one parameter leaf's groups.

  Attributes:
    reduce_axes: axes a group's norm runs over. Negative axes count from the
      end. ``()`` makes every entry its own group (L1).
    tie: ``None`` (groups inside this leaf only), or a name: the leaves whose
      specs share a tie name form *joint groups*, the ``i``-th group of each
      (row-major over its non-reduced axes) together, with weight ``sqrt`` of
      the joint size. Tied leaves must have the same number of groups (see
      ``tied.py``).

  Example (Flax ``Dense`` kernel ``(in, out)``, input-wise groups, one per
  kernel row)::

    GroupSpec(reduce_axes=(1,))

  Example (one joint group per head of an attention layer, across its query
  ``(in, heads, hd)`` and out ``(heads, hd, out)`` kernels)::

    {"query": GroupSpec((0, 2), tie="attn"), "out": GroupSpec((1, 2), tie="attn")}
  """

  reduce_axes: tuple[int, ...] = ()
  tie: str | None = None

  def __post_init__(self):
    axes = self.reduce_axes
    if isinstance(axes, (int, np.integer)):
      axes = (axes,)
    axes = tuple(int(a) if isinstance(a, np.integer) else a for a in axes)
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
      raise TypeError(
          f"GroupSpec.reduce_axes must be integers, got {self.reduce_axes!r}."
      )
    object.__setattr__(self, "reduce_axes", axes)
    if self.tie is not None and not isinstance(self.tie, str):
      raise TypeError(f"GroupSpec.tie must be a name (str) or None, got {self.tie!r}.")


@dataclasses.dataclass(frozen=True)
class Unregularized:
  """Marks a leaf with no regularizer in a resolved spec tree."""


UNREGULARIZED = Unregularized()


@dataclasses.dataclass(frozen=True)
class GroupLeaf:
  """Static grouping of one regularized leaf, vectorised over its groups.

  Every group reduction keeps dims, so a per-group value broadcasts against
  the leaf.
  """

  reduce_axes: tuple[int, ...]
  weight: float  # sqrt(|g|), the same for every group of the leaf
  group_size: int
  num_groups: int
  tie: str | None = None  # joint groups with the other leaves of this tie

  def norm(self, x: jax.Array) -> jax.Array:
    """Per-group Euclidean norm ``||x_g||`` (keepdims)."""
    if not self.reduce_axes:
      return jnp.abs(x)
    return jnp.sqrt(jnp.sum(x * x, axis=self.reduce_axes, keepdims=True))

  def max(self, x: jax.Array) -> jax.Array:
    """Per-group maximum (keepdims); 0 for an empty group."""
    if not self.reduce_axes:
      return x
    return jnp.max(x, axis=self.reduce_axes, keepdims=True, initial=0)

  def sum(self, x: jax.Array) -> jax.Array:
    """Per-group sum (keepdims)."""
    if not self.reduce_axes:
      return x
    return jnp.sum(x, axis=self.reduce_axes, keepdims=True)

  def shrink(self, z: jax.Array, threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Block soft-thresholding (ALGORITHMS.md §6 step 5).

    ``r_g = max(||z_g|| - threshold_g, 0)`` and ``z_g <- z_g * r_g / (r_g +
    threshold_g)``. With a positive threshold a group whose norm does not
    exceed it becomes exactly zero. Returns the new ``z`` and ``r`` (the
    post-prox norms, keepdims).
    """
    factor, r = self.shrink_factor(self.norm(z), threshold)
    return z * factor, r

  @staticmethod
  def shrink_factor(norms: jax.Array, threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per group, ``r / (r + threshold)`` with ``r = max(norms - threshold, 0)``, and ``r``.

    :meth:`shrink`'s scaling of a group of norm ``norms`` (0 for a zero group
    with a zero threshold).
    """
    r = jnp.maximum(norms - threshold, 0)
    den = r + threshold
    safe = den > 0  # only 0 / 0 when threshold == 0 on a zero group
    return jnp.where(safe, r / jnp.where(safe, den, 1), 0), r


def normalize_axes(axes: Sequence[int], ndim: int, path: str) -> tuple[int, ...]:
  out = []
  for a in axes:
    if ndim == 0:
      raise ValueError(
          f"reduce axis {a} given for parameter {path}, which is a scalar (no "
          "axes). Use GroupSpec(()) to make the scalar its own group, or None "
          "to leave it unregularized."
      )
    if not -ndim <= a < ndim:
      raise ValueError(
          f"reduce axis {a} is out of range for parameter {path} with {ndim} "
          f"dimension(s). Use axes in [-{ndim}, {ndim - 1}], e.g. "
          "GroupSpec(reduce_axes=(1,)) for input-wise groups of a Flax Dense "
          "kernel (in, out)."
      )
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"repeated reduce axes {tuple(axes)} for parameter {path}.")
  return tuple(sorted(out))


def group_leaf(spec: GroupSpec, leaf: Any, path: str) -> GroupLeaf:
  """The static :class:`GroupLeaf` of one leaf (checked)."""
  shape = tuple(jnp.shape(leaf))
  dtype = jnp.result_type(leaf)
  if not jnp.issubdtype(dtype, jnp.floating):  # not int, bool or complex
    raise TypeError(
        f"parameter {path} has dtype {dtype} but is regularized; only real "
        "floating-point parameters can be regularized. Give it None in the "
        "group spec (or cast it to a real float dtype)."
    )
  axes = normalize_axes(spec.reduce_axes, len(shape), path)
  size = math.prod(shape[a] for a in axes)
  groups = math.prod(s for i, s in enumerate(shape) if i not in axes)
  return GroupLeaf(axes, math.sqrt(size), size, groups, spec.tie)


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, (GroupSpec, MaskedNode))


def _is_param_leaf(x: Any) -> bool:
  return isinstance(x, MaskedNode)


SpecTree = Any
SpecLike = SpecTree | Callable[[Any], SpecTree]


def resolve(
    spec: SpecLike,
    params: Any,
    make_leaf: Callable[[Any, Any, str], Any] | None = None,
) -> Any:
  """Checks ``spec`` against ``params`` and returns a tree of static leaves.

  The result has the structure of ``params``; each leaf is a
  :class:`GroupLeaf` (or what ``make_leaf(spec_leaf, param_leaf, path)``
  returns), :data:`UNREGULARIZED`, or an ``optax.MaskedNode`` where
  ``params`` has one (inside ``optax.masked``).

  Raises:
    ValueError: the spec tree does not match the params, or an axis is out of
      range.
    TypeError: an integer, boolean or complex leaf is regularized.
  """
  if make_leaf is None:
    make_leaf = _default_make_leaf
  tree = spec(params) if callable(spec) and not isinstance(spec, GroupSpec) else spec
  p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_param_leaf)
  s_flat, s_def = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_spec_leaf)
  if jax.tree_util.treedef_is_leaf(s_def) and s_flat:
    # One spec (GroupSpec, None, NuclearSpec, ...) for every leaf.
    s_leaves: list[Any] = [s_flat[0][1]] * len(p_leaves)
  else:
    if s_def == p_def:  # type: ignore[operator, unused-ignore]  # jax types PyTreeDef loosely
      s_leaves = [s for _, s in s_flat]
    else:
      found = _entries_over_prefix(p_leaves, p_def, tree)
      if found is None:
        raise ValueError(_mismatch_message(
            [path for path, _ in p_leaves], [path for path, _ in s_flat], p_def, s_def,
            masked={path for path, p in p_leaves if isinstance(p, MaskedNode)},
            nones=[path for path, x in jax.tree_util.tree_flatten_with_path(
                params, is_leaf=lambda x: x is None)[0] if x is None],
            entries=dict(s_flat),
        ))
      s_leaves = found
  out = []
  masked_ties: dict[str, str] = {}  # tie -> a masked-out leaf (or subtree) of it
  for (path, p), s in zip(p_leaves, s_leaves):
    name = jax.tree_util.keystr(path)
    if isinstance(p, MaskedNode):
      for entry in jax.tree.leaves(s, is_leaf=_is_spec_leaf):
        if getattr(entry, "tie", None) is not None:
          masked_ties.setdefault(entry.tie, name)
      out.append(p)
    elif s is None or isinstance(s, MaskedNode):
      out.append(UNREGULARIZED)
    elif _is_single_entry(s):
      out.append(make_leaf(s, p, name))
    else:
      raise TypeError(f"unexpected group spec {s!r} for parameter {name}.")
  from optax_ramda._src import tied  # tied.py imports this module

  tied.check_ties([jax.tree_util.keystr(path) for path, _ in p_leaves], out, masked_ties)
  return jax.tree_util.tree_unflatten(p_def, out)


def _is_single_entry(s: Any) -> bool:
  return _is_spec_leaf(s) or not isinstance(s, (list, tuple, dict))


def _entries_over_prefix(
    p_leaves: Sequence[tuple[Any, Any]], p_def: Any, tree: Any
) -> list[Any] | None:
  """The spec entry of each params leaf when the params' structure is a prefix of the spec's.

  Two cases, where flattening both trees leaf by leaf disagrees:

  * ``optax.masked`` / ``optax.partition`` with a prefix mask (``{"enc": False,
    ...}``) hand the optimizer one ``MaskedNode`` for a whole subtree, while the
    spec follows the whole params tree: each ``MaskedNode`` takes whatever spec
    subtree is there;
  * params with ``None`` in place of an array (a layer without bias): ``None`` is
    an empty subtree of the params but an entry ("not regularized") of a spec,
    e.g. of ``jax.tree.map(lambda _: None, params)``; it matches there.

  Every other leaf must still have a single entry. ``None`` if that is not the
  case (the caller then explains the mismatch).
  """
  try:
    entries = p_def.flatten_up_to(tree)
  except (ValueError, TypeError):
    return None
  for (_, p), s in zip(p_leaves, entries):
    if not isinstance(p, MaskedNode) and not _is_single_entry(s):
      return None
  return entries


def _mismatch_message(
    p_paths: Sequence[tuple[Any, ...]],
    s_paths: Sequence[tuple[Any, ...]],
    p_def: Any,
    s_def: Any,
    masked: Collection[tuple[Any, ...]] = (),
    nones: Sequence[tuple[Any, ...]] = (),
    entries: Mapping[tuple[Any, ...], Any] | None = None,
) -> str:
  """Why a spec tree does not match the params, naming the first bad path.

  ``masked``: the params' paths that hold an ``optax.MaskedNode`` (leaves that
  ``optax.masked`` or ``optax.partition`` keep from this optimizer); ``nones``:
  the paths where the params hold ``None`` (an empty subtree); ``entries``: the
  spec's entry at each of its paths.
  """
  entries = entries or {}
  filled = [q for q in nones if q in entries and entries[q] is not None]
  if filled:
    q = filled[0]
    return (
        f"the group spec tree does not match the params tree: the params hold None at "
        f"{jax.tree_util.keystr(q)} (no array there, e.g. a layer without bias), but the "
        "spec regularizes it. Give it None (False in an l1 mask).")
  keystr = jax.tree_util.keystr
  head = "the group spec tree does not match the params tree: "
  rule = (
      "(A spec tree has one GroupSpec or None per parameter leaf, in the params' "
      "structure: start from jax.tree.map(lambda _: None, params); or pass a "
      "function params -> spec tree.)"
  )
  p_set, s_set = set(p_paths), set(s_paths)

  def below(path: tuple[Any, ...], others: Sequence[tuple[Any, ...]]) -> list[str]:
    return [keystr(o) for o in others if len(o) > len(path) and o[: len(path)] == path]

  def more(items: list[str]) -> str:
    if len(items) < 2:
      return ""
    listed = ", ".join(items[1:4]) + (", ..." if len(items) > 4 else "")
    return f" (and {len(items) - 1} more: {listed})"

  def under_masked(q: tuple[Any, ...]) -> bool:
    return any(len(q) > len(m) and q[: len(m)] == m for m in masked)

  for path in p_paths:
    if path not in s_set:
      nested = below(path, s_paths)
      if nested and path in masked:
        continue  # a prefix mask: any spec subtree may lie under a MaskedNode
      if nested:
        return (
            f"{head}parameter {keystr(path)} is a single array, but the spec has a "
            f"subtree there ({', '.join(nested[:3])}). Give it one GroupSpec or None, "
            "e.g. GroupSpec(reduce_axes=(1,)) rather than a bare tuple (1,). " + rule
        )
      tops = [s for s in s_paths if len(path) > len(s) and path[: len(s)] == s]
      if tops:
        top = tops[0]
        return (
            f"{head}the spec has one entry at {keystr(top) or 'its root'}, but the params have a "
            f"subtree there ({', '.join(below(top, p_paths)[:3])}). Give one entry per "
            f"leaf, e.g. jax.tree.map(lambda _: spec, params{keystr(top)}). " + rule
        )
      missing = [keystr(q) for q in p_paths if q not in s_set]
      if path in masked:
        return (
            f"{head}parameter {keystr(path)} has no entry in the spec{more(missing)}. "
            f"It is masked out here (optax.masked or optax.partition hands this "
            f"optimizer an optax.MaskedNode at {keystr(path)}), but the spec must "
            f"still follow the whole params tree: give {keystr(path)} None. " + rule
        )
      return (
          f"{head}parameter {keystr(path)} has no entry in the spec{more(missing)}. "
          f"Add an entry for {keystr(path)}: a GroupSpec, or None to leave it "
          "unregularized (True/False in an l1 mask). " + rule
      )
  extra = [keystr(q) for q in s_paths
           if q not in p_set and not under_masked(q) and q not in nones]
  if extra:
    return (
        f"{head}the spec has an entry at {extra[0]}, which is not a parameter"
        f"{more(extra)}. Remove it (check the spelling against the params' paths). " + rule
    )
  left_out = [q for q in nones if q not in s_set]
  if left_out:
    listed = ", ".join(keystr(q) for q in left_out[:3]) + (", ..." if len(left_out) > 3 else "")
    return (
        f"{head}the params hold None at {listed} (an empty subtree, e.g. a layer "
        "without bias). Give the spec None there too, as jax.tree.map(lambda _: None, "
        "params) does, rather than leaving the key out. " + rule
    )
  # Same leaf paths, different containers (e.g. a tuple for a list, a dict for a State).
  return (
      f"{head}the leaf paths agree but the containers differ.\n  params: {p_def}\n"
      f"  spec:   {s_def}\nBuild the spec with the params' own container types, "
      "e.g. jax.tree.map(lambda x: ..., params), or pass a function params -> spec tree."
  )


def _default_make_leaf(spec: Any, leaf: Any, path: str) -> GroupLeaf:
  if not isinstance(spec, GroupSpec):
    from optax_ramda._src.nuclear import NuclearSpec  # nuclear.py imports this module

    hint = (" A NuclearSpec belongs in optax_ramda.nuclear_norm(...), whose spec tree may "
            "mix NuclearSpec and GroupSpec leaves.") if isinstance(spec, NuclearSpec) else ""
    raise TypeError(
        f"parameter {path}: expected a GroupSpec or None, got {spec!r}.{hint}"
    )
  return group_leaf(spec, leaf, path)


def is_static_leaf(x: Any) -> bool:
  """``is_leaf`` for maps over resolved trees (keeps MaskedNode as a leaf)."""
  return isinstance(x, MaskedNode)
