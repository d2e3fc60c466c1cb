"""Group presets from Flax NNX models and Flax params trees (ALGORITHMS.md §9)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_ramda
from optax_ramda import GroupSpec, presets
from optax_ramda._src.groups import GroupLeaf


class Net(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.emb = nnx.Embed(10, 8, rngs=rngs)
    self.att = nnx.MultiHeadAttention(
        num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs
    )
    self.ln = nnx.LayerNorm(8, rngs=rngs)
    self.fc = nnx.Linear(8, 3, rngs=rngs)


def axes_by_path(reg, params):
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(reg.leaves(params))[0]:
    name = "/".join(presets.path_names(path))
    out[name] = leaf.reduce_axes if isinstance(leaf, GroupLeaf) else None
  return out


def test_from_nnx_paper_grouping():
  model = Net(nnx.Rngs(0))
  got = axes_by_path(presets.from_nnx(model), nnx.state(model, nnx.Param))
  assert got == {
      "att/key/bias": None, "att/key/kernel": (0, 2),
      "att/out/bias": None, "att/out/kernel": (1, 2),
      "att/query/bias": None, "att/query/kernel": (0, 2),
      "att/value/bias": None, "att/value/kernel": (0, 2),
      "bn/bias": None, "bn/scale": None,
      "conv/bias": None, "conv/kernel": (0, 1, 3),  # channel-wise (§9)
      "emb/embedding": None,
      "fc/bias": None, "fc/kernel": (1,),  # input-wise (§9)
      "ln/bias": None, "ln/scale": None,
  }


def test_from_nnx_other_choices_and_overrides():
  model = Net(nnx.Rngs(0))
  reg = presets.from_nnx(
      model, dense="output", conv="filter", attention="input",
      overrides={"att/out/*": None, "emb/embedding": GroupSpec((1,))},
  )
  got = axes_by_path(reg, nnx.state(model, nnx.Param))
  assert got["fc/kernel"] == (0,)
  assert got["conv/kernel"] == (0, 1, 2)
  assert got["att/query/kernel"] == (1, 2)
  assert got["att/out/kernel"] is None
  assert got["emb/embedding"] == (1,)


def test_head_groups_zero_whole_heads():
  """One joint group per head: a large prox zeros every head, a boost of one
  head's slices leaves exactly that head nonzero (see the presets module
  docstring)."""
  model = Net(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  reg = presets.from_nnx(model, dense=None, conv=None)
  big = reg.prox(params, 1e3)
  flags = presets.head_sparsity(big)
  np.testing.assert_array_equal(flags["att"], [True, True])
  # Keep head 1 (slices along the head axis) far above the threshold.
  def boost(path, x):
    names = presets.path_names(path)
    if names[-1] != "kernel" or names[0] != "att":
      return x
    axis = 0 if names[-2] == "out" else 1
    idx = [slice(None)] * x.ndim
    idx[axis] = 1
    return x.at[tuple(idx)].multiply(1e4)
  boosted = jax.tree_util.tree_map_with_path(boost, params)
  flags = presets.head_sparsity(reg.prox(boosted, 1.0))
  np.testing.assert_array_equal(flags["att"], [True, False])


def test_works_with_nnx_optimizer():
  model = Net(nnx.Rngs(0))
  reg = presets.from_nnx(model)
  opt = nnx.Optimizer(model, optax_ramda.ramda(0.1, strength=1e-3, regularizer=reg), wrt=nnx.Param)
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  opt.update(model, grads)
  after = nnx.state(model, nnx.Param)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
  assert all(jax.tree.leaves(changed))


def test_unknown_layer_names_path():
  class Odd(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(2, 2, rngs=rngs)
      self.gate = nnx.Param(jnp.ones((2, 2)))

  with pytest.raises(ValueError, match=r"gate.*overrides=\{'gate'"):
    presets.from_nnx(Odd(nnx.Rngs(0)))
  reg = presets.from_nnx(Odd(nnx.Rngs(0)), overrides={"gate": GroupSpec((0,))})
  assert axes_by_path(reg, nnx.state(Odd(nnx.Rngs(0)), nnx.Param))["gate"] == (0,)


def test_bad_choice():
  with pytest.raises(ValueError, match="dense='rows'"):
    presets.from_params({"kernel": jnp.ones((2, 2))}, dense="rows")


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    x = x.reshape(x.shape[0], -1, 4)
    x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(x)
    return nn.Dense(3)(x.mean(1))


def test_from_params_linen():
  variables = LinenNet().init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
  params = variables["params"]
  got = axes_by_path(presets.from_params(params), params)
  assert got["Conv_0/kernel"] == (0, 1, 3)
  assert got["Dense_0/kernel"] == (1,)
  assert got["MultiHeadDotProductAttention_0/query/kernel"] == (0, 2)
  assert got["MultiHeadDotProductAttention_0/out/kernel"] == (1, 2)
  assert got["BatchNorm_0/scale"] is None
  assert got["Dense_0/bias"] is None


def test_from_params_unknown_leaf_and_mismatch():
  with pytest.raises(ValueError, match="cannot classify parameter blk/w"):
    presets.from_params({"blk": {"w": jnp.ones((2, 2))}})
  # The regularizer classifies any tree, so a masked/partitioned tree works.
  reg = presets.from_params({"a": {"kernel": jnp.ones((3, 2))}, "b": {"bias": jnp.ones(2)}})
  masked = {"a": {"kernel": jnp.ones((3, 2))}, "b": {"bias": optax.MaskedNode()}}
  assert isinstance(reg.leaves(masked)["a"]["kernel"], GroupLeaf)
  # A hand-written mask/spec tree that does not match the params names the fix.
  bad = optax_ramda.group_lasso({"a": GroupSpec((1,))})
  with pytest.raises(ValueError, match=r"does not match the params tree: parameter \['b'\]"):
    bad.leaves({"a": jnp.ones((2, 2)), "b": jnp.ones(2)})
  # Same for an L1 mask tree that misses a leaf.
  with pytest.raises(ValueError, match=r"parameter \['b'\] has no entry.*True/False"):
    optax_ramda.l1({"a": True}).leaves({"a": jnp.ones((2, 2)), "b": jnp.ones(2)})


def ties_by_path(reg, params):
  return {
      "/".join(presets.path_names(path)): leaf.tie
      for path, leaf in jax.tree_util.tree_flatten_with_path(reg.leaves(params))[0]
      if isinstance(leaf, GroupLeaf)
  }


def test_head_preset_ties_the_four_kernels_of_each_module():
  class Two(nnx.Module):
    def __init__(self, rngs):
      kw = dict(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs)
      self.a = nnx.MultiHeadAttention(**kw)
      self.b = nnx.MultiHeadAttention(**kw)
      self.fc = nnx.Linear(8, 3, rngs=rngs)

  model = Two(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  ties = ties_by_path(presets.from_nnx(model), params)
  for m in ("a", "b"):
    for proj in ("query", "key", "value", "out"):
      assert ties[f"{m}/{proj}/kernel"] == m
  assert ties["fc/kernel"] is None
  untied = ties_by_path(presets.from_nnx(model, attention="input"), params)
  assert all(t is None for t in untied.values())
  # Also for the arrays nnx.Optimizer passes (paths ending in .value).
  state = nnx.state(model, nnx.Param)
  arrays = jax.tree.map(lambda v: v[...], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert ties_by_path(presets.from_nnx(model), arrays)["b/out/kernel"] == "b"


def test_head_preset_value_is_the_joint_group_lasso():
  model = Net(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  reg = presets.from_nnx(model, dense=None, conv=None)
  att = params["att"]
  q, k, v = (np.asarray(att[n]["kernel"][...]) for n in ("query", "key", "value"))
  o = np.asarray(att["out"]["kernel"][...])
  rows = np.concatenate(
      [x.transpose(1, 0, 2).reshape(2, -1) for x in (q, k, v)] + [o.reshape(2, -1)], axis=1
  )
  expected = np.sqrt(rows.shape[1]) * np.linalg.norm(rows, axis=1).sum()
  np.testing.assert_allclose(reg.value(params), expected, rtol=1e-5)
  # One large slice keeps the whole head: its other three slices are not zeroed.
  boosted = jax.tree.map(lambda x: x, params)
  boosted["att"]["query"]["kernel"][...] = att["query"]["kernel"][...].at[:, 1].multiply(1e4)
  out = reg.prox(boosted, 1.0)
  np.testing.assert_array_equal(presets.head_sparsity(out)["att"], [True, False])
  for n in ("key", "value"):
    assert np.all(np.asarray(out["att"][n]["kernel"][...])[:, 1] != 0)
  assert np.all(np.asarray(out["att"]["out"]["kernel"][...])[1] != 0)


def test_head_preset_grouped_query_attention():
  class GQA(nnx.Module):
    def __init__(self, rngs):
      self.att = nnx.MultiHeadAttention(
          num_heads=4, num_kv_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs
      )

  model = GQA(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  reg = presets.from_nnx(model)
  ties = ties_by_path(reg, params)
  assert ties == {
      "att/query/kernel": "att", "att/out/kernel": "att",
      "att/key/kernel": "att/kv", "att/value/kernel": "att/kv",
  }
  rep = optax_ramda.structure(params, reg)
  np.testing.assert_allclose(rep.group_sparsity, 0.0)
  # Paths are jax.tree_util.keystr of the params (an NNX Param ends in .value).
  assert rep.per_leaf["['att']['key']['kernel'].value"].num_groups == 2


def test_from_params_linen_head_ties():
  variables = LinenNet().init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
  params = variables["params"]
  ties = ties_by_path(presets.from_params(params), params)
  mod = "MultiHeadDotProductAttention_0"
  assert {ties[f"{mod}/{p}/kernel"] for p in ("query", "key", "value", "out")} == {mod}
  assert ties["Dense_0/kernel"] is None


def test_an_override_that_matches_no_path_warns_at_init():
  """A typo in an override pattern would leave the layer regularized without a word:
  the optimizer warns when it first sees the params; matched patterns (masked-out
  leaves included) do not warn."""
  import warnings

  model = Net(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    typo = presets.from_nnx(model, overrides={"fcc/kernel": None})  # no warning yet
  opt = optax_ramda.ramda(0.1, 1e-3, typo)
  with pytest.warns(UserWarning, match=r"pattern 'fcc/kernel' matches no parameter path") as w:
    opt.init(params)
  assert [r.filename for r in w] == [__file__]  # the user's line, not the library's
  with pytest.warns(UserWarning, match="'fcc/kernel'"):
    assert axes_by_path(typo, params)["fc/kernel"] == (1,)  # the typo changed nothing
  # from_params: the same at init, not at construction (the tree the optimizer sees
  # may carry a prefix the construction tree lacks).
  tree = {"params": {"fc": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    reg = presets.from_params(tree["params"], overrides={"params/fc/kernel": None})
  with pytest.warns(UserWarning, match=r"'params/fc/kernel' matches no parameter path"):
    optax_ramda.ramda(0.1, 1e-3, reg).init(tree["params"])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    optax_ramda.ramda(0.1, 1e-3, reg).init(tree)  # the prefixed tree: matched
    # Matched patterns, and a pattern naming a leaf optax.masked keeps out, are silent.
    ok = presets.from_nnx(model, overrides={"fc/kernel": None, "conv/*": None})
    optax_ramda.ramda(0.1, 1e-3, ok).init(params)
    masked_out = presets.from_nnx(model, overrides={"fc/kernel": None})
    mask = jax.tree.map(lambda _: True, params)
    mask["fc"]["kernel"] = False
    optax.masked(optax_ramda.ramda(0.1, 1e-3, masked_out), mask).init(params)


def test_an_override_the_preset_needs_does_not_warn_where_the_optimizer_skips_it():
  """A leaf the preset cannot classify needs an override even if this optimizer never sees
  it (optax.partition with prefix labels, a prefix mask): no 'typo' warning for it."""
  import warnings

  params = {
      "generator": {"Dense_0": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)}},
      "discriminator": {"Dense_0": {"kernel": jnp.ones((8, 1)), "bias": jnp.zeros(1)},
                        "PReLU_0": {"alpha": jnp.ones(())}},
  }
  with pytest.raises(ValueError, match="cannot classify parameter discriminator/PReLU_0/alpha"):
    presets.from_params(params)
  reg = presets.from_params(params, overrides={"discriminator/PReLU_0/alpha": None})
  grads = jax.tree.map(jnp.ones_like, params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tx = optax.partition(
        {"sparse": optax_ramda.ramda(0.01, 1e-3, reg), "plain": optax.adam(1e-3)},
        {"generator": "sparse", "discriminator": "plain"},
    )
    state = tx.init(params)
    jax.jit(tx.update)(grads, state, params)
    # A preset built from the generator alone, the override naming a path under the
    # prefix mask's MaskedNode: no warning either.
    gen_only = presets.from_params(
        {"generator": params["generator"]}, overrides={"discriminator/*/alpha": None}
    )
    tx = optax.masked(optax_ramda.ramda(0.01, 1e-3, gen_only),
                      {"generator": True, "discriminator": False})
    tx.init({"generator": params["generator"], "discriminator": params["discriminator"]})
  # The same preset on a tree where the pattern matches nothing does warn.
  with pytest.warns(UserWarning, match="'discriminator/\\*/alpha' matches no parameter path"):
    optax_ramda.ramda(0.01, 1e-3, gen_only).init({"generator": params["generator"]})


def test_no_override_warning_when_nnx_optimizer_trains_part_of_the_model():
  """nnx.Optimizer(wrt=...) narrowed to the head: the override the preset needs for a custom
  layer in the body (which this optimizer never sees) is not called a typo."""
  import warnings

  class Gate(nnx.Module):
    def __init__(self, n):
      self.gate = nnx.Param(jnp.ones((n,)))

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(8, 8, rngs=rngs)
      self.g = Gate(8)
      self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
      return self.head(self.fc(x) * self.g.gate)

  model = Model(nnx.Rngs(0))
  with pytest.raises(ValueError, match="cannot classify parameter g/gate"):
    presets.from_nnx(model)
  reg = presets.from_nnx(model, overrides={"g/gate": None})
  wrt = nnx.All(nnx.Param, nnx.PathContains("head"))
  before = np.asarray(model.fc.kernel[...]).copy()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    opt = nnx.Optimizer(model, optax_ramda.ramda(0.01, 1e-3, reg), wrt=wrt)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((3, 8))) ** 2),
                     argnums=nnx.DiffState(0, wrt))(model)
    opt.update(model, grads)
  assert not [w for w in caught if "optax_ramda.presets" in str(w.message)]
  np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]), before)  # only the head moved


# --- stacked layers, grouped convs, names that only look like attention --------------------


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
    return x + nn.Dense(8)(nn.relu(nn.Dense(8)(x))), None


class LinenScanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)(name="blocks")
    return nn.Dense(2)(blocks(x, None)[0])


def _linen_scanned_params():
  return LinenScanned().init(jax.random.key(0), jnp.ones((1, 5, 8)))["params"]


def test_linen_scanned_layers_are_refused_unless_named_in_stacked():
  params = _linen_scanned_params()
  # Unnamed, the scanned Dense (3, 8, 8) was taken for a Conv kernel, its groups
  # spanning all three layers; it is refused now, and the fix is named.
  with pytest.raises(ValueError, match=r"blocks/Dense_0/kernel has shape \(3, 8, 8\).*stacked="):
    presets.from_params(params)
  reg = presets.from_params(params, stacked=["blocks"])
  got = axes_by_path(reg, params)
  assert got["blocks/Dense_0/kernel"] == (2,)  # input-wise, per layer
  assert got["blocks/MultiHeadDotProductAttention_0/query/kernel"] == (1, 3)
  assert got["blocks/MultiHeadDotProductAttention_0/out/kernel"] == (2, 3)
  assert got["Dense_0/kernel"] == (1,)  # outside the scan: unchanged
  leaves = reg.leaves(params)
  assert leaves["blocks"]["Dense_0"]["kernel"].num_groups == 3 * 8
  # One joint group per (layer, head): 3 x 2, tied across q/k/v/out of each layer.
  ties = ties_by_path(reg, params)
  mod = "blocks/MultiHeadDotProductAttention_0"
  assert {ties[f"{mod}/{p}/kernel"] for p in PROJ} == {mod}
  assert leaves["blocks"]["MultiHeadDotProductAttention_0"]["out"]["kernel"].num_groups == 6


PROJ = ("query", "key", "value", "out")


def test_linen_stacked_groups_zero_rows_per_layer():
  # Per-layer groups: a row is zeroed in one layer and kept in another (with groups
  # across layers a row could only be zeroed in all three at once).
  params = _linen_scanned_params()
  k = params["blocks"]["Dense_0"]["kernel"]
  k = k.at[0, :4].multiply(1e-3).at[2, 4:].multiply(1e-3)  # small rows, different per layer
  params = {**params, "blocks": {**params["blocks"], "Dense_0": {
      **params["blocks"]["Dense_0"], "kernel": k}}}
  reg = presets.from_params(params, stacked=["blocks"])
  opt = optax_ramda.prox_sgd(1.0, strength=0.02, regularizer=reg)
  zeros = jax.tree.map(jnp.zeros_like, params)
  u, _ = opt.update(zeros, opt.init(params), params)
  new = optax.apply_updates(params, u)["blocks"]["Dense_0"]["kernel"]
  zero_rows = [np.flatnonzero(np.all(np.asarray(new[i]) == 0, axis=1)).tolist() for i in range(3)]
  assert zero_rows == [[0, 1, 2, 3], [], [4, 5, 6, 7]]


def test_stacked_pattern_that_matches_no_module_warns():
  params = _linen_scanned_params()
  reg = presets.from_params(
      params, stacked=["blocks", "blokcs"],
      overrides={"blocks/MultiHeadDotProductAttention_0/*": "default"})
  opt = optax_ramda.ramda(0.1, 1e-3, reg)
  with pytest.warns(UserWarning, match="stacked pattern 'blokcs' matches no"):
    opt.init(params)


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.att = nnx.MultiHeadAttention(
        num_heads=4, num_kv_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs)
    self.lin = nnx.Linear(8, 8, rngs=rngs)
    self.conv = nnx.Conv(8, 8, (3,), rngs=rngs)
    self.ln = nnx.LayerNorm(8, rngs=rngs)


class NnxStack(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return NnxBlock(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)


def test_from_nnx_reads_stacked_layers_from_the_modules():
  # nnx.vmap-stacked layers: the extra leading axis is found from each layer's own
  # kernel rank, and never reduced over (was: a ValueError for the rank-3 Linear).
  model = NnxStack(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  reg = presets.from_nnx(model)
  got = axes_by_path(reg, params)
  assert got["blocks/lin/kernel"] == (2,)
  assert got["blocks/conv/kernel"] == (1, 3)  # (layers, width, in, out): per input channel
  assert got["blocks/att/query/kernel"] == (1, 3) and got["blocks/att/out/kernel"] == (2, 3)
  assert got["blocks/ln/scale"] is None and got["head/kernel"] == (1,)
  ties = ties_by_path(reg, params)
  assert ties["blocks/att/query/kernel"] == "blocks/att"
  assert ties["blocks/att/key/kernel"] == "blocks/att/kv"  # grouped-query, per layer
  assert reg.leaves(params)["blocks"]["att"]["key"]["kernel"].num_groups == 3 * 2
  tx = nnx.Optimizer(model, optax_ramda.ramda(0.1, 1e-3, reg), wrt=nnx.Param)
  tx.update(model, jax.tree.map(jnp.ones_like, params))
  assert model.blocks.lin.kernel.shape == (3, 8, 8)
  assert presets.head_sparsity(params)["blocks/att"].shape == (3, 4)


def test_grouped_convs_take_filter_groups_and_refuse_channel_groups():
  class Net2(nnx.Module):
    def __init__(self, rngs):
      self.dw = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
      self.gc = nnx.Conv(8, 8, (3, 3), feature_group_count=2, rngs=rngs)
      self.pw = nnx.Conv(8, 4, (1, 1), rngs=rngs)

  model = Net2(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  # conv="channel" gave the depthwise kernel (3, 3, 1, 8) one group for the whole
  # layer. Its channel c has one filter, kernel[..., 0, c]: that is its group.
  # The 2-group conv's channel groups cannot be written as reduce axes: refused.
  with pytest.raises(ValueError, match=r"gc/kernel .*grouped Conv.*conv='filter'"):
    presets.from_nnx(model)
  got = axes_by_path(presets.from_nnx(model, overrides={"gc/kernel": None}), params)
  assert got["dw/kernel"] == (0, 1, 2) and got["pw/kernel"] == (0, 1, 3)
  assert got["gc/kernel"] is None
  got = axes_by_path(presets.from_nnx(model, conv="filter"), params)
  assert got["dw/kernel"] == got["gc/kernel"] == got["pw/kernel"] == (0, 1, 2)


def test_linen_out_kernel_is_attention_only_beside_query_key_value():
  class Conv1dNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3,), name="out")(nn.Conv(8, (5,), name="conv")(x))

  params = Conv1dNet().init(jax.random.key(0), jnp.ones((1, 16, 3)))["params"]
  got = axes_by_path(presets.from_params(params), params)
  assert got["out/kernel"] == (0, 2)  # a Conv1D kernel (3, 8, 4): per input channel
  assert ties_by_path(presets.from_params(params), params)["out/kernel"] is None


def test_head_sparsity_root_module_and_grouped_query_attention():
  mha = nnx.MultiHeadAttention(num_heads=4, num_kv_heads=2, in_features=8, qkv_features=8,
                               decode=False, rngs=nnx.Rngs(0))
  mha.query.kernel.set_value(mha.query.kernel[...].at[:, 1].set(0))
  mha.out.kernel.set_value(mha.out.kernel[...].at[1].set(0))
  # (was: {} for a module at the root, and a broadcasting error with fewer kv heads)
  got = presets.head_sparsity(nnx.state(mha, nnx.Param))
  np.testing.assert_array_equal(got[""], [False, True, False, False])


def test_linen_refusals_only_where_automatic_names_tell_the_layer():
  # Self-attention made of 1x1 convs named query/key/value/out (SAGAN style) is a
  # plain conv layer: channel groups, as before stacked layers were refused.
  class ConvAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
      q, k = nn.Conv(2, (1, 1), name="query")(x), nn.Conv(2, (1, 1), name="key")(x)
      v = nn.Conv(4, (1, 1), name="value")(x)
      return nn.Conv(4, (1, 1), name="out")(v * (q * k).sum(-1, keepdims=True))

  params = ConvAttention().init(jax.random.key(0), jnp.ones((1, 4, 4, 4)))["params"]
  got = axes_by_path(presets.from_params(params), params)
  assert {got[f"{p}/kernel"] for p in PROJ} == {(0, 1, 3)}


def test_stacked_edge_cases():
  params = _linen_scanned_params()
  # A per-layer scalar (unstacked: a 0-d "scale") stacks to (layers,): unregularized.
  blocks = {**params["blocks"], "scale": jnp.ones(3)}
  params = {**params, "blocks": blocks}
  got = axes_by_path(presets.from_params(params, stacked=["blocks"]), params)
  assert got["blocks/scale"] is None
  # Patterns match whole module paths: on the prefixed tree, "blocks" matches nothing,
  # and the refusal says so.
  with pytest.raises(ValueError, match=r"stacked=\['blocks'\] matches no module.*'params/'"):
    presets.from_params({"params": params}, stacked=["blocks"])
  reg = presets.from_params({"params": params}, stacked=["params/blocks"])
  assert axes_by_path(reg, {"params": params})["params/blocks/Dense_0/kernel"] == (2,)


def test_nested_scans_need_every_stacked_module_named():
  class Inner(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.relu(nn.Dense(8)(x)), None

  class Outer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      inner = nn.scan(Inner, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=2)(name="inner")
      return inner(x, None)[0], None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      outer = nn.scan(Outer, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=3)(name="outer")
      return outer(x, None)[0]

  params = Net().init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  assert params["outer"]["inner"]["Dense_0"]["kernel"].shape == (3, 2, 8, 8)
  # Only the outer scan named: the kernel left, (2, 8, 8), is still stacked.
  with pytest.raises(ValueError, match=r"after its 1 stacked axes.*name the inner module"):
    presets.from_params(params, stacked=["outer"])
  reg = presets.from_params(params, stacked=["outer", "outer/inner"])
  got = axes_by_path(reg, params)
  assert got["outer/inner/Dense_0/kernel"] == (3,)  # one group per (outer, inner, row)
  assert reg.leaves(params)["outer"]["inner"]["Dense_0"]["kernel"].num_groups == 3 * 2 * 8
