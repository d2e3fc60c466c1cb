"""Parameter trees, groupings and forward passes for the benchmark suite.

Two families, with the paper's groupings (ALGORITHMS.md §9), Flax layouts:

* ``cnn``: a VGG-like stack of 3x3 convs ``(kh, kw, in, out)`` in four blocks
  (widths ``w, 2w, 4w, 8w``, two convs per block) and a Dense head. Conv
  kernels: channel-wise groups ``GroupSpec((0, 1, 3))``; Dense kernels:
  input-wise ``GroupSpec((1,))``; biases unregularized.
* ``transformer``: ``layers`` blocks of attention q/k/v/out ``(d, d)`` and an
  MLP ``(d, 4d), (4d, d)``, each with a bias, two LayerNorms per block, an
  unregularized embedding. Kernels: input-wise ``GroupSpec((1,))``.

The width is chosen so the total parameter count is close to a target.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from optax_ramda import GroupSpec

CNN_BLOCKS = (1, 1, 2, 2, 4, 4, 8, 8)  # conv widths in units of w (two per block)


def cnn_params(width: int, in_channels: int = 3, classes: int = 10, seed: int = 0) -> dict:
  key = jax.random.PRNGKey(seed)
  params, cin = {}, in_channels
  for i, m in enumerate(CNN_BLOCKS):
    key, k = jax.random.split(key)
    cout = m * width
    fan_in = 9 * cin
    params[f"conv{i}"] = {
        "kernel": jax.random.normal(k, (3, 3, cin, cout)) * math.sqrt(2 / fan_in),
        "bias": jnp.zeros(cout),
    }
    cin = cout
  key, k = jax.random.split(key)
  params["head"] = {
      "kernel": jax.random.normal(k, (cin, classes)) / math.sqrt(cin),
      "bias": jnp.zeros(classes),
  }
  return params


def cnn_width_for(target: int) -> int:
  """The base width ``w`` whose CNN has about ``target`` parameters."""
  return _closest(lambda w: count(cnn_params_shapes(w)), target, 1)


def cnn_params_shapes(width: int) -> dict:
  return jax.eval_shape(lambda: cnn_params(width))


def transformer_params(
    d: int, layers: int, vocab: int = 256, seq: int = 64, seed: int = 0
) -> dict:
  key = jax.random.PRNGKey(seed)
  key, ke, kp = jax.random.split(key, 3)
  params = {
      "embed": jax.random.normal(ke, (vocab, d)) * 0.02,
      "pos": jax.random.normal(kp, (seq, d)) * 0.02,
  }
  shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "out": (d, d), "mlp_in": (d, 4 * d),
            "mlp_out": (4 * d, d)}
  for i in range(layers):
    block = {
        "ln1": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
        "ln2": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
    }
    for name, shape in shapes.items():
      key, k = jax.random.split(key)
      block[name] = {
          "kernel": jax.random.normal(k, shape) / math.sqrt(shape[0]),
          "bias": jnp.zeros(shape[1]),
      }
    params[f"block{i:02d}"] = block
  params["ln_f"] = {"scale": jnp.ones(d), "bias": jnp.zeros(d)}
  return params


def transformer_width_for(target: int, layers: int = 4) -> int:
  """A width ``d`` (multiple of 8) whose Transformer has about ``target`` parameters."""
  n = lambda k: count(jax.eval_shape(lambda: transformer_params(8 * k, layers)))
  return 8 * _closest(n, target, 1)


def _closest(n, target: int, lo: int) -> int:
  """The ``k >= lo`` minimising ``|n(k) - target|`` for an increasing ``n`` (bisection)."""
  hi = lo
  while n(hi) < target:
    hi *= 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if n(mid) < target else (lo, mid)
  return min((lo, hi), key=lambda k: abs(n(k) - target))


def group_spec(params) -> dict:
  """Channel-wise groups on conv kernels, input-wise on dense kernels, None elsewhere."""

  def one(path, x):
    name = jax.tree_util.keystr(path)
    if not name.endswith("['kernel']"):
      return None
    return GroupSpec((0, 1, 3)) if x.ndim == 4 else GroupSpec((1,))

  return jax.tree_util.tree_map_with_path(one, params)


def count(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def nbytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# --- forward passes (plain jax) ----------------------------------------------


def cnn_apply(params, images):
  """``images``: (batch, H, W, C). Max-pool after every second conv."""
  h = images
  for i in range(len(CNN_BLOCKS)):
    p = params[f"conv{i}"]
    h = jax.lax.conv_general_dilated(
        h, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jax.nn.relu(h + p["bias"])
    if i % 2 == 1 and h.shape[1] > 1:
      h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  h = jnp.mean(h, axis=(1, 2))
  return h @ params["head"]["kernel"] + params["head"]["bias"]


def _layer_norm(p, x):
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.var(x, -1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _dense(p, x):
  return x @ p["kernel"] + p["bias"]


def transformer_apply(params, tokens, heads: int = 4):
  """Causal pre-LN Transformer language model; returns logits (batch, seq, vocab)."""
  b, n = tokens.shape
  h = params["embed"][tokens] + params["pos"][:n]
  d = h.shape[-1]
  mask = jnp.tril(jnp.ones((n, n), bool))
  blocks = sorted(k for k in params if k.startswith("block"))
  for name in blocks:
    p = params[name]
    x = _layer_norm(p["ln1"], h)
    split = lambda t: t.reshape(b, n, heads, d // heads)
    q, k, v = (split(_dense(p[m], x)) for m in ("q", "k", "v"))
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads)
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, d)
    h = h + _dense(p["out"], o)
    x = _layer_norm(p["ln2"], h)
    h = h + _dense(p["mlp_out"], jax.nn.gelu(_dense(p["mlp_in"], x)))
  h = _layer_norm(params["ln_f"], h)
  return h @ params["embed"].T


def cnn_batch(key, batch: int, size: int = 32, classes: int = 10):
  """Synthetic images whose labels a fixed random teacher assigns (learnable)."""
  k1, k2 = jax.random.split(key)
  x = jax.random.normal(k1, (batch, size, size, 3))
  teacher = jax.random.normal(jax.random.PRNGKey(1234), (3, classes))
  y = jnp.argmax(jnp.mean(x, axis=(1, 2)) @ teacher, -1)
  return x, y


def token_batch(key, batch: int, seq: int, vocab: int = 256):
  """Synthetic sequences with a learnable rule: next token = (7 * token + 3) % vocab."""
  tok = jax.random.randint(key, (batch,), 0, vocab)
  seqs = [tok]
  for _ in range(seq):
    seqs.append((7 * seqs[-1] + 3) % vocab)
  seqs = jnp.stack(seqs, axis=1)
  return seqs[:, :-1], seqs[:, 1:]
