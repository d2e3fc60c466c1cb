"""Multi-device training on 8 simulated CPU devices (tests/conftest.py).

Data parallel with NamedSharding, FSDP-style sharded params (group norms
across shards), shard_map with pmean, and pmap: each must follow the
single-device trajectory within float32 tolerance, and the optimizer state
must keep the sharding of the params it mirrors.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ramda
from optax_ramda import presets

STEPS = 4
# Batch means and group norms are reduced in a different order across 8
# shards than on one device: float32 rounding (~1e-7 relative per op), grown
# over 4 steps. The PG solver runs a fixed number of iterations (see
# test_contract.FIXED_ITERS) so its answer is a smooth function of the input.
TOL = dict(rtol=2e-5, atol=2e-6)


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
}


def make_step(opt):
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def single_device(opt):
  params = init_params()
  state = opt.init(params)
  x, y = data()
  step = jax.jit(make_step(opt))
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  return params


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


@pytest.mark.parametrize("name", sorted(OPTS))
def test_shard_map_pmean(name):
  opt = OPTS[name]()
  mesh = Mesh(np.array(jax.devices()), ("data",))

  def step(params, state, x, y):
    grads = jax.lax.pmean(jax.grad(loss_fn)(params, x, y), "data")
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  # check_vma=False: per-device gradients, averaged by the explicit pmean.
  # (With jax's default check_vma=True, the gradient of a replicated input is
  # already summed over devices, and a pmean on top would be a no-op.)
  sharded = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P()),
      check_vma=False,
  ))
  params = init_params()
  state = opt.init(params)
  x, y = data()
  for _ in range(STEPS):
    params, state = sharded(params, state, x, y)
  assert_close(params, single_device(opt))


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
