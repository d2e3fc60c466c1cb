"""The paper's PG solver (ALGORITHMS.md §6) and the closed-form prox."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_ramda._src import solvers
from optax_ramda._src.groups import GroupSpec, group_leaf


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _numpy_pg(x0, V, P, w, t, axes, rtol, max_iters, min_iters):
  """Spec §6 written with numpy loops over groups (an independent reading)."""
  keep_axes = tuple(i for i in range(x0.ndim) if i not in axes)
  groups = list(np.ndindex(*[x0.shape[i] for i in keep_axes]))

  def idx(g):
    sl = [slice(None)] * x0.ndim
    for ax, i in zip(keep_axes, g):
      sl[ax] = i
    return tuple(sl)

  kept = [g for g in groups if np.linalg.norm((P * x0 - V)[idx(g)]) > t]
  z = np.zeros_like(x0)
  if not kept:
    return z, 0
  eta = {g: 1 / P[idx(g)].max() for g in kept}

  def Q(z, norms):
    total = 0.0
    for g in kept:
      d = z[idx(g)] - x0[idx(g)]
      total += np.sum(V[idx(g)] * d + 0.5 * d * P[idx(g)] * d) + t * norms[g]
    return total

  for g in kept:
    z[idx(g)] = w[idx(g)]
  prev = Q(z, {g: np.linalg.norm(z[idx(g)]) for g in kept})
  for i in range(max_iters):
    norms = {}
    for g in kept:
      s = idx(g)
      zg = z[s] - eta[g] * (V[s] + P[s] * (z[s] - x0[s]))
      r = max(np.linalg.norm(zg) - eta[g] * t, 0.0)
      z[s] = zg * r / (r + eta[g] * t)
      norms[g] = r
    cur = Q(z, norms)
    if i + 1 >= min_iters and (prev - cur) / (abs(cur) + 1) < rtol:
      return z, i + 1
    prev = cur
  return z, max_iters


def _problem(shape, axes, t, seed=0, spread=3.0):
  rng = np.random.default_rng(seed)
  x0 = rng.normal(size=shape)
  V = rng.normal(size=shape)
  P = np.exp(rng.uniform(-spread, spread, size=shape))
  leaf = group_leaf(GroupSpec(axes), x0, "x")
  prob = solvers.LeafProblem(*(jnp.asarray(a) for a in (x0, V, P, x0)), jnp.asarray(t))
  return leaf, prob, (x0, V, P, x0.copy())


@pytest.mark.parametrize(
    "shape, axes, t",
    [((6, 5), (1,), 0.8), ((2, 2, 3, 4), (0, 1, 3), 1.5), ((7,), (), 0.3), ((4, 3), (0, 1), 2.0)],
)
def test_pg_matches_independent_reading_of_the_spec(shape, axes, t):
  leaf, prob, np_args = _problem(shape, axes, t)
  (sol,) = solvers.pg_solve([leaf], [prob], 1e-8, 100, 2)
  z_ref, iters_ref = _numpy_pg(*np_args, t, leaf.reduce_axes, 1e-8, 100, 2)
  assert int(sol.iterations) == iters_ref
  np.testing.assert_allclose(sol.z, z_ref, rtol=0, atol=1e-12)


def test_screened_groups_are_exactly_zero():
  leaf, prob, _ = _problem((8, 5), (1,), 2.5, seed=3)
  (sol,) = solvers.pg_solve([leaf], [prob], 1e-8, 100, 2)
  screened = np.linalg.norm(np.asarray(prob.metric * prob.centre - prob.linear), axis=1) <= 2.5
  assert screened.any() and not screened.all()
  assert np.all(np.asarray(sol.z)[screened] == 0)


def test_all_groups_screened_gives_zero_without_iterations():
  leaf, prob, _ = _problem((4, 3), (1,), 1e6)
  (sol,) = solvers.pg_solve([leaf], [prob], 1e-8, 100, 2)
  assert int(sol.iterations) == 0
  assert np.all(np.asarray(sol.z) == 0)


def test_zero_threshold_is_unregularized_point():
  leaf, prob, (x0, V, P, _) = _problem((4, 3), (1,), 0.0)
  # a zero group would be 0/0 in the prox; lambda = 0 must bypass it
  prob = prob._replace(centre=prob.centre.at[0].set(0.0), linear=prob.linear.at[0].set(0.0))
  (sol,) = solvers.pg_solve([leaf], [prob], 1e-8, 100, 2)
  expected = np.asarray(prob.centre - prob.linear / prob.metric)
  np.testing.assert_array_equal(sol.z, expected)
  assert int(sol.iterations) == 0 and np.all(np.isfinite(sol.z))


def test_each_leaf_stops_on_its_own():
  """Fused loop: a leaf that converges early keeps its own result bit-for-bit."""
  fast = _problem((5, 4), (1,), 0.5, seed=1, spread=0.0)  # equal metric: converges at once
  slow = _problem((5, 4), (1,), 0.5, seed=2, spread=4.0)
  together = solvers.pg_solve([fast[0], slow[0]], [fast[1], slow[1]], 1e-8, 100, 2)
  alone = [solvers.pg_solve([p[0]], [p[1]], 1e-8, 100, 2)[0] for p in (fast, slow)]
  assert int(together[0].iterations) < int(together[1].iterations)
  for a, b in zip(together, alone):
    chex.assert_trees_all_equal(a, b)
  per_leaf = solvers.pg_solve_per_leaf([fast[0], slow[0]], [fast[1], slow[1]], 1e-8, 100, 2)
  chex.assert_trees_all_equal(together, per_leaf)


def test_min_and_max_iters():
  leaf, prob, _ = _problem((5, 4), (1,), 0.5, seed=2, spread=4.0)
  (capped,) = solvers.pg_solve([leaf], [prob], 1e-8, 3, 2)
  assert int(capped.iterations) == 3
  eq = _problem((5, 4), (1,), 0.5, seed=1, spread=0.0)
  (early,) = solvers.pg_solve([eq[0]], [eq[1]], 1e-8, 100, 2)
  assert int(early.iterations) == 2  # converged at once; the first test is at i = 1
  (later,) = solvers.pg_solve([eq[0]], [eq[1]], 1e-8, 100, 5)
  assert int(later.iterations) == 5


def test_pg_to_convergence_satisfies_optimality():
  """Run long, then check §6's optimality conditions on every group."""
  t = 0.7
  leaf, prob, (x0, V, P, _) = _problem((6, 5), (1,), t, seed=4, spread=1.0)
  (sol,) = solvers.pg_solve([leaf], [prob], 0.0, 20000, 20000)
  z = np.asarray(sol.z)
  y = x0 - V / P
  for g in range(6):
    if np.all(z[g] == 0):
      assert np.linalg.norm(P[g] * y[g]) <= t
    else:
      residual = P[g] * (z[g] - y[g]) + t * z[g] / np.linalg.norm(z[g])
      assert np.linalg.norm(residual) < 1e-8


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("regularized", [True, False])
def test_closed_form_is_block_soft_threshold(fused, regularized):
  leaf, prob, (x0, V, _, _) = _problem((6, 5), (1,), 0.9)
  y = x0 - V / 2.0
  n = np.linalg.norm(y, axis=1, keepdims=True)
  t = 2.0 * np.median(n) if regularized else 0.0  # half the groups zero, or none
  prob = prob._replace(metric=jnp.asarray(2.0), threshold=jnp.asarray(t))
  sol = solvers.closed_form(leaf, prob, fused)
  thr = t / 2.0
  expected = y * np.maximum(n - thr, 0) / np.where(n > 0, n, 1)
  if regularized:
    assert np.any(expected == 0) and np.any(expected != 0)  # both kinds of groups
  np.testing.assert_allclose(sol.z, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_closed_form_fused_never_forms_the_scaled_terms(dtype):
  """With ``linear_scale`` and ``centre_scale`` the fused form solves the same problem as
  the folded one (to rounding), and the unfused form bit for bit."""
  leaf, prob, (x0, V, _, _) = _problem((40, 7), (1,), 0.5, seed=3)
  a, c = jnp.asarray(0.37, dtype), jnp.asarray(0.9, dtype)
  t = 1.7 * np.median(np.linalg.norm(0.9 * x0 - V / 1.7, axis=1))  # about half the groups zero
  scaled = prob._replace(centre=jnp.asarray(x0, dtype), linear=jnp.asarray(V, dtype) / a,
                         metric=jnp.asarray(1.7, dtype), warm_start=jnp.asarray(x0, dtype),
                         threshold=jnp.asarray(t, dtype), linear_scale=a, centre_scale=c)
  folded = scaled.folded()
  ref = np.asarray(solvers.closed_form(leaf, folded).z)
  assert np.any(ref == 0) and np.any(ref != 0)
  chex.assert_trees_all_equal(solvers.closed_form(leaf, scaled).z, ref)
  eps = float(jnp.finfo(dtype).eps)
  for p in (scaled, folded):
    np.testing.assert_allclose(solvers.closed_form(leaf, p, fused=True).z, ref,
                               rtol=8 * eps, atol=8 * eps * np.abs(ref).max())
