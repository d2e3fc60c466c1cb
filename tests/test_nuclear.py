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
  its = int(optax_ramda.solve_diagnostics(st, params).iterations["w"])
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
  with pytest.raises(ValueError, match=r"1-D leaf has no matrix.*Give it None"):
    opt.init({"w": jnp.ones(4)})  # (the message suggested a split that cannot exist)
  # A numpy integer split is an int; a single NuclearSpec from a spec function
  # covers every leaf, as a single GroupSpec does.
  assert NuclearSpec(split=np.int64(1)).split == 1
  params = {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 4))}
  one = optax_ramda.nuclear_norm(lambda p: NuclearSpec()).leaves(params)
  assert one["a"].shape == (3, 2) and one["b"].shape == (2, 4)
  # ProxSSI has no nuclear solver: its message names prox_adamw, not a solver argument.
  with pytest.raises(ValueError, match=r"prox_ssi .*nuclear norm.*prox_adamw"):
    optax_ramda.prox_ssi(1e-3, 1e-4, optax_ramda.nuclear_norm({"w": NuclearSpec()}))


def test_bf16_leaves_value_prox_and_low_rank_level():
  # jnp.linalg.svd has no bf16 kernel: these raised NotImplementedError after a bf16
  # training run (the optimizers already solved in float32).
  p = {"w": jnp.asarray(np.arange(24.0).reshape(6, 4) % 5, jnp.bfloat16)}
  reg = optax_ramda.nuclear_norm({"w": NuclearSpec()})
  ref = np.linalg.svd(np.asarray(p["w"], np.float32), compute_uv=False).sum()
  np.testing.assert_allclose(float(reg.value(p)), ref, rtol=1e-2)
  sv = np.linalg.svd(np.asarray(p["w"], np.float32), compute_uv=False)
  z = reg.prox(p, float(sv[1] + sv[0]) / 2)  # keeps only the largest singular value
  assert z["w"].dtype == jnp.bfloat16
  assert float(optax_ramda.low_rank_level(p, reg)) == 0
  assert float(optax_ramda.low_rank_level(z, reg)) == 0.75  # rank 1 of 4
  with pytest.raises(TypeError, match="complex64 but is regularized; only real"):
    optax_ramda.nuclear_norm({"w": NuclearSpec()}).value({"w": jnp.ones((2, 3), jnp.complex64)})


def _numpy_nuclear_pg(x0, v, p, t, warm, rtol, max_iters, min_iters=2):
  """Spec §6 "Nuclear norm", written independently in numpy: PG with the one
  scalar step 1/max(P), SVT prox, the relative-decrease stop of §6 step 5."""

  def q(z, nuc):
    d = z - x0
    return np.sum(v * d + 0.5 * p * d * d) + t * nuc

  eta = 1.0 / p.max()
  z = warm
  prev = q(z, np.linalg.svd(z, compute_uv=False).sum())
  for i in range(max_iters):
    u, s, vt = np.linalg.svd(z - eta * (v + p * (z - x0)), full_matrices=False)
    s = np.maximum(s - eta * t, 0)
    z = (u * s) @ vt
    cur = q(z, s.sum())
    rel = (prev - cur) / (abs(cur) + 1)
    if (i + 1 >= min_iters and rel < rtol) or i + 1 >= max_iters:
      return z, i + 1, rel
    prev = cur
  raise AssertionError("unreachable")


@pytest.mark.parametrize("rtol,max_iters", [(1e-3, 5), (0.0, 40)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nuclear_pg_matches_numpy_reference(seed, rtol, max_iters):
  # The paper's settings (rtol 1e-3, 5 iterations) and a long run with the
  # test disabled, on metrics spanning 1e-2..1e2: same iterate, same count.
  from optax_ramda._src import nuclear, solvers

  rng = np.random.default_rng(seed)
  shape = (7, 5)
  x0 = rng.normal(size=shape)
  v = rng.normal(size=shape)
  p = 10.0 ** rng.uniform(-2, 2, size=shape)
  warm = x0 + 0.1 * rng.normal(size=shape)
  s = np.linalg.svd(p * x0 - v, compute_uv=False)
  t = float(s[2])  # a threshold that removes some but not all singular values
  leaf = nuclear.nuclear_leaf(NuclearSpec(), x0, "w", rtol, max_iters, 2)
  prob = solvers.LeafProblem(*(jnp.asarray(a) for a in (x0, v, p, warm)), jnp.asarray(t))
  sol = jax.jit(lambda pr: nuclear.nuclear_pg(leaf, pr))(prob)
  want, its, rel = _numpy_nuclear_pg(x0, v, p, t, warm, rtol, max_iters)
  assert int(sol.iterations) == its
  # 1e-10: LAPACK (numpy) and XLA's SVD agree to ~1e-14 per singular triple;
  # up to 40 PG sweeps (a contraction) keep the difference at that level.
  np.testing.assert_allclose(np.asarray(sol.z), want, rtol=0, atol=1e-10)
  np.testing.assert_allclose(float(sol.relative_decrease), rel, rtol=1e-6, atol=1e-12)
  assert float(sol.residual) == -1.0  # not measured for nuclear PG (documented)


def test_prox_adamw_nuclear_end_to_end():
  # ProxGen with the nuclear norm on a low-rank regression: the subproblem is
  # the nuclear PG (default solver=None), the learned matrix becomes low rank
  # while fitting the data, and solver="exact" is refused with the fix named.
  rng = np.random.default_rng(3)
  a = rng.normal(size=(64, 8))
  w_true = rng.normal(size=(8, 2)) @ rng.normal(size=(2, 6))  # rank 2
  y = a @ w_true
  params = {"w": jnp.zeros((8, 6)), "b": jnp.zeros(6)}
  reg = optax_ramda.nuclear_norm({"w": NuclearSpec(), "b": None})
  opt = optax_ramda.prox_adamw(0.05, 0.5, reg)
  st = opt.init(params)

  def loss(ps):
    return 0.5 * jnp.mean(jnp.sum((a @ ps["w"] + ps["b"] - y) ** 2, axis=1))

  @jax.jit
  def step(ps, st):
    g = jax.grad(loss)(ps)
    upd, st = opt.update(g, st, ps)
    return optax.apply_updates(ps, upd), st

  loss0 = float(loss(params))
  for _ in range(400):
    params, st = step(params, st)
  its = int(optax_ramda.solve_diagnostics(st, params).iterations["w"])
  assert 1 <= its <= 5
  assert float(loss(params)) < 0.05 * loss0
  s = np.linalg.svd(np.asarray(params["w"]), compute_uv=False)
  # Zero singular values (to SVD round-off, 1e-16 relative) beyond the true
  # rank 2; without the regularizer the same run leaves them at ~1e-9.
  assert np.sum(s > 1e-12 * s[0]) == 2, s
  assert float(optax_ramda.low_rank_level(params, reg)) >= 0.5
  with pytest.raises(ValueError, match="solver=None"):
    optax_ramda.prox_adamw(0.05, 0.5, reg, solver="exact")
