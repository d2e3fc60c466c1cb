"""Each stage on its own, against the spec's formulas evaluated in numpy (float64)."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_ramda
from optax_ramda import GroupSpec, NewPoint, StageSchedule


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _grads(n, shape=(3, 4), seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape) for _ in range(n)]


def test_dual_averaging_weights_and_restart():
  """s = lr sqrt(k), alpha = sum s, V = sum s g; restart at milestones (§2, §7)."""
  lr, gamma = 0.3, 0.5
  sched = StageSchedule((3,), gamma)
  opt = optax_ramda.dual_averaging(lr, sched)
  x = np.ones((3, 4))
  state = opt.init(jnp.asarray(x))
  gs = _grads(5)
  V, alpha, k, lr_t, x0 = np.zeros_like(x), 0.0, 0, lr, x.copy()
  for t, g in enumerate(gs):
    params = x + t  # the params move; x0 must follow at the restart
    if t == 3:
      V, alpha, k, lr_t, x0 = np.zeros_like(x), 0.0, 0, lr_t * gamma, params.copy()
    k += 1
    s = lr_t * np.sqrt(k)
    alpha += s
    V = V + s * g
    out, state = opt.update(jnp.asarray(g), state, jnp.asarray(params))
    np.testing.assert_allclose(out.weight, s, rtol=1e-15)
    np.testing.assert_allclose(out.alpha, alpha, rtol=1e-15)
    np.testing.assert_allclose(out.beta, np.sqrt(k), rtol=1e-15)
    np.testing.assert_allclose(out.linear, V, rtol=1e-14)
    np.testing.assert_array_equal(out.centre, x0)
    assert bool(out.restart) == (t in (0, 3))


def test_cube_root_metric():
  """U = sum s g^2 (reset at restart), P = cbrt(U) + eps, eps decays (§2, §7)."""
  eps, gamma = 1e-3, 0.1
  sched = StageSchedule((2,), gamma)
  chain = [optax_ramda.dual_averaging(0.2, sched), optax_ramda.cube_root_metric(eps, sched)]
  x = jnp.zeros((3, 4))
  states = [s.init(x) for s in chain]
  U, k = np.zeros((3, 4)), 0
  for t, g in enumerate(_grads(4)):
    lr = 0.2 * (gamma if t >= 2 else 1)
    if t == 2:
      U, k = np.zeros((3, 4)), 0
    k += 1
    U = U + lr * np.sqrt(k) * g * g
    da, states[0] = chain[0].update(jnp.asarray(g), states[0], x)
    sub, states[1] = chain[1].update(da, states[1], x)
    np.testing.assert_allclose(sub.metric, np.cbrt(U) + eps * (gamma if t >= 2 else 1), rtol=1e-14)
    assert isinstance(sub, optax_ramda.Subproblem)
    np.testing.assert_allclose(sub.scale, da.alpha)


def test_sqrt_count_metric_is_scalar_beta():
  da_opt, metric = optax_ramda.dual_averaging(0.1), optax_ramda.sqrt_count_metric()
  x = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  s0, s1 = da_opt.init(x), metric.init(x)
  for _ in range(3):
    da, s0 = da_opt.update(x, s0, x)
    sub, s1 = metric.update(da, s1, x)
  assert all(jnp.ndim(m) == 0 for m in jax.tree.leaves(sub.metric))
  np.testing.assert_allclose(sub.metric["a"], np.sqrt(3.0))


def test_adam_subproblem():
  """ProxGen's centre, linear term and metric (§4), with weight decay and decay of lr."""
  lr, b1, b2, eps, wd, gamma = 0.01, 0.8, 0.9, 1e-4, 0.1, 0.5
  opt = optax_ramda.adam_subproblem(lr, b1, b2, eps, wd, StageSchedule((2,), gamma))
  x = np.full((3, 4), 2.0)
  state = opt.init(jnp.asarray(x))
  m = v = np.zeros_like(x)
  for t, g in enumerate(_grads(3)):
    k = t + 1
    lr_t = lr * (gamma if t >= 2 else 1)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    sub, state = opt.update(jnp.asarray(g), state, jnp.asarray(x))
    np.testing.assert_allclose(sub.centre * sub.centre_scale, x * (1 - lr_t * wd), rtol=1e-15)
    np.testing.assert_allclose(sub.linear_scale * sub.linear, lr_t / (1 - b1**k) * m, rtol=1e-14)
    np.testing.assert_allclose(sub.metric, np.sqrt(v) / np.sqrt(1 - b2**k) + eps, rtol=1e-14)
    np.testing.assert_allclose(sub.scale, lr_t, rtol=1e-15)
    np.testing.assert_array_equal(sub.warm_start, sub.centre * sub.centre_scale)


def _scaled_subproblem(rng, dtype):
  """The params and a Subproblem with a ``linear_scale`` and a ``centre_scale``."""
  shapes = {"w": (6, 4), "s": (5, 3), "k": (4, 5), "b": (5,)}
  x = {n: jnp.asarray(rng.normal(size=sh), dtype) for n, sh in shapes.items()}
  m = {n: jnp.asarray(rng.normal(size=sh), dtype) for n, sh in shapes.items()}
  # Diagonal metrics, except "s": a scalar (the closed-form prox).
  p = {n: jnp.asarray(10.0 ** rng.uniform(-1, 1, size=sh), dtype) for n, sh in shapes.items()}
  p["s"] = jnp.asarray(1.7, dtype)
  c = jnp.asarray(0.9, jnp.float32)
  warm = jax.tree.map(lambda v: v * c.astype(v.dtype), x)
  scaled = optax_ramda.Subproblem(x, m, p, jnp.asarray(0.5), warm, jnp.asarray(0.37), c)
  return x, scaled


def _folded(sub):
  """``sub`` with the products in ``centre`` and ``linear`` (ProxGen's stage, before)."""
  a, c = sub.linear_scale, sub.centre_scale
  return sub._replace(linear=jax.tree.map(lambda v: a.astype(v.dtype) * v, sub.linear),
                      centre=jax.tree.map(lambda v: v * c.astype(v.dtype), sub.centre),
                      linear_scale=None, centre_scale=None)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("reg, solver", [
    ("group", None), ("group", "pg"), ("group", "pg_fused"), ("l1", None), ("nuclear", None),
])
def test_solve_stage_takes_the_scaled_centre_and_linear_term(dtype, reg, solver):
  """``centre * centre_scale`` and ``linear_scale * linear`` solve bit for bit like the
  folded products, on every path (the closed form of a scalar metric, leaf "s", unfused:
  the fused one, for updates of 32 MiB+, is checked to rounding in test_solvers.py)."""
  x, scaled = _scaled_subproblem(np.random.default_rng(4), dtype)
  spec = {"w": GroupSpec((1,)), "s": GroupSpec((1,)), "b": None}
  regs = {
      "group": optax_ramda.group_lasso({**spec, "k": GroupSpec((0,))}),
      "l1": optax_ramda.l1({"w": True, "s": True, "k": True, "b": False}),
      "nuclear": optax_ramda.nuclear_norm({**spec, "k": optax_ramda.NuclearSpec()}),
  }
  stage = optax_ramda.solve_subproblem(regs[reg], strength=0.3, solver=solver)
  state = stage.init(x)
  (z_scaled,), st_scaled = jax.jit(stage.update)(scaled, state, x)
  # Folded inside the same jit (XLA may keep a bf16 product in float32 there).
  (z_folded,), st_folded = jax.jit(lambda sub, s, x: stage.update(_folded(sub), s, x))(
      scaled, state, x
  )
  chex.assert_trees_all_equal(z_scaled, z_folded)
  chex.assert_trees_all_equal(st_scaled, st_folded)
  # Not vacuous: the regularizer moved "w" and "k" away from the unregularized point.
  plain = optax_ramda.solve_subproblem(regs[reg], strength=0.0, solver=solver)
  (z_plain,), _ = jax.jit(plain.update)(scaled, plain.init(x), x)
  for name in ("w", "k"):
    assert not np.allclose(z_scaled[name], z_plain[name]), name


def test_sgd_subproblem():
  """buf = c g at step 1 then EMA; linear = lr buf (as linear_scale * linear) with a unit
  scalar metric (§5)."""
  lr, c = 0.1, 0.25
  opt = optax_ramda.sgd_subproblem(lr, c)
  x = jnp.ones((2, 3))
  state = opt.init(x)
  buf = np.zeros((2, 3))
  for t, g in enumerate(_grads(3, (2, 3))):
    buf = c * g if t == 0 else (1 - c) * buf + c * g
    sub, state = opt.update(jnp.asarray(g), state, x)
    np.testing.assert_allclose(sub.linear, buf, rtol=1e-15)
    np.testing.assert_allclose(sub.linear_scale, lr, rtol=1e-15)
    assert jnp.ndim(sub.metric) == 0 and float(sub.metric) == 1.0


def test_interpolate_and_ramp():
  """x <- (1-c) x + c z with the ramp min(c0 sqrt(j+1), 1) in the last stage (§7)."""
  c0 = 0.3
  opt = optax_ramda.interpolate(c0, StageSchedule((2, 4)))
  x = jnp.full(3, 1.0)
  z = jnp.full(3, 0.0)
  state = opt.init(x)
  # last milestone 4: step t = 4 is the first of the last stage (j = 1).
  expected_c = [c0] * 4 + [min(c0 * np.sqrt(j + 1), 1.0) for j in range(1, 14)]
  assert expected_c[-1] == 1.0
  for c in expected_c:
    u, state = opt.update(NewPoint(z), state, x)
    np.testing.assert_allclose(x + u, (1 - c) * x, rtol=1e-15)
  # c == 1: exactly z; zero groups land as exact zeros after apply_updates.
  opt1 = optax_ramda.interpolate(1.0)
  xx = jnp.asarray([0.1, -3.7, 1e-30])
  zz = jnp.asarray([0.0, 2.5, 0.0])
  u, _ = opt1.update(NewPoint(zz), opt1.init(xx), xx)
  new = xx + u
  assert new[0] == 0 and new[2] == 0


def test_interpolate_keeps_param_dtype():
  opt = optax_ramda.interpolate(0.5)
  x = jnp.ones(4, jnp.bfloat16)
  u, _ = opt.update(NewPoint(jnp.zeros(4, jnp.float32)), opt.init(x), x)
  assert u.dtype == jnp.bfloat16


class RamdaVariantsTest(chex.TestCase):
  """chex variants: outputs have the params' shapes; state dtypes follow the params."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_shapes_and_dtypes(self, dtype):
    reg = optax_ramda.group_lasso(optax_ramda.GroupSpec((1,)))
    params = {"w": jnp.ones((3, 4), dtype), "v": jnp.ones((2, 5), dtype)}
    opt = optax_ramda.ramda(0.1, 0.01, reg)
    with warnings.catch_warnings():  # bf16 state is what is tested: no accumulator_dtype
      warnings.filterwarnings("ignore", "parameter .* is bfloat16", UserWarning)
      state = opt.init(params)
    updates, new_state = self.variant(opt.update)(params, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    da = new_state[0]
    chex.assert_trees_all_equal_shapes_and_dtypes(da.centre, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(da.sum_grad, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state[1].sum_sq_grad, params)
    chex.assert_tree_all_finite(updates)


_STAGES = {
    "dual_averaging": lambda reg: optax_ramda.dual_averaging(0.1),
    "cube_root_metric": lambda reg: optax_ramda.cube_root_metric(),
    "sqrt_count_metric": lambda reg: optax_ramda.sqrt_count_metric(),
    "adam_subproblem": lambda reg: optax_ramda.adam_subproblem(0.1),
    "sgd_subproblem": lambda reg: optax_ramda.sgd_subproblem(0.1),
    "solve_subproblem": lambda reg: optax_ramda.solve_subproblem(reg, 1e-3),
    "interpolate": lambda reg: optax_ramda.interpolate(0.1),
}


@pytest.mark.parametrize("order, stage, got", [
    # the metric before the averages: it gets the gradients
    (["cube_root_metric", "dual_averaging", "solve_subproblem", "interpolate"],
     "cube_root_metric", "a dict"),
    # no metric: the solve gets the averages
    (["dual_averaging", "solve_subproblem", "interpolate"], "solve_subproblem", "the DualAverage"),
    # no solve: interpolate gets the subproblem
    (["dual_averaging", "sqrt_count_metric", "interpolate"], "interpolate", "the Subproblem"),
    (["adam_subproblem", "interpolate"], "interpolate", "the Subproblem"),
    # interpolate twice, or alone: it gets updates / gradients, not a point
    (["sgd_subproblem", "solve_subproblem", "interpolate", "interpolate"], "interpolate", "a dict"),
    (["interpolate"], "interpolate", "a dict"),
    # two first stages
    (["dual_averaging", "adam_subproblem", "solve_subproblem", "interpolate"],
     "adam_subproblem", "the DualAverage"),
    (["sgd_subproblem", "dual_averaging", "solve_subproblem", "interpolate"],
     "dual_averaging", "the Subproblem"),
])
def test_stages_in_the_wrong_order_name_the_right_one(order, stage, got):
  """Hand-built chains in the wrong order raise a ValueError naming the order, at the
  first update (trace time: the same under jit), instead of an AttributeError, a
  pytree-structure error, or (interpolate alone or twice) silently wrong params."""
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  reg = optax_ramda.group_lasso({"w": GroupSpec((1,)), "b": None})
  opt = optax.chain(*[_STAGES[name](reg) for name in order])
  state = opt.init(params)
  for update in (opt.update, jax.jit(opt.update)):
    with pytest.raises(ValueError, match=f"^{stage} takes .* but got {got}") as err:
      update(params, state, params)
    assert "optax.chain(dual_averaging(...), cube_root_metric(...)" in str(err.value)
    assert "optax_ramda.ramda" in str(err.value)


def test_a_chain_that_stops_at_the_solve_does_not_pass_z_as_updates():
  """solve_subproblem's z is a point: ending the chain there gives a NewPoint, which
  optax.apply_updates refuses, instead of params + z."""
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  reg = optax_ramda.group_lasso({"w": GroupSpec((1,)), "b": None})
  opt = optax.chain(
      optax_ramda.dual_averaging(0.1), optax_ramda.cube_root_metric(),
      optax_ramda.solve_subproblem(reg, 1e-3),
  )
  out, _ = opt.update(params, opt.init(params), params)
  assert isinstance(out, NewPoint)
  chex.assert_trees_all_equal_structs(out.z, params)
  with pytest.raises(ValueError, match="NewPoint"):
    optax.apply_updates(params, out)


def test_the_right_orders_pass_the_checks():
  """The four orders the aliases use are accepted, under jit."""
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  reg = optax_ramda.group_lasso({"w": GroupSpec((1,)), "b": None})
  for first in (["dual_averaging", "cube_root_metric"], ["dual_averaging", "sqrt_count_metric"],
                ["adam_subproblem"], ["sgd_subproblem"]):
    opt = optax.chain(*[_STAGES[n](reg) for n in [*first, "solve_subproblem", "interpolate"]])
    updates, _ = jax.jit(opt.update)(params, opt.init(params), params)
    chex.assert_trees_all_equal_structs(updates, params)
