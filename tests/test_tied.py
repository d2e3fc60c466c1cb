"""Joint groups across leaves: GroupSpec(tie=...) (tied.py, ALGORITHMS.md §1)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_ramda
from optax_ramda import GroupSpec, presets
from optax_ramda._src import groups, tied
from optax_ramda._src.subproblem import Subproblem

IN, H, HD, OUT = 3, 4, 2, 5

TIED = {
    "q": GroupSpec((0, 2), tie="att"),  # (in, heads, hd)
    "o": GroupSpec((1, 2), tie="att"),  # (heads, hd, out)
    "w": GroupSpec((1,)),  # an untied leaf alongside
    "b": None,
}
HAND = {"m": GroupSpec((1,)), "w": GroupSpec((1,)), "b": None}


def concat(tree):
  """The hand-made single leaf of the joint groups: one row per head, the
  slices in the order of the flattened params (``o`` before ``q``)."""
  q, o = np.asarray(tree["q"]), np.asarray(tree["o"])
  return np.concatenate([o.reshape(H, -1), q.transpose(1, 0, 2).reshape(H, -1)], axis=1)


def tied_params(rng, dtype=np.float64):
  return {
      "q": rng.normal(size=(IN, H, HD)).astype(dtype),
      "o": rng.normal(size=(H, HD, OUT)).astype(dtype),
      "w": rng.normal(size=(6, 3)).astype(dtype),
      "b": rng.normal(size=(5,)).astype(dtype),
  }


def to_hand(tree):
  return {"m": concat(tree), "w": tree["w"], "b": tree["b"]}


def block_soft_threshold(y, thr):
  """numpy: each row of ``y`` shrunk by ``thr * sqrt(row size)``."""
  n = np.linalg.norm(y, axis=1, keepdims=True)
  t = thr * np.sqrt(y.shape[1])
  return y * np.maximum(n - t, 0) / np.where(n > 0, n, 1)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize(
    "shapes_axes",
    [
        [((3, 4, 2), (0, 2)), ((4, 2, 5), (1, 2)), ((3, 4, 2), (0, 2))],
        [((2, 3, 3), (1,)), ((6, 5), (1,)), ((3, 2, 1), ()), ((6,), ())],  # 6 groups
        [((4, 3), (0,)), ((2, 3), (0,))],
    ],
)
def test_pack_unpack_round_trip_is_exact(shapes_axes):
  rng = np.random.default_rng(0)
  leaves, arrays, names = [], [], []
  for i, (shape, axes) in enumerate(shapes_axes):
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    leaves.append(groups.group_leaf(GroupSpec(axes, tie="t"), x, f"x{i}"))
    arrays.append(x)
    names.append(f"x{i}")
  # An untied leaf in between stays as it is.
  leaves.insert(1, groups.UNREGULARIZED)
  arrays.insert(1, jnp.arange(3.0))
  tied.check_ties(["a", "u", "b", "c", "d"][: len(leaves)], leaves)
  plan = tied.packing(leaves, [x.shape for x in arrays])
  assert not plan.trivial and len(plan.leaves) == 2
  packed = plan.pack(arrays)
  joint = plan.leaves[0]
  total = sum(leaf.group_size for leaf in leaves if isinstance(leaf, groups.GroupLeaf))
  assert packed[0].shape == (joint.num_groups, total)
  assert joint.reduce_axes == (1,) and joint.weight == np.sqrt(total)
  assert packed[1] is arrays[1]
  back = plan.unpack(packed)
  for a, b in zip(arrays, back):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  # Under jit too.
  back = jax.jit(lambda xs: plan.unpack(plan.pack(xs)))(arrays)
  for a, b in zip(arrays, back):
    np.testing.assert_array_equal(a, b)


def test_packing_is_trivial_without_ties():
  x = jnp.ones((3, 4))
  leaf = groups.group_leaf(GroupSpec((1,)), x, "x")
  single = groups.group_leaf(GroupSpec((1,), tie="alone"), x, "y")
  plan = tied.packing([leaf, single, groups.UNREGULARIZED], [(3, 4)] * 3)
  assert plan.trivial
  assert plan.pack([x, x, x])[0] is x


def test_scalar_metrics_stay_scalar_and_mixed_ones_broadcast():
  leaves = groups.resolve(TIED, tied_params(np.random.default_rng(0), np.float32))
  flat = jax.tree.leaves(leaves)
  shapes = [(5,), (H, HD, OUT), (IN, H, HD), (6, 3)]  # sorted keys: b, o, q, w
  plan = tied.packing(flat, shapes)
  beta = jnp.asarray(2.0)
  packed = plan.pack([beta, beta, beta, beta])
  assert all(jnp.ndim(p) == 0 for p in packed)
  mixed = plan.pack([beta, beta, jnp.full((IN, H, HD), 3.0), beta])
  joint = next(p for p in mixed if jnp.ndim(p) == 2 and p.shape[0] == H)
  np.testing.assert_array_equal(joint[:, : HD * OUT], 2.0)  # o, then q
  np.testing.assert_array_equal(joint[:, HD * OUT:], 3.0)


def test_value_and_prox_are_those_of_the_joint_groups(x64):
  params = tied_params(np.random.default_rng(1))
  reg = optax_ramda.group_lasso(TIED)
  m = concat(params)
  expected = np.sqrt(m.shape[1]) * np.linalg.norm(m, axis=1).sum()
  expected += np.sqrt(3) * np.linalg.norm(params["w"], axis=1).sum()
  np.testing.assert_allclose(reg.value(jax.tree.map(jnp.asarray, params)), expected, rtol=1e-13)
  # A threshold that zeros some heads but not all.
  norms = np.linalg.norm(m, axis=1) / np.sqrt(m.shape[1])
  thr = float(np.median(norms))
  out = reg.prox(jax.tree.map(jnp.asarray, params), thr)
  want = block_soft_threshold(m, thr)
  assert 0 < np.sum(np.all(want == 0, axis=1)) < H
  np.testing.assert_allclose(concat(out), want, rtol=1e-13, atol=1e-15)
  np.testing.assert_allclose(out["w"], block_soft_threshold(params["w"], thr), rtol=1e-13)
  np.testing.assert_array_equal(out["b"], params["b"])
  # A zeroed head is zero in both kernels, exactly.
  zero = np.all(want == 0, axis=1)
  np.testing.assert_array_equal(np.all(np.asarray(out["q"]) == 0, axis=(0, 2)), zero)
  np.testing.assert_array_equal(np.all(np.asarray(out["o"]) == 0, axis=(1, 2)), zero)


def _subproblem(rng, metric):
  centre = tied_params(rng)
  linear = jax.tree.map(lambda x: rng.normal(size=x.shape), centre)
  if metric == "scalar":
    p = jax.tree.map(lambda _: jnp.asarray(1.7), centre)
  else:
    p = jax.tree.map(lambda x: rng.uniform(0.1, 3.0, size=x.shape), centre)
  warm = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape), centre)
  return centre, linear, p, warm


def _hand_sub(centre, linear, p, warm):
  conv = lambda t: to_hand(t) if np.ndim(t["q"]) else {"m": t["q"], "w": t["w"], "b": t["b"]}
  return conv(centre), conv(linear), conv(p), conv(warm)


def _solve(spec, fields, solver, strength, scale):
  sol = optax_ramda.solve_subproblem(
      optax_ramda.group_lasso(spec), strength=strength, solver=solver, rtol=1e-10, max_iters=50
  )
  centre, linear, p, warm = (jax.tree.map(jnp.asarray, f) for f in fields)
  sub = Subproblem(centre, linear, p, jnp.asarray(scale), warm)
  state = sol.init(centre)
  new_point, st = jax.jit(sol.update)(sub, state, centre)
  return new_point.z, st


def test_closed_form_prox_is_block_soft_threshold_of_the_joint_group(x64):
  rng = np.random.default_rng(2)
  centre, linear, p, warm = _subproblem(rng, "scalar")
  y = concat(centre) - concat(linear) / 1.7
  # t = scale * strength * sqrt(|g|); closed form: shrink y by t / p.
  scale, strength = 2.0, 0.6
  norms = np.linalg.norm(y, axis=1) / np.sqrt(y.shape[1])
  strength = float(np.median(norms)) * 1.7 / scale
  z, _ = _solve(TIED, (centre, linear, p, warm), None, strength, scale)
  want = block_soft_threshold(y, scale * strength / 1.7)
  assert 0 < np.sum(np.all(want == 0, axis=1)) < H
  np.testing.assert_allclose(concat(z), want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("solver", ["pg", "pg_fused", "exact"])
def test_diagonal_solvers_equal_the_hand_concatenated_leaf(x64, solver):
  rng = np.random.default_rng(3)
  fields = _subproblem(rng, "diagonal")
  # Group g is zero iff ||(P * x0 - V)_g|| <= t (§6): a threshold between them.
  b = concat(fields[2]) * concat(fields[0]) - concat(fields[1])
  strength = float(np.median(np.linalg.norm(b, axis=1))) / np.sqrt(b.shape[1])
  z, st = _solve(TIED, fields, solver, strength, 1.0)
  z_hand, st_hand = _solve(HAND, _hand_sub(*fields), solver, strength, 1.0)
  np.testing.assert_allclose(concat(z), z_hand["m"], rtol=1e-13, atol=1e-15)
  np.testing.assert_allclose(z["w"], z_hand["w"], rtol=1e-13, atol=1e-15)
  np.testing.assert_allclose(z["b"], z_hand["b"], rtol=1e-13)
  zero = np.all(np.asarray(z_hand["m"]) == 0, axis=1)
  assert 0 < zero.sum() < H  # a real mix of zeroed and kept heads
  np.testing.assert_array_equal(np.all(np.asarray(z["q"]) == 0, axis=(0, 2)), zero)
  np.testing.assert_array_equal(np.all(np.asarray(z["o"]) == 0, axis=(1, 2)), zero)
  # The joint solve's diagnostics are reported for each of its leaves.
  its = optax_ramda.solve_diagnostics(st, z).iterations
  its_hand = optax_ramda.solve_diagnostics(st_hand, z_hand).iterations
  for name in ("q", "o"):
    assert int(its[name]) == int(its_hand["m"])


@pytest.mark.parametrize(
    "make", [
        lambda reg: optax_ramda.ramda(0.1, strength=0.05, regularizer=reg, momentum=0.5),
        lambda reg: optax_ramda.ramda(0.1, strength=0.05, regularizer=reg, solver="exact"),
        lambda reg: optax_ramda.rmda(0.1, strength=0.05, regularizer=reg, momentum=0.5),
        lambda reg: optax_ramda.prox_adamw(0.1, strength=0.05, regularizer=reg),
        lambda reg: optax_ramda.prox_sgd(0.1, strength=0.5, regularizer=reg),
    ],
    ids=["ramda", "ramda_exact", "rmda", "prox_adamw", "prox_sgd"],
)
def test_optimizers_on_ties_equal_the_hand_concatenated_leaf(x64, make):
  rng = np.random.default_rng(4)
  params = jax.tree.map(jnp.asarray, tied_params(rng))
  hand = jax.tree.map(jnp.asarray, to_hand(params))
  tx, tx_hand = make(optax_ramda.group_lasso(TIED)), make(optax_ramda.group_lasso(HAND))
  state, state_hand = tx.init(params), tx_hand.init(hand)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  step_hand = jax.jit(lambda g, s, p: tx_hand.update(g, s, p))
  for _ in range(4):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
    u, state = step(grads, state, params)
    params = optax.apply_updates(params, u)
    u, state_hand = step_hand(to_hand(grads), state_hand, hand)
    hand = optax.apply_updates(hand, u)
  np.testing.assert_allclose(concat(params), hand["m"], rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(params["w"], hand["w"], rtol=1e-12, atol=1e-14)


def test_mismatched_tie_names_the_paths():
  params = {"a": jnp.ones((3, 4)), "b": jnp.ones((3, 5)), "c": jnp.ones(2)}
  spec = {"a": GroupSpec((1,), tie="t"), "b": GroupSpec((0,), tie="t"), "c": None}
  with pytest.raises(ValueError, match=r"(?s)tie='t'.*\['a'\]: 3 groups.*\['b'\]: 5 groups"):
    groups.resolve(spec, params)
  with pytest.raises(ValueError, match=r"tie='t'"):
    optax_ramda.rmda(0.1, 1e-3, optax_ramda.group_lasso(spec)).init(params)
  with pytest.raises(TypeError, match="tie must be a name"):
    GroupSpec((1,), tie=3)


def test_structure_counts_a_joint_group_once():
  params = jax.tree.map(jnp.asarray, tied_params(np.random.default_rng(5), np.float32))
  params["q"] = params["q"].at[:, 0].set(0)
  params["o"] = params["o"].at[0].set(0)  # head 0: all slices zero
  params["q"] = params["q"].at[:, 1].set(0)  # head 1: only its query slice
  params["w"] = params["w"].at[2].set(0)
  r = optax_ramda.structure(params, optax_ramda.group_lasso(TIED))
  joint = IN * HD + HD * OUT
  np.testing.assert_allclose(r.group_sparsity, 2 / (H + 6))
  np.testing.assert_allclose(r.weighted_group_sparsity, (joint + 3) / (H * joint + 18))
  assert int(r.per_leaf["['q']"].zero_groups) == 1 == int(r.per_leaf["['o']"].zero_groups)
  assert r.per_leaf["['q']"].group_size == IN * HD and r.per_leaf["['q']"].num_groups == H
  assert int(r.per_leaf["['q']"].zero_entries) == 2 * IN * HD
  assert int(r.per_leaf["['w']"].zero_groups) == 1
  hand = optax_ramda.structure(to_hand(params), optax_ramda.group_lasso(HAND))
  np.testing.assert_allclose(r.group_sparsity, hand.group_sparsity)
  np.testing.assert_allclose(r.weighted_group_sparsity, hand.weighted_group_sparsity)
  jit_r = jax.jit(lambda p: optax_ramda.structure(p, optax_ramda.group_lasso(TIED)))(params)
  np.testing.assert_allclose(jit_r.group_sparsity, r.group_sparsity)


class Attn(nnx.Module):
  def __init__(self, rngs):
    self.att = nnx.MultiHeadAttention(
        num_heads=4, in_features=8, qkv_features=16, decode=False, rngs=rngs
    )
    self.fc = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.fc(self.att(x).mean(1))


def head_zero_flags(params):
  """Per head, whether each of the four slices is exactly zero: (4, heads)."""
  att = params["att"]
  q, k, v = (np.asarray(att[n]["kernel"][...]) for n in ("query", "key", "value"))
  o = np.asarray(att["out"]["kernel"][...])
  return np.stack([np.all(x == 0, axis=(0, 2)) for x in (q, k, v)] + [np.all(o == 0, axis=(1, 2))])


@pytest.mark.parametrize(
    "make",
    [
        # momentum 1: the params are z itself, so zero groups show at once.
        lambda reg: optax_ramda.ramda(0.05, strength=0.03, regularizer=reg, momentum=1.0),
        lambda reg: optax_ramda.rmda(0.05, strength=1.0, regularizer=reg, momentum=1.0),
    ],
    ids=["ramda", "rmda"],
)
def test_training_zeroes_whole_heads(make):
  """Strong lambda: whole heads (all four slices) become exactly zero together.
  (Observed: heads 1-3 zero, head 0 kept.)"""
  model = Attn(nnx.Rngs(0))
  # Scale head 0 up so it survives a lambda that kills the others.
  kernels = [model.att.query.kernel, model.att.key.kernel, model.att.value.kernel]
  for k in kernels:
    k[...] = k[...].at[:, 0].multiply(3.0)
  model.att.out.kernel[...] = model.att.out.kernel[...].at[0].multiply(3.0)
  reg = presets.from_nnx(model, dense=None)
  optimizer = nnx.Optimizer(model, make(reg), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(0), (16, 5, 8))
  y = jax.random.normal(jax.random.key(1), (16, 2))

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  for _ in range(15):
    train_step(model, optimizer, x, y)
  flags = head_zero_flags(nnx.state(model, nnx.Param))
  # Each head's four slices are zero together or not at all.
  assert np.all(flags == flags[:1]), flags
  assert flags[0].any() and not flags[0].all(), flags
  np.testing.assert_array_equal(presets.head_sparsity(nnx.state(model, nnx.Param))["att"], flags[0])


def test_a_tie_split_by_a_mask_is_refused():
  # With "b" masked out, the optimizer saw "a" alone and solved its rows as groups of
  # their own, while structure() and the regularizer's value count joint groups.
  params = {"a": jnp.ones((4, 3)), "b": jnp.ones((4, 2)), "c": jnp.ones((4, 2))}
  reg = optax_ramda.group_lasso({"a": GroupSpec((1,), tie="t"), "b": GroupSpec((1,), tie="t"),
                                 "c": GroupSpec((1,), tie="u")})
  opt = optax.masked(optax_ramda.prox_sgd(0.1, 5.0, reg), {"a": True, "b": False, "c": True})
  with pytest.raises(ValueError, match=r"tie='t' joins \['a'\] with \['b'\], which is masked"):
    opt.init(params)
  # A tie masked out whole, or seen whole, is fine.
  for mask in ({"a": False, "b": False, "c": True}, {"a": True, "b": True, "c": False}):
    opt = optax.masked(optax_ramda.prox_sgd(0.1, 5.0, reg), mask)
    opt.update(params, opt.init(params), params)
