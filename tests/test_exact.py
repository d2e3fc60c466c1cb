"""The exact scaled group-LASSO solver (ALGORITHMS.md §6 "Exact solution") in the optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ramda
from optax_ramda._src import exact, solvers
from optax_ramda._src.groups import GroupSpec, group_leaf


def _prob(x0, v, p, t, dtype=jnp.float64):
  c = lambda a: jnp.asarray(a, dtype)
  return solvers.LeafProblem(c(x0), c(v), c(p), c(x0), c(t))


def test_equal_metric_is_block_soft_threshold_in_zero_steps():
  # With p_i == p in a group the start rh0 = 1 - tau is the root: 0 Newton
  # steps, and z is block soft-thresholding of y by t / p (spec §6).
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x0, v = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    p = np.full((6, 5), 2.5)
    leaf = group_leaf(GroupSpec((1,)), x0, "x")
    sol = exact.exact_solve([leaf], [_prob(x0, v, p, 1.5)])[0]
    y = x0 - v / p
    ny = np.linalg.norm(y, axis=1, keepdims=True)
    want = y * np.maximum(ny - 1.5 / 2.5, 0) / ny
    # 1e-14: a handful of float64 roundings of O(1) numbers.
    np.testing.assert_allclose(np.asarray(sol.z), want, rtol=1e-14, atol=1e-14)
    assert int(sol.iterations) <= 1


def test_spread_metric_iterations_and_boundary():
  # Metrics spanning 1e-8..1e8 in one group; thresholds just above the
  # screening boundary (root near 0): finite, nonzero, tiny, optimal.
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=(200, 30))
    p = 10.0 ** rng.uniform(-8, 8, size=x0.shape)
    v = rng.normal(size=x0.shape) * p
    leaf = group_leaf(GroupSpec((1,)), x0, "x")
    nb = np.linalg.norm(p * x0 - v, axis=1)
    t = float(np.min(nb)) * (1 - 1e-12)  # the smallest group is kept by a hair
    sol = exact.exact_solve([leaf], [_prob(x0, v, p, t)])[0]
    z = np.asarray(sol.z)
    assert np.all(np.isfinite(z))
    assert np.all(np.linalg.norm(z, axis=1) > 0)
    # Measured: 5-9 Newton steps here; the cap is 40. A loose bound of 20
    # catches a regression to bisection-like behaviour.
    assert 0 < int(sol.iterations) <= 20
    # Optimality residual relative to ||b||: 1e-10 (float64; the secular
    # equation's condition grows with pmax/pmin = 1e16 at worst, measured 1e-12).
    nz = np.linalg.norm(z, axis=1, keepdims=True)
    res = np.linalg.norm(p * z - (p * x0 - v) + t * z / nz, axis=1)
    assert np.max(res / nb) < 1e-10


def test_diagnostics_readable_with_tree_get():
  params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
  reg = optax_ramda.group_lasso({"w": GroupSpec((1,)), "b": None})
  grads = jax.tree.map(lambda x: 0.3 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), params)
  for solver in ("pg", "exact"):
    opt = optax_ramda.ramda(0.1, 1e-2, reg, solver=solver)
    state = opt.init(params)
    _, state = jax.jit(opt.update)(grads, state, params)
    its = optax.tree_utils.tree_get(state, "iterations")
    res = optax.tree_utils.tree_get(state, "residual")
    assert int(its["b"]) == 0 and float(res["b"]) == 0  # unregularized
    assert int(its["w"]) >= 1
    assert np.isfinite(float(res["w"]))
    assert int(optax.tree_utils.tree_get(state, "solve_count")) == 1


def test_exact_beats_paper_pg_on_residual_in_ramda():
  # One RAMDA step from a shared state: the exact solver's optimality residual
  # is far below the paper PG's (whose stopping rule is on Q's decrease).
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.normal(size=(64, 32)))}
    reg = optax_ramda.group_lasso(GroupSpec((1,)))
    states = {}
    for solver in ("pg", "exact"):
      # The PG solvers measure their residual only on request.
      opt = optax_ramda.ramda(0.05, 1e-2, reg, solver=solver, track_residual=True)
      st = opt.init(params)
      update = jax.jit(opt.update)
      for k in range(5):
        g = {"w": jnp.asarray(np.random.default_rng(k).normal(size=(64, 32)))}
        upd, st = update(g, st, params)
      states[solver] = st
    r_pg = float(optax.tree_utils.tree_get(states["pg"], "residual")["w"])
    r_ex = float(optax.tree_utils.tree_get(states["exact"], "residual")["w"])
    assert r_ex < 1e-3 * r_pg, (r_ex, r_pg)


def test_prox_ssi_is_prox_adamw_exact_without_decay():
  params = {"w": jnp.ones((6, 3)), "b": jnp.ones(3)}
  reg = optax_ramda.group_lasso({"w": GroupSpec((1,)), "b": None})
  # strength 100: threshold lr * 100 * sqrt(3) = 1.7 ~ ||D x_g|| of a row of
  # ones (D ~ |g| ~ 1), so some rows are screened to exact zeros.
  a = optax_ramda.prox_ssi(1e-2, 100.0, reg)
  b = optax_ramda.prox_adamw(1e-2, 100.0, reg, solver="exact")
  sa, sb = a.init(params), b.init(params)
  pa = pb = params
  for k in range(4):
    g = jax.tree.map(lambda x, k=k: jnp.sin(x * (k + 1) + jnp.arange(x.size).reshape(x.shape)), pa)
    ua, sa = jax.jit(a.update)(g, sa, pa)
    ub, sb = jax.jit(b.update)(g, sb, pb)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
  jax.tree.map(np.testing.assert_array_equal, pa, pb)
  assert np.any(np.all(np.asarray(pa["w"]) == 0, axis=1))


def test_exact_zero_groups_land_in_params():
  params = {"w": jnp.ones((5, 4))}
  reg = optax_ramda.group_lasso(GroupSpec((1,)))
  opt = optax_ramda.prox_adamw(0.1, 10.0, reg, solver="exact")
  st = opt.init(params)
  upd, st = opt.update({"w": jnp.ones((5, 4)) * 1e-3}, st, params)
  new = optax.apply_updates(params, upd)
  assert np.all(np.asarray(new["w"]) == 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver="newton"), "unknown solver"),
        (dict(solver=object()), "solver must be a name"),
        (dict(max_iters=0), "max_iters"),
        (dict(rtol=-1.0), "rtol"),
        (dict(solver="exact", subgradient_tol=1e-3), "subgradient_tol"),
    ],
)
def test_bad_input(kwargs, match):
  reg = optax_ramda.group_lasso(GroupSpec((1,)))
  with pytest.raises((ValueError, TypeError), match=match):
    optax_ramda.solve_subproblem(reg, 1e-3, **kwargs)


def test_exact_with_nuclear_norm_rejected():
  reg = optax_ramda.nuclear_norm()
  with pytest.raises(ValueError, match="solver='pg'"):
    optax_ramda.ramda(0.1, 1e-3, reg, solver="exact")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_exactly_at_and_just_above_the_boundary(dtype):
  # Groups with ||P x0 - V|| exactly representable: (3, 4) * 1 has norm 5.
  # t == 5: screened (the test is strict), z exactly 0 for both solvers.
  # t one ulp below 5: kept, root ~ 1 ulp, z tiny, finite, of the sign of y.
  with jax.enable_x64(True):
    x0 = np.array([[3.0, 4.0]])
    p = np.ones_like(x0)
    v = np.zeros_like(x0)
    leaf = group_leaf(GroupSpec((1,)), x0, "x")
    for t, screened in ((5.0, True), (float(np.nextafter(dtype(5), dtype(0))), False)):
      prob = _prob(x0, v, p, t, dtype)
      ex = exact.exact_solve([leaf], [prob])[0]
      pg = solvers.pg_solve([leaf], [prob], 1e-8, 100, 2)[0]
      for sol in (ex, pg):
        z = np.asarray(sol.z)
        assert z.dtype == dtype
        assert np.all(np.isfinite(z))
        if screened:
          assert np.all(z == 0)
        else:
          assert np.all(z > 0) and np.all(z < 1e-5)
