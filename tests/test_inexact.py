"""The paper's formal inexactness condition as a PG stopping rule (ALGORITHMS.md §6)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ramda
from optax_ramda._src import solvers
from optax_ramda._src.groups import GroupSpec, group_leaf


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  x0 = rng.normal(size=(40, 10))
  p = 10.0 ** rng.uniform(-1, 1, size=x0.shape)
  v = rng.normal(size=x0.shape) * p
  leaf = group_leaf(GroupSpec((1,)), x0, "x")
  c = jnp.asarray
  return leaf, solvers.LeafProblem(c(x0), c(v), c(p), c(x0), c(2.0))


@pytest.mark.parametrize("eps", [1e-1, 1e-4, 1e-8])
def test_stops_when_condition_holds(eps):
  with jax.enable_x64(True):
    leaf, prob = _problem()
    run = jax.jit(lambda pr: solvers.pg_solve([leaf], [pr], 0.0, 5000, 2, eps)[0])
    sol = run(prob)
    # At the stop: the condition holds (residual <= eps), Q did not increase
    # over the warm start, and one iteration earlier it did not yet hold.
    assert float(sol.residual) <= eps
    assert 2 <= int(sol.iterations) < 5000
    z = np.asarray(sol.z)
    q = lambda z: float(
        jnp.sum(prob.linear * (z - prob.centre) + 0.5 * prob.metric * (z - prob.centre) ** 2)
        + 2.0 * jnp.sum(leaf.norm(z))
    )
    assert q(z) <= q(np.asarray(prob.warm_start))
    its = int(sol.iterations)
    if its > 2:
      before = solvers.pg_solve([leaf], [prob], -1.0, its - 1, 2, track_residual=True)[0]
      assert float(before.residual) > eps


def test_smaller_eps_needs_more_iterations():
  with jax.enable_x64(True):
    leaf, prob = _problem(1)
    its = [
        int(solvers.pg_solve([leaf], [prob], 0.0, 5000, 2, e)[0].iterations)
        for e in (1e-1, 1e-4, 1e-8)
    ]
    assert its[0] <= its[1] <= its[2] and its[0] < its[2]


def test_schedule_in_optimizer_and_bad_power():
  sched = optax_ramda.summable_tolerance(1e-2, power=1.0)
  np.testing.assert_allclose(float(sched(jnp.asarray(3))), 1e-2 / 4, rtol=1e-6)
  with pytest.raises(ValueError, match="power"):
    optax_ramda.summable_tolerance(1e-2, power=0.5)
  params = {"w": jnp.ones((6, 4))}
  reg = optax_ramda.group_lasso(GroupSpec((1,)))
  opt = optax.chain(
      optax_ramda.adam_subproblem(1e-1),
      optax_ramda.solve_subproblem(
          reg, 1e-2, max_iters=1000, solver="pg", subgradient_tol=sched
      ),
      optax_ramda.interpolate(1.0),
  )
  st = opt.init(params)
  g = {"w": jnp.arange(24.0).reshape(6, 4) / 24}
  upd = jax.jit(opt.update)
  for _ in range(3):
    u, st = upd(g, st, params)
    params = optax.apply_updates(params, u)
  diag = optax_ramda.solve_diagnostics(st, params)
  res, its = float(diag.residual["w"]), int(diag.iterations["w"])
  # The third solve (count 2) stopped on the rule or on the cap.
  assert its == 1000 or res <= float(sched(jnp.asarray(2)))
  assert its >= 2


def test_negative_tol_rejected():
  with pytest.raises(ValueError, match="subgradient_tol"):
    optax_ramda.solve_subproblem(optax_ramda.l1(), 1e-3, solver="pg", subgradient_tol=-1.0)


def test_needs_a_pg_solver():
  # The default (exact) solver has no stopping rule to replace: the error
  # names the fix.
  for solver in (None, "exact"):
    with pytest.raises(ValueError, match="solver='pg'"):
      optax_ramda.solve_subproblem(optax_ramda.l1(), 1e-3, solver=solver, subgradient_tol=1e-3)
    with pytest.raises(ValueError, match="solver='pg'"):
      optax_ramda.ramda(0.1, 1e-3, optax_ramda.l1(), solver=solver, subgradient_tol=1e-3)
