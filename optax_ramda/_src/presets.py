"""Group presets from Flax models and params trees (ALGORITHMS.md §9).

A preset turns a model into a :class:`GroupLasso` whose groups are the
paper's: Dense kernels input-wise, Conv kernels channel-wise, biases, norm
layers and embeddings not regularized. Other common groupings are one keyword
away: output-wise Dense groups (one per neuron), filter-wise Conv groups (one
per filter) and attention-head groups.

The returned regularizer holds a *function* ``params -> spec tree`` that
classifies each leaf by its path, so it works unchanged on every tree the
optimizer may see: the arrays ``nnx.Optimizer`` hands the optimizer (paths
``['fc']['kernel'].value``), ``nnx.state(model, nnx.Param)``, a Linen params
dict, and trees with ``optax.MaskedNode`` placeholders inside ``optax.masked``
or ``optax.partition``.

Flax layouts (ALGORITHMS.md §9), with the reduce axes each choice uses:

==========================  =======================  =====================
kernel                      choice                   reduce axes
==========================  =======================  =====================
Dense ``(in, out)``         ``"input"`` (paper)      ``(1,)``
                            ``"output"``             ``(0,)``
Conv ``(*window, in, out)`` ``"channel"`` (paper)    all but ``in``
                            ``"filter"``             all but ``out``
q/k/v ``(in, heads, hd)``   ``"head"``               ``(0, 2)``
                            ``"input"``              ``(1, 2)``
out ``(heads, hd, out)``    ``"head"``               ``(1, 2)``
                            ``"input"``              ``(2,)``
==========================  =======================  =====================

Attention heads: a head's weights are slices of four arrays (q, k, v, out).
``attention="head"`` gives each head *one joint group* across the four: the
kernels of one attention module are tied (``GroupSpec(axes,
tie=module_path)``), so head ``h``'s group is the four slices ``q[:, h]``,
``k[:, h]``, ``v[:, h]``, ``out[h]``, its norm runs over all of them and its
weight is ``sqrt`` of their total size ``4 * in * head_dim`` (for ``in ==
out``). A head is zeroed as a unit, all four slices exactly zero together;
:func:`head_sparsity` reports which heads are. With grouped-query attention
(``num_kv_heads < num_heads``) the query and out kernels are tied per head
and the key and value kernels per key/value head (tie ``module_path + "/kv"``).
To get one group per head in each projection instead (four groups per head),
override the kernels with untied specs, e.g. ``overrides={"*/query/kernel":
GroupSpec((0, 2)), ...}``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from optax_ramda._src import validation
from optax_ramda._src.groups import GroupSpec
from optax_ramda._src.regularizers import GroupLasso

DENSE = {"input": lambda nd: (1,), "output": lambda nd: (0,)}
CONV = {
    "channel": lambda nd: tuple(a for a in range(nd) if a != nd - 2),
    "filter": lambda nd: tuple(range(nd - 1)),
}
# q/k/v kernels (in, heads, head_dim) and the out kernel (heads, head_dim, out).
ATTENTION_QKV = {"head": (0, 2), "input": (1, 2)}
ATTENTION_OUT = {"head": (1, 2), "input": (2,)}
QKV_NAMES = ("query", "key", "value")
PROJ_NAMES = (*QKV_NAMES, "out")
UNREGULARIZED_NAMES = ("bias", "scale", "embedding", "mean", "var")
# NNX module types (by class name) whose parameters are never regularized (§9).
UNREGULARIZED_MODULES = (
    "BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm", "Embed",
)
ATTENTION_MODULES = ("MultiHeadAttention", "MultiHeadDotProductAttention", "SelfAttention")

Override = GroupSpec | str | None
# from_nnx's module types for an nnx.Conv with feature_group_count > 1: depthwise with
# one output per input channel (its channel groups are its filters), and the others.
DEPTHWISE_CONV = "Conv(depthwise)"
GROUPED_CONV = "Conv(feature_group_count>1)"
# Linen's automatic names, which tell a layer's type from params alone.
_LINEN_DENSE = re.compile(r"Dense_\d+")
_LINEN_DENSE_GENERAL = re.compile(r"DenseGeneral_\d+")
_LINEN_ATTENTION = re.compile(
    r"(MultiHeadDotProductAttention|MultiHeadAttention|SelfAttention)_\d+")


def _refuse_linen_stacked(
    names: tuple[str, ...], shape: tuple[int, ...], stacked: tuple[str, ...], named: int
) -> None:
  """Linen kernels whose rank says "stacked by nn.scan/nn.vmap", refused rather than
  grouped across layers (from_params sees shapes only; only Linen's automatic module
  names tell the layer type: ``Dense_0``, ``MultiHeadDotProductAttention_0``).

  ``shape`` is what is left after the ``named`` leading axes that ``stacked`` names.
  """
  path = "/".join(names)
  parent = names[-2] if len(names) > 1 else ""
  grandparent = names[-3] if len(names) > 2 else ""
  if _LINEN_DENSE.fullmatch(parent) and len(shape) >= 3:
    what, alt = f"a Dense layer ({parent}), whose kernel is (in, out)", ""
  elif _LINEN_DENSE_GENERAL.fullmatch(parent) and len(shape) >= 3:
    what = f"a DenseGeneral ({parent})"
    alt = (" Or it has several input or feature axes: then give it a group, "
           f"overrides={{'{path}': GroupSpec(...)}}.")
  elif (parent in PROJ_NAMES and _LINEN_ATTENTION.fullmatch(grandparent)
        and len(shape) >= 4):
    what, alt = "an attention projection (rank 3 unstacked)", ""
  else:
    return
  if named:
    tried = (f" `stacked` names {named} leading axis(es) here; if it is stacked again "
             "(an nn.scan inside an nn.scan), name the inner module too.")
  elif stacked:
    tried = (f" (stacked={list(stacked)} matches no module on this path; patterns match "
             "the whole module path from the root of the tree"
             + (", here starting with 'params/'" if path.startswith("params/") else "")
             + ")")
  else:
    tried = ""
  left = f" (after its {named} stacked axes)" if named else ""
  raise ValueError(
      f"parameter {path} has shape {shape}{left}, of rank {len(shape)}, but is the kernel "
      f"of {what}: most likely a layer stacked by nn.scan/nn.vmap (a leading layer axis), "
      "whose groups would otherwise span all layers. Pass stacked=['<path of the "
      f"scanned module>'] (one leading axis per match), e.g. stacked=['blocks'].{tried}"
      f"{alt}")


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """A jax key path as plain names, without the ``.value`` of an nnx Variable."""
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
    else:
      names.append(str(k))
  if len(names) > 1 and names[-1] == "value":
    names = names[:-1]
  return tuple(names)


def _check_choice(name: str, value: Any, choices: Mapping[str, Any]) -> None:
  if value is not None and value not in choices:
    raise ValueError(
        f"{name}={value!r} is not a preset; choose one of {sorted(choices)} or None "
        "(not regularized)."
    )


class _Classifier:
  """Maps (path names, shape, owning module type) to a GroupSpec or None."""

  def __init__(self, dense, conv, attention, overrides, stacked=()):
    if isinstance(stacked, str):
      stacked = (stacked,)
    if not all(isinstance(p, str) for p in stacked):
      raise TypeError(f"stacked must be module path patterns like 'blocks', got {stacked!r}.")
    self.stacked = tuple(stacked)
    _check_choice("dense", dense, DENSE)
    _check_choice("conv", conv, CONV)
    _check_choice("attention", attention, ATTENTION_QKV)
    self.dense, self.conv, self.attention = dense, conv, attention
    self.overrides = dict(overrides or {})
    for pattern, value in self.overrides.items():
      if not isinstance(pattern, str):
        raise TypeError(f"override patterns must be strings like 'fc1/kernel', got {pattern!r}.")
      if not (value is None or isinstance(value, GroupSpec) or value in ("default",)):
        raise TypeError(
            f"override {pattern!r}: expected a GroupSpec, None or 'default', got {value!r}."
        )

  def unmatched(self, paths: list[str]) -> list[str]:
    """The override patterns that match none of ``paths``, and the ``stacked``
    patterns that match none of their module paths."""
    modules = {q.rsplit("/", 1)[0] for q in paths if "/" in q}
    prefixes = {"/".join(m.split("/")[:k]) for m in modules for k in range(1, m.count("/") + 2)}
    return [p for p in self.overrides if not any(fnmatch.fnmatchcase(q, p) for q in paths)] + [
        p for p in self.stacked if not any(fnmatch.fnmatchcase(q, p) for q in prefixes)]

  def stacked_axes(self, names: tuple[str, ...], shape: tuple[int, ...]) -> int:
    """Leading layer axes of a leaf: one per module on its path that ``stacked`` names."""
    return sum(
        any(fnmatch.fnmatchcase("/".join(names[:k]), p) for p in self.stacked)
        for k in range(1, len(names)))

  def _override(self, path: str) -> tuple[bool, Override]:
    for pattern, value in self.overrides.items():
      if fnmatch.fnmatchcase(path, pattern) and value != "default":
        return True, value
    return False, None

  def __call__(
      self,
      names: tuple[str, ...],
      shape: tuple[int, ...],
      module: str | None,
      stacked: int = 0,
      attention_module: bool = True,
  ) -> Override:
    """The spec of one leaf.

    ``stacked``: leading layer axes (``nnx.vmap``/``nnx.scan``, Linen
    ``nn.scan``/``nn.vmap``): the leaf is classified by its shape without them,
    and every layer gets its own groups (the reduce axes never include them).
    ``attention_module``: for params without module types (Linen), whether the
    leaf's module also has query/key/value kernels (an ``out`` kernel alone is
    not an attention projection).
    """
    path = "/".join(names)
    hit, value = self._override(path)
    if hit:
      return value
    if stacked:
      if len(shape) < stacked:
        raise ValueError(
            f"parameter {path} has shape {shape}: fewer axes than its {stacked} stacked "
            "layer axes. Check `stacked`, or give it an override.")
      spec = self._classify(names, shape[stacked:], module, attention_module, path, stacked)
      if not isinstance(spec, GroupSpec):
        return spec
      return GroupSpec(tuple(a + stacked for a in spec.reduce_axes), tie=spec.tie)
    return self._classify(names, shape, module, attention_module, path)

  def _classify(self, names, shape, module, attention_module, path, stacked=0) -> Override:
    leaf = names[-1] if names else ""
    parent = names[-2] if len(names) > 1 else ""
    linen_attention = module is None and parent in PROJ_NAMES and (
        parent != "out" or attention_module)
    in_attention = module in ATTENTION_MODULES or (linen_attention and len(shape) == 3)
    if module in UNREGULARIZED_MODULES or leaf in UNREGULARIZED_NAMES:
      return None
    if leaf == "kernel" and module is None:
      _refuse_linen_stacked(names, shape, self.stacked, stacked)
    if leaf == "kernel" and module == DEPTHWISE_CONV:
      # (*window, 1, channels): channel c's only weights are its filter.
      return None if self.conv is None else GroupSpec(CONV["filter"](len(shape)))
    if leaf == "kernel" and module == GROUPED_CONV:
      if self.conv == "channel":
        raise ValueError(
            f"parameter {path} (shape {shape}) is the kernel of a grouped Conv "
            "(feature_group_count > 1): its input axis holds only one group's channels, "
            "so conv='channel' would put input channels of different feature groups "
            "into one group. Use conv='filter' (one "
            f"group per output channel), or overrides={{'{path}': GroupSpec(...)}} or "
            f"{{'{path}': None}}.")
      return None if self.conv is None else GroupSpec(CONV[self.conv](len(shape)))
    if leaf == "kernel" and in_attention and len(shape) == 3:
      if self.attention is None:
        return None
      table = ATTENTION_OUT if parent == "out" else ATTENTION_QKV
      # "head": one joint group per head across q/k/v/out, tied by module path.
      tie = "/".join(names[:-2]) if self.attention == "head" else None
      return GroupSpec(table[self.attention], tie=tie)
    if leaf == "kernel" and module in (None, "Linear", "Dense") and len(shape) == 2:
      return None if self.dense is None else GroupSpec(DENSE[self.dense](2))
    if leaf == "kernel" and module in (None, "Conv", "ConvTranspose") and len(shape) >= 3:
      return None if self.conv is None else GroupSpec(CONV[self.conv](len(shape)))
    what = f"a {module} module" if module else "an unrecognised layer"
    stack = f" after its {stacked} stacked layer axes" if stacked else ""
    raise ValueError(
        f"the preset cannot classify parameter {path} (shape {shape}{stack}, in {what}). "
        f"Give it a group with overrides={{'{path}': GroupSpec(reduce_axes=...)}}, or "
        f"overrides={{'{path}': None}} to leave it unregularized."
    )


def _spec_fn(
    classify: _Classifier,
    module_of: Callable[[tuple[str, ...]], str | None],
    shapes: Mapping[tuple[str, ...], tuple[int, ...]] | None = None,
    stacked_of: Callable[[tuple[str, ...], tuple[int, ...]], int] = lambda names, shape: 0,
):
  """``params -> spec tree``; ``shapes`` (path names -> global shape) arms the shard check.

  ``stacked_of(names, shape)``: the number of leading layer axes of a leaf.
  """

  built_from = ["/".join(names) for names in shapes or {}]

  def spec(params: Any, warn_unmatched: bool = True) -> Any:
    if warn_unmatched:
      _warn_unmatched(classify, params, built_from)
    # Modules with query/key/value kernels (Linen: an `out` kernel is an attention
    # projection only beside them), in this tree or the one the preset was built from.
    paths = [path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    qkv = {n[:-2] for n in [*paths, *(shapes or {})]
           if len(n) >= 2 and n[-1] == "kernel" and n[-2] in QKV_NAMES}

    def one(path, leaf):
      names = path_names(path)
      shape = tuple(np.shape(leaf))
      out = classify(names, shape, module_of(names), stacked_of(names, shape),
                     names[:-2] in qkv)
      if shapes is not None and isinstance(out, GroupSpec):
        _check_local_shape(names, shape, out, shapes.get(names))
      return out

    return _split_kv_ties(jax.tree_util.tree_map_with_path(one, params), params)

  return spec


def _warn_unmatched(classify: _Classifier, params: Any, built_from: list[str]) -> None:
  """Warns about override patterns that match no parameter path (typos).

  A pattern counts as used if it matches a path of the tree the preset was
  built from (``built_from``: it may name a leaf the preset needs an override
  for, which this optimizer does not see, e.g. under ``optax.partition`` or
  ``nnx.Optimizer(wrt=...)``), a path of ``params``, or a path under an
  ``optax.MaskedNode`` of ``params`` (a prefix mask covers a whole subtree).
  Not an error: one preset may be shared by models that lack some layers.
  """
  flat = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
  )[0]
  paths = ["/".join(path_names(path)) for path, _ in flat]
  masked = [p for p, (_, leaf) in zip(paths, flat) if isinstance(leaf, optax.MaskedNode)]
  for pattern in classify.unmatched(paths + built_from):
    if any(_may_lie_under(pattern, m) for m in masked):
      continue
    examples = ", ".join(repr(p) for p in paths[:3])
    validation.warn_user(
        f"optax_ramda.presets: {'stacked' if pattern in classify.stacked else 'override'} "
        f"pattern {pattern!r} matches no parameter path "
        f"(paths such as {examples}), so it changes nothing. Check its spelling, and "
        "whether the paths start with a prefix such as 'params/'."
    )


def _may_lie_under(pattern: str, prefix: str) -> bool:
  """Whether ``pattern`` can match a path below ``prefix`` (component-wise)."""
  k = prefix.count("/") + 1
  return fnmatch.fnmatchcase(prefix, "/".join(pattern.split("/")[:k]))


def _global_shapes(params: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  return {
      path_names(path): tuple(np.shape(leaf))
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def _manual_mesh_axes() -> dict[str, int]:
  """``{axis name: size}`` of the mesh axes in manual mode (inside ``jax.shard_map``)."""
  get = getattr(jax.sharding, "get_abstract_mesh", None)
  if get is None:  # pragma: no cover - older jax
    return {}
  try:
    mesh = get()
    manual = tuple(getattr(mesh, "manual_axes", ()) or ())
    return {name: int(mesh.shape[name]) for name in manual}
  except Exception:  # pragma: no cover - no abstract mesh here
    return {}


def _check_local_shape(
    names: tuple[str, ...],
    shape: tuple[int, ...],
    spec: GroupSpec,
    full: tuple[int, ...] | None,
) -> None:
  """Refuses a per-device shard, inside ``jax.shard_map``, split along a reduce axis.

  Inside ``shard_map`` each device sees its local block of a sharded
  parameter; a group whose reduce axis is split would have its norm computed
  over one shard only and the prox would be silently wrong. Outside
  ``shard_map`` (``jax.jit`` with any sharding, ``pmap``, a compacted model)
  shapes are global and nothing is checked.
  """
  if full is None or len(full) != len(shape) or full == shape:
    return
  nd = len(shape)
  axes = sorted({a % nd for a in spec.reduce_axes if -nd <= a < nd})
  split = [
      a for a in axes
      if 0 < shape[a] < full[a] and full[a] % shape[a] == 0
  ]
  if not split:
    return
  manual = _manual_mesh_axes()
  devices = int(np.prod(list(manual.values()))) if manual else 0
  split = [a for a in split if devices % (full[a] // shape[a]) == 0]
  if not manual or not split:
    return
  path = "/".join(names)
  where = ", ".join(f"axis {a} ({full[a]} -> {shape[a]})" for a in split)
  raise ValueError(
      f"parameter {path} has local shape {shape} inside jax.shard_map (manual mesh axes "
      f"{tuple(manual)}) but shape {full} in the model the preset was built from: it is "
      f"sharded along {where}, which its groups (reduce axes {tuple(axes)}) run over. Each "
      "device would compute the group norms over its own shard only, so the prox would be "
      f"silently wrong. Fix: replicate axis {split[0]} of this parameter in shard_map's "
      f"in_specs (None at position {split[0]} of its PartitionSpec; shard an axis its groups "
      "do not reduce over instead), or train with jax.jit and NamedSharding (FSDP-style), "
      "where group norms cross shards correctly. "
      "presets.check_shard_map_specs(regularizer, params, in_specs) checks the specs "
      "before tracing."
  )


def _split_kv_ties(specs: Any, params: Any) -> Any:
  """Grouped-query attention: a module's key/value kernels with fewer heads
  than its query/out kernels get their own tie (``module path + "/kv"``)."""
  is_spec = lambda x: x is None or isinstance(x, GroupSpec)

  def preset_tie(names: tuple[str, ...], spec: Any, leaf: Any) -> bool:
    return (
        isinstance(spec, GroupSpec) and spec.tie is not None and len(names) >= 2
        and names[-1] == "kernel" and names[-2] in PROJ_NAMES
        and spec.tie == "/".join(names[:-2]) and np.ndim(leaf) >= 3
    )

  def heads(names: tuple[str, ...], leaf: Any) -> int:
    # q/k/v (..., in, heads, hd), out (..., heads, hd, out); "..." are stacked layers.
    shape = np.shape(leaf)
    return int(shape[-3] if names[-2] == "out" else shape[-2])

  query_heads: dict[str, int] = {}

  def collect(path, spec, leaf):
    names = path_names(path)
    if preset_tie(names, spec, leaf) and names[-2] in ("query", "out"):
      query_heads.setdefault(spec.tie, heads(names, leaf))
    return spec

  def split(path, spec, leaf):
    names = path_names(path)
    if preset_tie(names, spec, leaf) and names[-2] in ("key", "value"):
      n = query_heads.get(spec.tie)
      if n is not None and heads(names, leaf) != n:
        return GroupSpec(spec.reduce_axes, tie=spec.tie + "/kv")
    return spec

  jax.tree_util.tree_map_with_path(collect, specs, params, is_leaf=is_spec)
  if not query_heads:
    return specs
  return jax.tree_util.tree_map_with_path(split, specs, params, is_leaf=is_spec)


def from_params(
    params: Any,
    dense: str | None = "input",
    conv: str | None = "channel",
    attention: str | None = "head",
    overrides: Mapping[str, Override] | None = None,
    stacked: Sequence[str] = (),
) -> GroupLasso:
  """A :class:`GroupLasso` for a params tree with Flax (Linen or NNX) paths.

  Leaves are classified by their path and shape: ``kernel`` of rank 2 is a
  Dense kernel, of rank >= 3 a Conv kernel, except a rank-3 ``kernel`` under
  ``query``/``key``/``value`` or under an ``out`` beside them (an attention
  projection); ``bias``, ``scale``, ``embedding`` (and BatchNorm statistics)
  are not regularized. Anything else raises a ``ValueError`` naming its path;
  ``overrides`` fixes it. ``params`` is only used to check every leaf now; the
  regularizer classifies whatever tree the optimizer passes it.

  Shapes are all it sees, so two things need telling (:func:`from_nnx` reads
  them from the modules):

  * layers stacked by ``nn.scan``/``nn.vmap`` carry a leading layer axis: name
    their module in ``stacked`` and every layer gets its own groups. Unnamed,
    a scanned kernel under one of Linen's automatic module names (``Dense_0``,
    ``DenseGeneral_0``, ``MultiHeadDotProductAttention_0/query``) is refused
    (its rank gives it away), but a stacked kernel of a module with another
    name looks like a Conv kernel and would be grouped across layers;
  * a grouped or depthwise Conv (``feature_group_count > 1``) looks like any
    Conv; ``conv="channel"`` would mix the feature groups' input channels in
    one group. Give such kernels ``GroupSpec`` overrides (filter-wise: all axes
    but the last).

  Args:
    params: the params tree (e.g. ``variables['params']`` of a Linen model).
    dense: ``"input"`` (paper, §9), ``"output"`` or None (not regularized).
    conv: ``"channel"`` (paper, §9), ``"filter"`` or None.
    attention: ``"head"`` (one joint group per head across q/k/v/out, see the module
      docstring), ``"input"`` or None.
    overrides: ``{pattern: GroupSpec | None | "default"}``; ``pattern`` is an
      ``fnmatch`` pattern on the ``/``-joined path of the tree the
      optimizer sees, e.g. ``"Dense_0/kernel"``, ``"*/bias"``,
      ``"params/head/*"``. The first matching pattern wins. A pattern that
      matches no path of the tree the optimizer sees (a typo) gives a
      ``UserWarning`` when the optimizer first sees the params.
    stacked: ``fnmatch`` patterns of module paths (``"blocks"``,
      ``"params/encoder/layers"``) whose leaves carry one leading layer axis
      (``nn.scan``/``nn.vmap`` with ``variable_axes={"params": 0}``); a leaf
      under two matching modules has two. A pattern that matches no module
      warns like an override.

  Example::

    variables = model.init(key, x)            # a Linen model
    reg = optax_ramda.presets.from_params(variables["params"], dense="output")
    opt = optax_ramda.ramda(0.01, strength=1e-4, regularizer=reg)
    # nn.scan over 12 blocks named "blocks": per-layer groups
    reg = optax_ramda.presets.from_params(variables["params"], stacked=["blocks"])
  """
  classify = _Classifier(dense, conv, attention, overrides, stacked)
  spec = _spec_fn(classify, lambda names: None, _global_shapes(params), classify.stacked_axes)
  spec(params, warn_unmatched=False)  # raises now, naming the path, for anything unknown
  return GroupLasso(spec)


def _modules(model: Any) -> dict[tuple[str, ...], Any]:
  """``{module path: module}`` for every submodule of an NNX model."""
  from flax import nnx

  return {
      tuple(str(p) for p in path): node
      for path, node in nnx.iter_graph(model)
      if isinstance(node, nnx.Module)
  }


def module_types(model: Any) -> dict[tuple[str, ...], str]:
  """``{module path: class name}`` for every submodule of an NNX model."""
  return {path: type(node).__name__ for path, node in _modules(model).items()}


def from_nnx(
    model: Any,
    dense: str | None = "input",
    conv: str | None = "channel",
    attention: str | None = "head",
    overrides: Mapping[str, Override] | None = None,
) -> GroupLasso:
  """A :class:`GroupLasso` for a Flax NNX model, by the type of each layer.

  ``nnx.Linear`` kernels get the ``dense`` groups, ``nnx.Conv`` /
  ``nnx.ConvTranspose`` kernels the ``conv`` groups, the four projections of
  ``nnx.MultiHeadAttention`` the ``attention`` groups; biases, norm layers
  (BatchNorm, LayerNorm, RMSNorm, GroupNorm) and ``nnx.Embed`` are not
  regularized (ALGORITHMS.md §9). A ``nnx.Param`` of any other layer raises a
  ``ValueError`` naming its path; give it a group in ``overrides``.

  Layers stacked by ``nnx.vmap``/``nnx.scan`` (a kernel with more leading axes
  than its layer type has) get groups per layer: the leading axes are never
  reduced over. A depthwise ``nnx.Conv`` (``feature_group_count == in_features
  == out_features``) has one filter per channel, which is that channel's
  group for both ``conv`` choices. Another grouped ``nnx.Conv``
  (``feature_group_count > 1``) takes ``conv="filter"`` (one group per output
  channel); with ``conv="channel"`` it raises, as its input axis holds one
  feature group's channels only.

  The result works with ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and with
  ``nnx.state(model, nnx.Param)``, and inside ``optax.masked``/``partition``.

  Args:
    model: the NNX module (only its structure is read, once).
    dense: ``"input"`` (paper), ``"output"`` or None (not regularized).
    conv: ``"channel"`` (paper), ``"filter"`` or None.
    attention: ``"head"``, ``"input"`` or None.
    overrides: ``{pattern: GroupSpec | None | "default"}`` on ``/``-joined
      paths such as ``"fc1/kernel"``, ``"blocks/*/bias"``; first match wins.
      A pattern that matches no path gives a ``UserWarning`` at ``init``.

  Example::

    model = CNN(rngs=nnx.Rngs(0))
    reg = optax_ramda.presets.from_nnx(model, overrides={"head/kernel": None})
    tx = optax_ramda.ramda(0.01, strength=1e-4, regularizer=reg)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  """
  from flax import nnx

  modules = _modules(model)
  types = {path: type(node).__name__ for path, node in modules.items()}
  classify = _Classifier(dense, conv, attention, overrides)

  def module_of(names: tuple[str, ...]) -> str | None:
    owner = types.get(names[:-1])
    if owner in ("LinearGeneral",) and names[:-2] in types:
      parent = types[names[:-2]]
      if parent in ATTENTION_MODULES:
        return parent
    if owner == "Conv" and getattr(modules[names[:-1]], "feature_group_count", 1) != 1:
      conv = modules[names[:-1]]
      depthwise = conv.feature_group_count == conv.in_features == conv.out_features
      return DEPTHWISE_CONV if depthwise else GROUPED_CONV
    return owner

  def stacked_of(names: tuple[str, ...], shape: tuple[int, ...]) -> int:
    """Leading axes beyond the layer's own kernel rank (nnx.vmap / nnx.scan)."""
    node = modules.get(names[:-1])
    if names[-1:] != ("kernel",) or node is None:
      return 0
    if isinstance(node, (nnx.Conv, nnx.ConvTranspose)):
      rank = len(node.kernel_shape)
    elif isinstance(node, nnx.Linear):
      rank = 2
    elif isinstance(node, nnx.LinearGeneral) and module_of(names) in ATTENTION_MODULES:
      rank = 3  # q/k/v (in, heads, head_dim), out (heads, head_dim, out)
    else:
      return 0
    return max(len(shape) - rank, 0)

  state = nnx.state(model, nnx.Param)
  spec = _spec_fn(classify, module_of, _global_shapes(state), stacked_of)
  spec(state, warn_unmatched=False)  # raises now, naming the path
  return GroupLasso(spec)


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, (PartitionSpec, NamedSharding))


def _mesh_names(entry: Any, sizes: Mapping[str, int]) -> tuple[str, ...]:
  """The mesh axes (of size > 1 where known) one PartitionSpec entry shards over."""
  if entry is None or entry is PartitionSpec.UNCONSTRAINED:
    return ()
  names = entry if isinstance(entry, tuple) else (entry,)
  return tuple(n for n in names if sizes.get(n, 2) > 1)


def _spec_entries(spec: Any) -> tuple[Any, ...]:
  """A PartitionSpec's per-axis entries (or a list's items).

  ``partitions`` where JAX has it: JAX >= 0.10 refuses to iterate a spec with
  unreduced/reduced axes.
  """
  return tuple(getattr(spec, "partitions", spec))


def _spec_str(spec: Any) -> str:
  """A PartitionSpec (or a list of its entries) as users write it, ``P(None, 'model')``."""
  parts = [
      "P.UNCONSTRAINED" if e is PartitionSpec.UNCONSTRAINED else repr(e)
      for e in _spec_entries(spec)
  ]
  for kind in ("unreduced", "reduced"):
    if getattr(spec, kind, None):
      parts.append(f"{kind}={set(getattr(spec, kind))!r}")
  return "P(" + ", ".join(parts) + ")"


def check_shard_map_specs(
    regularizer: Any,
    params: Any,
    in_specs: Any,
    mesh: Any | None = None,
) -> None:
  """Checks that ``jax.shard_map`` in_specs keep every group on one device.

  Inside ``jax.shard_map`` the optimizer sees each device's local block of a
  sharded parameter. A group whose reduce axis is sharded would have its norm
  computed per shard, and the update would be silently wrong. (Under
  ``jax.jit`` with ``NamedSharding`` any sharding is fine: the compiler
  reduces group norms across devices; don't call this for that.)

  The presets also catch this at trace time from the shapes they recorded;
  this check works for every regularizer (``group_lasso``, ``l1``,
  ``nuclear_norm``: a nuclear-norm leaf may not be sharded at all) and
  reports every offending parameter at once, before anything is traced.
  Leaves tied into joint groups (``GroupSpec(..., tie=name)``, e.g. the
  attention heads of ``attention="head"``) must shard their group axes the
  same way: sharding q/k/v/out all along the head axis keeps each head on
  one device and is fine.

  Args:
    regularizer: the optimizer's regularizer (anything with ``.leaves``).
    params: the global params (arrays or ``jax.ShapeDtypeStruct``).
    in_specs: the params' ``in_specs`` of ``shard_map``: a tree of
      ``PartitionSpec`` (or ``NamedSharding``, or None for replicated) that
      is a prefix of ``params``, e.g. a single ``P()``.
    mesh: optional ``jax.sharding.Mesh``; mesh axes of size 1 are then
      ignored. Taken from ``NamedSharding`` leaves when they are given.

  Raises:
    ValueError: naming each parameter path whose group reduce axes are
      sharded (with the spec that fixes it), and each tie whose leaves shard
      their groups differently.

  Example::

    specs = {"fc1": {"kernel": P("model", None), "bias": P()}, "fc2": P()}
    presets.check_shard_map_specs(reg, params, specs)
    step = jax.shard_map(step_fn, mesh=mesh, in_specs=(specs, ...), ...)
  """
  from optax_ramda._src.groups import GroupLeaf, MaskedNode, Unregularized

  is_masked = lambda x: isinstance(x, MaskedNode)
  try:
    full = jax.tree_util.tree_map(
        lambda s, sub: jax.tree_util.tree_map(lambda _: s, sub, is_leaf=is_masked),
        in_specs, params, is_leaf=_is_spec_leaf,
    )
  except (ValueError, TypeError) as e:
    raise ValueError(
        "check_shard_map_specs: the specs must be a tree prefix of the params (the "
        f"params' in_specs of jax.shard_map, e.g. P() for all of them): {e}"
    ) from e
  spec_leaves = jax.tree_util.tree_leaves(full, is_leaf=_is_spec_leaf)
  reg_leaves = jax.tree_util.tree_leaves(regularizer.leaves(params), is_leaf=is_masked)
  param_leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)[0]
  problems = []
  ties: dict[str, list[tuple[str, tuple[int, ...], tuple[tuple[str, ...], ...]]]] = {}
  for (path, x), leaf, spec in zip(param_leaves, reg_leaves, spec_leaves):
    if isinstance(leaf, (Unregularized, MaskedNode)):
      continue
    sizes = dict(mesh.shape) if mesh is not None else {}
    if isinstance(spec, NamedSharding):
      sizes = dict(spec.mesh.shape)
      spec = spec.spec
    spec = PartitionSpec() if spec is None else spec
    shape = tuple(np.shape(x))
    nd = len(shape)
    reduce = leaf.reduce_axes if isinstance(leaf, GroupLeaf) else tuple(range(nd))
    parts = _spec_entries(spec)
    entries = list(parts) + [None] * (nd - len(parts))
    names = [_mesh_names(e, sizes) for e in entries]
    if getattr(leaf, "tie", None) is not None:
      keep = [a for a in range(nd) if a not in reduce]
      ties.setdefault(leaf.tie, []).append((
          jax.tree_util.keystr(path),
          tuple(shape[a] for a in keep),
          tuple(names[a] for a in keep),
      ))
    bad = [(a, names[a]) for a in reduce if names[a]]
    if bad:
      fixed = list(entries)
      for a, _ in bad:
        fixed[a] = None
      while fixed and fixed[-1] is None:
        fixed.pop()
      kind = (
          f"groups reduce over axes {reduce}" if isinstance(leaf, GroupLeaf)
          else f"its {type(leaf).__name__} regularizer needs the whole array"
      )
      axes = ", ".join(f"axis {a} over mesh axis {'/'.join(n)}" for a, n in bad)
      problems.append(
          f"  {jax.tree_util.keystr(path)} (shape {tuple(np.shape(x))}, {kind}): "
          f"{_spec_str(spec)} shards {axes}; use {_spec_str(fixed)}"
      )
  for tie, members in ties.items():
    # The i-th local group of every tied leaf must be the same joint group.
    if len({(m[1], m[2]) for m in members}) > 1 and any(any(m[2]) for m in members):
      listed = ", ".join(
          f"{p} (group axes {shape}, sharded as {tuple('/'.join(n) or None for n in ns)})"
          for p, shape, ns in members
      )
      problems.append(
          f"  tie {tie!r} joins {listed}: tied leaves must shard their group axes the same "
          "way (or not at all), so that each device holds whole joint groups"
      )
  if problems:
    raise ValueError(
        "inside jax.shard_map these specs would split groups across devices, so each "
        "device would compute group norms from its own part only and the update would "
        "be silently wrong:\n" + "\n".join(problems) + "\n"
        "Fix: replicate those axes in shard_map's in_specs (shard axes the groups do not "
        "reduce over instead, alike for tied leaves), or train with jax.jit and "
        "NamedSharding (FSDP-style), where group norms cross shards correctly."
    )


def head_sparsity(params: Any, tol: float = 0.0) -> dict[str, np.ndarray]:
  """Per attention module, which heads are entirely zero (all four projections).

  Returns ``{module path: bool array (heads,)}`` for every attention module
  found by path (``query``/``key``/``value``/``out`` kernels; ``""`` for an
  attention module at the root of ``params``). Layers stacked by
  ``nnx.vmap``/``nn.scan`` give ``(layers, heads)``. With grouped-query attention
  (fewer key/value heads) a query head counts as zero when its query and out
  slices are: its key/value head is shared with other query heads. Reads values
  on the host: call it outside the training step.
  """
  found: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = path_names(path)
    if len(names) >= 2 and names[-1] == "kernel" and names[-2] in PROJ_NAMES:
      if np.ndim(leaf) >= 3:
        found.setdefault(names[:-2], {})[names[-2]] = np.asarray(leaf)
  out = {}
  for mod, kernels in found.items():
    if set(kernels) != set(PROJ_NAMES) or len({k.ndim for k in kernels.values()}) != 1:
      continue
    # out (..., heads, hd, out), q/k/v (..., in, heads, hd)
    zero = np.abs(kernels["out"]).max(axis=(-2, -1)) <= tol
    for n in QKV_NAMES:
      dead = np.abs(kernels[n]).max(axis=(-3, -1)) <= tol
      if dead.shape == zero.shape:
        zero &= dead
      elif n == "query" or zero.shape[-1] % dead.shape[-1]:
        zero = None  # not an attention layout
        break
    if zero is not None:
      out["/".join(mod)] = zero
  return out


__all__ = [
    "check_shard_map_specs",
    "from_nnx",
    "from_params",
    "head_sparsity",
    "module_types",
    "path_names",
]
