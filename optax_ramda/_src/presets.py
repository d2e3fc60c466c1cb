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
The solvers work on groups inside one array, so ``attention="head"`` gives
each head one group *per projection* (four groups per head, each weighted by
``sqrt`` of its own size) rather than one joint group across the four. Each
of the four groups of a head is zeroed on its own; a head is fully removed
when all four are zero, which :func:`head_sparsity` reports.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

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

  def __init__(self, dense, conv, attention, overrides):
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

  def _override(self, path: str) -> tuple[bool, Override]:
    for pattern, value in self.overrides.items():
      if fnmatch.fnmatchcase(path, pattern) and value != "default":
        return True, value
    return False, None

  def __call__(self, names: tuple[str, ...], shape: tuple[int, ...], module: str | None):
    path = "/".join(names)
    hit, value = self._override(path)
    if hit:
      return value
    leaf = names[-1] if names else ""
    parent = names[-2] if len(names) > 1 else ""
    in_attention = module in ATTENTION_MODULES or (
        module is None and parent in PROJ_NAMES and len(shape) == 3
    )
    if module in UNREGULARIZED_MODULES or leaf in UNREGULARIZED_NAMES:
      return None
    if leaf == "kernel" and in_attention and len(shape) == 3:
      if self.attention is None:
        return None
      table = ATTENTION_OUT if parent == "out" else ATTENTION_QKV
      return GroupSpec(table[self.attention])
    if leaf == "kernel" and module in (None, "Linear", "Dense") and len(shape) == 2:
      return None if self.dense is None else GroupSpec(DENSE[self.dense](2))
    if leaf == "kernel" and module in (None, "Conv", "ConvTranspose") and len(shape) >= 3:
      return None if self.conv is None else GroupSpec(CONV[self.conv](len(shape)))
    what = f"a {module} module" if module else "an unrecognised layer"
    raise ValueError(
        f"the preset cannot classify parameter {path} (shape {shape}, in {what}). "
        f"Give it a group with overrides={{'{path}': GroupSpec(reduce_axes=...)}}, or "
        f"overrides={{'{path}': None}} to leave it unregularized."
    )


def _spec_fn(classify: Callable[..., Any], module_of: Callable[[tuple[str, ...]], str | None]):
  def spec(params: Any) -> Any:
    def one(path, leaf):
      names = path_names(path)
      return classify(names, tuple(np.shape(leaf)), module_of(names))

    return jax.tree_util.tree_map_with_path(one, params)

  return spec


def from_params(
    params: Any,
    dense: str | None = "input",
    conv: str | None = "channel",
    attention: str | None = "head",
    overrides: Mapping[str, Override] | None = None,
) -> GroupLasso:
  """A :class:`GroupLasso` for a params tree with Flax (Linen or NNX) paths.

  Leaves are classified by their path and shape: ``kernel`` of rank 2 is a
  Dense kernel, of rank >= 3 a Conv kernel, except a rank-3 ``kernel`` under
  ``query``/``key``/``value``/``out`` (an attention projection); ``bias``,
  ``scale``, ``embedding`` (and BatchNorm statistics) are not regularized.
  Anything else raises a ``ValueError`` naming its path; ``overrides`` fixes
  it. ``params`` is only used to check every leaf now; the regularizer
  classifies whatever tree the optimizer passes it.

  Args:
    params: the params tree (e.g. ``variables['params']`` of a Linen model).
    dense: ``"input"`` (paper, §9), ``"output"`` or None (not regularized).
    conv: ``"channel"`` (paper, §9), ``"filter"`` or None.
    attention: ``"head"`` (per-projection head groups, see the module
      docstring), ``"input"`` or None.
    overrides: ``{pattern: GroupSpec | None | "default"}``; ``pattern`` is an
      ``fnmatch`` pattern on the ``/``-joined path of the tree the
      optimizer sees, e.g. ``"Dense_0/kernel"``, ``"*/bias"``,
      ``"params/head/*"``. The first matching pattern wins.

  Example::

    variables = model.init(key, x)            # a Linen model
    reg = optax_ramda.presets.from_params(variables["params"], dense="output")
    opt = optax_ramda.ramda(0.01, strength=1e-4, regularizer=reg)
  """
  classify = _Classifier(dense, conv, attention, overrides)
  reg = GroupLasso(_spec_fn(classify, lambda names: None))
  reg.groups(params)  # raises now, naming the path, for anything unknown
  return reg


def module_types(model: Any) -> dict[tuple[str, ...], str]:
  """``{module path: class name}`` for every submodule of an NNX model."""
  from flax import nnx

  return {
      tuple(str(p) for p in path): type(node).__name__
      for path, node in nnx.iter_graph(model)
      if isinstance(node, nnx.Module)
  }


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

  The result works with ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and with
  ``nnx.state(model, nnx.Param)``, and inside ``optax.masked``/``partition``.

  Args:
    model: the NNX module (only its structure is read, once).
    dense: ``"input"`` (paper), ``"output"`` or None (not regularized).
    conv: ``"channel"`` (paper), ``"filter"`` or None.
    attention: ``"head"``, ``"input"`` or None.
    overrides: ``{pattern: GroupSpec | None | "default"}`` on ``/``-joined
      paths such as ``"fc1/kernel"``, ``"blocks/*/bias"``; first match wins.

  Example::

    model = CNN(rngs=nnx.Rngs(0))
    reg = optax_ramda.presets.from_nnx(model, overrides={"head/kernel": None})
    tx = optax_ramda.ramda(0.01, strength=1e-4, regularizer=reg)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  """
  from flax import nnx

  types = module_types(model)
  classify = _Classifier(dense, conv, attention, overrides)

  def module_of(names: tuple[str, ...]) -> str | None:
    owner = types.get(names[:-1])
    if owner in ("LinearGeneral",) and names[:-2] in types:
      parent = types[names[:-2]]
      if parent in ATTENTION_MODULES:
        return parent
    return owner

  reg = GroupLasso(_spec_fn(classify, module_of))
  reg.groups(nnx.state(model, nnx.Param))  # raises now, naming the path
  return reg


def head_sparsity(params: Any, tol: float = 0.0) -> dict[str, np.ndarray]:
  """Per attention module, which heads are entirely zero (all four projections).

  Returns ``{module path: bool array (heads,)}`` for every attention module
  found by path (``query``/``key``/``value``/``out`` kernels). Reads values on
  the host: call it outside the training step.
  """
  found: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = path_names(path)
    if len(names) >= 3 and names[-1] == "kernel" and names[-2] in PROJ_NAMES:
      if np.ndim(leaf) == 3:
        found.setdefault(names[:-2], {})[names[-2]] = np.asarray(leaf)
  out = {}
  for mod, kernels in found.items():
    if set(kernels) != set(PROJ_NAMES):
      continue
    zero = np.abs(kernels["out"]).max(axis=(1, 2)) <= tol
    for n in QKV_NAMES:
      zero &= np.abs(kernels[n]).max(axis=(0, 2)) <= tol
    out["/".join(mod)] = zero
  return out


__all__ = ["from_nnx", "from_params", "head_sparsity", "module_types", "path_names"]
