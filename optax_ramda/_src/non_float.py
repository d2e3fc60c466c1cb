"""Integer and boolean leaves of the params: passed through unchanged.

A params tree may hold leaves that are not trained (a step counter, an index
table, a mask). ``optax.adam`` leaves such a leaf unchanged when its gradient
is zero; the dual-averaged stages would not: with an integer ``x0``, ``V``
and ``U`` the metric ``cbrt(U) + eps`` rounds to 0 and ``z = x0 - V / P`` is
``0 / 0``. The optimizers of :mod:`optax_ramda` therefore hand their stages
only the real floating-point leaves (an ``optax.MaskedNode`` in place of each
other leaf, as ``optax.masked`` does) and return a zero update for the
others. The state then holds nothing for those leaves. For a params tree of
floating-point leaves only, ``init`` and ``update`` call the inner ones
unchanged: same state, same program.

Complex leaves are refused at ``init`` (the regularizers and the cube root
are defined on real numbers), and a regularized integer leaf keeps the
regularizer's own error.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax._src import base

from optax_ramda._src.regularizers import Regularizer


def is_real_float(leaf: Any) -> bool:
  return bool(jnp.issubdtype(jnp.result_type(leaf), jnp.floating))


def _has_non_float(params: Any) -> bool:
  return not all(is_real_float(x) for x in jax.tree.leaves(params))


def _check_real(params: Any) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
      raise ValueError(
          f"parameter {jax.tree_util.keystr(path)} is complex "
          f"({jnp.result_type(leaf)}); optax_ramda's optimizers take real "
          "floating-point params. Train the real and imaginary parts as two "
          "real leaves."
      )


def _float_only(tree: Any, params: Any) -> Any:
  """``tree`` with an ``optax.MaskedNode`` where ``params`` has a non-float leaf."""
  return jax.tree.map(
      lambda t, p: t if is_real_float(p) else optax.MaskedNode(), tree, params
  )


def float_leaves_only(
    inner: base.GradientTransformation, regularizer: Regularizer | None = None
) -> base.GradientTransformationExtraArgs:
  """``inner`` applied to the real floating-point leaves; zero updates elsewhere.

  Args:
    inner: the optimizer's chain of stages.
    regularizer: its regularizer, resolved against the whole params tree at
      ``init`` so that a regularized integer leaf still raises its error.

  Returns:
    A transformation with ``inner``'s state.
  """
  inner = base.with_extra_args_support(inner)

  def init_fn(params):
    _check_real(params)
    if not _has_non_float(params):
      return inner.init(params)
    if regularizer is not None:
      regularizer.leaves(params)  # raises for a regularized non-float leaf
    return inner.init(_float_only(params, params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None or not _has_non_float(params):
      return inner.update(updates, state, params, **extra_args)
    new, state = inner.update(
        _float_only(updates, params), state, _float_only(params, params),
        **extra_args,
    )
    new = jax.tree.map(
        lambda p, u: u if is_real_float(p) else jnp.zeros_like(p), params, new
    )
    return new, state

  return base.GradientTransformationExtraArgs(init_fn, update_fn)
