"""Hypothesis properties of the group-LASSO subproblem solvers (ALGORITHMS.md §6).

Random leaf shapes (including size-1 groups, 0-D leaves and empty arrays),
random reduce axes, metrics spanning 1e-8..1e8, thresholds below, above and
exactly at the screening boundary, float32 and float64.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from optax_ramda._src import exact, solvers
from optax_ramda._src.groups import GroupSpec, group_leaf


@st.composite
def problems(draw, spread=8.0, allow_empty=True):
  """A leaf, its spec, and (x0, V, P, t, mode) in float64 numpy."""
  ndim = draw(st.integers(0, 3))
  lo = 0 if allow_empty else 1
  shape = tuple(draw(st.integers(lo, 4)) for _ in range(ndim))
  axes = tuple(a for a in range(ndim) if draw(st.booleans()))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  x0 = rng.normal(size=shape) * 10.0 ** rng.uniform(-2, 2)
  log_p = rng.uniform(-spread, spread, size=shape)
  p = 10.0**log_p
  v = rng.normal(size=shape) * p * 10.0 ** rng.uniform(-2, 2)
  if draw(st.booleans()) and x0.size:  # some all-zero groups / entries
    mask = rng.random(shape) < 0.3
    x0 = np.where(mask, 0.0, x0)
    v = np.where(mask, 0.0, v)
  leaf = group_leaf(GroupSpec(axes), x0, "x")
  b_norm = np.sqrt(np.sum((p * x0 - v) ** 2, axis=axes, keepdims=True)) if axes else np.abs(
      p * x0 - v
  )
  mode = draw(st.sampled_from(["zero", "below", "boundary", "above", "random"]))
  finite = np.sort(b_norm[b_norm > 0]) if b_norm.size else np.zeros(0)
  # A group's own norm (not a median of an even count, which no group has),
  # so "boundary" puts that group exactly at ||b_g|| == t.
  ref = float(finite[finite.size // 2]) if finite.size else 1.0
  t = {
      "zero": 0.0,
      "below": 0.1 * ref,
      "boundary": ref,  # some group sits exactly at ||b|| == t
      "above": 10 * ref,
      "random": ref * 10.0 ** rng.uniform(-3, 1),
  }[mode]
  return leaf, axes, x0, v, p, t


# Each new leaf shape costs a compile (~0.3 s on the 2-core CI machine), so
# the solvers run jitted with the leaf static, and the examples per test are
# capped to keep this file near a minute.
FEW = settings(max_examples=15)


@functools.partial(jax.jit, static_argnums=0)
def _exact(leaf, prob):
  return exact.exact_solve([leaf], [prob])[0]


@functools.partial(jax.jit, static_argnums=(0, 2))
def _pg(leaf, prob, max_iters, rtol=1e-8):
  return solvers.pg_solve([leaf], [prob], rtol, max_iters, 2)[0]


def _problem(x0, v, p, t, dtype):
  c = lambda a: jnp.asarray(a, dtype)
  return solvers.LeafProblem(c(x0), c(v), c(p), c(x0), c(t))


def _check_optimality(leaf, prob, z, tol):
  """Spec §6 optimality conditions, per group, relative to the group's scale."""
  x0, v, p = (np.asarray(a, np.float64) for a in prob[:3])
  t = float(prob.threshold)
  z = np.asarray(z, np.float64)
  norm = lambda a: (
      np.sqrt(np.sum(a * a, axis=leaf.reduce_axes, keepdims=True)) if leaf.reduce_axes else abs(a)
  )
  b = p * x0 - v
  nb, nz = norm(b), norm(z)
  # b = P x0 - V is formed in the solver's dtype, so its rounding error is
  # relative to ||P x0|| + ||V||, not to ||b||, which can cancel.
  mag = norm(np.abs(p * x0)) + norm(np.abs(v))
  if t == 0:
    np.testing.assert_allclose(z, x0 - v / p, rtol=tol, atol=0)
    return
  # z_g == 0 exactly iff ||b_g|| <= t (the screening test); groups within
  # tol of the boundary may go either way, as the solver computes ||b_g|| in
  # its own dtype.
  clear = np.abs(nb - t) > tol * np.maximum(mag, t)
  assert np.all(np.where(clear, (nz == 0) == (nb <= t), True))
  # z_g != 0:  p (z - y) + t z / ||z|| = p z - b + t z / ||z|| = 0, relative to
  # the scale of b's rounding (mag) or of t.
  res = norm(p * z - b + t * z / np.where(nz > 0, nz, 1))
  scale = np.maximum(mag, t)
  assert np.all(np.where(nz > 0, res <= tol * scale, True)), float(np.max(res / scale))


@given(problems(), st.sampled_from([jnp.float32, jnp.float64]))
def test_exact_satisfies_optimality(pb, dtype):
  leaf, _, x0, v, p, t = pb
  with jax.enable_x64(True):
    prob = _problem(x0, v, p, t, dtype)
    sol = _exact(leaf, prob)
    assert sol.z.dtype == dtype
    assert not np.any(np.isnan(np.asarray(sol.z)))
    # The residual is evaluated on the rounded inputs, in float64; z's entries
    # carry relative error ~ a few eps of the dtype times the condition of the
    # secular equation (bounded by pmax/pmin within a group, but here the
    # residual is relative to ||b_g||, where that factor cancels). 1e2 eps
    # leaves room for the group sums of up to 64 entries.
    tol = 1e2 * float(jnp.finfo(dtype).eps)
    prob64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), prob)
    _check_optimality(leaf, prob64, sol.z, tol)
    assert sol.iterations <= exact.DEFAULT_MAX_NEWTON


@FEW
@given(problems(spread=1.5, allow_empty=False))
def test_pg_to_convergence_reaches_exact(pb):
  # PG converges linearly with rate 1 - pmin/pmax within a group, so the metric
  # spread here is 10^-1.5..10^1.5 (1000x); 40000 sweeps with rtol < 0 (never
  # stops early) then contract the error by (1 - 1e-3)^40000 ~ 4e-18.
  leaf, _, x0, v, p, t = pb
  with jax.enable_x64(True):
    prob = _problem(x0, v, p, t, jnp.float64)
    ex = _exact(leaf, prob).z
    pg = _pg(leaf, prob, 40000, -1.0).z
    # Same zero pattern (both screen with the same test) away from the
    # screening boundary: a group with ||b_g|| == t up to rounding (the
    # "boundary" mode makes one) has solution 0, and PG's sweeps may land on
    # either side of the test there, leaving entries ~1e-9 * scale that the
    # closeness check below still bounds. Then the same point: 1e-9 relative
    # to the largest |y| covers the 1e-13 contraction times the conditioning
    # (pmax/pmin <= 1000) plus round-off.
    b = p * x0 - v
    axes = leaf.reduce_axes
    nb = np.sqrt(np.sum(b * b, axis=axes, keepdims=True)) if axes else np.abs(b)
    clear = np.broadcast_to(np.abs(nb - t) > 1e-9 * max(t, 1e-300), np.shape(x0))
    ex_zero, pg_zero = np.asarray(ex) == 0, np.asarray(pg) == 0
    np.testing.assert_array_equal(ex_zero[clear], pg_zero[clear])
    scale = max(float(jnp.max(jnp.abs(x0 - v / p), initial=0)), 1e-300)
    np.testing.assert_allclose(np.asarray(pg), np.asarray(ex), rtol=0, atol=1e-9 * scale)


@FEW
@given(
    st.lists(st.integers(1, 5), min_size=1, max_size=3),
    st.sampled_from([jnp.float32, jnp.float64]),
    st.sampled_from(["zero_threshold", "zero_group", "zero_metric"]),
)
def test_screened_groups_exact_zero_never_nan(shape, dtype, case):
  shape = tuple(shape)
  rng = np.random.default_rng(sum(shape))
  x0 = rng.normal(size=shape)
  v = rng.normal(size=shape)
  p = 10.0 ** rng.uniform(-8, 8, size=shape)
  t = 1.0
  if case == "zero_threshold":
    t = 0.0
  elif case == "zero_group":
    x0[0] = 0.0
    v[0] = 0.0
  else:  # zero metric entries in a group with b == 0: screened for any t > 0
    p[0] = 0.0
    v[0] = 0.0
  leaf = group_leaf(GroupSpec(tuple(range(1, len(shape)))), x0, "x")
  with jax.enable_x64(True):
    prob = _problem(x0, v, p, t, dtype)
    for sol in (_exact(leaf, prob), _pg(leaf, prob, 100)):
      z = np.asarray(sol.z)
      assert not np.any(np.isnan(z))
      assert not np.isnan(float(sol.residual))
      if case == "zero_threshold":
        y = np.asarray(prob.centre) - np.asarray(prob.linear) / np.asarray(prob.metric)
        np.testing.assert_array_equal(z, y)
      else:
        assert np.all(z[0] == 0)


@FEW
@given(problems(spread=1.0, allow_empty=False))
def test_pg_to_convergence_reaches_exact_float32(pb):
  # The same in float32 (spread 100x, 3000 sweeps): both solvers' answers,
  # each in float32, agree to float32 resolution: 1e-4 of the largest |y|
  # allows for the conditioning (pmax/pmin <= 100) times a few float32 eps.
  leaf, _, x0, v, p, t = pb
  with jax.enable_x64(True):
    prob = _problem(x0, v, p, t, jnp.float32)
    ex = np.asarray(_exact(leaf, prob).z, np.float64)
    pg_sol = _pg(leaf, prob, 3000, -1.0)
    assert pg_sol.z.dtype == jnp.float32
    pg = np.asarray(pg_sol.z, np.float64)
    scale = max(float(np.max(np.abs(x0 - v / p), initial=0)), 1e-30)
    np.testing.assert_allclose(pg, ex, rtol=0, atol=1e-4 * scale)


def _assert_same_up_to_ulps(got, want, dtype, ulps):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(float(np.max(np.abs(want), initial=0)), float(jnp.finfo(dtype).tiny))
  np.testing.assert_allclose(got, want, rtol=0, atol=ulps * float(jnp.finfo(dtype).eps) * scale)


@settings(max_examples=8)  # three compiles per example
@given(
    problems(allow_empty=False),
    st.sampled_from([jnp.float32, jnp.float64]),
    st.sampled_from(["exact", "pg"]),
)
def test_dtype_jit_vmap_identical(pb, dtype, solver):
  # Output in the input dtype; under jax.vmap each batch element equals its
  # own jitted solve (every group / leaf freezes once its own test passes,
  # whatever the others do) -- up to round-off: XLA compiles the batched
  # group reductions with a different association order, which moves the
  # result by a few ulp (measured on 300 random problems: at most 2.8 ulp of
  # max|z| for exact, 1.1 for PG). 8 ulp is the tolerance. PG runs a fixed
  # 50 sweeps here: with the paper's rtol = 1e-8 a float32 run stops on
  # round-off (README "Notes on numerics"), so an ulp can change the count.
  leaf, _, x0, v, p, t = pb
  with jax.enable_x64(True):
    prob = _problem(x0, v, p, t, dtype)
    if solver == "exact":
      f = lambda pr: exact.exact_solve([leaf], [pr])[0]
    else:
      f = lambda pr: solvers.pg_solve([leaf], [pr], -1.0, 50, 2)[0]
    jitted = jax.jit(f)(prob)
    assert jitted.z.dtype == dtype
    other = prob._replace(linear=prob.linear * 3, threshold=prob.threshold * 0.5)
    batch = jax.tree.map(lambda *a: jnp.stack(a), prob, other, prob)
    batched = jax.jit(jax.vmap(f))(batch)
    assert batched.z.dtype == dtype
    for k, single in ((0, jitted), (2, jitted), (1, jax.jit(f)(other))):
      _assert_same_up_to_ulps(batched.z[k], single.z, dtype, 8)


@settings(max_examples=8)
@given(problems(allow_empty=False), st.sampled_from([jnp.float32, jnp.float64]))
def test_exact_eager_matches_jit(pb, dtype):
  # Eager runs op by op; jit fuses and may reassociate, so the two agree to
  # round-off, not bit for bit: within 64 ulp of the larger of |z| and the
  # group's scale (Newton's last step damps the difference of its inputs).
  leaf, _, x0, v, p, t = pb
  with jax.enable_x64(True):
    prob = _problem(x0, v, p, t, dtype)
    eager = exact.exact_solve([leaf], [prob])[0].z
    jitted = _exact(leaf, prob).z
    assert eager.dtype == jitted.dtype == dtype
    e, j = np.asarray(eager, np.float64), np.asarray(jitted, np.float64)
    scale = max(float(np.max(np.abs(x0 - v / p), initial=0)), 1e-30)
    ulp = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(e, j, rtol=0, atol=64 * ulp * scale)
