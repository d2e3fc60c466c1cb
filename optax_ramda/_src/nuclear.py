"""The nuclear-norm regularizer and its subproblem solvers (ALGORITHMS.md §1, §6, §8).

``psi(x) = sum of the singular values of the matrix of x``. A 2-D weight is
its own matrix; a higher-D weight is reshaped to ``(prod(shape[:split]),
prod(shape[split:]))`` along a declared axis split (:class:`NuclearSpec`).

Solvers, per leaf, with threshold ``t = scale * strength``:

* scalar metric ``p`` (RMDA, ProxSGD): closed form, the singular values of
  ``y = x0 - V / p`` soft-thresholded by ``t / p``;
* diagonal metric ``P`` (RAMDA, ProxGen): the paper's PG (spec §6, "Nuclear
  norm"): one scalar step ``eta = 1 / max(P)`` over the whole matrix,
  ``z <- SVT_{eta t}(z - eta (V + P (z - x0)))``, ``Q(z) = <V, z - x0> +
  1/2 <z - x0, P (z - x0)> + t ||z||_*``, the same relative-decrease stopping
  rule as the group solver with the paper's settings ``rtol = 1e-3,
  max_iters = 5`` (static, on the regularizer).

Example::

  reg = optax_ramda.nuclear_norm({"w": optax_ramda.NuclearSpec(), "b": None})
  opt = optax_ramda.ramda(1e-2, strength=1e-3, regularizer=reg)
  rank_level = optax_ramda.low_rank_level(params, reg)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_ramda._src import groups as groups_lib
from optax_ramda._src import validation
from optax_ramda._src.groups import GroupSpec, SpecLike
from optax_ramda._src.regularizers import Regularizer
from optax_ramda._src.solvers import (
    NOT_MEASURED,
    LeafProblem,
    LeafSolution,
    scalar_metric_prox,
    unregularized_point,
)


@dataclasses.dataclass(frozen=True)
class NuclearSpec:
  """Marks a leaf for the nuclear norm.

  Attributes:
    split: ``None`` for a 2-D leaf; otherwise the leaf is reshaped to the
      matrix ``(prod(shape[:split]), prod(shape[split:]))``. E.g. a Flax conv
      kernel ``(kh, kw, in, out)`` with ``split=3`` gives ``(kh*kw*in, out)``.
  """

  split: int | None = None

  def __post_init__(self):
    if isinstance(self.split, np.integer):
      object.__setattr__(self, "split", int(self.split))
    if self.split is not None and (
        not isinstance(self.split, int) or isinstance(self.split, bool)
    ):
      raise TypeError(f"NuclearSpec.split must be an int or None, got {self.split!r}.")


@dataclasses.dataclass(frozen=True)
class NuclearLeaf:
  """Static nuclear-norm data of one leaf (matrix shape and solver settings)."""

  shape: tuple[int, ...]
  rows: int
  cols: int
  rtol: float
  max_iters: int
  min_iters: int

  def matrix(self, x: jax.Array) -> jax.Array:
    return jnp.reshape(x, (self.rows, self.cols))

  def unmatrix(self, m: jax.Array) -> jax.Array:
    return jnp.reshape(m, self.shape)

  def singular_values(self, x: jax.Array) -> jax.Array:
    """In at least float32 (the SVD has no bf16/float16 kernels), cast back."""
    if self.rows * self.cols == 0:
      return jnp.zeros([0], x.dtype)
    work = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.linalg.svd(self.matrix(x).astype(work), compute_uv=False).astype(x.dtype)

  def psi(self, x: jax.Array) -> jax.Array:
    """``||x||_*``, the sum of singular values."""
    return jnp.sum(self.singular_values(x))

  def svt(self, y: jax.Array, threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Singular-value soft-thresholding; returns ``z`` and ``||z||_*``."""
    if self.rows * self.cols == 0:
      return y, jnp.zeros([], y.dtype)
    work = jnp.promote_types(y.dtype, jnp.float32)  # as singular_values
    u, s, vt = jnp.linalg.svd(self.matrix(y).astype(work), full_matrices=False)
    s = jnp.maximum(s - jnp.asarray(threshold, work), 0)
    return self.unmatrix((u * s) @ vt).astype(y.dtype), jnp.sum(s).astype(y.dtype)

  def prox(self, y: jax.Array, threshold: Any) -> jax.Array:
    """``argmin_z 1/2 ||z - y||^2 + threshold ||z||_*`` (``y`` if threshold is 0)."""
    t = jnp.asarray(threshold, y.dtype)
    z, _ = self.svt(y, t)
    return jnp.where(t > 0, z, y)


def nuclear_leaf(
    spec: NuclearSpec, leaf: Any, path: str, rtol: float, max_iters: int, min_iters: int
) -> NuclearLeaf:
  shape = tuple(jnp.shape(leaf))
  if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):  # not int, bool or complex
    raise TypeError(
        f"parameter {path} has dtype {jnp.result_type(leaf)} but is regularized; only "
        "real floating-point parameters can be. Give it None in the spec."
    )
  if len(shape) < 2:
    raise ValueError(
        f"parameter {path} has shape {shape}: a 0-D or 1-D leaf has no matrix for the "
        "nuclear norm. Give it None in the spec (a bias, a norm scale), or GroupSpec(()) "
        "for L1."
    )
  if spec.split is None:
    if len(shape) != 2:
      raise ValueError(
          f"parameter {path} has shape {shape}: the nuclear norm needs a 2-D weight. "
          f"Declare an axis split, e.g. NuclearSpec(split={max(len(shape) - 1, 1)}) to use the "
          "matrix (prod(shape[:split]), prod(shape[split:])), or give it None."
      )
    split = 1
  else:
    split = spec.split
    if not 0 < split < len(shape):
      raise ValueError(
          f"NuclearSpec(split={split}) is out of range for parameter {path} with shape "
          f"{shape}. Use 1 <= split <= {len(shape) - 1}; a 0-D or 1-D leaf has no matrix "
          "(give it None)."
      )
  return NuclearLeaf(
      shape, math.prod(shape[:split]), math.prod(shape[split:]), rtol, max_iters, min_iters
  )


@dataclasses.dataclass(frozen=True, eq=False)
class NuclearNorm(Regularizer):
  r"""The nuclear norm ``psi(x) = ||mat(x)||_*`` (ALGORITHMS.md §1), per leaf.

  The spec tree holds a :class:`NuclearSpec` (nuclear norm), a
  :class:`GroupSpec` (group LASSO: the tree may mix both kinds) or ``None``
  per leaf. ``rtol``, ``max_iters`` and ``min_iters`` are the stopping rule
  of the nuclear-norm PG solver used with a diagonal metric (spec §6; the
  paper: 1e-3, 5, 2); group leaves use the optimizer's solver settings.
  """

  rtol: float = 1e-3
  max_iters: int = 5
  min_iters: int = 2

  def leaves(self, params: Any) -> Any:
    if isinstance(self.groups, NuclearSpec):  # one spec for every leaf
      spec = self.groups
      return groups_lib.resolve(
          lambda ps: jax.tree.map(lambda _: spec, ps, is_leaf=groups_lib.is_static_leaf),
          params,
          self.make_leaf,
      )
    return super().leaves(params)

  def make_leaf(self, spec: Any, leaf: Any, path: str) -> Any:
    if isinstance(spec, NuclearSpec):
      return nuclear_leaf(spec, leaf, path, self.rtol, self.max_iters, self.min_iters)
    if isinstance(spec, GroupSpec):
      return groups_lib.group_leaf(spec, leaf, path)
    raise TypeError(
        f"parameter {path}: expected a NuclearSpec, GroupSpec or None, got {spec!r}."
    )


def nuclear_norm(
    groups: SpecLike = NuclearSpec(), rtol: float = 1e-3, max_iters: int = 5, min_iters: int = 2
) -> NuclearNorm:
  """The nuclear norm on the leaves marked by :class:`NuclearSpec` in ``groups``.

  Args:
    groups: a spec tree matching the params (``NuclearSpec``, ``GroupSpec``
      or ``None`` per leaf), one ``NuclearSpec`` for every leaf, or a
      function ``params -> spec tree``.
    rtol: relative-decrease tolerance of the nuclear PG solver (>= 0).
    max_iters: its iteration cap (>= 1); the paper: 5.
    min_iters: iterations before the first stopping test.

  Raises:
    ValueError: ``rtol < 0`` or ``max_iters < 1`` (at construction); a
      nuclear leaf that is not 2-D without a split (at ``init``).
  """
  validation.check_non_negative("rtol", rtol)
  validation.check_iterations(max_iters, min_iters)
  return NuclearNorm(groups, float(rtol), int(max_iters), int(min_iters))


def _nuclear_objective(p: LeafProblem, z: jax.Array, nuc: jax.Array) -> jax.Array:
  d = z - p.centre
  return jnp.sum(p.linear * d + 0.5 * (d * (p.metric * d))) + p.threshold * nuc


def nuclear_closed_form(leaf: NuclearLeaf, p: LeafProblem) -> LeafSolution:
  """Scalar metric: ``z = SVT_{t/p}(x0 - V/p)`` exactly."""
  return scalar_metric_prox(leaf.svt, p)


def nuclear_pg(leaf: NuclearLeaf, p: LeafProblem) -> LeafSolution:
  """Diagonal metric: the paper's PG for the nuclear norm (module docstring).

  Diagnostics: ``iterations`` and ``relative_decrease`` at the stop only;
  ``residual`` is ``solvers.NOT_MEASURED`` (-1) whenever an iteration ran
  (the minimum-norm subgradient of ``||.||_*`` needs one more SVD and a
  projection, which the group solvers' ``track_residual`` does not buy), and
  0 when ``t == 0`` (``z`` is then the exact unregularized point).
  """
  t = p.threshold
  pmax = jnp.max(p.metric, initial=0)
  eta = 1 / jnp.where(pmax > 0, pmax, 1)
  z0 = p.warm_start
  prev0 = _nuclear_objective(p, z0, leaf.psi(z0))

  def cond(c):
    _, _, _, done, _ = c
    return jnp.logical_not(done)

  def body(c):
    i, z, prev, _, _ = c
    i1 = i + 1
    z, nuc = leaf.svt(z - eta * (p.linear + p.metric * (z - p.centre)), eta * t)
    cur = _nuclear_objective(p, z, nuc)
    rel = (prev - cur) / (jnp.abs(cur) + 1)
    stop = ((i1 >= leaf.min_iters) & (rel < leaf.rtol)) | (i1 >= leaf.max_iters)
    return i1, z, cur, stop, rel

  # Counter, flag and decrease start from the data (zeros_like), as the loop
  # updates them (varying.py).
  zero = jnp.zeros_like(prev0)
  done0 = jnp.logical_not(t > 0) | jnp.zeros_like(prev0, bool)
  carry = (jnp.zeros_like(prev0, jnp.int32), z0, prev0, done0, zero)
  it, z, _, _, rel = lax.while_loop(cond, body, carry)
  z = jnp.where(t > 0, z, unregularized_point(p))
  res = jnp.where(t > 0, jnp.asarray(NOT_MEASURED, z0.dtype), zero)
  return LeafSolution(z, it, rel, res)


def low_rank_level(params: Any, regularizer: Regularizer, rtol: float | None = None) -> jax.Array:
  """Fraction of zero singular values over the nuclear-norm leaves (spec §8).

  A singular value counts as zero when it is ``<= rtol * s_max`` with
  ``rtol = max(rows, cols) * eps_machine`` by default (the rank rule of
  ``numpy.linalg.matrix_rank``): the product ``(u * s) @ vt`` of a prox
  with exactly zero ``s`` has singular values at round-off level, not exactly
  0. An all-zero matrix has all its singular values zero. Returns 0 when the
  regularizer has no nuclear leaf. Jit-able.
  """
  leaves = regularizer.leaves(params)
  zero: Any = 0
  total = 0
  for leaf, x in zip(jax.tree.leaves(leaves), jax.tree.leaves(params)):
    if not isinstance(leaf, NuclearLeaf) or leaf.rows * leaf.cols == 0:
      continue
    s = leaf.singular_values(x)
    tol = rtol if rtol is not None else max(leaf.rows, leaf.cols) * jnp.finfo(s.dtype).eps
    zero = zero + jnp.sum(s <= tol * jnp.max(s))
    total += s.size
  return jnp.asarray(zero / total if total else 0.0)


__all__ = [
    "NuclearLeaf",
    "NuclearNorm",
    "NuclearSpec",
    "low_rank_level",
    "nuclear_closed_form",
    "nuclear_norm",
    "nuclear_pg",
]
