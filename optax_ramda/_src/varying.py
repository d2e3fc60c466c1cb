"""Varying manual axes: the solvers inside ``jax.shard_map(check_vma=True)``.

With ``check_vma=True`` (``shard_map``'s default) JAX types every value by
the manual mesh axes along which it may differ between devices (its
"varying manual axes"). A replicated parameter (``P()`` in ``in_specs``) is
invariant; a sharded one varies along the axes it is split over.

Two places in the solve need to know:

* a ``lax.while_loop`` must return carries of the types it was given. A
  counter or flag started as a constant (invariant) but updated from a
  sharded leaf's data comes back varying, and JAX refuses the loop. The
  solvers therefore start such carries with ``jnp.zeros_like`` of the data
  they follow, which keeps the data's varying axes (and is the same constant
  outside ``shard_map``);
* the per-leaf diagnostics (:class:`~optax_ramda.SolveState`) of a sharded
  leaf are computed by each device from its own shard. They are combined
  across the leaf's axes (:func:`combine_leaf_diagnostics`), so that the
  state is the same on every device, as ``out_specs=P()`` requires.

Outside ``shard_map``, and inside it with ``check_vma=False``, no value has
varying axes and nothing here changes the program.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def varying_axes(x: Any) -> frozenset:
  """The manual mesh axes along which ``x`` varies (empty outside ``shard_map``).

  Read from JAX's type of ``x``: ``.mat.varying`` (JAX >= 0.10) or ``.vma``
  (JAX 0.8-0.9).
  """
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  if mat is not None:
    return frozenset(getattr(mat, "varying", ()))
  return frozenset(getattr(aval, "vma", ()))


def _ordered(axes: Any) -> tuple:
  return tuple(sorted(axes, key=str))


def combine_leaf_diagnostics(
    iterations: jax.Array,
    relative_decrease: jax.Array,
    residual: jax.Array,
    leaf_axes: Sequence[frozenset],
    not_measured: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-leaf diagnostics of the whole leaf from those of each device's shard.

  ``leaf_axes[j]`` are the axes entry ``j``'s leaf varies along (its
  shards). Entry ``j`` becomes: the largest ``iterations`` and
  ``relative_decrease`` over the shards (the slowest shard's), and the
  ``residual`` of the whole leaf, the shards' residuals summed in
  quadrature (each is a norm over its own groups), or ``not_measured``
  where any shard did not measure it. A replicated leaf's entries are
  unchanged. A leaf that varies along an axis is taken for a sharded one
  (independent per-device models would have theirs combined too). The
  results are invariant along every axis. With no varying axes (outside
  ``shard_map`` or with ``check_vma=False``) the vectors are returned as
  they are, with no collective.
  """
  union = frozenset().union(*leaf_axes)
  if not union:
    return iterations, relative_decrease, residual
  every = _ordered(union)
  iterations = lax.pmax(iterations, every)
  relative_decrease = lax.pmax(relative_decrease, every)
  # Each group of leaves split along the same axes: their squared residuals
  # summed over those axes; 0 in the other entries.
  sq = jnp.square(residual)
  parts = [
      lax.psum(jnp.where(np.array([a == axes for a in leaf_axes]), sq, 0), _ordered(axes))
      for axes in sorted({a for a in leaf_axes if a}, key=_ordered)
  ]
  # The other axes see the same values on every device: pmax only retypes them.
  whole = jnp.sqrt(lax.pmax(sum(parts[1:], parts[0]), every))
  unmeasured = lax.pmin(residual, every) < 0
  sharded = np.array([bool(a) for a in leaf_axes])
  residual = jnp.where(
      unmeasured, jnp.asarray(not_measured, residual.dtype),
      jnp.where(sharded, whole, lax.pmax(residual, every)),
  )
  return iterations, relative_decrease, residual
