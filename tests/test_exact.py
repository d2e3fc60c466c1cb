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


def test_infinite_threshold_zeroes_every_group_with_a_zero_residual():
  """t = inf (exact_solve called directly): z = 0 and the residual is 0, not inf * 0."""
  x0 = np.ones((3, 4))
  leaf = group_leaf(GroupSpec((1,)), x0, "x")
  for dtype in (jnp.float32, jnp.float64):
    with jax.enable_x64(dtype == jnp.float64):
      for t in (1e30, np.inf):
        sol = exact.exact_solve([leaf], [_prob(x0, 0.1 * x0, 2 * x0, t, dtype)])[0]
        np.testing.assert_array_equal(np.asarray(sol.z), 0)
        assert float(sol.residual) == 0.0 and int(sol.iterations) == 0, (dtype, t)


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
    # Measured: 5 Newton evaluations here (6 before a group stopped on the
    # step that lands); the cap is 40. A loose bound of 20 catches a
    # regression to bisection-like behaviour.
    assert 0 < int(sol.iterations) <= 20
    # Optimality residual relative to ||b||: 1e-10 (float64; the secular
    # equation's condition grows with pmax/pmin = 1e16 at worst; measured 3e-16).
    nz = np.linalg.norm(z, axis=1, keepdims=True)
    res = np.linalg.norm(p * z - (p * x0 - v) + t * z / nz, axis=1)
    assert np.max(res / nb) < 1e-10


def _reference_newton(b, p, t):
  """Spec §6 Newton in numpy, from ``1 - tau`` until a step at rounding level.

  Returns the scaled root and the evaluations made, the last of which only
  confirms that the step before it had landed.
  """
  eps = np.finfo(np.float64).eps
  nb, pmax = np.linalg.norm(b), np.max(p)
  u, ph, tau = b / nb, p / pmax, t / nb
  rh, evaluations = 1 - tau, 0
  while True:
    w = 1 / (ph * rh + tau)
    q2 = (u * w) ** 2
    step = np.sum(q2) * (np.sqrt(np.sum(q2)) - 1) / np.sum(q2 * ph * w)
    evaluations += 1
    if step <= 4 * eps * (rh + max(step, 0)):
      return rh + max(step, 0), evaluations
    rh += step


@pytest.mark.parametrize("spread", [1.0, 4.0, 12.0])
def test_newton_stops_on_the_step_that_lands(spread):
  # A group stops after a step with 1.5 step^2 <= eps rh^2, which the bound
  # |phi''| < 3 phi' / rh puts within about eps rh of the root, instead of
  # spending one more evaluation to see a step at rounding level (module
  # docstring of exact.py, "Stopping"). One group per leaf, so that each
  # leaf's `iterations` is its group's evaluations.
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    groups, n = 64, 30
    x0 = rng.normal(size=(groups, 1, n))
    p = np.exp(rng.uniform(-spread, spread, size=x0.shape))
    v = rng.normal(size=x0.shape) * p
    b = p * x0 - v
    t = 0.5 * np.linalg.norm(b, axis=(1, 2))
    leaves = [group_leaf(GroupSpec((1,)), x0[g], "x") for g in range(groups)]
    problems = [_prob(x0[g], v[g], p[g], t[g]) for g in range(groups)]
    sols = exact.exact_solve(leaves, problems)
    ours = np.array([int(s.iterations) for s in sols])
    ref = [_reference_newton(b[g, 0], p[g, 0], t[g]) for g in range(groups)]
    full = np.array([k for _, k in ref])
    # Never more evaluations than stopping on a rounding-level step, and one
    # fewer for most groups (measured: 84%, 86%, 66% of the groups).
    assert np.all(ours <= full)
    assert np.mean(ours < full) >= 0.5
    for g, (rh, _) in enumerate(ref):
      nb, pmax = np.linalg.norm(b[g, 0]), np.max(p[g, 0])
      want = b[g, 0] * (rh / pmax) / (p[g, 0] / pmax * rh + t[g] / nb)
      z = np.asarray(sols[g].z)[0]
      # As accurate as the full iteration: measured at most 7.3e-16.
      assert np.linalg.norm(z - want) <= 4e-15 * np.linalg.norm(want)
      # The residual reported is the bound at the returned point (measured:
      # <= 2.3e-16 t here), not the measurement one step earlier, which
      # fails this bound on these groups (checked by mutation).
      assert 0 <= float(sols[g].residual) <= 1e-13 * t[g]
    # Cut off after one evaluation, a group that has not landed reports the
    # residual measured at its start, t |1 / ||q(1 - tau)|| - 1|.
    cut = exact.exact_solve(leaves, problems, max_newton=1)
    for g in np.flatnonzero(full > 2):
      nb, pmax = np.linalg.norm(b[g, 0]), np.max(p[g, 0])
      tau = t[g] / nb
      q = (b[g, 0] / nb) / (p[g, 0] / pmax * (1 - tau) + tau)
      measured = t[g] * abs(1 / np.linalg.norm(q) - 1)
      np.testing.assert_allclose(float(cut[g].residual), measured, rtol=1e-12)


def test_diagnostics_readable_per_leaf():
  params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
  reg = optax_ramda.group_lasso({"w": GroupSpec((1,)), "b": None})
  grads = jax.tree.map(lambda x: 0.3 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), params)
  for solver in ("pg", "exact"):
    opt = optax_ramda.ramda(0.1, 1e-2, reg, solver=solver)
    state = opt.init(params)
    before = optax_ramda.solve_diagnostics(state, params)
    assert float(before.residual["w"]) == solvers.NOT_MEASURED
    _, state = jax.jit(opt.update)(grads, state, params)
    diag = optax_ramda.solve_diagnostics(state, params)
    assert jax.tree.structure(diag.iterations) == jax.tree.structure(params)
    assert int(diag.iterations["b"]) == 0 and float(diag.residual["b"]) == 0  # unregularized
    assert int(diag.iterations["w"]) >= 1
    assert np.isfinite(float(diag.residual["w"]))
    assert int(diag.solve_count) == 1
    # tree_get finds the vectors, one entry per leaf in jax.tree.leaves order.
    its = optax.tree_utils.tree_get(state, "iterations")
    assert its.shape == (2,) and its.dtype == jnp.int32
    np.testing.assert_array_equal(its, [diag.iterations["b"], diag.iterations["w"]])
    # The same inside jit.
    jitted = jax.jit(lambda s, p: optax_ramda.solve_diagnostics(s, p).iterations)(state, params)
    assert int(jitted["w"]) == int(diag.iterations["w"])


def test_diagnostic_vectors_match_solo_solves_in_a_mixed_tree():
  # The solve stage writes the exact solver's diagnostics from its batches'
  # vectors with one gather: batches of several shapes, interleaved with
  # unregularized leaves, must land on the right leaves. Each leaf's solve
  # (groups are independent) and so its diagnostics equal its solo run's.
  shapes = {"a": (6, 4), "b": (5,), "c": (6, 4), "d": (3, 7), "e": (6, 4), "f": (3, 7),
            "g": (2,)}
  spec = {"a": GroupSpec((1,)), "b": None, "c": GroupSpec((1,)), "d": GroupSpec((0,)),
          "e": GroupSpec((1,)), "f": GroupSpec((0,)), "g": None}
  rng = np.random.default_rng(3)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  grads = [{k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
           for _ in range(3)]
  for g in grads:  # "c": a constant metric in each group, so fewer Newton steps
    g["c"] = jnp.broadcast_to(g["c"][:, :1], shapes["c"])

  def run(keys):
    opt = optax_ramda.ramda(0.1, 0.05, optax_ramda.group_lasso({k: spec[k] for k in keys}))
    p = {k: params[k] for k in keys}
    st = opt.init(p)
    step = jax.jit(opt.update)
    for g in grads:
      upd, st = step({k: g[k] for k in keys}, st, p)
      p = optax.apply_updates(p, upd)
    return p, optax_ramda.solve_diagnostics(st, p)

  p_all, d_all = run(list(shapes))
  its = {k: int(v) for k, v in d_all.iterations.items()}
  assert its["b"] == its["g"] == 0 and min(its[k] for k in "acdef") >= 1
  # Distinct values, so that a misplaced entry shows.
  assert len({its[k] for k in "acdef"}) > 1
  assert len({float(d_all.residual[k]) for k in "acdef"}) == 5
  for k in "acdef":
    p_one, d_one = run([k])
    np.testing.assert_array_equal(p_all[k], p_one[k])
    assert its[k] == int(d_one.iterations[k]), k
    assert float(d_all.residual[k]) == float(d_one.residual[k]), k
    assert float(d_all.relative_decrease[k]) == 0


def test_diagnostics_found_through_wrappers():
  params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
  reg = optax_ramda.group_lasso({"w": GroupSpec((1,)), "b": None})
  grads = jax.tree.map(lambda x: 0.3 * jnp.ones_like(x), params)
  wrapped = {
      "inject": optax.inject_hyperparams(optax_ramda.ramda, static_args=("regularizer",))(
          learning_rate=0.1, strength=1e-2, regularizer=reg
      ),
      "multisteps": optax.MultiSteps(optax_ramda.ramda(0.1, 1e-2, reg), every_k_schedule=1),
      "chain": optax.chain(optax.clip_by_global_norm(1.0), optax_ramda.prox_adamw(0.1, 1e-2, reg)),
  }
  for name, opt in wrapped.items():
    state = opt.init(params)
    _, state = jax.jit(opt.update)(grads, state, params)
    diag = optax_ramda.solve_diagnostics(state, params)
    assert int(diag.solve_count) == 1, name
    assert float(diag.residual["w"]) >= 0, name


def test_diagnostics_errors_name_the_fix():
  params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
  reg = optax_ramda.group_lasso({"w": GroupSpec((1,)), "b": None})
  with pytest.raises(ValueError, match="exactly one solve stage; this one has 0"):
    optax_ramda.solve_diagnostics(optax.adamw(1e-3).init(params), params)
  two = optax.chain(optax_ramda.ramda(0.1, 1e-2, reg), optax_ramda.ramda(0.1, 1e-2, reg))
  with pytest.raises(ValueError, match="has 2"):
    optax_ramda.solve_diagnostics(two.init(params), params)
  state = optax_ramda.ramda(0.1, 1e-2, reg).init(params)
  with pytest.raises(ValueError, match="saw 2 parameter leaves, params has 1"):
    optax_ramda.solve_diagnostics(state, {"w": params["w"]})


def test_diagnostics_with_integer_leaves_and_of_a_batched_state():
  # The optimizers hand their stages only the float leaves; the diagnostics still
  # come back like params, with zeros for the integer leaf (was: "saw 1 parameter
  # leaves, params has 2" for the very params it was initialised with).
  params = {"step": jnp.array(3), "w": jnp.ones((8, 4))}
  reg = optax_ramda.group_lasso({"step": None, "w": GroupSpec((1,))})
  opt = optax_ramda.ramda(0.1, 1e-2, reg)
  grads = {"step": jnp.zeros((), jnp.int32), "w": 0.3 * jnp.ones((8, 4))}
  _, state = jax.jit(opt.update)(grads, opt.init(params), params)
  diag = optax_ramda.solve_diagnostics(state, params)
  assert int(diag.iterations["step"]) == 0 and float(diag.residual["step"]) == 0
  assert int(diag.iterations["w"]) >= 1
  # A vmapped ensemble's state is refused with a message that says how to read it.
  batched = jax.vmap(opt.init)(jax.tree.map(lambda x: jnp.stack([x, x]), params))
  with pytest.raises(ValueError, match=r"shape \(2, 1\).*batched state.*x\[i\]"):
    optax_ramda.solve_diagnostics(batched, params)
  member = jax.tree.map(lambda x: x[1], batched)
  assert int(optax_ramda.solve_diagnostics(member, params).iterations["w"]) == 0


def test_diagnostics_dtype_follows_the_solves():
  with jax.enable_x64(True):
    params = {"w": jnp.ones((8, 4), jnp.float64), "h": jnp.ones((4, 4), jnp.bfloat16)}
    reg = optax_ramda.group_lasso(GroupSpec((1,)))
    st = optax_ramda.solve_subproblem(reg, 1e-2).init(params)
    assert st.residual.dtype == jnp.float64 and st.iterations.dtype == jnp.int32
  params = {"h": jnp.ones((4, 4), jnp.bfloat16)}
  st = optax_ramda.solve_subproblem(optax_ramda.group_lasso(GroupSpec((1,))), 1e-2).init(params)
  assert st.residual.dtype == jnp.float32
  assert optax_ramda.solve_subproblem().init({}).residual.shape == (0,)


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
    r_pg = float(optax_ramda.solve_diagnostics(states["pg"], params).residual["w"])
    r_ex = float(optax_ramda.solve_diagnostics(states["exact"], params).residual["w"])
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


def test_stacked_leaves_equal_their_solo_solves_up_to_rounding():
  # Leaves of one shape are solved stacked; XLA may then sum a group in another
  # order than for the leaf alone, so the last bits of z may differ (measured:
  # 222-323 entries of a (64, 32) leaf, by at most 4.3e-16 relative). Zero
  # patterns and Newton steps are the same; anything beyond a few ulps is a bug.
  with jax.enable_x64(True):
    for shape in ((7, 5), (64, 32), (16, 128)):
      leaf = group_leaf(GroupSpec((1,)), np.zeros(shape), "x")
      rng = np.random.default_rng(4)
      probs = []
      for t in (0.7, 1.3):
        x, m = rng.normal(size=shape), rng.normal(size=shape)
        P = np.exp(rng.uniform(-3, 3, shape))
        probs.append(solvers.LeafProblem(*(jnp.asarray(a) for a in (x, m, P, x)),
                                         jnp.asarray(t)))
      both = jax.jit(lambda ps, leaf=leaf: exact.exact_solve([leaf] * 2, ps))(probs)
      for p, b in zip(probs, both):
        one = jax.jit(lambda p, leaf=leaf: exact.exact_solve([leaf], [p]))(p)[0]
        zb, zo = np.asarray(b.z), np.asarray(one.z)
        np.testing.assert_array_equal(zb == 0, zo == 0)
        assert int(b.iterations) == int(one.iterations)
        np.testing.assert_allclose(zb, zo, rtol=4 * np.finfo(np.float64).eps, atol=0)
