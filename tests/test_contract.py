"""The optax contract, one parametrized suite run for every optimizer.

Each test compares the optimizer inside an optax wrapper with the same
optimizer driven by hand (not with stored numbers), on a small Flax-shaped
params tree with the paper's grouping (presets.from_params) and a fixed
sequence of random gradients. Float32 throughout unless stated.
"""


import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ramda
from optax_ramda import presets

STEPS = 5
# Milestone after epoch 2 with 2 steps per epoch: a restart (RAMDA/RMDA) at
# step 4, inside every trajectory below.
STAGES = dict(milestones=(2,), steps_per_epoch=2)
# The PG solver stops on a relative decrease; an ulp change of its input may
# change the iteration count and so the answer at the solver's accuracy. A
# fixed iteration count makes the step a smooth function of its inputs, so
# wrappers that reorder float ops differ only by rounding (tolerances below).
FIXED_ITERS = dict(max_iters=20, min_iters=20)


def make_params(dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
      "dense": {"kernel": jax.random.normal(k1, (5, 4), dtype), "bias": jnp.zeros(4, dtype)},
      "conv": {"kernel": jax.random.normal(k2, (3, 3, 2, 3), dtype)},
  }


REG = presets.from_params(make_params())

# name -> (factory, schedulable hyperparameters, fixed keyword arguments)
OPTIMIZERS = {
    "ramda": (
        optax_ramda.ramda,
        dict(learning_rate=0.1, strength=0.05, momentum=0.1),
        {**STAGES, **FIXED_ITERS},
    ),
    "rmda": (
        optax_ramda.rmda,
        dict(learning_rate=0.1, strength=0.05, momentum=0.1),
        STAGES,
    ),
    "prox_adamw": (
        optax_ramda.prox_adamw,
        dict(learning_rate=0.05, strength=0.05, b1=0.9),
        {**STAGES, **FIXED_ITERS},
    ),
    "prox_sgd": (
        optax_ramda.prox_sgd,
        dict(learning_rate=0.1, strength=0.05, momentum=0.1),
        STAGES,
    ),
    "prox_ssi": (
        optax_ramda.prox_ssi,
        dict(learning_rate=0.05, strength=0.05, b1=0.9),
        STAGES,
    ),
}
NAMES = sorted(OPTIMIZERS)


def build(name, regularizer=REG, **changes):
  if regularizer is REG and not changes:
    return _default(name)
  factory, hp, static = OPTIMIZERS[name]
  return factory(**{**hp, **changes}, regularizer=regularizer, **static)


@functools.cache
def _default(name):
  """One object per optimizer, so its jitted update compiles once per params shape."""
  factory, hp, static = OPTIMIZERS[name]
  return factory(**hp, regularizer=REG, **static)


@functools.cache
def clipped(name):
  return optax.chain(optax.clip_by_global_norm(1.0), build(name))


_JITTED = {}


def jitted_update(opt):
  if id(opt) not in _JITTED:
    _JITTED[id(opt)] = (opt, jax.jit(opt.update))
  return _JITTED[id(opt)][1]


# bf16 params without accumulator_dtype warn at init (tested on its own below).
BF16_WARNING = pytest.mark.filterwarnings("ignore:parameter .* is bfloat16:UserWarning")


def grads_seq(params, n=STEPS, seed=1):
  out = []
  for i in range(n):
    key = jax.random.fold_in(jax.random.key(seed), i)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out.append(treedef.unflatten(
        [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    ))
  return out


def run(opt, params, grads, **extra):
  state = opt.init(params)
  step = jitted_update(opt)
  traj = []
  for g in grads:
    updates, state = step(g, state, params, **extra)
    params = optax.apply_updates(params, updates)
    traj.append(params)
  return traj, state


def assert_trees(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if tol:
      np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), **tol)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", NAMES)
def test_jit_no_recompilation_and_groups_zeroed(name):
  params = make_params()
  opt = build(name, strength=5.0)  # strong enough to zero groups
  traces = []

  @jax.jit
  def step(g, state, p):
    traces.append(1)
    u, state = opt.update(g, state, p)
    return optax.apply_updates(p, u), state

  state = opt.init(params)
  for g in grads_seq(params):
    params, state = step(g, state, params)
  assert len(traces) == 1  # one trace for all steps, across the restart
  if name in ("prox_adamw", "prox_sgd", "prox_ssi"):  # c = 1 from the start: exact zeros
    norms = jnp.linalg.norm(params["dense"]["kernel"], axis=1)
    assert int(jnp.sum(norms == 0)) > 0


@pytest.mark.parametrize("name", NAMES)
def test_after_clip_by_global_norm(name):
  params = make_params()
  grads = [jax.tree.map(lambda x: 10 * x, g) for g in grads_seq(params)]
  traj, _ = run(clipped(name), params, grads)
  by_hand = []
  for g in grads:
    scale = jnp.minimum(1.0, 1.0 / optax.tree.norm(g))
    by_hand.append(jax.tree.map(lambda x, s=scale: x * s, g))
  ref, _ = run(build(name), params, by_hand)
  # Clipping multiplies by 1/norm in optax; by hand we do the same in a
  # different op order, so allow a few float32 ulps (rtol 1e-5).
  assert_trees(traj[-1], ref[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_schedule_switch(name):
  """Scheduling lr, momentum and strength = switching optimizers mid-run.

  Before the switch the injected optimizer (hyperparameters as float32
  arrays) must follow the unwrapped one built with Python constants.
  """
  factory, hp, static = OPTIMIZERS[name]
  switch = 3
  new = {k: v * 0.5 for k, v in hp.items()}
  scheds = {k: (lambda c, a=hp[k], b=new[k]: jnp.where(c < switch, a, b)) for k in hp}
  injected = optax.inject_hyperparams(factory)(**scheds, regularizer=REG, **static)
  params = make_params()
  grads = grads_seq(params)
  traj, inj_state = run(injected, params, grads)
  assert set(hp) <= set(inj_state.hyperparams)
  first, state = run(build(name), params, grads[:switch])
  opt_b = build(name, **new)
  step = jitted_update(opt_b)
  p = first[-1]
  for g in grads[switch:]:
    u, state = step(g, state, p)
    p = optax.apply_updates(p, u)
  # Hyperparameters become float32 arrays instead of weakly-typed Python
  # floats; products like lr * sqrt(k) may round differently: 1e-5 relative.
  assert_trees(traj[switch - 1], first[-1], rtol=1e-5, atol=1e-6)
  assert_trees(traj[-1], p, rtol=1e-5, atol=1e-6)
  # The switch mattered (guards against a schedule that is ignored).
  unswitched, _ = run(build(name), params, grads)
  assert not np.allclose(unswitched[-1]["dense"]["kernel"], p["dense"]["kernel"])


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_schedule_from_zero(name):
  """Schedules that start at 0 (optax.warmup_cosine_decay_schedule(0.0, ...)).

  inject_hyperparams rebuilds the optimizer with jax.Array values, also eagerly,
  where they are concrete: a 0 learning rate (and momentum) must pass the
  construction checks there, eagerly and under jit, and the first step, taken
  with 0, must leave the params where they are. A Python 0 is still refused.
  """
  factory, hp, static = OPTIMIZERS[name]
  warm = lambda v: optax.linear_schedule(0.0, v, 3)
  scheds = {k: warm(v) if k in ("learning_rate", "momentum") else v for k, v in hp.items()}
  params = make_params()
  for jit in (False, True):
    opt = optax.inject_hyperparams(factory)(**scheds, regularizer=REG, **static)
    state = opt.init(params)
    step = jax.jit(opt.update) if jit else opt.update
    p = params
    for i, g in enumerate(grads_seq(params)):
      u, state = step(g, state, p)
      p = optax.apply_updates(p, u)
      if i == 0:  # lr = 0 (and c = 0): nothing moves but by rounding
        assert_trees(p, params, rtol=0, atol=1e-6)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))
    assert not np.allclose(p["dense"]["kernel"], params["dense"]["kernel"])
  with pytest.raises(ValueError, match="learning_rate must be finite and > 0"):
    factory(**{**hp, "learning_rate": 0.0}, regularizer=REG, **static)


@pytest.mark.parametrize("name", NAMES)
def test_masked(name):
  params = make_params()
  mask = {"dense": {"kernel": True, "bias": False}, "conv": {"kernel": True}}
  grads = grads_seq(params)
  masked_opt = optax.masked(build(name), mask)
  state = masked_opt.init(params)
  sub = {"dense": {"kernel": params["dense"]["kernel"]}, "conv": params["conv"]}
  ref_opt = build(name)
  ref_state = ref_opt.init(sub)
  for g in grads:
    u, state = jitted_update(masked_opt)(g, state, params)
    g_sub = {"dense": {"kernel": g["dense"]["kernel"]}, "conv": g["conv"]}
    ru, ref_state = jitted_update(ref_opt)(g_sub, ref_state, sub)
    # Same ops on the same inputs: bit-identical.
    assert_trees(
        {"d": u["dense"]["kernel"], "c": u["conv"]}, {"d": ru["dense"]["kernel"], "c": ru["conv"]}
    )
    np.testing.assert_array_equal(u["dense"]["bias"], g["dense"]["bias"])  # passed through
    params = optax.apply_updates(params, u)
    sub = optax.apply_updates(sub, ru)


@pytest.mark.parametrize("name", NAMES)
def test_partition(name):
  params = make_params()
  labels = {"dense": {"kernel": "ours", "bias": "ours"}, "conv": {"kernel": "sgd"}}
  opt = optax.partition({"ours": build(name), "sgd": optax.sgd(0.1)}, labels)
  grads = grads_seq(params)
  traj, _ = run(opt, params, grads)
  dense, _ = run(build(name), {"dense": params["dense"]}, [{"dense": g["dense"]} for g in grads])
  conv, _ = run(optax.sgd(0.1), {"conv": params["conv"]}, [{"conv": g["conv"]} for g in grads])
  assert_trees(traj[-1]["dense"], dense[-1]["dense"])  # same ops: bit-identical
  assert_trees(traj[-1]["conv"], conv[-1]["conv"])


@pytest.mark.parametrize("name", NAMES)
def test_multisteps(name):
  params = make_params()
  micro = grads_seq(params, n=2 * 3)
  traj, _ = run(optax.MultiSteps(build(name), every_k_schedule=2), params, micro)
  means = [jax.tree.map(lambda a, b: (a + b) / 2, micro[i], micro[i + 1]) for i in (0, 2, 4)]
  ref, _ = run(build(name), params, means)
  # MultiSteps accumulates a running mean (a + (b - a) / 2): float32 rounding
  # differs from (a + b) / 2 by an ulp, amplified over 3 steps: rtol 1e-5.
  assert_trees(traj[-1], ref[-1], rtol=1e-5, atol=1e-6)
  assert_trees(traj[0], params)  # no change on a mini-step


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite(name):
  params = make_params()
  grads = grads_seq(params)
  bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), grads[0])
  with_nan = [*grads[:2], bad, *grads[2:]]
  traj, _ = run(optax.apply_if_finite(build(name), max_consecutive_errors=3), params, with_nan)
  ref, _ = run(build(name), params, grads)
  assert_trees(traj[2], traj[1])  # the NaN step is skipped
  assert_trees(traj[-1], ref[-1])  # and leaves no trace: bit-identical


@BF16_WARNING
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("acc", [None, jnp.float32])
def test_bf16_params(name, acc):
  params = make_params(jnp.bfloat16)
  opt = build(name, accumulator_dtype=acc)
  traj, state = run(opt, params, grads_seq(params, n=2))
  u, _ = jitted_update(opt)(grads_seq(params, n=1)[0], state, traj[-1])
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(traj[-1]))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(traj[-1]))
  # Accumulators (state leaves shaped like a param): the params' dtype, or
  # accumulator_dtype when given.
  shapes = {x.shape for x in jax.tree.leaves(params)}
  acc_leaves = [x for x in jax.tree.leaves(state) if x.ndim > 0 and x.shape in shapes]
  assert acc_leaves
  want = jnp.bfloat16 if acc is None else jnp.float32
  assert all(x.dtype == want for x in acc_leaves), {x.dtype for x in acc_leaves}


@pytest.mark.parametrize("name", NAMES)
def test_bf16_dual_averages_warn_unless_the_dtype_is_chosen(name):
  """RAMDA/RMDA sum V and U over a stage; in bf16 (8 significant bits) a sum stops
  taking in increments below half its ulp. Without accumulator_dtype, bf16 params
  warn at init; an explicit dtype (float32, or bf16 knowingly) does not. The EMAs
  of ProxGen/ProxSGD/ProxSSI do not grow: no warning."""
  params = make_params(jnp.bfloat16)
  sums = name in ("ramda", "rmda")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    build(name, accumulator_dtype=None).init(params)
  msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
  assert any("accumulator_dtype=jnp.float32" in m for m in msgs) == sums, msgs
  # The warning points at the user's call, here and through jax.jit, not into the library.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.jit(build(name, accumulator_dtype=None).init)(params)
  ours = [w for w in caught if "accumulator_dtype=jnp.float32" in str(w.message)]
  assert len(ours) == sums
  assert all(w.filename == __file__ for w in ours), [(w.filename, w.lineno) for w in ours]
  for acc in (jnp.float32, jnp.bfloat16):
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      build(name, accumulator_dtype=acc).init(params)


def test_warning_from_a_notebook_cell_points_at_the_cell():
  """Code without a file (a notebook cell, ``python -c``) is the user's too."""
  code = compile("build('ramda', accumulator_dtype=None).init(params)", "<ipython-input-1>",
                 "exec")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    exec(code, {"build": build, "params": make_params(jnp.bfloat16)})
  ours = [w for w in caught if "accumulator_dtype=jnp.float32" in str(w.message)]
  assert [(w.filename, w.lineno) for w in ours] == [("<ipython-input-1>", 1)]


@BF16_WARNING
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("acc", [None, jnp.float32])
def test_bf16_trajectory_follows_float32(name, acc):
  """bf16 params end within a few bf16 roundings of the float32 run.

  Each of the STEPS steps rounds the params to bf16 (8 bits: an ulp is
  2^-7 of the leading power of two), so they may drift by a few ulps of the
  largest param; a wrong update is off by the steps' size or more (in bf16
  Adam's b2 = 0.999 rounds to 1, which used to leave v at 0 and make
  ProxGen's step lr * m / eps).
  """
  p16 = make_params(jnp.bfloat16)
  f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
  g16 = grads_seq(p16)
  t16, _ = run(build(name, accumulator_dtype=acc), p16, g16)
  t32, _ = run(build(name), f32(p16), [f32(g) for g in g16])
  top = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(t32[-1]))
  ulp = 2.0 ** (np.floor(np.log2(top)) - 7)
  diff = max(
      float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
      for a, b in zip(jax.tree.leaves(t16[-1]), jax.tree.leaves(t32[-1]))
  )
  pairs = zip(jax.tree.leaves(t32[-1]), jax.tree.leaves(f32(p16)))
  move = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)
  assert move > 4 * ulp  # the bound below is tighter than the steps taken
  assert diff <= 4 * ulp, (diff, ulp, move)


@pytest.mark.parametrize("name", NAMES)
def test_extra_args_accepted(name):
  params = make_params()
  opt = clipped(name)
  a, _ = run(opt, params, grads_seq(params), value=jnp.float32(1.0), unknown=jnp.ones(3))
  b, _ = run(opt, params, grads_seq(params))
  assert_trees(a, b)
  assert isinstance(build(name), optax.GradientTransformationExtraArgs)


@pytest.mark.parametrize(
    "name,solver", [(n, None) for n in NAMES] + [("ramda", "pg"), ("ramda", "pg_fused")]
)
def test_vmap_over_an_ensemble_follows_each_member(name, solver):
  """``jax.vmap`` of init and STEPS updates over 3 models (an ensemble, one of
  them with a zero group) gives each member's params and state as its own
  run: the solvers' loops stop per group (or leaf) under vmap too. Within
  rounding: batched reductions may add in another order (bit for bit on these
  small models on CPU, measured; not on larger ones)."""
  opt = build(name) if solver is None else build(name, solver=solver)
  members = [jax.tree.map(lambda x, k=k: x * (1 + 0.3 * k), make_params()) for k in range(3)]
  members[1]["dense"]["kernel"] = members[1]["dense"]["kernel"].at[:, 0].set(0)
  grads = [grads_seq(m, seed=10 + k) for k, m in enumerate(members)]

  def train(params, gs):
    state = opt.init(params)
    for g in gs:
      updates, state = opt.update(g, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  together = jax.jit(jax.vmap(train))(stack(members), [stack(g) for g in zip(*grads)])
  for k, (m, g) in enumerate(zip(members, grads)):
    assert_trees(jax.tree.map(lambda x, k=k: x[k], together), jax.jit(train)(m, g),
                 rtol=1e-5, atol=1e-6)
