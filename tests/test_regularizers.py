"""Regularizers: value and identity-metric prox (ALGORITHMS.md §1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_ramda
from optax_ramda import GroupSpec


def test_group_lasso_value():
  x = np.arange(12.0).reshape(3, 4) - 5
  reg = optax_ramda.group_lasso({"w": GroupSpec((1,)), "b": None})
  expected = np.sqrt(4) * np.linalg.norm(x, axis=1).sum()
  value = reg.value({"w": jnp.asarray(x), "b": jnp.ones(3)})
  np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_group_lasso_value_gradient_at_zero_groups():
  """jax.grad of psi (e.g. in a loss) is finite after training zeroed groups:
  weight * x_g / ||x_g|| on a non-zero group, 0 (the minimum-norm
  subgradient) on a zero one; also under jit, for ties and for L1."""
  x = jnp.asarray(np.arange(12.0).reshape(3, 4) - 5).at[1].set(0.0)
  reg = optax_ramda.group_lasso({"w": GroupSpec((1,)), "b": None})
  params = {"w": x, "b": jnp.ones(3)}
  g = jax.jit(jax.grad(reg.value))(params)
  norms = np.linalg.norm(np.asarray(x), axis=1, keepdims=True)
  want = np.where(norms > 0, 2 * np.asarray(x) / np.where(norms > 0, norms, 1), 0)
  np.testing.assert_allclose(g["w"], want, rtol=1e-6)
  assert np.all(np.asarray(g["w"][1]) == 0) and np.all(np.asarray(g["b"]) == 0)
  np.testing.assert_allclose(reg.value(params), 2 * np.sum(norms), rtol=1e-6)
  assert np.isnan(float(reg.value({"w": x.at[0, 0].set(jnp.nan), "b": jnp.ones(3)})))
  tied = optax_ramda.group_lasso({"a": GroupSpec((1,), tie="t"), "b": GroupSpec((0,), tie="t")})
  tg = jax.grad(tied.value)({"a": jnp.zeros((2, 3)), "b": jnp.ones((4, 2)).at[:, 0].set(0)})
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(tg))
  np.testing.assert_array_equal(jax.grad(optax_ramda.l1().value)(jnp.zeros(3)), 0)


def test_regularized_complex_leaves_are_refused():
  """psi is defined on real params (x * x is not |x|^2 for complex x): a regularized
  complex leaf is a TypeError naming it, unregularized ones are left alone."""
  reg = optax_ramda.group_lasso({"w": GroupSpec((1,)), "b": None})
  with pytest.raises(TypeError, match=r"\['w'\] has dtype complex64 but is regularized"):
    reg.value({"w": jnp.ones((3, 4), jnp.complex64), "b": jnp.ones(3)})
  with pytest.raises(TypeError, match=r"\['w'\] has dtype complex64 but is regularized"):
    optax_ramda.l1().prox({"w": jnp.ones((3, 4), jnp.complex64)}, 0.1)
  assert float(reg.value({"w": jnp.ones((3, 4)), "b": jnp.ones(3, jnp.complex64)})) == 12.0


def test_group_lasso_prox_is_block_soft_threshold():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 3))
  reg = optax_ramda.group_lasso(GroupSpec((0,)))
  thr = 0.8
  out = np.asarray(reg.prox(jnp.asarray(x), thr))
  n = np.linalg.norm(x, axis=0)
  expected = x * np.maximum(1 - thr * np.sqrt(5) / n, 0)
  np.testing.assert_allclose(out, expected, atol=1e-6)
  assert np.any(np.all(out == 0, axis=0))


def test_prox_threshold_zero_is_identity():
  reg = optax_ramda.group_lasso(GroupSpec((0,)))
  x = jnp.zeros((3, 2)).at[:, 1].set(1.0)
  np.testing.assert_array_equal(reg.prox(x, 0.0), x)


def test_l1_value_and_prox():
  x = jnp.asarray([-2.0, 0.5, 0.0, 3.0])
  reg = optax_ramda.l1()
  assert float(reg.value(x)) == 5.5
  np.testing.assert_allclose(reg.prox(x, 1.0), [-1.0, 0.0, 0.0, 2.0])


def test_l1_mask_tree_and_callable():
  params = {"w": jnp.asarray([1.0, -2.0]), "b": jnp.asarray([3.0])}
  by_tree = optax_ramda.l1({"w": True, "b": False})
  by_fn = optax_ramda.l1(lambda p: jax.tree.map(lambda x: x.size > 1, p))
  assert float(by_tree.value(params)) == 3.0 == float(by_fn.value(params))
  np.testing.assert_allclose(by_tree.prox(params, 1.5)["b"], [3.0])


def test_regularizer_is_not_callable():
  # optax.inject_hyperparams treats callables as schedules.
  assert not callable(optax_ramda.group_lasso(GroupSpec(())))


def test_messages_for_masks_and_specs_of_the_wrong_kind():
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  # An elementwise mask was numpy's "truth value of an array is ambiguous".
  with pytest.raises(ValueError, match=r"one bool per parameter leaf.*shape \(4, 3\)"):
    optax_ramda.l1({"w": jnp.array([[True, False, True]] * 4), "b": False}).leaves(params)
  with pytest.raises(TypeError, match=r"NuclearSpec belongs in optax_ramda.nuclear_norm"):
    optax_ramda.group_lasso({"w": optax_ramda.NuclearSpec(), "b": None}).leaves(params)
  # numpy integers are integers
  assert optax_ramda.GroupSpec(np.int64(1)).reduce_axes == (1,)
  assert optax_ramda.GroupSpec((np.int32(0), 1)).reduce_axes == (0, 1)
