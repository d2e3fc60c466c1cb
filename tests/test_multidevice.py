"""Multi-device training on 8 simulated CPU devices (tests/conftest.py).

Data parallel with NamedSharding, FSDP-style sharded params (group norms
across shards), shard_map with pmean, and pmap: each must follow the
single-device trajectory within float32 tolerance, and the optimizer state
must keep the sharding of the params it mirrors. Inside shard_map a param
sharded along a group's reduce axis is refused (the presets at trace time,
presets.check_shard_map_specs before); sharding another axis is exact.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ramda
from optax_ramda import GroupSpec, presets
from optax_ramda._src import exact, solvers, varying

STEPS = 4
# Batch means and group norms are reduced in a different order across 8
# shards than on one device: float32 rounding (~1e-7 relative per op), grown
# over 4 steps. The PG solver runs a fixed number of iterations (see
# test_contract.FIXED_ITERS) so its answer is a smooth function of the input.
TOL = dict(rtol=2e-5, atol=2e-6)
FIXED = dict(max_iters=20, min_iters=20)  # for the PG solvers: a fixed number of sweeps


def init_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
      "fc1": {"kernel": jax.random.normal(k1, (8, 16)) * 0.5, "bias": jnp.zeros(16)},
      "fc2": {"kernel": jax.random.normal(k2, (16, 8)) * 0.5, "bias": jnp.zeros(8)},
  }


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  out = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
  return jnp.mean((out - y) ** 2)


def data():
  kx, ky = jax.random.split(jax.random.key(1))
  return jax.random.normal(kx, (32, 8)), jax.random.normal(ky, (32, 8))


REG = presets.from_params(init_params())
OPTS = {
    "ramda": lambda: optax_ramda.ramda(
        0.05, strength=0.02, regularizer=REG, momentum=0.1, max_iters=20, min_iters=20
    ),
    "prox_sgd": lambda: optax_ramda.prox_sgd(0.05, strength=0.02, regularizer=REG),
    "rmda": lambda: optax_ramda.rmda(0.05, strength=0.02, regularizer=REG, momentum=0.1),
    "prox_adamw": lambda: optax_ramda.prox_adamw(
        0.05, strength=0.02, regularizer=REG, max_iters=20, min_iters=20
    ),
    "prox_ssi": lambda: optax_ramda.prox_ssi(0.05, strength=0.02, regularizer=REG),
}


def make_step(opt):
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def run_steps(opt, step):
  """``STEPS`` calls of ``step(params, state, x, y)`` from fresh params; the final params."""
  params = init_params()
  state = opt.init(params)
  x, y = data()
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  return params


def single_device(opt):
  return run_steps(opt, jax.jit(make_step(opt)))


def assert_close(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), **TOL)


def names_of(path):
  return presets.path_names(path)


def assert_state_mirrors(state, params):
  """Every state leaf with a param's path suffix and shape has its sharding."""
  by_suffix = {names_of(p)[-2:]: x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  checked = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    param = by_suffix.get(names_of(path)[-2:])
    if param is None or leaf.shape != param.shape or leaf.ndim == 0:
      continue
    assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), (
        jax.tree_util.keystr(path), leaf.sharding, param.sharding)
    checked += 1
  assert checked > 0


@pytest.mark.parametrize("name", sorted(OPTS))
def test_data_parallel_named_sharding(name):
  opt = OPTS[name]()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P("data"))
  params = jax.device_put(init_params(), replicated)
  state = jax.jit(opt.init)(params)
  x, y = (jax.device_put(a, batch) for a in data())
  step = jax.jit(make_step(opt), donate_argnums=(0, 1))
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  assert_close(params, single_device(opt))
  assert_state_mirrors(state, params)
  assert all(p.sharding.is_fully_replicated for p in jax.tree.leaves(params))


@pytest.mark.parametrize("name", sorted(OPTS))
def test_fsdp_sharded_params_groups_cross_shards(name):
  """fc1's input-wise groups reduce axis 1, which is split over 8 devices."""
  opt = OPTS[name]()
  mesh = Mesh(np.array(jax.devices()), ("model",))
  specs = {
      "fc1": {"kernel": P(None, "model"), "bias": P("model")},  # groups cross shards
      "fc2": {"kernel": P("model", None), "bias": P()},  # one group per shard row
  }
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  params = jax.device_put(init_params(), shardings)
  # Eager init: zeros_like of a concrete sharded array keeps its sharding
  # (as for any optax optimizer; under jit, pass out_shardings instead).
  state = opt.init(params)
  assert_state_mirrors(state, params)
  x, y = data()
  step = jax.jit(make_step(opt), out_shardings=(shardings, None), donate_argnums=(0, 1))
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  assert_close(params, single_device(opt))
  assert_state_mirrors(state, params)


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("name", sorted(OPTS))
def test_shard_map_pmean(name, check_vma):
  opt = OPTS[name]()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  n = mesh.devices.size

  def step(params, state, x, y):
    if check_vma:
      # JAX's types: the gradient of the replicated params comes back summed
      # over the devices (a pmean on top would change nothing); the mean loss
      # over devices gives the mean gradient.
      grads = jax.grad(lambda p: loss_fn(p, x, y) / n)(params)
    else:
      # Per-device gradients, averaged by the explicit pmean.
      grads = jax.lax.pmean(jax.grad(loss_fn)(params, x, y), "data")
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  sharded = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P()),
      check_vma=check_vma,
  ))
  assert_close(run_steps(opt, sharded), single_device(opt))


@pytest.mark.parametrize("name", sorted(OPTS))
def test_pmap(name):
  opt = OPTS[name]()
  n = jax.local_device_count()

  def step(params, state, x, y):
    grads = jax.lax.pmean(jax.grad(loss_fn)(params, x, y), "data")
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # pmap is deprecated in jax 0.10
    pstep = jax.pmap(step, axis_name="data")
    replicate = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), t)
    params = replicate(init_params())
    state = replicate(opt.init(init_params()))
    x, y = (a.reshape(n, -1, *a.shape[1:]) for a in data())
    for _ in range(STEPS):
      params, state = pstep(params, state, x, y)
  assert_close(jax.tree.map(lambda a: a[0], params), single_device(opt))
  for leaf in jax.tree.leaves(params):  # every replica holds the same params
    leaf = np.asarray(leaf)
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))


# --- shard_map with sharded params: groups must not be split -----------------------------

SPLIT_GROUPS = {"fc1": {"kernel": P(None, "model"), "bias": P()}, "fc2": P()}  # reduce axis 1
WHOLE_GROUPS = {"fc1": P(), "fc2": {"kernel": P("model", None), "bias": P()}}  # rows whole


def sharded_step(opt, specs, check_vma):
  """shard_map step on a ``model`` mesh; the loss gathers the sharded kernels."""
  mesh = Mesh(np.array(jax.devices()), ("model",))
  full_specs = jax.tree.map(  # the prefix tree, one spec per param leaf
      lambda s, sub: jax.tree.map(lambda _: s, sub), specs, init_params(),
      is_leaf=lambda x: isinstance(x, P),
  )
  by_shape = {
      np.shape(x): s
      for x, s in zip(jax.tree.leaves(init_params()), jax.tree.leaves(full_specs))
  }

  def axis_of(s):
    return next((i for i, e in enumerate(s) if e is not None), None)

  def step(params, state, x, y):
    def gather(a, s):
      ax = axis_of(s)
      return a if ax is None else jax.lax.all_gather(a, "model", axis=ax, tiled=True)

    if check_vma:
      # JAX's types know the gather: the gradient of each param comes back summed
      # over the devices (psum_scatter for a sharded one, psum for a replicated
      # one), each of which computed the whole loss.
      n = mesh.devices.size
      grads = jax.grad(
          lambda p: loss_fn(jax.tree.map(gather, p, full_specs), x, y) / n)(params)
    else:
      full = jax.tree.map(gather, params, full_specs)
      g_full = jax.grad(loss_fn)(full, x, y)
      idx = jax.lax.axis_index("model")

      def local(g, a, s):
        ax = axis_of(s)
        if ax is None:
          return g
        return jax.lax.dynamic_slice_in_dim(g, idx * a.shape[ax], a.shape[ax], ax)

      grads = jax.tree.map(local, g_full, params, full_specs)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state_specs = jax.tree.map(lambda a: by_shape.get(np.shape(a), P()), opt.init(init_params()))
  return jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(full_specs, state_specs, P(), P()),
      out_specs=(full_specs, state_specs), check_vma=check_vma,
  ))


@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_split_groups_raise_naming_the_path(check_vma):
  """fc1's input-wise groups reduce axis 1; sharding it in shard_map is refused."""
  opt = OPTS["prox_sgd"]()
  step = sharded_step(opt, SPLIT_GROUPS, check_vma)
  params = init_params()
  with pytest.raises(ValueError, match=r"parameter fc1/kernel has local shape \(8, 2\) "
                     r"inside jax.shard_map.*axis 1.*jax.jit and NamedSharding"):
    step(params, opt.init(params), *data())


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("name", sorted(OPTS))
def test_shard_map_whole_groups_follow_single_device(name, check_vma):
  """fc2 sharded along axis 0 (its groups are rows): allowed, and exact (the PG
  solver runs a fixed number of iterations, see docs/flax_and_distributed.md),
  with JAX's varying-axes check (the default) or without."""
  opt = OPTS[name]()
  presets.check_shard_map_specs(REG, init_params(), WHOLE_GROUPS)
  step = sharded_step(opt, WHOLE_GROUPS, check_vma=check_vma)
  assert_close(run_steps(opt, step), single_device(opt))


def test_check_shard_map_specs():
  params = init_params()
  with pytest.raises(ValueError, match=r"(?s)\['fc1'\]\['kernel'\].*axis 1 over mesh "
                     r"axis model; use P\(\).*jax.jit and NamedSharding"):
    presets.check_shard_map_specs(REG, params, SPLIT_GROUPS)
  # Every offending leaf is listed; a hand-written group_lasso is checked too.
  reg = optax_ramda.group_lasso({"fc1": {"kernel": GroupSpec((0,)), "bias": GroupSpec(())},
                                 "fc2": {"kernel": GroupSpec((0, 1)), "bias": None}})
  specs = {"fc1": {"kernel": P("model", None), "bias": P("model")}, "fc2": P(None, "model")}
  with pytest.raises(ValueError, match=r"(?s)\['fc1'\]\['kernel'\].*\['fc2'\]\['kernel'\]"
                     r".*use P\(\)"):
    presets.check_shard_map_specs(reg, params, specs)
  # The suggested spec keeps the axes the groups do not reduce over, written as users write it.
  for spec, shown, fix in [
      (P("data", "model"), "P('data', 'model')", "P('data')"),
      (P(P.UNCONSTRAINED, "model"), "P(P.UNCONSTRAINED, 'model')", "P(P.UNCONSTRAINED)"),
      # JAX 0.10 refuses to iterate a spec with unreduced axes: it used to raise there.
      (P(None, "model", unreduced={"data"}), "P(None, 'model', unreduced={'data'})", "P()"),
  ]:
    with pytest.raises(ValueError, match=re.escape(f"{shown} shards axis 1 over mesh axis "
                                                   f"model; use {fix}")):
      presets.check_shard_map_specs(REG, params, {**SPLIT_GROUPS, "fc1": {"kernel": spec,
                                                                          "bias": P()}})
  # Replicated (a prefix P() or None), sharding whole groups, L1, size-1 mesh axes: fine.
  presets.check_shard_map_specs(REG, params, P())
  presets.check_shard_map_specs(REG, params, None)
  presets.check_shard_map_specs(REG, params, WHOLE_GROUPS)
  presets.check_shard_map_specs(optax_ramda.l1(), params, jax.tree.map(lambda _: P("m"), params))
  one = Mesh(np.array(jax.devices()[:1]), ("model",))
  presets.check_shard_map_specs(REG, params, SPLIT_GROUPS, mesh=one)
  # NamedSharding leaves carry their mesh.
  mesh = Mesh(np.array(jax.devices()), ("model",))
  named = jax.tree.map(lambda s: NamedSharding(mesh, s), SPLIT_GROUPS,
                       is_leaf=lambda x: isinstance(x, P))
  with pytest.raises(ValueError, match=r"\['fc1'\]\['kernel'\]"):
    presets.check_shard_map_specs(REG, params, named)
  with pytest.raises(ValueError, match="prefix of the params"):
    presets.check_shard_map_specs(REG, params, {"fc1": P()})


def test_preset_shape_check_only_inside_shard_map():
  """Outside shard_map a preset accepts other shapes (e.g. a compacted model)."""
  small = {"fc1": {"kernel": jnp.ones((8, 2)), "bias": jnp.ones(2)},
           "fc2": {"kernel": jnp.ones((2, 8)), "bias": jnp.ones(8)}}
  assert REG.leaves(small)["fc1"]["kernel"].group_size == 2
  jax.jit(REG.value)(small)


@pytest.mark.parametrize("kernel_spec, ok", [(P(None, "model"), False), (P("model", None), True)])
def test_from_nnx_shard_check(kernel_spec, ok):
  """The check also runs for presets.from_nnx (paths of nnx.state / nnx.Optimizer)."""
  from flax import nnx

  model = nnx.Linear(8, 16, rngs=nnx.Rngs(0))
  reg = presets.from_nnx(model)  # input-wise: the kernel's groups reduce axis 1
  params = nnx.state(model, nnx.Param)
  specs = jax.tree.map(lambda x: kernel_spec if x.ndim == 2 else P(), params)
  mesh = Mesh(np.array(jax.devices()), ("model",))
  value = jax.jit(jax.shard_map(
      reg.value, mesh=mesh, in_specs=(specs,), out_specs=P(), check_vma=False
  ))
  if ok:
    value(params)
  else:
    with pytest.raises(ValueError, match=r"parameter kernel has local shape \(8, 2\)"):
      value(params)


def test_check_shard_map_specs_attention_heads():
  """Tied head groups (attention="head"): sharding q/k/v/out along the head axis
  keeps each joint group on one device; sharding only some of them is refused."""
  from flax import nnx

  att = nnx.MultiHeadAttention(num_heads=8, in_features=8, qkv_features=16, decode=False,
                               rngs=nnx.Rngs(0))
  reg = presets.from_nnx(att)
  params = nnx.state(att, nnx.Param)
  heads = {"query": P(None, "model"), "key": P(None, "model"), "value": P(None, "model"),
           "out": P("model")}

  def specs(out_kernel):
    def one(path, x):
      names = presets.path_names(path)
      if names[-1] == "kernel":
        return out_kernel if names[0] == "out" else heads[names[0]]
      return P("model") if names[0] != "out" else P()  # q/k/v biases (heads, head_dim)
    return jax.tree_util.tree_map_with_path(one, params)

  presets.check_shard_map_specs(reg, params, specs(heads["out"]))
  # ... and then the prox inside shard_map (one head per device) is the unsharded one.
  mesh = Mesh(np.array(jax.devices()), ("model",))
  good = specs(heads["out"])
  prox = jax.jit(jax.shard_map(lambda p: reg.prox(p, 0.5), mesh=mesh, in_specs=(good,),
                               out_specs=good, check_vma=False))
  for a, b in zip(jax.tree.leaves(prox(params)), jax.tree.leaves(reg.prox(params, 0.5))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  unlike = (r"(?s)tie '' joins .*\['out'\]\['kernel'\]\S* \(group axes \(8,\), "
            r"sharded as \(None,\)\).*shard their group axes the same way")
  with pytest.raises(ValueError, match=unlike):
    presets.check_shard_map_specs(reg, params, specs(P()))
  # Sharding the heads' reduce axis (head_dim) is refused too.
  with pytest.raises(ValueError, match=r"\['out'\]\['kernel'\].*axis 1 over mesh axis model"):
    presets.check_shard_map_specs(reg, params, specs(P(None, "model")))


# --- shard_map with JAX's varying-axes check (check_vma=True, the default) ---------------

@pytest.mark.parametrize("solver", sorted(solvers.SOLVERS))
@pytest.mark.parametrize("make", [optax_ramda.ramda, optax_ramda.prox_adamw])
def test_shard_map_check_vma_every_solver(make, solver):
  """Each group solver's loops trace with a sharded leaf (their carries start
  from the leaf's data), the params follow the single-device run, and the
  solver diagnostics are those of the whole leaf on every device."""
  opt = make(0.05, strength=0.02, regularizer=REG, solver=solver, track_residual=True, **FIXED)

  def run(step):
    params, state, (x, y) = init_params(), opt.init(init_params()), data()
    for _ in range(STEPS):
      params, state = step(params, state, x, y)
    return params, optax_ramda.solve_diagnostics(state, params)

  params, diag = run(sharded_step(opt, WHOLE_GROUPS, check_vma=True))
  ref_params, ref_diag = run(jax.jit(make_step(opt)))
  assert_close(params, ref_params)
  assert jax.tree.map(int, diag.iterations) == jax.tree.map(int, ref_diag.iterations)
  assert int(diag.iterations["fc2"]["kernel"]) > 0
  # PG (track_residual): the whole leaf's subgradient norm, the shards' in
  # quadrature. Exact solver: secular residuals at round-off level, which
  # differ between the layouts (test_combine_leaf_diagnostics_over_shards
  # checks the arithmetic).
  r, r_ref = (np.array(jax.tree.leaves(d.residual)) for d in (diag, ref_diag))
  if solver == "exact":
    assert np.all((r >= 0) & (r <= 1e-6)) and np.all((r_ref >= 0) & (r_ref <= 1e-6))
  else:
    assert r[3] > 1e-5  # fc2/kernel, sharded: far from round-off
    np.testing.assert_allclose(r, r_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("solver", sorted(solvers.SOLVERS))
def test_shard_map_check_vma_replicated_and_sharded_leaves_of_one_shape(solver):
  """A replicated leaf and a sharded one with the same local shape and
  grouping: the exact solver stacks same-shape leaves into one batch, which
  would make the replicated leaf's update typed as sharded (refused by
  out_specs=P()); they are kept apart. Updates as on one device."""
  mesh = Mesh(np.array(jax.devices()), ("model",))
  n = mesh.devices.size
  k = jax.random.split(jax.random.key(3), 4)
  params = {"a": jax.random.normal(k[0], (4, 3)), "b": jax.random.normal(k[1], (4 * n, 3))}
  grads = {"a": jax.random.normal(k[2], (4, 3)), "b": jax.random.normal(k[3], (4 * n, 3))}
  reg = optax_ramda.group_lasso(GroupSpec((1,)))
  opt = optax_ramda.ramda(0.1, strength=0.5, regularizer=reg, solver=solver, **FIXED)

  def update(g, p):
    return opt.update(g, opt.init(p), p)[0]

  specs = {"a": P(), "b": P("model", None)}
  got = jax.jit(jax.shard_map(update, mesh=mesh, in_specs=(specs, specs), out_specs=specs))(
      grads, params)
  assert_close(got, jax.jit(update)(grads, params))


def test_shard_map_check_vma_chunked_exact_solve(monkeypatch):
  """The exact solver's chunk loops (forced on at this size) trace too."""
  monkeypatch.setattr(exact, "_chunking_pays", lambda: True)  # conftest: 8 devices
  monkeypatch.setattr(exact, "CHUNK_FROM", 16)
  monkeypatch.setattr(exact, "CHUNK_ENTRIES", 8)
  monkeypatch.setattr(exact, "MIN_CHUNK_ENTRIES", 1)
  chunked = []

  def spy(name):
    f = getattr(exact, name)

    def solve(*args, **kw):
      chunked.append(name)
      return f(*args, **kw)

    return solve

  for name in ("_solve_chunked", "_solve_chunked_leaves"):
    monkeypatch.setattr(exact, name, spy(name))
  opt = OPTS["ramda"]()
  step = sharded_step(opt, WHOLE_GROUPS, check_vma=True)
  assert_close(run_steps(opt, step), single_device(opt))
  assert "_solve_chunked" in chunked


def test_shard_map_check_vma_nuclear_per_device_blocks():
  """A nuclear-norm leaf whose rows are split over devices is solved per
  block (check_shard_map_specs refuses that spec; it is the per-device
  semantics): the nuclear PG loop traces, each block's update is that of
  the block alone, and the iterations reported are the slowest block's."""
  mesh = Mesh(np.array(jax.devices()), ("model",))
  n = mesh.devices.size
  reg = optax_ramda.nuclear_norm({"w": optax_ramda.NuclearSpec()})
  opt = optax_ramda.ramda(0.1, strength=0.5, regularizer=reg)
  kw, kg = jax.random.split(jax.random.key(2))
  params = {"w": jax.random.normal(kw, (4 * n, 3))}
  grads = {"w": jax.random.normal(kg, (4 * n, 3))}

  def update(g, p):
    u, state = opt.update(g, opt.init(p), p)
    return u, optax_ramda.solve_diagnostics(state, p).iterations["w"][None]

  spec = {"w": P("model", None)}
  sharded = jax.jit(jax.shard_map(update, mesh=mesh, in_specs=(spec, spec),
                                  out_specs=(spec, P("model"))))
  got, iters = sharded(grads, params)
  blocks = [update({"w": g}, {"w": p}) for g, p in zip(jnp.split(grads["w"], n),
                                                      jnp.split(params["w"], n))]
  np.testing.assert_allclose(got["w"], jnp.concatenate([b[0]["w"] for b in blocks]),
                             rtol=1e-5, atol=1e-6)
  # Every device reports the leaf's slowest block (the diagnostics are combined).
  block_iters = np.concatenate([b[1] for b in blocks])
  assert len(set(block_iters.tolist())) > 1
  np.testing.assert_array_equal(iters, np.full(n, block_iters.max()))


def test_combine_leaf_diagnostics_over_shards():
  """Per device diagnostics of leaves replicated, sharded over one mesh axis
  or over both, on a 2 x 4 mesh: max iterations and relative decrease,
  residuals in quadrature over each leaf's own shards, -1 if any shard has
  -1; the results are the same on every device (out_specs P())."""
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  axes = [frozenset(), frozenset({"model"}), frozenset({"data"}),
          frozenset({"data", "model"}), frozenset({"model"})]
  d, m = np.meshgrid(np.arange(2), np.arange(4), indexing="ij")
  # Entry j's value on device (d, m): the same along the axes its leaf does not vary over.
  vals = np.stack([np.full_like(d, 3), m + 1, d + 5, 4 * d + m + 1, m + 1], -1).astype(np.float32)
  res = vals / 8
  res[0, 2, 4] = -1  # one shard of the last leaf did not measure its residual
  iters = vals.astype(np.int32)

  def f(it, rel, r):
    return varying.combine_leaf_diagnostics(it[0, 0], rel[0, 0], r[0, 0], axes, -1.0)

  spec = P("data", "model")
  out = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(spec,) * 3, out_specs=P()))(
      iters, vals, res)
  flat_v, flat_r = vals.reshape(8, 5), res.reshape(8, 5)
  np.testing.assert_array_equal(out[0], flat_v.max(0).astype(np.int32))
  np.testing.assert_array_equal(out[1], flat_v.max(0))
  want = [3 / 8, np.sqrt(np.sum(((np.arange(4) + 1) / 8) ** 2)),
          np.sqrt(np.sum((np.arange(2) + 5) ** 2)) / 8, np.sqrt(np.sum(flat_r[:, 3] ** 2)), -1]
  np.testing.assert_allclose(out[2], want, rtol=1e-6)
  # With no varying axes (outside shard_map), nothing changes and nothing is reduced.
  v = jnp.arange(3.0)
  assert all(a is b for a, b in zip(varying.combine_leaf_diagnostics(v, v, v, [frozenset()] * 3,
                                                                    -1.0), (v, v, v)))
