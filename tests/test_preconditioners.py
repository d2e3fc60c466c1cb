"""The fast cube root of the RAMDA metric (ALGORITHMS.md §2: P = cbrt(U) + eps)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ramda
from optax_ramda._src.preconditioners import cube_root


@pytest.mark.parametrize("dtype, max_ulp", [(np.float32, 1.5), (np.float64, 2.5)])
def test_cube_root_is_within_ulps_of_the_true_root(dtype, max_ulp):
  with jax.enable_x64(dtype == np.float64):
    rng = np.random.default_rng(0)
    u = (10.0 ** rng.uniform(-20, 20, 200_000)).astype(dtype)
    got = np.asarray(jax.jit(cube_root)(jnp.asarray(u)))
    assert got.dtype == dtype
    ref = np.cbrt(u.astype(np.longdouble))  # more precise than either dtype
    ulps = np.abs(got.astype(np.longdouble) - ref) / np.spacing(ref.astype(dtype))
    assert float(ulps.max()) <= max_ulp, float(ulps.max())
    # jnp.cbrt, for comparison, is no more accurate than this.
    jref = np.asarray(jax.jit(jnp.cbrt)(jnp.asarray(u)))
    julps = np.abs(jref.astype(np.longdouble) - ref) / np.spacing(ref.astype(dtype))
    assert float(ulps.max()) <= float(julps.max()) + 1


def test_cube_root_of_zero_and_exact_cubes():
  u = jnp.asarray([0.0, 1.0, 8.0, 27.0, 1e-30, 1e30], jnp.float32)
  got = np.asarray(cube_root(u))
  np.testing.assert_array_equal(got[:4], [0.0, 1.0, 2.0, 3.0])
  np.testing.assert_allclose(got[4:], [1e-10, 1e10], rtol=2e-7)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cube_root_low_precision_keeps_dtype(dtype):
  u = jnp.asarray([0.0, 0.125, 3.0, 1000.0], dtype)
  got = cube_root(u)
  assert got.dtype == dtype
  np.testing.assert_allclose(
      np.asarray(got, np.float32), np.cbrt(np.asarray(u, np.float32)), rtol=1e-2
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cube_root_passes_non_finite_values(dtype):
  # cbrt(inf) = inf and NaN stays NaN, as jnp.cbrt; with offset too. (The fast root
  # gave NaN for inf and 0 for NaN.)
  u = jnp.asarray([jnp.inf, jnp.nan, 8.0], dtype)
  for offset in (0.0, 1e-6):
    got = np.asarray(cube_root(u, offset), np.float32)
    assert got[0] == np.inf and np.isnan(got[1]) and abs(got[2] - 2.0) < 1e-2


def test_overflowed_sum_of_squares_freezes_the_leaf_instead_of_nan():
  # A finite but huge gradient overflows U = s g^2 in float32: P = inf and the
  # step is 0, as optax.contrib.madgrad gives, not NaN params.
  p = jnp.ones(3)
  g = jnp.full(3, 1e25)
  for opt in (optax_ramda.ramda(0.05), optax.contrib.madgrad(0.05)):
    u, _ = opt.update(g, opt.init(p), p)
    np.testing.assert_array_equal(np.asarray(optax.apply_updates(p, u)), np.ones(3))
  # Regularized: the group solvers cannot use P = inf and give NaN, loudly; a NaN P
  # made the screen zero the group, i.e. pull the params to 0 without a sign.
  p = {"w": jnp.ones((4, 3))}
  g = {"w": jnp.full((4, 3), 1e25)}
  reg = optax_ramda.group_lasso({"w": optax_ramda.GroupSpec((1,))})
  for solver in ("exact", "pg"):
    opt = optax_ramda.ramda(0.05, 1e-3, reg, solver=solver)
    u, _ = opt.update(g, opt.init(p), p)
    new = np.asarray(optax.apply_updates(p, u)["w"])
    assert not np.any(np.isfinite(new) & (new != 1)), new  # unchanged or NaN, never moved
