"""Structure metrics (ALGORITHMS.md §8)."""

import jax.numpy as jnp
import numpy as np

import optax_ramda
from optax_ramda import GroupSpec


def test_structure_report():
  w = jnp.ones((4, 3)).at[1].set(0).at[3].set(0)  # 2 of 4 input-wise groups zero
  conv = jnp.ones((2, 2, 5, 2)).at[:, :, 0].set(0)  # 1 of 5 channels zero
  b = jnp.asarray([0.0, 1.0, 0.0])
  params = {"w": w, "conv": conv, "b": b}
  reg = optax_ramda.group_lasso({"w": GroupSpec((1,)), "conv": GroupSpec((0, 1, 3)), "b": None})
  r = optax_ramda.structure(params, reg)
  np.testing.assert_allclose(r.weighted_group_sparsity, (2 * 3 + 1 * 8) / (12 + 40))
  np.testing.assert_allclose(r.group_sparsity, 3 / 9)
  np.testing.assert_allclose(r.unstructured_sparsity, (6 + 8 + 2) / (12 + 40 + 3))
  assert int(r.per_leaf["['w']"].zero_groups) == 2
  assert int(r.per_leaf["['conv']"].zero_groups) == 1
  assert "['b']" not in r.per_leaf


def test_almost_zero_is_not_zero():
  params = {"w": jnp.zeros((2, 3)).at[0, 0].set(1e-30)}
  r = optax_ramda.structure(params, optax_ramda.group_lasso({"w": GroupSpec((1,))}))
  np.testing.assert_allclose(r.group_sparsity, 0.5)
