"""The fast cube root of the RAMDA metric (ALGORITHMS.md §2: P = cbrt(U) + eps)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
