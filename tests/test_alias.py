"""The four optimizers end to end: MADGRAD equivalence, exact zeros, jit, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ramda
from optax_ramda import GroupSpec

OPTIMIZERS = {
    "ramda": lambda reg, **kw: optax_ramda.ramda(0.05, 0.05, reg, **kw),
    "rmda": lambda reg, **kw: optax_ramda.rmda(0.1, 0.05, reg, **kw),
    "prox_adamw": lambda reg, **kw: optax_ramda.prox_adamw(0.01, 0.05, reg, **kw),
    "prox_sgd": lambda reg, **kw: optax_ramda.prox_sgd(0.1, 0.05, reg, **kw),
}


def _problem(seed=0, dtype=jnp.float32):
  key = jax.random.PRNGKey(seed)
  k1, k2 = jax.random.split(key)
  params = {
      "w": jax.random.normal(k1, (6, 5), dtype) * 0.5,
      "conv": jax.random.normal(k2, (2, 2, 3, 4), dtype) * 0.5,
      "b": jnp.zeros(5, dtype),
  }
  spec = {"w": GroupSpec((1,)), "conv": GroupSpec((0, 1, 3)), "b": None}

  def loss(p, x):
    h = jnp.tanh(x @ p["w"] + p["b"])
    return jnp.mean((h - 0.2) ** 2) + 0.1 * jnp.sum(jnp.sin(p["conv"]) ** 2) * jnp.mean(x**2)

  return params, optax_ramda.group_lasso(spec), loss


def _run(opt, params, loss, steps, jit=True, seed=1):
  state = opt.init(params)

  def step(p, s, x):
    g = jax.grad(loss)(p, x)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step) if jit else step
  key = jax.random.PRNGKey(seed)
  for t in range(steps):
    x = jax.random.normal(jax.random.fold_in(key, t), (8, params["w"].shape[0]))
    params, state = step(params, state, x)
  return params, state


def test_ramda_without_regularizer_is_madgrad():
  """RAMDA without a regularizer is MADGRAD with momentum 1 - c (ALGORITHMS.md §2).

  optax.contrib.madgrad adds eps to its learning rate and rounds its step
  weight lr*sqrt(k) to float32 (int32 count), so we pass lr - eps and compare in
  float64 with a bound derived from that rounding: each weight carries a
  relative error <= 2^-24, z - x0 = -V / P scales like s^(2/3), and x averages
  the z's, so |x - x_madgrad| <= ~2 * 2^-24 * max|x - x0|; we allow 4 * 2^-24.
  """
  with jax.enable_x64(True):
    params, _, loss = _problem(dtype=jnp.float64)
    lr, c, eps = 0.01, 0.1, 1e-6
    ours = optax_ramda.ramda(lr, momentum=c, eps=eps)
    ref = optax.contrib.madgrad(learning_rate=lr - eps, momentum=1 - c, eps=eps)
    wrong = optax.contrib.madgrad(learning_rate=lr - eps, momentum=1 - c, eps=10 * eps)
    p1, _ = _run(ours, params, loss, 100)
    p2, _ = _run(ref, params, loss, 100)
    p3, _ = _run(wrong, params, loss, 100)
    diff = lambda a, b: max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
    move = diff(p1, params)
    bound = 4 * 2.0**-24 * move
    assert diff(p1, p2) <= bound, (diff(p1, p2), bound)
    assert diff(p1, p3) > 10 * bound  # the comparison detects a wrong eps


@pytest.mark.parametrize("name", ["ramda", "rmda"])
def test_zero_groups_exact_in_z_and_params_with_c1(name):
  params, reg, loss = _problem()
  make = {"ramda": optax_ramda.ramda, "rmda": optax_ramda.rmda}[name]
  opt = make(0.05, 0.3, reg, momentum=1.0)
  p, _ = _run(opt, params, loss, 30)
  report = optax_ramda.structure(p, reg)
  assert float(report.group_sparsity) > 0, "the strength should zero some groups"
  # Every group that is zero is exactly zero, and zero groups stay in the params.
  for key, axes in (("w", (1,)), ("conv", (0, 1, 3))):
    norms = jnp.sqrt(jnp.sum(p[key] ** 2, axis=axes))
    zero = norms == 0
    assert bool(jnp.all(jnp.where(zero, jnp.all(p[key] == 0, axis=axes), True)))


@pytest.mark.parametrize("metric", ["cube_root", "sqrt_count"])
def test_z_has_exact_zeros_while_x_does_not_with_small_c(metric):
  """With c < 1 zero groups appear in z (the solve stage's output), not in x (§2)."""
  params, reg, loss = _problem()
  stages = [
      optax_ramda.dual_averaging(0.05),
      optax_ramda.cube_root_metric(1e-6) if metric == "cube_root"
      else optax_ramda.sqrt_count_metric(),
      optax_ramda.solve_subproblem(reg, 0.3),
      optax_ramda.interpolate(0.1),
  ]
  states = [s.init(params) for s in stages]
  for t in range(40):
    v = jax.grad(loss)(params, jax.random.normal(jax.random.PRNGKey(t), (8, 6)))
    for i, stage in enumerate(stages):
      if i == 3:
        z = v.z
      v, states[i] = stage.update(v, states[i], params)
    params = optax.apply_updates(params, v)
  zero_in = lambda tree: [
      bool(jnp.any(jnp.all(tree[k] == 0, axis=ax))) for k, ax in (("w", 1), ("conv", (0, 1, 3)))
  ]
  assert any(zero_in(z))
  assert not any(zero_in(params))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_jit_and_eager_agree(name):
  """Same trajectory with and without jit, in float64.

  (In float32 the paper's rtol = 1e-8 stopping test acts on round-off, so jit
  and eager may stop the PG solver at different iterations; float64 keeps the
  comparison about the arithmetic. XLA may fuse and reassociate differently
  under jit, hence 1e-12 rather than equality.)
  """
  with jax.enable_x64(True):
    params, reg, loss = _problem(dtype=jnp.float64)
    opt = OPTIMIZERS[name](reg, milestones=(2, 4))
    p_jit, _ = _run(opt, params, loss, 6, jit=True)
    p_eager, _ = _run(opt, params, loss, 6, jit=False)
    chex.assert_trees_all_close(p_jit, p_eager, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_update_compiles_once(name):
  params, reg, loss = _problem()
  opt = OPTIMIZERS[name](reg, milestones=(2, 4)) if name != "prox_adamw" else OPTIMIZERS[name](reg)
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(1)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = opt.init(params)
  for t in range(6):
    g = jax.grad(loss)(params, jax.random.normal(jax.random.PRNGKey(t), (8, 6)))
    params, state = step(params, state, g)
  assert len(traces) == 1


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_update_without_params_raises(name):
  params, reg, _ = _problem()
  opt = OPTIMIZERS[name](reg)
  state = opt.init(params)
  with pytest.raises(ValueError, match="params"):
    opt.update(params, state)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda reg: optax_ramda.ramda(-0.1, 0.1, reg), "learning_rate"),
        (lambda reg: optax_ramda.ramda(0.0, 0.1, reg), "learning_rate"),
        (lambda reg: optax_ramda.rmda(0.0, 0.1, reg), "learning_rate"),
        (lambda reg: optax_ramda.prox_adamw(-1.0, 0.1, reg), "learning_rate"),
        (lambda reg: optax_ramda.prox_sgd(-1.0, 0.1, reg), "learning_rate"),
        (lambda reg: optax_ramda.ramda(0.1, -0.1, reg), "strength"),
        (lambda reg: optax_ramda.prox_sgd(0.1, -0.1, reg), "strength"),
        (lambda reg: optax_ramda.ramda(0.1, 0.1, reg, eps=-1e-6), "eps"),
        (lambda reg: optax_ramda.prox_adamw(0.1, 0.1, reg, eps=-1e-8), "eps"),
        (lambda reg: optax_ramda.ramda(0.1, 0.1, reg, momentum=0.0), "momentum"),
        (lambda reg: optax_ramda.ramda(0.1, 0.1, reg, momentum=1.5), "momentum"),
        (lambda reg: optax_ramda.rmda(0.1, 0.1, reg, momentum=-0.1), "momentum"),
        (lambda reg: optax_ramda.prox_sgd(0.1, 0.1, reg, momentum=2.0), "momentum"),
        (lambda reg: optax_ramda.ramda(0.1, 0.1, reg, milestones=(30, 15)), "strictly increasing"),
        (lambda reg: optax_ramda.rmda(0.1, 0.1, reg, milestones=(15, 15)), "strictly increasing"),
        (lambda reg: optax_ramda.prox_sgd(0.1, 0.1, reg, milestones=(0, 5)), "positive"),
        (lambda reg: optax_ramda.ramda(0.1, 0.1, reg, max_iters=0), "max_iters"),
        (lambda reg: optax_ramda.ramda(0.1, 0.1, reg, rtol=-1.0), "rtol"),
        (lambda reg: optax_ramda.ramda(0.1, 0.1, None), "without a regularizer"),
        (lambda reg: optax_ramda.prox_adamw(0.1, 0.1, reg, b1=1.0), "b1"),
        (lambda reg: optax_ramda.ramda(float("inf"), 0.1, reg), "finite"),
        (lambda reg: optax_ramda.prox_sgd(float("inf"), 0.1, reg), "finite"),
        (lambda reg: optax_ramda.ramda(0.1, 0.1, reg, eps=float("inf")), "finite"),
        (lambda reg: optax_ramda.ramda(0.1, float("inf"), reg), "finite"),
        (lambda reg: optax_ramda.ramda(np.array([0.1]), 0.1, reg), "scalar"),
        (lambda reg: optax_ramda.prox_adamw(0.1, np.array([0.1, 0.2]), reg), "scalar"),
        (lambda reg: optax_ramda.ramda(0.1, 0.1, reg, accumulator_dtype=jnp.int32), "floating"),
        (lambda reg: optax_ramda.prox_adamw(0.1, 0.1, reg, accumulator_dtype="int8"), "floating"),
        (lambda reg: optax_ramda.rmda(0.1, 0.1, reg, accumulator_dtype=jnp.complex64), "floating"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(make, match):
  _, reg, _ = _problem()
  with pytest.raises(ValueError, match=match):
    make(reg)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bad_group_spec_raises_at_init(name):
  params, _, _ = _problem()
  # Axis out of range.
  bad_axis = optax_ramda.group_lasso({"w": GroupSpec((2,)), "conv": None, "b": None})
  with pytest.raises(ValueError, match="out of range"):
    OPTIMIZERS[name](bad_axis).init(params)
  # Tree does not match the params.
  bad_tree = optax_ramda.group_lasso({"w": GroupSpec((1,)), "b": None})
  with pytest.raises(ValueError, match=r"does not match.*parameter \['conv'\] has no entry"):
    OPTIMIZERS[name](bad_tree).init(params)
  # A regularized integer leaf.
  int_params = {**params, "b": jnp.zeros(5, jnp.int32)}
  int_reg = optax_ramda.group_lasso({"w": None, "conv": None, "b": GroupSpec(())})
  with pytest.raises(TypeError, match="int32"):
    OPTIMIZERS[name](int_reg).init(int_params)


def test_inject_hyperparams_changes_nothing_with_constants():
  """Same trajectory wrapped in inject_hyperparams (float64: see jit test)."""
  with jax.enable_x64(True):
    params, reg, loss = _problem(dtype=jnp.float64)
    kw = dict(learning_rate=0.05, strength=0.05, regularizer=reg, momentum=0.2, milestones=(3,))
    p1, _ = _run(optax_ramda.ramda(**kw), params, loss, 6)
    p2, _ = _run(optax.inject_hyperparams(optax_ramda.ramda)(**kw), params, loss, 6)
    chex.assert_trees_all_close(p1, p2, atol=1e-12, rtol=0)


def test_hyperparameters_in_state_are_schedulable():
  params, reg, loss = _problem()
  opt = optax.inject_hyperparams(optax_ramda.ramda)(
      learning_rate=optax.linear_schedule(0.05, 0.01, 10), strength=0.05, regularizer=reg
  )
  _, state = _run(opt, params, loss, 3)
  assert float(state.hyperparams["learning_rate"]) < 0.05
  assert set(state.hyperparams) >= {"learning_rate", "strength", "momentum", "eps", "rtol"}


def test_alpha_compensated_sum_does_not_drift():
  """alpha grows like (2/3) lr k^1.5; a naive float32 sum drifts (DESIGN-NOTES).

  Over 1e5 float32 steps the Kahan-compensated alpha of dual_averaging stays
  within a few float32 ulps of the float64 sum of the same float32 weights.
  """
  opt = optax_ramda.dual_averaging(0.1)
  params = jnp.zeros(1)
  state = opt.init(params)
  g = jnp.zeros(1)

  def body(state, _):
    out, state = opt.update(g, state, params)
    return state, out.weight

  state, weights = jax.lax.scan(body, state, None, length=100_000)
  exact = np.sum(np.asarray(weights, np.float64))
  rel = abs(float(state.alpha) - exact) / exact
  assert rel <= 2 * 2.0**-24, rel
  # The uncompensated float32 running sum of the same weights drifts further.
  naive = np.float32(0)
  for w in np.asarray(weights):
    naive = np.float32(naive + w)
  assert abs(float(naive) - exact) / exact > 10 * rel


@pytest.mark.parametrize("name", [*OPTIMIZERS, "prox_ssi"])
def test_integer_and_bool_leaves_pass_through(name):
  """Unregularized non-float leaves keep their values; the float leaves are unaffected.

  With an integer state the dual averages' metric rounds to 0 and ``z`` would
  be ``0 / 0`` (the leaf used to come back as zeros).
  """
  make = OPTIMIZERS.get(name, lambda reg: optax_ramda.prox_ssi(0.01, 0.05, reg))
  params, _, loss = _problem()
  spec = {"w": GroupSpec((1,)), "conv": GroupSpec((0, 1, 3)), "b": None}
  ids = jnp.array([5, 7, 9], jnp.int32)
  flag = jnp.array([True, False])
  mixed = {**params, "ids": ids, "flag": flag}
  reg_mixed = optax_ramda.group_lasso({**spec, "ids": None, "flag": None})
  opt = make(reg_mixed)
  state = opt.init(mixed)
  # The state holds arrays for the float leaves only (MaskedNode placeholders,
  # which have no leaves, for the others): the arrays of the state without them.
  ref_state = make(optax_ramda.group_lasso(spec)).init(params)
  shapes = lambda tree: [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
  assert shapes(state) == shapes(ref_state)

  @jax.jit
  def step(p, s, x):
    g = jax.grad(loss)({k: p[k] for k in params}, x)
    g = {**g, "ids": jnp.ones(3, jnp.int32), "flag": jnp.array([True, True])}
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, u

  p = mixed
  for t in range(4):
    x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(1), t), (8, 6))
    p, state, u = step(p, state, x)
    assert u["ids"].dtype == jnp.int32 and not jnp.any(u["ids"])
  np.testing.assert_array_equal(p["ids"], ids)
  np.testing.assert_array_equal(p["flag"], flag)
  ref, _ = _run(make(optax_ramda.group_lasso(spec)), params, loss, 4)
  chex.assert_trees_all_close({k: p[k] for k in params}, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_float0_gradients_of_integer_leaves(name):
  """``jax.grad(..., allow_int=True)`` gives integer leaves float0 gradients."""
  params, reg, loss = _problem()
  mixed = {**params, "ids": jnp.array([5, 7, 9], jnp.int32)}
  reg = optax_ramda.group_lasso(
      {"w": GroupSpec((1,)), "conv": GroupSpec((0, 1, 3)), "b": None, "ids": None}
  )
  opt = OPTIMIZERS[name](reg)
  x = jnp.ones((8, 6))
  g = jax.grad(lambda p: loss({k: p[k] for k in params}, x), allow_int=True)(mixed)
  assert g["ids"].dtype == jax.dtypes.float0
  u, _ = jax.jit(opt.update)(g, opt.init(mixed), mixed)
  np.testing.assert_array_equal(optax.apply_updates(mixed, u)["ids"], mixed["ids"])


def test_complex_params_raise_at_init():
  params, reg, _ = _problem()
  params = {**params, "b": jnp.zeros(5, jnp.complex64)}
  for make in OPTIMIZERS.values():
    with pytest.raises(ValueError, match="complex"):
      make(reg).init(params)


@pytest.mark.parametrize("name", ["ramda", "rmda"])
def test_float16_params_need_a_wider_accumulator(name):
  """The dual averages grow like k^1.5 and leave float16's range: refused at init."""
  params, reg, loss = _problem(dtype=jnp.float16)
  with pytest.raises(ValueError, match=r"accumulator_dtype=jnp\.float32"):
    OPTIMIZERS[name](reg).init(params)
  p, state = _run(OPTIMIZERS[name](reg, accumulator_dtype=jnp.float32), params, loss, 3)
  assert all(x.dtype == jnp.float16 for x in jax.tree.leaves(p))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))


def test_a_single_milestone_may_be_an_int():
  params, reg, loss = _problem()
  a, _ = _run(optax_ramda.ramda(0.05, 0.05, reg, milestones=2), params, loss, 4)
  b, _ = _run(optax_ramda.ramda(0.05, 0.05, reg, milestones=(2,)), params, loss, 4)
  chex.assert_trees_all_equal(a, b)
  # Under inject_hyperparams a bare int becomes an array: a clear error.
  injected = optax.inject_hyperparams(optax_ramda.ramda)(0.05, 0.05, reg, milestones=2)
  with pytest.raises(ValueError, match="static_args"):
    injected.update(params, injected.init(params), params)


def test_group_axis_on_a_scalar_names_the_fix():
  params = {"s": jnp.ones(()), "w": jnp.ones((3, 2))}
  reg = optax_ramda.group_lasso({"s": GroupSpec((0,)), "w": None})
  with pytest.raises(ValueError, match=r"scalar.*GroupSpec\(\(\)\)"):
    optax_ramda.ramda(0.1, 0.1, reg).init(params)
