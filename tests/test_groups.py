"""Group specs resolved against params (ALGORITHMS.md §1, §9)."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import optax_ramda
from optax_ramda import GroupLeaf, GroupSpec
from optax_ramda._src import groups


def test_resolve_tree_callable_and_single_spec():
  params = {"k": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
  tree = groups.resolve({"k": GroupSpec((1,)), "b": None}, params)
  assert tree["k"] == GroupLeaf((1,), 2.0, 4, 3) and tree["b"] is groups.UNREGULARIZED
  fn = groups.resolve(lambda p: {"k": GroupSpec((-1,)), "b": None}, params)
  assert fn == tree
  single = groups.resolve(GroupSpec(()), params)
  assert single["b"] == GroupLeaf((), 1.0, 1, 4)


def test_conv_channel_groups():
  leaf = groups.resolve(GroupSpec((0, 1, 3)), jnp.zeros((3, 3, 5, 8)))
  assert leaf.group_size == 72 and leaf.num_groups == 5


def test_masked_nodes_pass_through():
  params = {"k": jnp.zeros((3, 4)), "b": optax.MaskedNode()}
  tree = groups.resolve({"k": GroupSpec((1,)), "b": None}, params)
  assert isinstance(tree["b"], optax.MaskedNode)


def test_params_with_none_holes():
  """A layer without bias often leaves ``None`` in the params (an empty subtree).

  The spec the error messages recommend, ``jax.tree.map(lambda _: None, params)``
  with entries filled in, has ``None`` there too and must be accepted, by every
  regularizer, the optimizers and structure(); leaving the key out names it.
  """
  params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": None}, "w": jnp.ones((2, 5))}
  spec = jax.tree.map(lambda _: None, params)
  assert spec == {"dense": {"kernel": None, "bias": None}, "w": None}
  spec["dense"]["kernel"] = GroupSpec((1,))
  fn = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, x: GroupSpec((1,)) if "kernel" in jax.tree_util.keystr(path) else None, p)
  for reg in (optax_ramda.group_lasso(spec), optax_ramda.group_lasso(fn),
              optax_ramda.l1({"dense": {"kernel": True, "bias": None}, "w": False}),
              optax_ramda.nuclear_norm({**spec, "w": optax_ramda.NuclearSpec()})):
    opt = optax_ramda.ramda(0.1, 1.0, reg)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    assert updates["dense"]["bias"] is None and updates["w"].shape == (2, 5)
  report = optax_ramda.structure(params, optax_ramda.group_lasso(spec))
  assert list(report.per_leaf) == ["['dense']['kernel']"]
  with pytest.raises(ValueError, match=r"params hold None at \['dense'\]\['bias'\].*None"):
    optax_ramda.ramda(0.1, 1.0, optax_ramda.group_lasso(
        {"dense": {"kernel": GroupSpec((1,))}, "w": None})).init(params)
  with pytest.raises(ValueError, match=r"None at \['dense'\]\['bias'\].*spec regularizes it"):
    optax_ramda.ramda(0.1, 1.0, optax_ramda.group_lasso(
        {"dense": {"kernel": GroupSpec((1,)), "bias": GroupSpec(())}, "w": None})).init(params)


def test_a_masked_leaf_missing_from_the_spec_is_named_as_masked():
  """Under optax.masked the spec still lists the masked-out leaves; the error says so."""
  params = {"k": jnp.ones((3, 4)), "b": jnp.ones(4)}
  opt = optax.masked(
      optax_ramda.ramda(0.1, 1e-3, optax_ramda.group_lasso({"k": GroupSpec((1,))})),
      {"k": True, "b": False},
  )
  with pytest.raises(ValueError, match=r"\['b'\] has no entry.*masked out here.*give \['b'\] None"):
    opt.init(params)
  # An unmasked missing leaf keeps the plain message.
  with pytest.raises(ValueError, match=r"\['b'\] has no entry in the spec\. Add an entry"):
    groups.resolve({"k": GroupSpec((1,))}, params)
  fixed = optax.masked(
      optax_ramda.ramda(0.1, 1e-3, optax_ramda.group_lasso({"k": GroupSpec((1,)), "b": None})),
      {"k": True, "b": False},
  )
  updates, _ = fixed.update(params, fixed.init(params), params)
  assert (updates["b"] == params["b"]).all()  # masked out: the gradient passes unchanged


def test_a_prefix_mask_takes_the_whole_spec_tree():
  """optax.masked / optax.partition with a prefix mask hand the optimizer one MaskedNode for
  a whole subtree; the spec of the whole params tree still works, with the same updates as
  a per-leaf mask."""
  params = {"enc": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
            "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}}
  spec = {"enc": {"kernel": GroupSpec((1,)), "bias": None},
          "head": {"kernel": GroupSpec((1,)), "bias": None}}
  grads = jax.tree.map(lambda x: 0.1 * x, params)
  per_leaf = {"enc": {"kernel": False, "bias": False}, "head": {"kernel": True, "bias": True}}
  runs = {}
  for name, mask in (("per_leaf", per_leaf), ("prefix", {"enc": False, "head": True})):
    tx = optax.masked(optax_ramda.ramda(0.1, 0.3, optax_ramda.group_lasso(spec)), mask)
    runs[name], _ = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_equal(runs["prefix"], runs["per_leaf"])
  assert float(jnp.abs(runs["prefix"]["head"]["kernel"]).max()) > 0
  tx = optax.partition(
      {"sparse": optax_ramda.ramda(0.1, 0.3, optax_ramda.group_lasso(spec)),
       "plain": optax.sgd(0.1)},
      {"enc": "plain", "head": "sparse"},
  )
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_equal(updates["head"], runs["per_leaf"]["head"])
  # None over the masked subtree works too; a bare tuple under it is still not a spec
  # where the params hold an array.
  groups.resolve({"enc": None, "head": spec["head"]},
                 {"enc": optax.MaskedNode(), "head": params["head"]})
  with pytest.raises(ValueError, match=r"\['head'\]\['kernel'\] is a single array"):
    groups.resolve({"enc": spec["enc"], "head": {"kernel": (1,), "bias": None}},
                   {"enc": optax.MaskedNode(), "head": params["head"]})


@pytest.mark.parametrize(
    "spec, params, err, match",
    [
        ({"k": GroupSpec((2,))}, {"k": jnp.zeros((3, 4))}, ValueError, "out of range"),
        ({"k": GroupSpec((0, -2))}, {"k": jnp.zeros((3, 4))}, ValueError, "repeated"),
        ({"k": GroupSpec((1,))}, {"k": jnp.zeros((3, 4)), "b": jnp.zeros(4)}, ValueError,
         r"does not match the params tree: parameter \['b'\] has no entry"),
        ({"k": GroupSpec(())}, {"k": jnp.zeros(3, jnp.int32)}, TypeError, "floating-point"),
        ({"k": GroupSpec(())}, {"k": jnp.zeros(3, jnp.complex64)}, TypeError,
         r"complex64 but is regularized; only real floating-point"),
        ({"k": (1,)}, {"k": jnp.zeros((3, 4))}, ValueError,
         r"parameter \['k'\] is a single array.*\['k'\]\[0\].*GroupSpec\(reduce_axes="),
    ],
)
def test_bad_specs(spec, params, err, match):
  with pytest.raises(err, match=match):
    groups.resolve(spec, params)


def test_mismatch_names_the_first_missing_or_extra_path():
  params = {"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}, "out": jnp.zeros(2)}
  # A typo: one extra path, the real one missing (reported first, in params order).
  typo = {"dense": {"kernel": GroupSpec((1,)), "bais": None}, "out": None}
  with pytest.raises(ValueError, match=r"parameter \['dense'\]\['bias'\] has no entry"):
    groups.resolve(typo, params)
  # Only an extra path.
  extra = {"dense": {"kernel": GroupSpec((1,)), "bias": None}, "out": None, "head": None}
  with pytest.raises(ValueError, match=r"entry at \['head'\], which is not a parameter"):
    groups.resolve(extra, params)
  # One spec for a whole subtree: names the subtree and the per-leaf fix.
  with pytest.raises(ValueError, match=r"one entry at \['dense'\].*jax\.tree\.map"):
    groups.resolve({"dense": GroupSpec((1,)), "out": None}, params)
  # Same leaf paths, different containers: both structures are printed.
  with pytest.raises(ValueError, match=r"(?s)containers differ.*PyTreeDef"):
    groups.resolve([GroupSpec(())], (jnp.zeros(3),))


def test_error_names_the_parameter_path():
  with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\]"):
    groups.resolve({"dense": {"kernel": GroupSpec((5,))}}, {"dense": {"kernel": jnp.zeros((2, 3))}})


def test_shrink_zero_threshold_and_zero_group_is_finite():
  leaf = GroupLeaf((1,), 2.0, 4, 2)
  z, r = leaf.shrink(jnp.zeros((2, 4)), jnp.asarray(0.0))
  assert bool(jnp.all(jnp.isfinite(z))) and bool(jnp.all(z == 0))
