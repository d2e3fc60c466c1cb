"""Guards for the performance work of issue 7 (BENCHMARKS.md "Profile").

The optimizations must not change results: the exact solver's batching of
same-shape leaves, the cube root's fused offset, and the scalar-branch restart
of the dual averages are checked here against their plain counterparts; the
state and temporary-memory budgets are checked from ``opt.init`` and XLA's
compiled memory analysis.
"""

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from xla_version import JAXLIB

import optax_ramda
from optax_ramda import GroupSpec
from optax_ramda._src import exact, solvers
from optax_ramda._src.groups import group_leaf
from optax_ramda._src.preconditioners import cube_root


def _problems(n, shape, thresholds, dtype, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    x0 = rng.normal(size=shape)
    p = 10.0 ** rng.uniform(-2, 2, size=shape)
    v = rng.normal(size=shape) * p
    c = lambda a: jnp.asarray(a, dtype)
    out.append(solvers.LeafProblem(c(x0), c(v), c(p), c(x0), c(thresholds[i])))
  return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(
    "thresholds",
    [
        (1.0, 3.0, 0.5, 2.0),
        (1.0, 0.0, 2.0, 0.0),
        # More leaves than one batch holds (exact.MAX_STACK = 8): batches of
        # 5 and 5, and of 5 and 6.
        (1.0, 3.0, 0.5, 2.0, 1.5, 0.7, 2.5, 1.1, 0.0, 0.9),
        (1.0, 3.0, 0.5, 2.0, 1.5, 0.7, 2.5, 1.1, 0.0, 0.9, 0.0),
    ],
)
def test_batched_leaves_match_solo_solves(dtype, thresholds):
  """Same-shape leaves are solved as stacked batches; each equals its solo solve.

  All but the first case have leaves with ``t == 0`` in the batch, which
  take the unregularized branch (``z = x0 - V / P``) of ``_finish_batch``;
  the last two have more leaves than one batch holds (``exact.MAX_STACK``).
  """
  with jax.enable_x64(dtype == jnp.float64):
    shape = (7, 5)
    leaf = group_leaf(GroupSpec((1,)), np.zeros(shape), "w")
    probs = _problems(len(thresholds), shape, thresholds, dtype)
    together = jax.jit(lambda ps: exact.exact_solve([leaf] * len(ps), ps))(probs)
    for p, got in zip(probs, together):
      (alone,) = jax.jit(lambda p: exact.exact_solve([leaf], [p]))(p)
      np.testing.assert_array_equal(got.z, alone.z)
      assert int(got.iterations) == int(alone.iterations)
      np.testing.assert_array_equal(got.residual, alone.residual)
      if float(p.threshold) == 0:
        np.testing.assert_array_equal(got.z, p.centre - p.linear / p.metric)


def test_batching_grows_the_newton_loop_per_batch_not_per_leaf():
  """The while body's jaxpr grows with the batches of same-shape leaves only.

  Up to ``exact.MAX_STACK`` leaves make one batch; more make one more batch
  per ``MAX_STACK`` leaves.
  """
  shape = (6, 4)
  leaf = group_leaf(GroupSpec((1,)), np.zeros(shape), "w")
  m = exact.MAX_STACK

  def body_size(n):
    probs = _problems(n, shape, [1.0] * n, jnp.float32)
    jaxpr = jax.make_jaxpr(lambda ps: exact.exact_solve([leaf] * n, ps))(probs)
    (loop,) = [e for e in jaxpr.eqns if e.primitive.name == "while"]
    return len(loop.params["body_jaxpr"].eqns)

  assert body_size(2) == body_size(m) < body_size(m + 1) == body_size(2 * m)


@pytest.mark.parametrize("n, sizes", [(1, [1]), (8, [8]), (9, [4, 5]), (12, [6, 6]),
                                      (17, [5, 6, 6]), (48, [8] * 6)])
def test_stack_slices_are_the_fewest_and_even(n, sizes):
  got = exact._stack_slices(n)
  assert [s.stop - s.start for s in got] == sizes
  assert got[0].start == 0 and got[-1].stop == n


def test_stacks_are_written_by_the_fused_metric():
  """No stack of leaves is a plain copy: XLA fuses the metric into the stacking.

  XLA's CPU backend fuses nothing into a concatenation of more than 8
  operands, so one stack of 12 leaves was a plain ``concatenate`` of each
  leaf's stored ``P``, ``x0`` and ``V`` (BENCHMARKS.md, "Stacks of at most 8
  leaves"); in two batches of 6 (``exact.MAX_STACK``) every stacking is
  fused with its producers. Checked in the optimized HLO of RAMDA's update
  with 12 same-shape regularized leaves.
  """
  params = {f"w{i}": jnp.ones((16, 8)) for i in range(12)}
  reg = optax_ramda.group_lasso({k: GroupSpec((1,)) for k in params})
  opt = optax_ramda.ramda(1e-2, 1e-3, reg)
  step = jax.jit(lambda g, s, p: opt.update(g, s, p))
  hlo = step.lower(params, opt.init(params), params).compile().as_text()
  entry = hlo[hlo.index("ENTRY"):]
  plain = re.findall(r"= f32\[[\d,]*16,8\]\{[\d,]+\} concatenate\(", entry)
  assert not plain, plain
  assert re.search(r"= f32\[6,16,8\]\{[\d,]+\} fusion\(", entry)
  assert not re.search(r"= f32\[12,16,8\]", entry)


def _sub_jaxprs(params):
  """The jaxprs in an equation's params (``jax.extend.core.jaxprs_in_params``, not in JAX 0.8)."""
  for v in params.values():
    for item in v if isinstance(v, (tuple, list)) else (v,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _loops(jaxpr, depth=0):
  """Deepest nesting of loops (``while``, ``scan``) in a jaxpr."""
  deepest = depth
  for e in jaxpr.eqns:
    for sub in _sub_jaxprs(e.params):
      deepest = max(deepest, _loops(sub, depth + (e.primitive.name in ("while", "scan"))))
  return deepest


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(
    "shape, axes, thresholds",
    [
        ((48, 20), (1,), (1.0,)),  # dense kernel: chunks of rows
        ((48, 20), (1,), (0.0,)),  # one leaf without strength: z = x0 - V / P inside the chunks
        ((3, 3, 12, 8), (0, 1, 3), (0.9,)),  # conv kernel: chunks of input channels (strided)
        # Stacked batches, cut along the leaves' rows (each leaf's own P
        # carried, no stacks), one leaf without strength:
        ((12, 10), (1,), (1.0, 0.0, 1.2, 0.5)),
        ((3, 3, 12, 8), (0, 1, 3), (0.9, 1.1)),  # stacked conv kernels: strided cuts
        ((6,), (), (1.0, 0.8)),  # L1 (every entry a group)
        ((10,), (0,), (0.5, 0.0, 1e3, 0.8)),  # one group per leaf: chunks of whole leaves
    ],
)
def test_chunked_solves_match_the_single_loop(monkeypatch, dtype, shape, axes, thresholds):
  """Large batches are solved chunk by chunk, with the unchunked solve's results.

  The chunk sizes are shrunk so that small problems take the chunked path
  (normally from ``exact.CHUNK_FROM`` entries, on CPU). The chunks solve the
  same equations; XLA may sum a chunk's groups in another order, so ``z`` is
  compared to ``1000 eps`` of the largest entry (on these shapes it is
  currently bit-identical), the zero pattern and the Newton steps exactly.
  """
  with jax.enable_x64(dtype == jnp.float64):
    leaf = group_leaf(GroupSpec(axes), np.zeros(shape), "w")
    probs = _problems(len(thresholds), shape, thresholds, dtype, seed=3)
    # Thresholds in units of the median group norm of b = P x0 - V, so that
    # about half the groups are screened at 1.0.
    median = np.median(leaf.norm(probs[0].metric * probs[0].centre - probs[0].linear))
    probs = [p._replace(threshold=p.threshold * median.astype(dtype)) for p in probs]
    # A fresh function per configuration: JAX caches traces by function, and
    # the chunking is decided at trace time.
    solver = lambda: lambda ps: exact.exact_solve([leaf] * len(ps), ps)
    monkeypatch.setattr(exact, "CHUNK_FROM", 10**12)
    plain = jax.jit(solver())(probs)
    assert _loops(jax.make_jaxpr(solver())(probs).jaxpr) == 1
    size = len(thresholds) * int(np.prod(shape))
    monkeypatch.setattr(exact, "CHUNK_FROM", 1)
    monkeypatch.setattr(exact, "_chunking_pays", lambda: True)  # conftest: 8 devices
    monkeypatch.setattr(exact, "CHUNK_ENTRIES", size // 3)
    monkeypatch.setattr(exact, "MIN_CHUNK_ENTRIES", 1)
    axis, _ = exact._chunking(exact._stacked(leaf, len(thresholds)), (len(thresholds), *shape))
    assert (axis == 0) == (axes == (0,))  # whole leaves only where a leaf is one group
    assert _loops(jax.make_jaxpr(solver())(probs).jaxpr) == 2  # chunk loop around Newton loops
    chunked = jax.jit(solver())(probs)
    tol = 1000 * np.finfo(dtype).eps
    for p, a, b in zip(probs, plain, chunked):
      np.testing.assert_allclose(b.z, a.z, rtol=0, atol=tol * float(np.max(np.abs(a.z))))
      np.testing.assert_array_equal(np.asarray(b.z) == 0, np.asarray(a.z) == 0)
      assert int(b.iterations) == int(a.iterations)
      np.testing.assert_allclose(b.residual, a.residual, rtol=1e-3, atol=tol * float(p.threshold))
      if float(p.threshold) == 0:
        np.testing.assert_array_equal(b.z, p.centre - p.linear / p.metric)
      elif leaf.num_groups > 1:
        assert int(a.iterations) > 0 and np.any(np.asarray(a.z) == 0)
    if leaf.num_groups == 1:  # some leaves kept (Newton steps taken), one screened
      assert any(int(a.iterations) > 0 for a in plain)
      assert any(not np.any(a.z) for a, p in zip(plain, probs) if float(p.threshold) > 0)


@pytest.mark.parametrize(
    "shape, axes, thresholds",
    [
        ((48, 20), (1,), (1.0,)),  # a single leaf, chunks of rows
        ((12, 10), (1,), (1.0, 0.0, 1.2, 0.5)),  # stacked leaves cut along their rows
        ((10,), (0,), (0.5, 0.0, 1e3, 0.8)),  # chunks of whole leaves
    ],
)
def test_scaled_centre_and_linear_term_are_formed_inside_the_chunks(
    monkeypatch, shape, axes, thresholds
):
  """``LeafProblem``'s scales: ``V = linear_scale * linear``, ``x0 = centre * centre_scale``.

  Unchunked, the products are formed before the solve, as from a folded
  problem: bit-identical. Chunked, each chunk multiplies its own slices (no
  full-size products), inside the fusion that forms ``b``; compared like
  ``test_chunked_solves_match_the_single_loop``.
  """
  leaf = group_leaf(GroupSpec(axes), np.zeros(shape), "w")
  probs = _problems(len(thresholds), shape, thresholds, jnp.float32, seed=5)
  median = np.median(leaf.norm(probs[0].metric * probs[0].centre - probs[0].linear))
  a, d = jnp.asarray(0.3, jnp.float32), jnp.asarray(0.9, jnp.float32)
  scaled = [p._replace(threshold=p.threshold * median, linear=p.linear / a, linear_scale=a,
                       centre=p.centre / d, centre_scale=d)
            for p in probs]
  folded = [p.folded() for p in scaled]
  assert all(p.linear_scale is None and p.centre_scale is None for p in folded)
  solver = lambda: lambda ps: exact.exact_solve([leaf] * len(ps), ps)
  monkeypatch.setattr(exact, "CHUNK_FROM", 10**12)
  for a_, b_ in zip(jax.jit(solver())(scaled), jax.jit(solver())(folded)):
    np.testing.assert_array_equal(a_.z, b_.z)
    assert int(a_.iterations) == int(b_.iterations)
  monkeypatch.setattr(exact, "CHUNK_FROM", 1)
  monkeypatch.setattr(exact, "_chunking_pays", lambda: True)  # conftest: 8 devices
  monkeypatch.setattr(exact, "CHUNK_ENTRIES", len(thresholds) * int(np.prod(shape)) // 3)
  monkeypatch.setattr(exact, "MIN_CHUNK_ENTRIES", 1)
  assert _loops(jax.make_jaxpr(solver())(scaled).jaxpr) == 2  # chunked
  tol = 1000 * np.finfo(np.float32).eps
  for p, a_, b_ in zip(scaled, jax.jit(solver())(scaled), jax.jit(solver())(folded)):
    np.testing.assert_allclose(a_.z, b_.z, rtol=0, atol=tol * float(np.max(np.abs(b_.z))))
    np.testing.assert_array_equal(np.asarray(a_.z) == 0, np.asarray(b_.z) == 0)
    assert int(a_.iterations) == int(b_.iterations)
    if float(p.threshold) == 0:  # the unregularized point, from the scaled term too
      np.testing.assert_allclose(a_.z, p.centre * d - a * p.linear / p.metric, rtol=1e-6)
  assert any(np.any(np.asarray(s.z) == 0) for s in jax.jit(solver())(scaled))


def test_chunking_picks_whole_groups_and_even_chunks(monkeypatch):
  """Chunks slice a group axis (never a reduce axis) into equal parts, within bounds."""
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  assert exact._chunking_pays() == (jax.default_backend() == "cpu")
  if not exact._chunking_pays():
    pytest.skip("chunked solves are CPU only")
  conv = exact._stacked(group_leaf(GroupSpec((0, 1, 3)), np.zeros((3, 3, 744, 744)), "w"), 1)
  axis, k = exact._chunking(conv, (1, 3, 3, 744, 744))
  assert axis == 3 and 744 % k == 0
  assert exact.MIN_CHUNK_ENTRIES <= 3 * 3 * 744 * 744 // k <= exact.CHUNK_ENTRIES
  dense = exact._stacked(group_leaf(GroupSpec((1,)), np.zeros((456, 456)), "w"), 16)
  # A leaf axis before the stacking axis: rows of all 16 leaves per chunk.
  assert exact._chunking(dense, (16, 456, 456)) == (1, 8)
  assert exact._chunking(dense, (1, 456, 456)) is None  # below CHUNK_FROM
  odd = exact._stacked(group_leaf(GroupSpec((1,)), np.zeros((457, 456)), "w"), 16)
  # 457 rows (a prime) cannot be cut into chunks of 64K+ entries: whole leaves.
  assert exact._chunking(odd, (16, 457, 456)) == (0, 8)
  wide = exact._stacked(group_leaf(GroupSpec((1,)), np.zeros((456, 1824)), "w"), 4)
  assert exact._chunking(wide, (4, 456, 1824))[0] == 1
  whole = exact._stacked(group_leaf(GroupSpec((0, 1)), np.zeros((2048, 2048)), "w"), 1)
  assert exact._chunking(whole, (1, 2048, 2048)) is None  # one group: nothing to chunk
  monkeypatch.setattr(jax, "device_count", lambda *a: 8)
  assert exact._chunking(conv, (1, 3, 3, 744, 744)) is None  # several devices: maybe sharded
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert exact._chunking(conv, (1, 3, 3, 744, 744)) is None  # CPU only


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cube_root_offset_is_added_with_one_rounding(dtype):
  """``cube_root(u, eps)`` is bit for bit ``cube_root(u) + eps``, scaled ranges included."""
  with jax.enable_x64(dtype == np.float64):
    rng = np.random.default_rng(0)
    lo, hi = (-40, 38) if dtype == np.float32 else (-300, 300)
    u = np.concatenate([[0.0, 1.0, 8.0], 10.0 ** rng.uniform(lo, hi, 50_000)]).astype(dtype)
    for eps in (1e-6, 1e-8, 0.3):
      got = np.asarray(cube_root(jnp.asarray(u), jnp.asarray(eps, dtype)))
      want = np.asarray(cube_root(jnp.asarray(u))) + dtype(eps)
      np.testing.assert_array_equal(got, want)


def _params():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return {
      "conv": {"kernel": jax.random.normal(k[0], (3, 3, 32, 64)) * 0.1, "bias": jnp.zeros(64)},
      "dense": {"kernel": jax.random.normal(k[1], (256, 128)) * 0.1, "bias": jnp.zeros(128)},
  }


def _reg():
  return optax_ramda.group_lasso({
      "conv": {"kernel": GroupSpec((0, 1, 3)), "bias": None},
      "dense": {"kernel": GroupSpec((1,)), "bias": None},
  })


def _param_sized(state, params):
  shapes = sorted(x.shape for x in jax.tree.leaves(params))
  return sorted(x.shape for x in jax.tree.leaves(state) if x.ndim > 0), shapes


@pytest.mark.parametrize("name, copies", [("ramda", 3), ("prox_adamw", 2)])
def test_state_is_exactly_the_papers_buffers(name, copies):
  """RAMDA keeps x0, V, U; ProxGen m, v; everything else is scalars and 3 short vectors."""
  params = _params()
  opt = getattr(optax_ramda, name)(1e-2, 1e-3, _reg())
  got, shapes = _param_sized(opt.init(params), params)
  # The solver diagnostics: one vector per field, one entry per leaf.
  assert got == sorted(shapes * copies + [(len(shapes),)] * 3)


@pytest.mark.parametrize("name, copies", [("ramda", 3), ("prox_adamw", 2), ("rmda", 2)])
def test_state_arrays_per_leaf_are_the_buffers_only(name, copies):
  """Each parameter leaf adds only its buffers to the state, no per-leaf scalars.

  Every array of the state is an argument of the jitted step and costs its
  dispatch (about 2 us per array per call on the benchmark machine,
  BENCHMARKS.md "Per-leaf scalars"); the solver diagnostics are one vector
  per field, whatever the number of leaves.
  """
  params = _params()
  spec = _reg().groups
  counts = []
  for tree, groups in ((params, spec), ({"a": params, "b": params}, {"a": spec, "b": spec})):
    opt = getattr(optax_ramda, name)(1e-2, 1e-3, optax_ramda.group_lasso(groups))
    counts.append(len(jax.tree.leaves(opt.init(tree))))
  n = len(jax.tree.leaves(params))
  assert counts[1] - counts[0] == copies * n, counts


def _step(opt):
  def step(params, state, grads):  # donated arguments first, in output order
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def _temporaries(opt, params):
  """XLA's temporaries of the donated update, in parameter copies."""
  state = jax.eval_shape(opt.init, params)
  mem = _step(opt).lower(params, state, params).compile().memory_analysis()
  if mem is None:
    pytest.skip("no memory analysis on this backend")
  return mem.temp_size_in_bytes / sum(x.nbytes for x in jax.tree.leaves(params))


# Below jaxlib 0.10.2, XLA keeps one more parameter-sized temporary in the closed-form prox
# of a scalar metric (measured 2026-11-25 with jaxlib 0.8.1, 0.9.0, 0.9.2, 0.10.0, 0.10.1:
# RMDA and ProxSGD 1.99 copies below FUSED_PROX_FROM, 1.00 fused); the other rows' budgets held.
_OLD_XLA_COPY = 0.0 if JAXLIB >= (0, 10, 2) else 1.0


@pytest.mark.parametrize(
    "make, bound",
    [
        # Measured on this model (JAX 0.10.2 CPU), in param copies: 0.0 for
        # adamw and RAMDA without regularizer, 4.0 for RAMDA and ProxGen
        # with the exact solver (P and b = P x0 - V, stacked per batch, and
        # the Newton loop's stacked pair of sums; ProxGen kept sqrt(v) as a
        # fifth, 5.0, until its metric ended in a division). Before issue 7's
        # changes: 7.0 and 6.0 at 1e6 params.
        (lambda: optax.adamw(1e-3), 0.5),
        (lambda: optax_ramda.ramda(1e-2), 0.5),
        (lambda: optax_ramda.ramda(1e-2, 1e-3, _reg()), 4.5),
        (lambda: optax_ramda.prox_adamw(1e-3, 1e-3, _reg()), 4.5),
        # The closed-form prox of a scalar metric, below FUSED_PROX_FROM: y.
        (lambda: optax_ramda.rmda(1e-1, 1e-3, _reg()), 1.5 + _OLD_XLA_COPY),
        (lambda: optax_ramda.prox_sgd(1e-1, 1e-3, _reg()), 1.5 + _OLD_XLA_COPY),
    ],
)
def test_update_temporaries_stay_within_budget(make, bound):
  copies = _temporaries(make(), _params())
  assert copies <= bound, copies


@pytest.mark.parametrize("make", [
    lambda: optax_ramda.rmda(1e-1, 1e-3, _reg()),
    lambda: optax_ramda.prox_sgd(1e-1, 1e-3, _reg()),  # a constant lr
    lambda: optax_ramda.prox_sgd(optax.cosine_decay_schedule(0.1, 100), 1e-3, _reg()),
])
def test_closed_form_prox_is_fused_from_its_size_on(monkeypatch, make):
  """The group leaves of a scalar metric (RMDA, ProxSGD) are solved fused, with no
  parameter-sized temporary, once they reach ``FUSED_PROX_FROM`` bytes; below, ``y``
  is stored (1 copy: the norms' pass and z's pass read it). Measured (JAX 0.10.2 CPU):
  0.00 fused (1.00 for every update before, also for ProxSGD with a constant lr until
  its ``lr * buf`` was passed as ``linear_scale``), 1.00 unfused."""
  from optax_ramda._src import solvers

  params = _params()
  nbytes = sum(params[k]["kernel"].nbytes for k in params)  # the group leaves
  monkeypatch.setattr(solvers, "FUSED_PROX_FROM", nbytes)
  assert _temporaries(make(), params) < 0.05 + _OLD_XLA_COPY
  monkeypatch.setattr(solvers, "FUSED_PROX_FROM", nbytes + 1)
  assert 0.9 + _OLD_XLA_COPY < _temporaries(make(), params) < 1.1 + _OLD_XLA_COPY


def _chunked_model(kind):
  if kind == "single":  # two leaves of 2M+ entries, each its own batch
    return {
        "conv": {"kernel": jnp.zeros((3, 3, 512, 512)), "bias": jnp.zeros(512)},
        "dense": {"kernel": jnp.zeros((2048, 1024)), "bias": jnp.zeros(1024)},
    }
  # 16 (456, 456) kernels: one stacked batch of 3.3M entries (the 1e7 Transformer's)
  return {f"l{i}": {"kernel": jnp.zeros((456, 456)), "bias": jnp.zeros(456)} for i in range(16)}


def _kernels_regularized(params):
  spec = {1: None, 2: GroupSpec((1,)), 4: GroupSpec((0, 1, 3))}
  return optax_ramda.group_lasso(jax.tree.map(lambda x: spec[x.ndim], params))


@pytest.mark.parametrize(
    "make, kind, bound",
    [
        # Measured (JAX 0.10.2 CPU), in param copies. Single leaves: 1.47 for
        # all three (2.47 and 3.26 before z took over P's buffer, 4.0 and 5.0
        # unchunked): P (then z) and the chunks' work arrays. ProxGen kept
        # its linear term (lr / (1 - b1^k)) m as one more copy (2.27), and
        # with weight decay its centre x (1 - lr wd) as another (3.27), until
        # the chunks formed them from m and x. Stacked batch: 1.50 for all
        # (3.00 and 3.06 while the batch's b and P were stacked in full;
        # ProxGen 2.50 and 3.50 with those products).
        (lambda r: optax_ramda.ramda(1e-2, 1e-3, r), "single", 2.0),
        (lambda r: optax_ramda.prox_adamw(1e-3, 1e-3, r), "single", 2.0),
        (lambda r: optax_ramda.prox_adamw(1e-3, 1e-3, r, weight_decay=1e-4), "single", 2.0),
        (lambda r: optax_ramda.ramda(1e-2, 1e-3, r), "stacked", 2.0),
        (lambda r: optax_ramda.prox_adamw(1e-3, 1e-3, r), "stacked", 2.0),
        (lambda r: optax_ramda.prox_adamw(1e-3, 1e-3, r, weight_decay=1e-4), "stacked", 2.0),
    ],
)
def test_chunked_solves_keep_temporaries_small(monkeypatch, make, kind, bound):
  """Batches of 2M+ entries are solved chunk by chunk (CPU): within 2 param copies."""
  if jax.default_backend() != "cpu":
    pytest.skip("chunked solves are CPU only")
  monkeypatch.setattr(exact, "_chunking_pays", lambda: True)  # conftest: 8 devices
  params = _chunked_model(kind)
  sizes = [x.size for x in jax.tree.leaves(params) if x.ndim > 1]
  assert (min(sizes) if kind == "single" else sum(sizes)) >= exact.CHUNK_FROM
  assert _temporaries(make(_kernels_regularized(params)), params) <= bound


def test_restart_branch_matches_elementwise_select():
  """x0 is the step's params at a restart and untouched between restarts."""
  params = _params()
  opt = optax_ramda.ramda(1e-2, 1e-3, _reg(), milestones=(2,))
  state = opt.init(params)
  update = jax.jit(opt.update)
  p = params
  for i in range(4):
    g = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), p)
    before = state[0].centre
    u, state = update(g, state, p)
    want = p if i in (0, 2) else before  # steps 0 and 2 restart
    jax.tree.map(np.testing.assert_array_equal, state[0].centre, want)
    p = optax.apply_updates(p, u)


def test_exact_diagnostics_add_no_reduction_per_leaf():
  # The exact solver's iterations and residual reach SolveState as its
  # batches' vectors (one gather), not as one masked sum per leaf and field:
  # those were two small kernels per leaf at every update (BENCHMARKS.md,
  # "Diagnostics without per-leaf kernels"). Same-shape leaves form batches of
  # up to exact.MAX_STACK, so the update's number of reductions grows with the
  # batches only.
  def reductions(n, alias):
    params = {f"w{i}": jnp.ones((16, 8)) for i in range(n)}
    reg = optax_ramda.group_lasso({k: optax_ramda.GroupSpec((1,)) for k in params})
    opt = alias(1e-2, 1e-3, reg)
    jaxpr = jax.make_jaxpr(opt.update)(params, opt.init(params), params)
    return len(re.findall(r"\breduce_sum\[", str(jaxpr)))

  m = exact.MAX_STACK
  for alias in (optax_ramda.ramda, optax_ramda.prox_adamw):
    assert reductions(m, alias) == reductions(2, alias), alias.__name__
    assert reductions(2 * m, alias) == reductions(m + 1, alias), alias.__name__
