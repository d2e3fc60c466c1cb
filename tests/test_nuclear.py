"""The nuclear-norm regularizer (ALGORITHMS.md §1, §6 "Nuclear norm", §8)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ramda
from optax_ramda import GroupSpec, NuclearSpec


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def test_value_and_identity_prox_match_numpy_svd():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 4))
  reg = optax_ramda.nuclear_norm({"w": NuclearSpec()})
  s = np.linalg.svd(x, compute_uv=False)
  # 1e-12: LAPACK SVDs of a 6x4 float64 matrix agree to a few eps.
  np.testing.assert_allclose(float(reg.value({"w": jnp.asarray(x)})), s.sum(), rtol=1e-12)
  thr = float(s[1])  # keeps exactly one singular value: rank 1
  z = np.asarray(reg.prox({"w": jnp.asarray(x)}, thr)["w"])
  u, s_, vt = np.linalg.svd(x, full_matrices=False)
  want = (u[:, :1] * (s_[0] - thr)) @ vt[:1]
  np.testing.assert_allclose(z, want, rtol=1e-10, atol=1e-12)
  assert float(optax_ramda.low_rank_level({"w": jnp.asarray(z)}, reg)) == 3 / 4


def test_axis_split_and_mixed_tree():
  params = {"conv": jnp.ones((3, 3, 2, 5)), "dense": jnp.ones((4, 3)), "b": jnp.ones(3)}
  reg = optax_ramda.nuclear_norm(
      {"conv": NuclearSpec(split=3), "dense": GroupSpec((1,)), "b": None}
  )
  leaves = reg.leaves(params)
  assert (leaves["conv"].rows, leaves["conv"].cols) == (18, 5)
  # value: conv ones(18, 5) has one singular value sqrt(90); dense rows of
  # ones: 4 groups of norm sqrt(3) weighted sqrt(3) -> 12.
  np.testing.assert_allclose(float(reg.value(params)), np.sqrt(90) + 12, rtol=1e-12)
  # structure() still works and counts only the group leaf.
  rep = optax_ramda.structure(params, reg)
  assert list(rep.per_leaf) == ["['dense']"]


@pytest.mark.parametrize("make", ["rmda", "prox_sgd"])
def test_scalar_metric_closed_form(make):
  # RMDA / ProxSGD with the nuclear norm: one step is SVT of the unregularized
  # point with threshold (scale * lambda) / metric, compared with numpy SVD.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(5, 4))
  g = rng.normal(size=(5, 4))
  reg = optax_ramda.nuclear_norm({"w": NuclearSpec()})
  opt = getattr(optax_ramda, make)(0.1, 2.0, reg, momentum=1.0)
  st = opt.init({"w": jnp.asarray(x)})
  upd, _ = opt.update({"w": jnp.asarray(g)}, st, {"w": jnp.asarray(x)})
  z = x + np.asarray(upd["w"])
  # Both: k = 1, y = x - lr g, threshold lr * lambda (RMDA: alpha/beta = lr).
  y = x - 0.1 * g
  u, s, vt = np.linalg.svd(y, full_matrices=False)
  want = (u * np.maximum(s - 0.2, 0)) @ vt
  np.testing.assert_allclose(z, want, rtol=1e-10, atol=1e-12)


def test_ramda_nuclear_pg_reduces_rank_and_reports_iterations():
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.normal(size=(8, 6)))}
  reg = optax_ramda.nuclear_norm({"w": NuclearSpec()})
  opt = optax_ramda.ramda(0.1, 3.0, reg, momentum=1.0)
  st = opt.init(params)
  update = jax.jit(opt.update)
  for k in range(3):
    g = {"w": jnp.asarray(np.random.default_rng(k).normal(size=(8, 6)))}
    upd, st = update(g, st, params)
    params = optax.apply_updates(params, upd)
  its = int(optax.tree_utils.tree_get(st, "iterations")["w"])
  assert 1 <= its <= 5  # paper cap max_iters = 5
  assert float(optax_ramda.low_rank_level(params, reg)) > 0


def test_bad_input():
  with pytest.raises(ValueError, match="split"):
    optax_ramda.nuclear_norm({"w": NuclearSpec()}).leaves({"w": jnp.ones((2, 3, 4))})
  with pytest.raises(ValueError, match="split"):
    optax_ramda.nuclear_norm({"w": NuclearSpec(split=3)}).leaves({"w": jnp.ones((2, 3, 4))})
  with pytest.raises(ValueError, match="max_iters"):
    optax_ramda.nuclear_norm(max_iters=0)
  with pytest.raises(ValueError, match="rtol"):
    optax_ramda.nuclear_norm(rtol=-1e-3)
  opt = optax_ramda.ramda(0.1, 1e-3, optax_ramda.nuclear_norm({"w": NuclearSpec()}))
  with pytest.raises(ValueError, match="2-D"):
    opt.init({"w": jnp.ones(4)})
