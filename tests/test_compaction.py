"""Tests of optax_ramda.compact: smaller models computing the same function.

Tolerances. Removing zero rows changes the contraction length of a matmul/conv, so
XLA may sum in another order: the outputs then agree up to reassociation, bounded by
``K * u * sum |x||w|`` (K the contraction length, u the unit roundoff). We check in
float64 (u = 1.1e-16, K <= 512, sum |x||w| within ~10x the output scale here) with
``atol = 1e-12 * scale``, and float32 models (u = 6e-8) with ``1e-5 * scale``.
Where no contraction changes (nothing removed) we require bitwise equality.
"""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_ramda

F64_TOL = 1e-12
F32_TOL = 1e-5


def _close(a, b, tol):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape
  scale = max(1.0, float(np.max(np.abs(a))))
  np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale)


def _shapes(model):
  return jax.tree.map(jnp.shape, nnx.state(model, nnx.Param))


def _params_equal(a, b):
  sa, sb = nnx.state(a), nnx.state(b)
  same = jax.tree.map(lambda x, y: x.shape == y.shape and bool(jnp.all(x == y)), sa, sb)
  return all(jax.tree.leaves(same))


def _randomize_bn(bn, key):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  n = bn.num_features
  dt = bn.scale[...].dtype
  bn.scale.set_value(1.0 + 0.3 * jax.random.normal(k1, (n,), dt))
  bn.bias.set_value(0.3 * jax.random.normal(k2, (n,), dt))
  bn.mean.set_value(0.3 * jax.random.normal(k3, (n,), dt))
  bn.var.set_value(0.5 + jax.random.uniform(k4, (n,), dt))


def _mlp(dtype=jnp.float64, bn=True):
  r = nnx.Rngs(0)
  kw = dict(param_dtype=dtype, dtype=dtype, rngs=r)
  layers = [nnx.Linear(6, 12, **kw)]
  if bn:
    layers.append(nnx.BatchNorm(12, **kw))
  layers += [nnx.gelu, nnx.Linear(12, 10, **kw), nnx.relu, nnx.Linear(10, 3, **kw)]
  m = nnx.Sequential(*layers)
  if bn:
    _randomize_bn(layers[1], jax.random.PRNGKey(1))
  m.eval()
  return m


def _flatten(x):
  return x.reshape(x.shape[0], -1)


def _pool(x):
  return nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))


def _cnn(dtype=jnp.float64, padding="SAME"):
  r = nnx.Rngs(0)
  kw = dict(param_dtype=dtype, dtype=dtype, rngs=r)
  m = nnx.Sequential(
      nnx.Conv(2, 6, (3, 3), padding=padding, **kw),
      nnx.BatchNorm(6, **kw),
      nnx.relu,
      nnx.Conv(6, 8, (3, 3), padding=padding, **kw),
      nnx.relu,
      _pool,
      _flatten,
      nnx.Linear(4 * 4 * 8 if padding == "SAME" else 2 * 2 * 8, 16, **kw),
      nnx.LayerNorm(16, **kw),
      nnx.relu,
      nnx.Linear(16, 5, **kw),
  )
  _randomize_bn(m.layers[1], jax.random.PRNGKey(2))
  m.eval()
  return m


def _x(shape, dtype=jnp.float64, seed=3):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def _zero(var, index):
  var.set_value(var[...].at[index].set(0))


# --- MLP -----------------------------------------------------------------------------------


def test_input_wise_zero_rows_remove_neurons_and_bn_entries():
  with jax.enable_x64(True):
    m = _mlp()
    x = _x((32, 6))
    _zero(m.layers[3].kernel, jnp.array([1, 4, 5]))  # rows of layer 2 -> neurons of layer 1
    small = optax_ramda.compact(m, x)
    assert small.layers[0].kernel.shape == (6, 9)
    assert small.layers[1].scale.shape == (9,) and small.layers[1].mean.shape == (9,)
    assert small.layers[3].kernel.shape == (9, 10)
    _close(small(x), m(x), F64_TOL)
    assert m.layers[0].kernel.shape == (6, 12)  # the input model is untouched


def test_output_wise_zero_column_folds_constant_through_bn_and_activation():
  with jax.enable_x64(True):
    m = _mlp()
    x = _x((32, 6))
    _zero(m.layers[0].kernel, (slice(None), jnp.array([0, 7])))
    b = m.layers[0].bias
    b.set_value(b[...].at[jnp.array([0, 7])].set(jnp.array([0.8, -1.3])))
    plan = optax_ramda.compaction_plan(m, x)
    assert plan[0].kept == 10 and plan[0].folded == 2
    small = optax_ramda.compact(m, x)
    assert small.layers[0].kernel.shape == (6, 10)
    assert not np.allclose(small.layers[3].bias[...], m.layers[3].bias[...])  # a real fold
    _close(small(x), m(x), F64_TOL)


def test_cascade_and_idempotence():
  with jax.enable_x64(True):
    m = _mlp(bn=False)
    x = _x((32, 6))
    # Removing outputs of layer 2 (column 4 folded, rows 0, 1 of layer 3) and an input of it
    # (row 3) in one go; the fixpoint loop handles the order.
    _zero(m.layers[2].kernel, (3, slice(None)))  # row 3 of layer 2 zero: removes neuron 3
    _zero(m.layers[4].kernel, (jnp.array([0, 1]), slice(None)))  # rows of layer 3
    _zero(m.layers[2].kernel, (slice(None), 4))  # column 4 of layer 2, bias kept non-zero
    small = optax_ramda.compact(m, x)
    _close(small(x), m(x), F64_TOL)
    again = optax_ramda.compact(small, x)
    assert _params_equal(small, again)
    assert bool(jnp.all(again(x) == small(x)))


def test_no_zero_groups_is_unchanged_bitwise():
  m = _cnn(jnp.float32)
  x = _x((4, 8, 8, 2), jnp.float32)
  small = optax_ramda.compact(m, x)
  assert _params_equal(m, small)
  assert bool(jnp.all(small(x) == m(x)))


@pytest.mark.parametrize("dead", ["consumer rows", "producer columns", "mixed"])
def test_a_layer_whose_channels_are_all_zero_keeps_one(dead):
  # At a high strength a whole hidden layer can come out zero; compact used to crash
  # (argmax of an empty sequence) on the then zero-wide layer. One channel is kept, as
  # attention keeps one head, and the function is unchanged.
  with jax.enable_x64(True):
    m = _mlp(bn=False)
    x = _x((32, 6))
    if dead in ("consumer rows", "mixed"):
      _zero(m.layers[4].kernel, (slice(0, 7), slice(None)) if dead == "mixed" else ...)
    if dead in ("producer columns", "mixed"):
      cols = slice(7, None) if dead == "mixed" else ...
      _zero(m.layers[2].kernel, (slice(None), cols))
      # relu(bias) of the dead columns: some zero, some folded into the last layer's bias
      m.layers[2].bias.set_value(m.layers[2].bias[...].at[cols].set(0.0).at[-1].set(0.4))
    small = optax_ramda.compact(m, x)
    # (with every column of layers/2 zero, its input rows are zero too, and layers/0 is
    # cut down to one channel as well)
    assert small.layers[2].kernel.shape[1] == 1 and small.layers[4].kernel.shape == (1, 3)
    _close(small(x), m(x), F64_TOL)
    (b,) = [b for b in optax_ramda.compaction_plan(m, x) if b.producer == "layers/2"]
    assert (b.channels, b.kept) == (10, 1) and "channel" in b.note and "kept" in b.note
    assert _params_equal(small, optax_ramda.compact(small, x))


def test_refuses_lora_linear_naming_the_layer():
  # LoRALinear is an nnx.Linear with extra weights; slicing only its kernel made the
  # compacted model fail with a shape error inside its __call__.
  r = nnx.Rngs(0)
  m = nnx.Sequential(nnx.Linear(6, 8, rngs=r), nnx.relu, nnx.LoRALinear(8, 3, lora_rank=2, rngs=r))
  _zero(m.layers[2].kernel, (jnp.array([1, 4]), slice(None)))
  with pytest.raises(ValueError, match=r"layer layers/2 is a LoRALinear.*lora_a"):
    optax_ramda.compact(m, jnp.ones((2, 6)))
  assert m.layers[0].kernel.shape == (6, 8)


# --- CNN -----------------------------------------------------------------------------------


def test_cnn_channels_through_bn_pool_and_flatten():
  with jax.enable_x64(True):
    m = _cnn()
    x = _x((8, 8, 8, 2))
    _zero(m.layers[3].kernel, (slice(None), slice(None), jnp.array([0, 2]), slice(None)))
    fc = m.layers[7]
    k = fc.kernel[...].reshape(16, 8, 16)
    k = k.at[:, jnp.array([1, 6]), :].set(0)  # channels 1 and 6 fully unused by the Linear
    k = k.at[:5, 3, :].set(0)  # channel 3 only partly: must stay
    fc.kernel.set_value(k.reshape(128, 16))
    small = optax_ramda.compact(m, x)
    assert small.layers[0].kernel.shape == (3, 3, 2, 4)
    assert small.layers[1].var.shape == (4,)
    assert small.layers[3].kernel.shape == (3, 3, 4, 6)
    assert small.layers[7].kernel.shape == (16 * 6, 16)
    _close(small(x), m(x), F64_TOL)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_constant_filter_into_conv(padding):
  # A zero filter with non-zero bias gives a constant channel. Folding it into the next conv's
  # bias is exact only without zero padding: with SAME it must be kept, with VALID removed.
  with jax.enable_x64(True):
    m = _cnn(padding=padding)
    x = _x((4, 8, 8, 2))
    _zero(m.layers[0].kernel, (..., 2))
    bn = m.layers[1]
    b = m.layers[0].bias
    b.set_value(b[...].at[2].set(bn.mean[...][2] + 1.0))  # bn input above its mean: relu > 0
    small = optax_ramda.compact(m, x)
    assert small.layers[0].kernel.shape[-1] == (6 if padding == "SAME" else 5)
    _close(small(x), m(x), F64_TOL)


def test_constant_zero_after_activation_is_removed_even_with_padding():
  with jax.enable_x64(True):
    m = _cnn()
    x = _x((4, 8, 8, 2))
    _zero(m.layers[0].kernel, (..., 2))
    bn = m.layers[1]
    bn.bias.set_value(bn.bias[...].at[2].set(-5.0))  # relu(bn(b)) == 0 exactly
    small = optax_ramda.compact(m, x)
    assert small.layers[0].kernel.shape[-1] == 5
    _close(small(x), m(x), F64_TOL)


def test_layernorm_blocks_its_boundary():
  with jax.enable_x64(True):
    m = _cnn()
    x = _x((4, 8, 8, 2))
    _zero(m.layers[10].kernel, (jnp.array([0, 1, 2]), slice(None)))  # behind a LayerNorm
    plan = optax_ramda.compaction_plan(m, x)
    assert plan[-1].kept == plan[-1].channels and "normalization" in plan[-1].note
    small = optax_ramda.compact(m, x)
    assert _shapes(small) == _shapes(m)


def test_channel_mixing_function_blocks_its_boundary():
  with jax.enable_x64(True):
    m = _mlp(bn=False)
    m.layers[1] = lambda h: nnx.relu(h - jnp.mean(h, axis=-1, keepdims=True))
    x = _x((16, 6))
    _zero(m.layers[2].kernel, (jnp.array([0, 3]), slice(None)))
    plan = optax_ramda.compaction_plan(m, x)
    assert plan[0].kept == 12 and "mix" in plan[0].note
    small = optax_ramda.compact(m, x)
    _close(small(x), m(x), F64_TOL)


@pytest.mark.parametrize("seed", range(4))
def test_random_zero_groups_mlp_and_cnn_float32(seed):
  rng = np.random.default_rng(seed)
  m = _cnn(jnp.float32)
  x = _x((8, 8, 8, 2), jnp.float32, seed)
  for i in (0, 3):  # random input-wise and output-wise zero groups in both convs
    conv = m.layers[i]
    _zero(conv.kernel, (..., jnp.asarray(rng.random(conv.out_features) < 0.3)))
    cin = jnp.asarray(rng.random(conv.in_features) < 0.3)
    _zero(conv.kernel, (slice(None), slice(None), cin, slice(None)))
  k = m.layers[7].kernel[...].reshape(16, 8, 16)
  k = k.at[:, jnp.asarray(rng.random(8) < 0.4), :].set(0)
  m.layers[7].kernel.set_value(k.reshape(128, 16))
  small = optax_ramda.compact(m, x)
  _close(small(x), m(x), F32_TOL)
  assert _params_equal(small, optax_ramda.compact(small, x))


# --- containers and refusals ----------------------------------------------------------------


def test_plain_list_and_nested_sequential():
  with jax.enable_x64(True):
    m = _mlp(bn=False)
    x = _x((8, 6))
    _zero(m.layers[2].kernel, (jnp.array([2, 5]), slice(None)))
    layers = list(m.layers)
    small = optax_ramda.compact(layers, x)
    assert isinstance(small, list) and small[0].kernel.shape == (6, 10)
    nested = nnx.Sequential(nnx.Sequential(*layers[:2]), nnx.Sequential(*layers[2:]))
    nested.eval()
    small = optax_ramda.compact(nested, x)
    assert small.layers[0].layers[0].kernel.shape == (6, 10)
    _close(small(x), m(x), F64_TOL)


class Residual(nnx.Module):
  def __init__(self, rngs):
    self.fc = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return x + self.fc(x)


def test_refuses_unknown_layers_and_residuals_naming_the_layer():
  r = nnx.Rngs(0)
  m = nnx.Sequential(nnx.Linear(3, 4, rngs=r), nnx.relu, Residual(r), nnx.Linear(4, 2, rngs=r))
  # The residual's branches disagree about a channel once one is cut: the first Linear's
  # channel 1 has a zero input row in the block's fc, but x + fc(x) still uses it.
  _zero(m.layers[2].fc.kernel, (1, slice(None)))
  for fn in (optax_ramda.compact, optax_ramda.compaction_plan):
    with pytest.raises(ValueError, match=r"layer layers/2 has unknown type Residual \(its "
                       r"sublayers: fc: Linear\).*residual block"):
      fn(m, jnp.ones((1, 3)))
  assert m.layers[0].kernel.shape == (3, 4)
  with pytest.raises(ValueError, match="chain"):
    optax_ramda.compact(Residual(r), jnp.ones((1, 4)))


class SkipNet(nnx.Module):
  """Has a ``layers`` list, but its __call__ adds a skip connection around two of them."""

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.relu, nnx.Linear(4, 4, rngs=rngs),
                            nnx.relu, nnx.Linear(4, 2, rngs=rngs)])

  def __call__(self, x):
    h = self.layers[0](x)
    return self.layers[4](h + self.layers[3](self.layers[2](self.layers[1](h))))


def test_refuses_a_module_whose_call_is_not_its_chain():
  m = SkipNet(nnx.Rngs(0))
  _zero(m.layers[2].kernel, (1, slice(None)))
  with pytest.raises(ValueError, match=r"SkipNet.__call__ does not just apply its `layers`"):
    optax_ramda.compact(m, jnp.ones((2, 3)))


def _shared_chain():
  r = nnx.Rngs(0)
  a, b, c = nnx.Linear(3, 4, rngs=r), nnx.Linear(4, 4, rngs=r), nnx.Linear(4, 2, rngs=r)
  _zero(b.kernel, (1, slice(None)))  # a zero input row of the shared layer
  return a, b, c


def test_refuses_a_layer_used_twice():
  a, b, c = _shared_chain()
  m = nnx.Sequential(a, nnx.relu, b, nnx.relu, b, nnx.relu, c)
  x = jnp.ones((2, 3))
  for fn in (optax_ramda.compact, optax_ramda.compaction_plan):
    with pytest.raises(ValueError, match=r"layer layers/4 is the same Linear instance as layer "
                       r"layers/2.*two consumers.*nnx.clone"):
      fn(m, x)
  assert b.kernel.shape == (4, 4)
  # The same sub-Sequential twice is the same layer twice.
  block = nnx.Sequential(b, nnx.relu)
  with pytest.raises(ValueError, match=r"layers/3/0 is the same Linear instance as layer "
                     r"layers/2/0"):
    optax_ramda.compact(nnx.Sequential(a, nnx.relu, block, block, c), x)
  # With separate copies the same model compacts fine.
  m = nnx.Sequential(a, nnx.relu, b, nnx.relu, nnx.clone(b), nnx.relu, c)
  x = _x((8, 3), jnp.float32)
  small = optax_ramda.compact(m, x)
  assert small.layers[0].kernel.shape == (3, 3) and small.layers[4].kernel.shape == (3, 4)
  _close(small(x), m(x), F32_TOL)


def test_refuses_shared_weights():
  a, b, c = _shared_chain()
  twin = nnx.Linear(4, 4, rngs=nnx.Rngs(5))
  twin.kernel = b.kernel  # weight tying: one Param in two layers
  with pytest.raises(ValueError, match=r"layers/4/kernel is the same Param as layers/2/kernel"):
    optax_ramda.compact(nnx.Sequential(a, nnx.relu, b, nnx.relu, twin, nnx.relu, c),
                        jnp.ones((2, 3)))


def test_refuses_functions_that_hide_a_layer():
  a, b, c = _shared_chain()
  x = jnp.ones((2, 3))
  m = nnx.Sequential(a, nnx.relu, b, lambda h: h + b(h), c)  # b feeds two consumers
  with pytest.raises(ValueError, match=r"layer layers/3 is a plain function that uses the "
                     r"Linear at layers/2"):
    optax_ramda.compact(m, x)
  d = nnx.Linear(4, 4, rngs=nnx.Rngs(1))
  for fn in (lambda h: h + d(h), d.__call__, functools.partial(_apply_to, d)):
    m = nnx.Sequential(a, nnx.relu, b, fn, c)  # a residual hidden in a function
    with pytest.raises(ValueError, match=r"layers/3 is a plain function that uses the Linear "
                       r"that is not in the chain"):
      optax_ramda.compact(m, x)


def _apply_to(layer, h):
  return h + layer(h)


def test_refuses_training_mode_batchnorm():
  m = _mlp(jnp.float32)
  m.train()
  with pytest.raises(ValueError, match=r"layers/1.*eval"):
    optax_ramda.compact(m, jnp.ones((2, 6)))


# --- attention heads ------------------------------------------------------------------------


def _mha(dtype=jnp.float64):
  mha = nnx.MultiHeadAttention(
      num_heads=4, in_features=8, qkv_features=12, decode=False, param_dtype=dtype,
      dtype=dtype, rngs=nnx.Rngs(0))
  mha.eval()
  return mha


# jax.nn.dot_product_attention (which nnx uses without dropout) computes the softmax in
# float32 even for float64 inputs, so attention weights sum to one only to float32 precision.
SOFTMAX_TOL = 1e-6


def test_attention_heads_removed_when_out_or_value_zero():
  with jax.enable_x64(True):
    mha = _mha()
    x = _x((2, 5, 8))
    _zero(mha.out.kernel, 1)  # head 1 contributes nothing: removing it is exact
    small = optax_ramda.compact(mha, x)
    assert small.num_heads == 3
    _close(small(x), mha(x), F64_TOL)
    # head 3 outputs sum_k att_k value.bias[3] = value.bias[3]: folded into out.bias, exact
    # up to how closely the (float32) softmax weights sum to one.
    _zero(mha.value.kernel, (slice(None), 3))
    mha.value.bias.set_value(mha.value.bias[...].at[3].set(0.7))
    small = optax_ramda.compact(mha, x)
    assert small.num_heads == 2 and small.query.kernel.shape == (8, 2, 3)
    assert small.out.kernel.shape == (2, 3, 8)
    _close(small(x), mha(x), SOFTMAX_TOL)
    assert _params_equal(small, optax_ramda.compact(small, x))


def test_attention_with_zero_query_only_is_kept():
  # Zero q gives uniform attention, not a zero head: nothing may be removed.
  with jax.enable_x64(True):
    mha = _mha()
    x = _x((2, 5, 8))
    _zero(mha.query.kernel, (slice(None), 0))
    small = optax_ramda.compact(mha, x)
    assert small.num_heads == 4
    assert bool(jnp.all(small(x) == mha(x)))


def test_attention_inside_sequential():
  with jax.enable_x64(True):
    r = nnx.Rngs(1)
    kw = dict(param_dtype=jnp.float64, dtype=jnp.float64)
    m = nnx.Sequential(
        nnx.Linear(8, 8, rngs=r, **kw), _mha(), nnx.relu, nnx.Linear(8, 6, rngs=r, **kw),
        nnx.relu, nnx.Linear(6, 2, rngs=r, **kw))
    x = _x((2, 5, 8))
    _zero(m.layers[1].out.kernel, 2)
    _zero(m.layers[5].kernel, (jnp.array([0]), slice(None)))
    small = optax_ramda.compact(m, x)
    assert small.layers[1].num_heads == 3 and small.layers[3].kernel.shape == (8, 5)
    _close(small(x), m(x), F64_TOL)


# --- the demo CNN ---------------------------------------------------------------------------


def test_demo_cnn():
  sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
  demo_models = pytest.importorskip("demo_models")
  m = demo_models.cnn(nnx.Rngs(0))
  m.eval()
  x = jnp.asarray(demo_models.digits().x_val[:64])
  c1, c2, fc = m.layers[0], m.layers[2], m.layers[6]
  _zero(c2.kernel, (slice(None), slice(None), jnp.array([1, 3, 5]), slice(None)))
  k = fc.kernel[...].reshape(16, c2.out_features, -1).at[:, jnp.array([0, 7, 8]), :].set(0)
  fc.kernel.set_value(k.reshape(fc.in_features, -1))
  _zero(c2.kernel, (..., 9))  # a constant channel: relu(bias) folded through pool + flatten
  c2.bias.set_value(c2.bias[...].at[9].set(0.3))
  small = optax_ramda.compact(m, x)
  assert small.layers[0].kernel.shape[-1] == c1.out_features - 3
  assert small.layers[2].kernel.shape[-1] == c2.out_features - 4
  assert small.layers[6].kernel.shape[0] == fc.in_features - 16 * 4
  _close(small(x), m(x), F32_TOL)
  np.testing.assert_array_equal(jnp.argmax(small(x), -1), jnp.argmax(m(x), -1))


# --- the benchmark's report (benchmarks/compaction.py) --------------------------------------


def test_benchmark_report_and_summary_line():
  import importlib.util

  path = pathlib.Path(__file__).parents[1] / "benchmarks" / "compaction.py"
  spec = importlib.util.spec_from_file_location("compaction_benchmark", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)  # importing trains nothing
  m = _cnn(jnp.float32)
  _zero(m.layers[3].kernel, (slice(None), slice(None), jnp.array([0, 2]), slice(None)))
  x = _x((12, 8, 8, 2), jnp.float32)
  y = jnp.argmax(m(x), -1)
  small = optax_ramda.compact(m, x)
  rep = bench.report(m, small, x, y, batch=4, repeats=2, warmup=1)
  o, c = rep["original"], rep["compact"]
  assert o["params"] - c["params"] == 2 * (3 * 3 * 2 + 1) + 2 * 2 + 2 * 3 * 3 * 8
  # conv1 loses 2 of 6 filters (64 positions x 3x3x2 each), conv2 2 of 6 input channels.
  assert o["flops"] - c["flops"] == 2 * 64 * (2 * 3 * 3 * 2 + 2 * 3 * 3 * 8)
  assert o["accuracy"] == c["accuracy"] == 100.0
  assert [w for _, w in c["widths"]] == [4, 8, 16, 5]
  line = bench.summary_line(rep)
  assert line.startswith("RAMDA-trained CNN: ") and "% fewer FLOPs, latency x" in line
  assert "same accuracy (100.0% vs 100.0%)" in line
  assert "| parameters |" in bench.markdown(rep)


# --- units inside custom modules (inside_blocks=True) ---------------------------------------


class TBlock(nnx.Module):
  """A pre-norm Transformer block: causal nnx attention and an nnx.Sequential MLP."""

  def __init__(self, d, heads, rngs, dtype=jnp.float64, mlp=None):
    kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
    self.ln1, self.ln2 = nnx.LayerNorm(d, **kw), nnx.LayerNorm(d, **kw)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False, **kw)
    self.mlp = mlp if mlp is not None else nnx.Sequential(
        nnx.Linear(d, 4 * d, **kw), nnx.gelu, nnx.Linear(4 * d, d, **kw))

  def __call__(self, x):
    mask = nnx.make_causal_mask(jnp.ones(x.shape[:-1]))
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.mlp(self.ln2(x))


class TinyLM(nnx.Module):
  def __init__(self, d=8, heads=4, dtype=jnp.float64, twice=False):
    r = nnx.Rngs(0)
    kw = dict(param_dtype=dtype, dtype=dtype, rngs=r)
    self.inp = nnx.Linear(3, d, **kw)
    self.blocks = nnx.List([TBlock(d, heads, r, dtype), TBlock(d, heads, r, dtype)])
    self.head = nnx.Linear(d, 2, **kw)
    self.twice = twice

  def __call__(self, x):
    h = self.inp(x)
    for block in self.blocks:
      h = block(h)
    if self.twice:  # the first block's MLP applied a second time
      h = h + self.blocks[0].mlp(h)
    return self.head(h)


def _kill(lm, hidden=(1, 5, 30), head=2):
  """Zero rows of block 0's second MLP Linear (hidden neurons) and one head's out kernel."""
  _zero(lm.blocks[0].mlp.layers[2].kernel, (jnp.array(hidden), slice(None)))
  _zero(lm.blocks[1].attn.out.kernel, head)
  lm.eval()
  return lm


def test_inside_blocks_compacts_mlp_and_heads_keeping_the_residual_width():
  with jax.enable_x64(True):
    lm = _kill(TinyLM())
    x = _x((4, 6, 3))
    small = optax_ramda.compact(lm, x, inside_blocks=True)
    b0, b1 = small.blocks
    assert b0.mlp.layers[0].kernel.shape == (8, 32 - 3)
    assert b0.mlp.layers[2].kernel.shape == (32 - 3, 8)  # residual width kept
    assert b1.mlp.layers[0].kernel.shape == (8, 32)  # nothing zero there
    assert b1.attn.num_heads == 3 and b1.attn.out.kernel.shape == (3, 2, 8)
    assert b0.attn.num_heads == 4
    assert small.inp.kernel.shape == (3, 8) and small.head.kernel.shape == (8, 2)
    assert lm.blocks[0].mlp.layers[0].kernel.shape == (8, 32)  # the input model is untouched
    for seed in (7, 8):  # inputs other than the sample
      x2 = _x((3, 5, 3), seed=seed)
      _close(small(x2), lm(x2), SOFTMAX_TOL)
    plan = optax_ramda.compaction_plan(lm, x, inside_blocks=True)
    got = {(b.producer, b.consumer): (b.channels, b.kept) for b in plan}
    assert got[("blocks/0/mlp/layers/0", "blocks/0/mlp/layers/2")] == (32, 29)
    assert got[("blocks/1/attn", "blocks/1/attn")] == (4, 3)
    # idempotent
    again = optax_ramda.compact(small, x, inside_blocks=True)
    assert _params_equal(small, again)
    assert bool(jnp.all(again(x) == small(x)))


def test_inside_blocks_float32():
  lm = _kill(TinyLM(dtype=jnp.float32))
  x = _x((4, 6, 3), jnp.float32)
  small = optax_ramda.compact(lm, x, inside_blocks=True)
  assert small.blocks[0].mlp.layers[0].kernel.shape == (8, 29)
  assert small.blocks[1].attn.num_heads == 3
  a, b = np.asarray(small(x), np.float64), np.asarray(lm(x), np.float64)
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(1.0, float(np.max(np.abs(b)))))


def test_inside_blocks_leaves_a_unit_called_twice():
  with jax.enable_x64(True):
    lm = _kill(TinyLM(twice=True))
    x = _x((4, 6, 3))
    plan = optax_ramda.compaction_plan(lm, x, inside_blocks=True)
    notes = {b.producer: b.note for b in plan}
    assert notes["blocks/0/mlp"] == "left as it is: called 2 times in one forward pass"
    small = optax_ramda.compact(lm, x, inside_blocks=True)
    assert small.blocks[0].mlp.layers[0].kernel.shape == (8, 32)  # not compacted
    assert small.blocks[1].attn.num_heads == 3  # the other units still are
    _close(small(x), lm(x), SOFTMAX_TOL)


def test_inside_blocks_leaves_a_unit_with_shared_weights():
  with jax.enable_x64(True):
    lm = _kill(TinyLM())
    spare = nnx.Linear(32, 8, param_dtype=jnp.float64, dtype=jnp.float64, rngs=nnx.Rngs(3))
    spare.kernel = lm.blocks[0].mlp.layers[2].kernel  # weight tying outside the MLP
    lm.spare = spare
    x = _x((4, 6, 3))
    notes = {b.producer: b.note for b in optax_ramda.compaction_plan(lm, x, inside_blocks=True)}
    assert notes["blocks/0/mlp"] == ("left as it is: the module or a weight of it is shared "
                                     "with another part of the model")
    small = optax_ramda.compact(lm, x, inside_blocks=True)
    assert small.blocks[0].mlp.layers[2].kernel.shape == (32, 8)
    assert small.spare.kernel is small.blocks[0].mlp.layers[2].kernel  # still tied
    assert small.blocks[1].attn.num_heads == 3
    _close(small(x), lm(x), SOFTMAX_TOL)


def test_without_inside_blocks_custom_modules_are_still_refused():
  lm = _kill(TinyLM(dtype=jnp.float32))
  x = _x((2, 6, 3), jnp.float32)
  with pytest.raises(ValueError, match="cannot read a chain of layers from TinyLM"):
    optax_ramda.compact(lm, x)
  with pytest.raises(ValueError, match=r"unknown type TBlock.*residual block"):
    optax_ramda.compact(nnx.Sequential(lm.inp, lm.blocks[0]), x)
  # A chain is compacted as without the option.
  m = _mlp(jnp.float32, bn=False)
  _zero(m.layers[2].kernel, (jnp.array([2, 5]), slice(None)))
  xm = _x((8, 6), jnp.float32)
  assert _params_equal(optax_ramda.compact(m, xm),
                       optax_ramda.compact(m, xm, inside_blocks=True))


def test_inside_blocks_without_zero_groups_is_unchanged():
  lm = TinyLM(dtype=jnp.float32)
  lm.eval()
  x = _x((2, 6, 3), jnp.float32)
  small = optax_ramda.compact(lm, x, inside_blocks=True)
  assert _params_equal(lm, small)
  assert bool(jnp.all(small(x) == lm(x)))
