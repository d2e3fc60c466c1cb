"""Compaction: cut the zero groups out of a trained Flax NNX model.

RAMDA/RMDA/ProxGen leave whole groups of weights exactly zero (ALGORITHMS.md §8,
§9). This module turns those zeros into a *physically smaller* dense model that
computes the same function: fewer neurons, channels and attention heads.

Accepted structure (anything else is refused with a ``ValueError`` naming the layer):

* a **chain** of layers applied in order: an ``nnx.Sequential`` (nested ones are
  flattened), a list/tuple/``nnx.List`` of layers, or a module whose ``layers``
  attribute is one of those; or a single ``nnx.MultiHeadAttention``;
* parametrized layers ``nnx.Linear`` and ``nnx.Conv`` (``feature_group_count=1``;
  not subclasses with their own ``__call__`` or weights, such as ``nnx.LoRALinear``),
  whose boundaries are compacted; ``nnx.BatchNorm`` (over the last axis) and
  ``nnx.Dropout`` between them, sliced along with the channels;
* ``nnx.LayerNorm``/``RMSNorm``/``GroupNorm``: kept as they are; they mix the
  channels of their input, so no channel is removed across them;
* ``nnx.MultiHeadAttention`` (self-attention, ``num_kv_heads == num_heads``, not
  decoding): dead heads are removed; its input and output widths are kept;
* plain callables (activations, pooling, flatten, reshapes): probed. Between two
  parametrized layers ``P -> fns -> Q`` the callables and BatchNorms form a
  segment ``g``; the Jacobian sparsity of ``g`` at four random points (forward
  mode, one tangent per channel of ``P``) tells which channel of ``P`` every
  input feature of ``Q`` comes from. If some feature depends on several channels
  (or none), the boundary is left as it is.

Refused before anything is copied or changed: a layer instance (or a weight) at two
places of the chain, i.e. one layer whose output feeds two consumers; a plain
function that uses a Flax module (a residual ``lambda x: x + f(x)``, or a layer of the
chain called a second time); a custom module in the chain (a residual block: compact
cannot see whether its branches agree about a channel); a module with a ``layers``
list whose ``__call__`` does something else than apply them in order.

Inside custom modules (``compact(..., inside_blocks=True)``): a model that is an
``nnx.Module`` but not a chain (a Transformer, a residual block) is not refused but
compacted *locally*. Its units are the outermost sub-modules that are chains (an
``nnx.Sequential``, or a module with a ``layers`` list, of the layers above) or an
``nnx.MultiHeadAttention``. The model is run once on ``sample`` with each unit's class
``__call__`` temporarily wrapped to record the unit's inputs; a unit is compacted, on
the input it received, when it was called exactly once, with one concrete array (a
chain) or without ``decode``/``sow_weights`` or a mask with a heads axis (attention),
when neither it nor a module or weight inside it is referenced from elsewhere in the
model, and when its chain passes the refusals above. Compaction only cuts between the
parametrized layers of a chain and keeps attention's input and output widths, so a unit
keeps its input and output widths and a residual stream ``x + unit(x)`` keeps its width;
everything else (embeddings, norms, the model's own code) is copied unchanged, and a
unit that does not qualify is left as it is (:func:`compaction_plan` says why). This is
off by default: it assumes that the model's code reaches a unit only by calling it (not
by reading its weights or sizes), which compact cannot see and only ``check`` verifies,
on ``sample``.

Rules at a boundary ``P -> g -> Q`` (channel ``c`` of ``P``, its features ``F_c``
in the input of ``Q``; ALGORITHMS.md §9 layouts: Linear ``(in, out)``, Conv
``(*window, in, out)``):

* **input-wise zero**: every input slice of ``Q`` in ``F_c`` is all zero (kernel
  rows / input-channel slices). Channel ``c`` is removed from ``P`` (kernel
  column/filter and bias), from every BatchNorm in ``g``, and ``F_c`` from ``Q``.
* **output-wise zero**: ``P``'s kernel column/filter ``c`` is all zero, so its
  output is the constant ``bias[c]`` and ``g`` maps it to constants ``v_d``,
  ``d in F_c`` (computed by running ``g``: BatchNorm, activation, pooling
  included). The channel is removed and ``sum_d v_d * Q.kernel[d]`` is added to
  ``Q.bias`` (accumulated in float64). For a Conv ``Q`` this is exact only with
  ``padding='VALID'`` and spatially uniform ``v`` (zero padding otherwise makes
  the contribution position dependent), so with other padding the channel is
  kept unless every ``v_d == 0``. A ``Q`` without bias keeps it likewise.
* Removing rows of ``Q`` may make a column of ``P`` zero, and so on: the passes
  repeat until nothing changes, which makes :func:`compact` idempotent.
* A layer keeps at least one channel: where every channel of ``P`` could go (a whole
  layer trained to zero), one is kept (a removable one if any), so that no layer is
  left zero wide; :func:`compaction_plan` notes it.

Attention heads (kernels ``(in, heads, head_dim)`` for query/key/value and
``(heads, head_dim, out)`` for out): head ``h`` is removed when ``out.kernel[h]``
is zero (it contributes nothing whatever q/k/v are), or when ``value.kernel[:, h]``
is zero (then the head outputs ``sum_k att_k value.bias[h] = value.bias[h]``, and
``value.bias[h] @ out.kernel[h]`` is folded into ``out.bias``; only with the
default softmax attention, whose weights sum to one). One head is always kept.

Equality: removing zero rows changes contraction lengths, so float32 results
differ from the original by reassociation (a few ulps of ``sum |x||w|``);
removing only output columns leaves each remaining dot product as it was. A
model with no zero groups is returned with identical shapes and parameters.

Example::

  model.eval()
  small = optax_ramda.compact(model, x_val[:8])
  assert jnp.allclose(small(x_val), model(x_val), rtol=1e-5, atol=1e-5)

Works on inference models: BatchNorm must use running averages and Dropout be
deterministic (``model.eval()``).
"""

from __future__ import annotations

import functools
import itertools
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_BARRIERS = (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)
# Layers whose weights or shapes compact rewrites, and the variables it rewrites.
_MODIFIED = (nnx.Linear, nnx.Conv, nnx.BatchNorm, nnx.MultiHeadAttention)
_REWRITTEN = (nnx.Param, nnx.BatchStat)


class CompactionBoundary(NamedTuple):
  """What :func:`compaction_plan` found at one boundary ``producer -> consumer``."""

  producer: str
  consumer: str
  channels: int  # channels of the producer before
  kept: int  # channels kept
  folded: int  # removed channels whose constant output was folded into a bias
  note: str  # why the boundary could not be compacted, or ""


def _name(path: tuple[Any, ...]) -> str:
  return "/".join(str(p) for p in path) or "model"


def _flatten(layers: Any, path: tuple[Any, ...]) -> list[tuple[str, Any]]:
  out = []
  for i, layer in enumerate(layers):
    p = (*path, i)
    if isinstance(layer, nnx.Sequential):
      out.extend(_flatten(list(layer.layers), p))
    else:
      out.append((_name(p), layer))
  return out


def _chain(model: Any) -> list[tuple[str, Any]]:
  if isinstance(model, nnx.Sequential):
    return _flatten(list(model.layers), ("layers",))
  if isinstance(model, (list, tuple, nnx.List)):
    return _flatten(list(model), ())
  if isinstance(model, (nnx.MultiHeadAttention, nnx.Linear, nnx.Conv)):
    return [("model", model)]
  layers = getattr(model, "layers", None)
  if isinstance(layers, (list, tuple, nnx.List, nnx.Sequential)):
    return _chain(layers) if isinstance(layers, nnx.Sequential) else _flatten(
        list(layers), ("layers",))
  raise ValueError(
      f"compact: cannot read a chain of layers from {type(model).__name__}. Pass an "
      "nnx.Sequential, a list of layers, or a module with a `layers` list; models with "
      "branches or residual connections are not supported (their branches may disagree "
      "about which channels exist); inside_blocks=True compacts the chains and attention "
      "layers inside such a model locally."
  )


# The weights of the layers whose subclasses must add none (see _refuse_subclass).
_BASE_PARAMS = {nnx.Linear: ("kernel", "bias"), nnx.Conv: ("kernel", "bias")}


def _refuse_subclass(name: str, layer: Any) -> None:
  """A subclass of a layer compact rewrites must compute what the layer does.

  ``nnx.LoRALinear`` is an ``nnx.Linear`` with its own ``__call__`` and extra weights
  (``lora_a``/``lora_b``) that compact would not slice; such layers are refused.
  """
  for base in (nnx.Linear, nnx.Conv, nnx.BatchNorm, nnx.MultiHeadAttention):
    if not isinstance(layer, base) or type(layer) is base:
      continue
    extra = [] if base not in _BASE_PARAMS else sorted(
        _name(path) for path, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))
        if _name(path) not in _BASE_PARAMS[base])
    if type(layer).__call__ is not base.__call__ or extra:
      what = f" and weights {', '.join(extra)}" if extra else ""
      raise ValueError(
          f"compact: layer {name} is a {type(layer).__name__}, a subclass of nnx."
          f"{base.__name__} with its own __call__{what}; compact only knows how the "
          f"plain nnx.{base.__name__} uses its weights, so it refuses rather than cut "
          "channels out of some weights and not others. Fix: merge the layer into a plain "
          f"nnx.{base.__name__} first (for LoRA: kernel + lora_a @ lora_b), or leave the "
          "model uncompacted.")



def _check(name: str, layer: Any) -> str:
  """Classifies a layer: 'weights', 'mha', 'channelwise', 'barrier' or 'function'."""
  _refuse_subclass(name, layer)
  if isinstance(layer, nnx.Linear):
    return "weights"
  if isinstance(layer, nnx.Conv):
    if layer.feature_group_count != 1:
      raise ValueError(f"compact: layer {name} is a grouped Conv (feature_group_count="
                       f"{layer.feature_group_count}); only feature_group_count=1 is supported.")
    return "weights"
  if isinstance(layer, nnx.BatchNorm):
    if layer.axis not in (-1,):
      raise ValueError(f"compact: BatchNorm {name} normalizes axis {layer.axis}; only the last "
                       "(channel) axis is supported.")
    if not layer.use_running_average:
      raise ValueError(f"compact: BatchNorm {name} uses batch statistics; call model.eval() "
                       "before compacting.")
    return "channelwise"
  if isinstance(layer, nnx.Dropout):
    if not layer.deterministic and layer.rate > 0:
      raise ValueError(f"compact: Dropout {name} is active; call model.eval() first.")
    return "channelwise"
  if isinstance(layer, _BARRIERS):
    return "barrier"
  if isinstance(layer, nnx.MultiHeadAttention):
    if layer.dropout_rate > 0 and not layer.deterministic:
      raise ValueError(f"compact: attention {name} has active dropout; call model.eval() first.")
    return "mha"
  if isinstance(layer, nnx.Module):
    subs = sorted({f"{_name(path)}: {type(node).__name__}" for path, node in nnx.iter_graph(layer)
                   if path and isinstance(node, _MODIFIED)})
    inside = f" (its sublayers: {', '.join(subs[:6])}{', ...' if len(subs) > 6 else ''})"
    raise ValueError(
        f"compact: layer {name} has unknown type {type(layer).__name__}"
        f"{inside if subs else ''}: compact cannot see how its __call__ combines its inputs "
        "and sublayers. If it is a residual block (x + f(x)) or has branches, the channels "
        "of both paths must stay aligned, which compact cannot verify, so it refuses rather "
        "than risk a wrong model. Supported: nnx.Linear, nnx.Conv, nnx.BatchNorm, "
        "nnx.LayerNorm/RMSNorm/GroupNorm, nnx.Dropout, nnx.MultiHeadAttention, nnx.Sequential "
        "and plain functions. Fix: build the model as an nnx.Sequential of those, or compact "
        "a plain chain inside the block yourself (e.g. block.mlp = compact(block.mlp, "
        "sample_of_its_input)), or pass inside_blocks=True to compact the model's chains and "
        "attention layers that way: compact keeps a chain's input and output widths."
    )
  if callable(layer):
    return "function"
  raise ValueError(f"compact: layer {name} ({type(layer).__name__}) is not callable.")


# --- sharing: one layer, several consumers -----------------------------------------------


def _rewritten(name: str, layer: Any) -> list[tuple[str, Any]]:
  """``(name, node)`` of the sub-layers and variables of ``layer`` that compact may rewrite."""
  if not isinstance(layer, _MODIFIED):
    return []
  return [(f"{name}/{_name(path)}" if path else name, node)
          for path, node in nnx.iter_graph(layer)
          if isinstance(node, (*_MODIFIED, *_REWRITTEN))]


def _code_names(code: Any) -> set[str]:
  names = set(code.co_names)
  for c in code.co_consts:
    if hasattr(c, "co_names"):
      names |= _code_names(c)
  return names


def _cell(cell: Any) -> list[Any]:
  try:
    return [cell.cell_contents]
  except ValueError:  # an empty cell
    return []


def _hidden(fn: Any, depth: int = 0, seen: set[int] | None = None) -> list[Any]:
  """Flax modules and variables a plain callable uses, as far as Python shows them.

  Looks at a bound method's ``self``, ``functools.partial`` arguments, ``__wrapped__``,
  closure cells, defaults, the globals a function's code names, and the attributes of a
  callable object (one level), following the functions found there up to three levels.
  """
  seen = set() if seen is None else seen
  if id(fn) in seen or depth > 3:
    return []
  seen.add(id(fn))
  refs: list[Any] = [getattr(fn, a) for a in ("__self__", "__func__", "__wrapped__")
                     if hasattr(fn, a)]
  if isinstance(fn, functools.partial):
    refs += [fn.func, *fn.args, *fn.keywords.values()]
  code = getattr(fn, "__code__", None)
  if isinstance(code, types.CodeType):
    for cell in getattr(fn, "__closure__", None) or ():
      refs += _cell(cell)
    refs += list(getattr(fn, "__defaults__", None) or ())
    refs += list((getattr(fn, "__kwdefaults__", None) or {}).values())
    globs = getattr(fn, "__globals__", None) or {}
    refs += [globs[n] for n in sorted(_code_names(code)) if n in globs]
  elif depth == 0 and hasattr(fn, "__dict__"):
    refs += list(vars(fn).values())
  found = []
  for ref in refs:
    items = list(ref.values()) if isinstance(ref, dict) else (
        list(ref) if isinstance(ref, (list, tuple)) else [ref])
    for obj in items:
      if isinstance(obj, (nnx.Module, nnx.Variable)):
        found.append(obj)
      elif callable(obj) and not isinstance(obj, (type, types.ModuleType)):
        found += _hidden(obj, depth + 1, seen)
  return found


def _refuse_shared(model: Any, sample: Any) -> None:
  """Raises ``ValueError`` if a layer of the chain has more than one consumer.

  Checked on the caller's model, before anything is copied or changed: a layer instance
  (or a sub-layer or weight of one) at two places of the chain; a plain function that
  uses a Flax module (compact cannot see into it, and if that module is also in the
  chain its output feeds two consumers); a model whose own ``__call__`` does not simply
  apply its ``layers`` in order (a skip connection around some of them).
  """
  chain = _chain(model)
  kinds = [_check(n, layer) for n, layer in chain]
  where: dict[int, str] = {}
  for name, layer in chain:  # whole layers first, so that the message names them
    if isinstance(layer, _MODIFIED):
      first = where.setdefault(id(layer), name)
      if first != name:
        raise ValueError(
            f"compact: layer {name} is the same {type(layer).__name__} instance as layer "
            f"{first}: one layer used at two places of the chain, so its weights are shared "
            "and its output feeds two consumers. Removing a channel would have to suit both "
            "places at once, which compact does not attempt. Fix: give each place its own "
            "layer (e.g. nnx.clone(layer)) if the weights need not be shared; otherwise this "
            "model cannot be compacted.")
  for name, layer in chain:
    for sub, node in _rewritten(name, layer):
      if sub == name:
        continue
      first = where.setdefault(id(node), sub)
      if first != sub:
        raise ValueError(
            f"compact: {sub} is the same {type(node).__name__} as {first} (shared between "
            "two layers of the chain). Removing a channel from one would change the other; "
            "compact does not attempt that. Fix: give each layer its own weights "
            "(nnx.clone), or leave this model uncompacted.")
  for (name, layer), kind in zip(chain, kinds):
    if kind != "function":
      continue
    for obj in _hidden(layer):
      at = where.get(id(obj))
      what = f"the {type(obj).__name__} " + (f"at {at}" if at else "that is not in the chain")
      raise ValueError(
          f"compact: layer {name} is a plain function that uses {what}. compact sees a "
          "function only from outside: it cannot compact the module inside, and if that "
          "module is also in the chain (its output feeding two consumers) or the function "
          "adds a skip connection, removing a channel would break it. Fix: put the module "
          "itself in the chain (an nnx.Sequential of supported layers and functions that "
          "use no module).")
  if isinstance(model, nnx.Module) and not (
      type(model).__call__ is nnx.Sequential.__call__
      or isinstance(model, (nnx.MultiHeadAttention, nnx.Linear, nnx.Conv))):
    x = jnp.asarray(sample)[:2]
    direct = np.asarray(model(x), np.float64)
    chained = np.asarray(_apply([layer for _, layer in chain], x), np.float64)
    scale = max(float(np.max(np.abs(direct), initial=0.0)), 1.0)
    if direct.shape != chained.shape or np.max(np.abs(direct - chained)) > 1e-6 * scale:
      raise ValueError(
          f"compact: {type(model).__name__}.__call__ does not just apply its `layers` in "
          "order (its output differs from running them one after the other); it may add a "
          "residual/skip connection or feed a layer's output to two consumers, which "
          "compact cannot follow. Fix: compact `model.layers` (or an nnx.Sequential of the "
          "plain chain inside it) and put the result back.")


# --- per-layer views ---------------------------------------------------------------------


def _np(v: Any) -> np.ndarray:
  return np.asarray(v[...])


def _in_zero(layer: Any) -> np.ndarray:
  """bool[in]: inputs of a Linear/Conv whose kernel slice is all zero."""
  k = _np(layer.kernel)
  axes = tuple(a for a in range(k.ndim) if a != k.ndim - 2)
  return np.all(k == 0, axis=axes)


def _out_zero(layer: Any) -> np.ndarray:
  k = _np(layer.kernel)
  return np.all(k == 0, axis=tuple(range(k.ndim - 1)))


def _set(var: Any, value: np.ndarray) -> None:
  var.set_value(jnp.asarray(value, dtype=var[...].dtype))


def _take_out(layer: Any, keep: np.ndarray) -> None:
  _set(layer.kernel, _np(layer.kernel)[..., keep])
  if layer.bias is not None:
    _set(layer.bias, _np(layer.bias)[keep])
  layer.out_features = int(keep.sum())
  _update_conv(layer)


def _take_in(layer: Any, keep: np.ndarray) -> None:
  _set(layer.kernel, _np(layer.kernel)[..., keep, :])
  layer.in_features = int(keep.sum())
  _update_conv(layer)


def _update_conv(layer: Any) -> None:
  if isinstance(layer, nnx.Conv):
    layer.kernel_shape = tuple(layer.kernel[...].shape)
    if layer.mask is not None:
      raise ValueError("compact: masked Conv layers are not supported.")


def _take_channelwise(layer: Any, keep: np.ndarray) -> None:
  if isinstance(layer, nnx.BatchNorm):
    for attr in ("scale", "bias", "mean", "var"):
      var = getattr(layer, attr, None)
      if var is not None:
        _set(var, _np(var)[keep])
    layer.num_features = int(keep.sum())


# --- probing a segment ---------------------------------------------------------------------


def _apply(layers: list[Any], x: jax.Array) -> jax.Array:
  for layer in layers:
    x = layer(x)
  return x


def _owners(layers: list[Any], x: jax.Array, key: jax.Array) -> np.ndarray | None:
  """int[D]: the input channel each output feature of ``layers`` depends on, or None.

  Forward-mode tangents, one per input channel (all positions at once), at four random
  points; a feature depends on channel c if its tangent is non-zero anywhere. A feature
  whose dependence is invisible at all four points counts as unknown (returns None).
  """
  channels = x.shape[-1]
  fn = lambda y: _apply(layers, y)
  k1, k2 = jax.random.split(key)
  n1, n2 = jax.random.normal(k1, x.shape, x.dtype), jax.random.normal(k2, x.shape, x.dtype)
  # Small and large, signed and positive points, so that activations which are flat
  # somewhere (relu below a shifted threshold) still pass a tangent at one of them.
  probes = [n1, jnp.abs(n2) + 0.1, 10 * n2, 10 * jnp.abs(n1) + 1.0]
  eye = jnp.eye(channels, dtype=x.dtype)
  deps: Any = 0
  for p in probes:
    tangent = jax.vmap(lambda e, p=p: jax.jvp(fn, (p,), (jnp.broadcast_to(e, p.shape),))[1])(eye)
    t = np.asarray(tangent)
    deps = deps + np.any(t != 0, axis=tuple(range(1, t.ndim - 1)))  # (C, D)
  deps = np.asarray(deps) > 0
  if not np.all(deps.sum(axis=0) == 1):
    return None
  return np.argmax(deps, axis=0)


def _compact_boundary(
    names: list[str], layers: list[Any], p: int, q: int, x: jax.Array, key: jax.Array
) -> CompactionBoundary:
  """Compacts ``layers[p] -> layers[p+1:q] -> layers[q]`` in place; ``x``: P's output."""
  prod, cons, seg = layers[p], layers[q], layers[p + 1:q]
  channels = x.shape[-1]
  nothing = lambda note: CompactionBoundary(names[p], names[q], channels, channels, 0, note)
  owner = _owners(seg, x, key)
  if owner is None:
    return nothing("features of the consumer mix several producer channels")
  zin = _in_zero(cons)
  if owner.shape[0] != zin.shape[0]:
    return nothing("segment output width does not match the consumer input")
  removable = np.array([np.all(zin[owner == c]) for c in range(channels)])
  const = _out_zero(prod) & ~removable
  folds = np.zeros(channels, bool)
  contributions: dict[int, np.ndarray] = {}  # channel -> its constant's term in cons.bias
  if const.any():
    b = _np(prod.bias) if prod.bias is not None else np.zeros(channels)
    xc = jnp.broadcast_to(jnp.asarray(np.where(const, b, 0), x.dtype), x.shape)
    v = np.asarray(_apply(seg, xc), np.float64)[0]  # (..., D)
    kernel = _np(cons.kernel).astype(np.float64)
    conv = isinstance(cons, nnx.Conv)
    for c in np.flatnonzero(const):
      feats = np.flatnonzero(owner == c)
      vc = v[..., feats].reshape(-1, feats.size)
      if np.all(vc == 0):
        folds[c] = True
        continue
      uniform = np.all(vc == vc[:1])
      if cons.bias is None or not uniform:
        continue
      if conv and not (isinstance(cons.padding, str) and cons.padding.upper() == "VALID"):
        continue
      rows = kernel[..., feats, :]
      rows = rows.reshape(-1, feats.size, kernel.shape[-1]).sum(0) if conv else rows
      contributions[int(c)] = vc[0] @ rows
      folds[c] = True
  remove = removable | folds
  note = ""
  if remove.all():
    # Every channel is dead: keep one (a removable one if any, whose consumer rows are
    # zero), as attention keeps one head, so that no layer is left zero wide.
    kept = int(np.flatnonzero(removable)[0]) if removable.any() else 0
    remove[kept] = folds[kept] = False
    note = f"every channel was zero; channel {kept} is kept so that the layer is not empty"
  if not remove.any():
    return nothing(note)
  keep = ~remove
  folded = [contributions[int(c)] for c in np.flatnonzero(folds) if int(c) in contributions]
  # BatchNorms inside the segment: their channels are features of a prefix of the segment.
  for i, layer in enumerate(seg):
    if isinstance(layer, nnx.BatchNorm):
      _take_channelwise(layer, keep[_owners(seg[:i], x, key)])
  if folded:
    _set(cons.bias, np.asarray(_np(cons.bias), np.float64) + sum(folded))
  _take_out(prod, keep)
  _take_in(cons, keep[owner])
  return CompactionBoundary(names[p], names[q], channels, int(keep.sum()), int(folds.sum()),
                            note)


def _compact_heads(layer: nnx.MultiHeadAttention) -> bool:
  """Removes dead heads of ``layer`` in place; returns whether anything changed."""
  if layer.num_kv_heads != layer.num_heads or layer.decode:
    return False
  out_k = _np(layer.out.kernel)  # (heads, head_dim, out)
  v_k = _np(layer.value.kernel)  # (in, heads, head_dim)
  v_b = _np(layer.value.bias) if layer.value.bias is not None else None
  out_dead = np.all(out_k == 0, axis=(1, 2))
  v_zero = np.all(v_k == 0, axis=(0, 2))
  default_fn = layer.attention_fn is nnx.dot_product_attention
  v_const = v_zero & ~out_dead & default_fn
  if v_b is not None:
    nonzero_b = np.any(v_b != 0, axis=1)
    v_const &= ~nonzero_b | (layer.out.bias is not None)
  remove = out_dead | v_const
  if remove.all():
    remove[0] = False
  if not remove.any():
    return False
  if v_b is not None and layer.out.bias is not None:
    folded = np.einsum("hd,hdo->o", v_b[remove & v_const & ~out_dead].astype(np.float64),
                       out_k[remove & v_const & ~out_dead].astype(np.float64))
    _set(layer.out.bias, np.asarray(_np(layer.out.bias), np.float64) + folded)
  keep = ~remove
  for proj in (layer.query, layer.key, layer.value):
    _set(proj.kernel, _np(proj.kernel)[:, keep])
    if proj.bias is not None:
      _set(proj.bias, _np(proj.bias)[keep])
    proj.out_features = (int(keep.sum()), layer.head_dim)
  _set(layer.out.kernel, out_k[keep])
  layer.out.in_features = (int(keep.sum()), layer.head_dim)
  layer.num_heads = layer.num_kv_heads = int(keep.sum())
  layer.qkv_features = layer.num_heads * layer.head_dim
  return True


# --- running ------------------------------------------------------------------------------


def _clone(model: Any) -> Any:
  if isinstance(model, nnx.Module):
    return nnx.clone(model)
  if isinstance(model, (list, tuple)):
    return type(model)(_clone(m) for m in model)
  return model


def _run(model: Any, sample: jax.Array, key: jax.Array) -> list[CompactionBoundary]:
  chain = _chain(model)
  names = [n for n, _ in chain]
  layers = [layer for _, layer in chain]
  kinds = [_check(n, layer) for n, layer in chain]
  for layer, kind in zip(layers, kinds):
    if kind == "mha":
      _compact_heads(layer)
  first: dict[tuple[int, int], tuple[int, int]] = {}  # channels at the start, folds so far
  while True:
    acts = [jnp.asarray(sample)[:1]]
    for layer in layers:
      acts.append(layer(acts[-1]))
    report, changed = [], False
    weights = [i for i, k in enumerate(kinds) if k == "weights"]
    for p, q in itertools.pairwise(weights):
      between = kinds[p + 1:q]
      if any(k in ("barrier", "mha") for k in between):
        c = acts[p + 1].shape[-1]
        note = "a normalization or attention layer mixes the channels"
        report.append(CompactionBoundary(names[p], names[q], c, c, 0, note))
        continue
      b = _compact_boundary(names, layers, p, q, acts[p + 1], key)
      c0, f0 = first.get((p, q), (b.channels, 0))
      first[(p, q)] = (c0, f0 + b.folded)
      report.append(b._replace(channels=c0, folded=f0 + b.folded))
      if b.kept < b.channels:
        changed = True
        break  # shapes changed: recompute the activations
    if not changed:
      return report


# --- units inside custom modules (inside_blocks=True) ---------------------------------------

_KNOWN = (nnx.Linear, nnx.Conv, nnx.BatchNorm, nnx.Dropout, nnx.MultiHeadAttention, *_BARRIERS)


def _is_chain(model: Any) -> bool:
  """Whether ``model`` reads as a chain of known layers (no custom module in it)."""
  try:
    chain = _chain(model)
  except ValueError:
    return False
  return not any(isinstance(layer, nnx.Module) and not isinstance(layer, _KNOWN)
                 for _, layer in chain)


def _unit_kind(node: Any) -> str | None:
  """'mha' or 'chain' for a candidate compactable unit, else None (validating its layers)."""
  if isinstance(node, nnx.MultiHeadAttention):
    _check("attention", node)
    return "mha"
  if isinstance(node, nnx.Module) and not isinstance(node, (nnx.Linear, nnx.Conv, nnx.List)) \
      and _is_chain(node):
    for name, layer in _chain(node):
      _check(name, layer)  # training-mode BatchNorm, grouped Conv...: raised as in a chain
    return "chain"
  return None


def _record_calls(model: Any, units: dict[int, Any], sample: Any) -> dict[int, list[Any]]:
  """Runs ``model(sample)`` once, recording the ``(args, kwargs)`` of every call of a unit.

  The ``__call__`` of each class that defines one for a unit is wrapped for the duration of
  the run (and restored afterwards); a call of a unit from inside its own call (a subclass
  calling ``super().__call__``) is recorded once.
  """
  calls: dict[int, list[Any]] = {i: [] for i in units}
  active: set[int] = set()
  owners = {}
  for unit in units.values():
    owner = next(c for c in type(unit).__mro__ if "__call__" in vars(c))
    owners[owner] = vars(owner)["__call__"]

  def wrap(orig: Any) -> Any:
    @functools.wraps(orig)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
      key = id(self)
      if key not in calls or key in active:
        return orig(self, *args, **kwargs)
      calls[key].append((args, kwargs))
      active.add(key)
      try:
        return orig(self, *args, **kwargs)
      finally:
        active.discard(key)
    return call

  try:
    for owner, orig in owners.items():
      owner.__call__ = wrap(orig)  # type: ignore[method-assign]
    _call(model, jnp.asarray(sample))
  finally:
    for owner, orig in owners.items():
      owner.__call__ = orig  # type: ignore[method-assign]
  return calls


def _outside_refs(model: Any, unit: Any) -> bool:
  """Whether the unit, or a module or weight inside it, is referenced from outside it."""
  inside = {id(n) for _, n in nnx.iter_graph(unit)}
  refs = 0
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable) or not nnx.graph.is_graph_node(node):
      continue
    for _, child in nnx.iter_children(node):
      if child is unit:
        refs += 1
      elif id(child) in inside and id(node) not in inside:
        return True
  return refs != 1


def _find_units(model: Any, sample: Any) -> tuple[list[tuple[tuple[Any, ...], str, Any]], list[
    CompactionBoundary]]:
  """The outermost compactable units of a custom module, with their recorded inputs.

  Returns ``[(path, kind, input)]`` (``input``: the positional arguments of a chain, or the
  keyword arguments of an attention call) and a note for every candidate left as it is.
  """
  nodes = list(nnx.iter_graph(model))  # each node once, at its first path
  cands = {id(n): (p, k, n) for p, n in nodes if p for k in [_unit_kind(n)] if k}
  calls = _record_calls(model, {i: n for i, (_, _, n) in cands.items()}, sample)
  ok, notes = {}, []
  for i, (path, kind, unit) in cands.items():
    name, why = _name(path), ""
    made = calls[i]
    if len(made) != 1:
      why = f"called {len(made)} times in one forward pass"
    elif _outside_refs(model, unit):
      why = "the module or a weight of it is shared with another part of the model"
    elif kind == "chain":
      args, kwargs = made[0]
      if len(args) != 1 or any(v is not None for v in kwargs.values()) or not isinstance(
          args[0], (jax.Array, np.ndarray)) or isinstance(args[0], jax.core.Tracer):
        why = "called with other than one concrete array"
      else:
        try:
          _refuse_shared(unit, args[0])
        except ValueError as e:
          why = str(e)
    else:
      _, kwargs = made[0]
      mask = kwargs.get("mask")
      if kwargs.get("decode") or kwargs.get("sow_weights"):
        why = "called with decode or sow_weights"
      elif mask is not None and jnp.ndim(mask) >= 3 and jnp.shape(mask)[-3] != 1:
        why = "its mask has a heads axis"
    if why:
      notes.append(CompactionBoundary(name, name, 0, 0, 0, f"left as it is: {why}"))
    else:
      ok[i] = (path, kind, made[0][0][0] if kind == "chain" else None)
  chosen = [v for v in ok.values()
            if not any(v[0][:n] == o[0] for o in ok.values() for n in range(len(v[0])))]
  return sorted(chosen, key=lambda v: [str(p) for p in v[0]]), notes


def _run_units(model: Any, sample: Any, key: jax.Array) -> tuple[Any, list[CompactionBoundary]]:
  """Compacts the units of a custom module on a copy; returns it and the report."""
  units, report = _find_units(model, sample)
  new = nnx.clone(model)
  # nnx.clone keeps the graph's structure: a node has the same first path in both.
  twin = {p: n for p, n in nnx.iter_graph(new)}
  for path, kind, x in units:
    unit = twin[path]
    name = _name(path)
    if kind == "mha":
      heads = unit.num_heads
      _compact_heads(unit)
      report.append(CompactionBoundary(name, name, heads, unit.num_heads, 0, "attention heads"))
    else:
      report += [b._replace(producer=f"{name}/{b.producer}", consumer=f"{name}/{b.consumer}")
                 for b in _run(unit, x, key)]
  return new, report


# --- public --------------------------------------------------------------------------------


def _compact(model: Any, sample: Any, seed: int, inside_blocks: bool
             ) -> tuple[Any, list[CompactionBoundary]]:
  key = jax.random.PRNGKey(seed)
  if inside_blocks and isinstance(model, nnx.Module) and not _is_chain(model):
    return _run_units(model, sample, key)
  _refuse_shared(model, sample)
  new = _clone(model)
  return new, _run(new, sample, key)


def compact(model: Any, sample: Any, *, seed: int = 0, check: bool = True,
            inside_blocks: bool = False) -> Any:
  """Returns a smaller copy of ``model`` with its zero groups cut out.

  See the module docstring for the accepted structure and the exact rules
  (ALGORITHMS.md §8 defines zero groups, §9 the Flax layouts). The input model is
  not modified.

  Args:
    model: an inference-mode ``nnx.Sequential``, list of layers, module with a
      ``layers`` list, or ``nnx.MultiHeadAttention``; with ``inside_blocks=True``
      also any other ``nnx.Module`` (a Transformer, a residual block).
    sample: an example input batch (its first example is used to find the
      intermediate shapes and to probe the functions between layers).
    seed: seed of the random probe points.
    check: compare the outputs of the new and old model on ``sample`` and raise
      ``RuntimeError`` if they differ by more than reassociation can explain
      (relative 1e-4 of the output scale in float32, 1e-10 in float64; 1e-6
      in float64 with attention, whose softmax jax computes in float32).
    inside_blocks: for a model that is not a chain (a custom module), compact its
      units locally instead of refusing it: every outermost sub-module that is a
      chain (``nnx.Sequential`` or a module with a ``layers`` list of supported
      layers) or an ``nnx.MultiHeadAttention``, called exactly once when running
      ``model(sample)`` and sharing no module or weight with the rest of the model,
      is compacted on the input it received there. A unit's input and output widths
      never change, so residual streams keep their width; the rest of the model is
      copied as it is, and units that do not qualify are left as they are (see
      :func:`compaction_plan` for why). Off by default: it relies on the custom
      code reaching its units only by calling them, which only ``check`` verifies.
      A chain model is compacted as without it.

  Returns:
    A new model of the same type with smaller layers.

  Example::

    small = compact(model, x_val[:8])
    small_lm = compact(transformer, tokens[:4], inside_blocks=True)
  """
  new, _ = _compact(model, sample, seed, inside_blocks)
  if check:
    sample = jnp.asarray(sample)
    try:
      out_new = jnp.asarray(_call(new, sample))
    except Exception as e:
      raise RuntimeError(
          "compact: the compacted model fails on `sample` (its code may read a compacted "
          f"layer's weights or sizes directly): {type(e).__name__}: {e}") from e
    before = np.asarray(_call(model, sample), np.float64)
    after = np.asarray(out_new, np.float64)
    # float64 models agree to reassociation, except that jax.nn.dot_product_attention
    # (nnx attention without dropout) computes its softmax in float32, so a folded
    # value bias is exact only to float32's precision there.
    layers = list(model) if isinstance(model, (list, tuple)) else [model]
    has_attention = any(
        isinstance(m, nnx.MultiHeadAttention)
        for layer in layers if isinstance(layer, nnx.Module)
        for _, m in nnx.iter_graph(layer)
    )
    eps = (1e-6 if has_attention else 1e-10) if out_new.dtype == jnp.float64 else 1e-4
    scale = max(float(np.max(np.abs(before))), 1.0)
    if before.shape != after.shape or np.max(np.abs(before - after)) > eps * scale:
      raise RuntimeError(
          "compact: the compacted model's outputs differ from the original's; a function "
          "between layers is probably not channel-wise (e.g. it hard-codes a channel count), "
          "or (inside_blocks=True) the model's code uses a unit's weights other than by "
          "calling it. Please report the model structure."
      )
  return new


def compaction_plan(model: Any, sample: Any, *, seed: int = 0,
                    inside_blocks: bool = False) -> list[CompactionBoundary]:
  """What :func:`compact` does at every Linear/Conv boundary (runs it on a copy).

  With ``inside_blocks=True`` on a custom module, the names are paths inside the model
  (``block/mlp/layers/0``); a compacted attention unit has one entry with ``producer ==
  consumer`` and heads as channels (note ``"attention heads"``); a candidate unit left as
  it is has one entry with zero channels and a note ``"left as it is: <why>"``.
  """
  return _compact(model, sample, seed, inside_blocks)[1]


def _call(model: Any, x: jax.Array) -> jax.Array:
  if isinstance(model, (list, tuple)):
    return _apply(list(model), x)
  return model(x)
