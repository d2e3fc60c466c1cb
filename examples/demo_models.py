"""Models and data of the demo: everything ships with the install, nothing is downloaded.

* Digits: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).
* Text: the English help topics bundled with CPython (``pydoc_data.topics``), for a
  character-level language model.

Models are Flax NNX modules whose layer order is explicit (``nnx.Sequential`` or a
list of blocks applied in order), so structure-removal tools can walk them:

* :func:`cnn`: Conv-ReLU-Conv-ReLU-AvgPool-Flatten-Linear-ReLU-Linear (no residuals).
* :func:`logreg`: a single ``nnx.Linear`` (multinomial logistic regression).
* :class:`CharTransformer`: a small pre-LayerNorm decoder-only Transformer.

:func:`paper_groups` is the grouping of ALGORITHMS.md §9 as a function
``params -> spec tree`` (to be swapped for ``optax_ramda.presets`` later).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import optax_ramda


class Split(NamedTuple):
  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray


# --- groups ----------------------------------------------------------------------------


def paper_groups(params: Any) -> Any:
  """ALGORITHMS.md §9 groups: Dense kernels input-wise, Conv kernels channel-wise.

  * a leaf named ``kernel`` with 2 dims ``(in, out)``: ``GroupSpec((1,))``, one group
    per input feature (for attention/MLP projections too);
  * a leaf named ``kernel`` with 4 dims ``(kh, kw, in, out)``: ``GroupSpec((0, 1, 3))``,
    one group per input channel;
  * everything else (biases, LayerNorm scales, embeddings): ``None``.

  Works on ``nnx.state(model, nnx.Param)`` and on its pure-dict form.
  """

  def spec(path, leaf):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [n for n in names if n != "value"]
    ndim = np.ndim(leaf)
    if names and names[-1] == "kernel":
      if ndim == 2:
        return optax_ramda.GroupSpec((1,))
      if ndim == 4:
        return optax_ramda.GroupSpec((0, 1, 3))
    return None

  return jax.tree_util.tree_map_with_path(spec, params)


# --- data ------------------------------------------------------------------------------


def digits(seed: int = 0, image: bool = True) -> Split:
  """8x8 digits scaled to [0, 1]; 1497 train / 300 validation images (fixed split)."""
  from sklearn.datasets import load_digits

  d = load_digits()
  x = (d.data / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  x, y = x[perm], y[perm]
  if image:
    x = x.reshape(-1, 8, 8, 1)
  return Split(x[:-300], y[:-300], x[-300:], y[-300:])


def text(context: int = 32, train_chars: int = 200_000, val_chars: int = 20_000) -> tuple[
    Split, int]:
  """Character windows of CPython's help topics; returns the split and the vocab size.

  Characters outside printable ASCII map to one "unknown" id. Inputs are windows of
  ``context`` ids, targets the same windows shifted by one. The validation text is a
  disjoint stretch after the training text. Windows do not overlap.
  """
  from pydoc_data.topics import topics

  raw = "\n".join(topics[k] for k in sorted(topics))
  vocab = [chr(i) for i in range(32, 127)] + ["\n"]
  table = {c: i + 1 for i, c in enumerate(vocab)}  # 0 = unknown
  ids = np.fromiter((table.get(c, 0) for c in raw[: train_chars + val_chars + 1]), np.int32)

  def windows(a):
    m = (len(a) - 1) // context
    xs = a[: m * context].reshape(m, context)
    ys = a[1 : m * context + 1].reshape(m, context)
    return xs, ys

  xt, yt = windows(ids[: train_chars + 1])
  xv, yv = windows(ids[train_chars:])
  return Split(xt, yt, xv, yv), len(vocab) + 1


# --- models ----------------------------------------------------------------------------


def _flatten(x):
  return x.reshape(x.shape[0], -1)


def _pool(x):
  return nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))


def cnn(rngs: nnx.Rngs, c1: int = 16, c2: int = 32, hidden: int = 64) -> nnx.Sequential:
  """A plain sequential CNN for 8x8x1 images (no residual connections)."""
  return nnx.Sequential(
      nnx.Conv(1, c1, (3, 3), rngs=rngs),
      nnx.relu,
      nnx.Conv(c1, c2, (3, 3), rngs=rngs),
      nnx.relu,
      _pool,
      _flatten,
      nnx.Linear(4 * 4 * c2, hidden, rngs=rngs),
      nnx.relu,
      nnx.Linear(hidden, 10, rngs=rngs),
  )


def logreg(rngs: nnx.Rngs) -> nnx.Sequential:
  """Multinomial logistic regression on the 64 pixels: one ``nnx.Linear``."""
  return nnx.Sequential(nnx.Linear(64, 10, rngs=rngs))


class Attention(nnx.Module):
  """Causal multi-head self-attention with separate q/k/v/out ``nnx.Linear``s."""

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.q = nnx.Linear(dim, dim, rngs=rngs)
    self.k = nnx.Linear(dim, dim, rngs=rngs)
    self.v = nnx.Linear(dim, dim, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    h = self.heads
    split = lambda y: y.reshape(b, t, h, d // h)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // h).astype(x.dtype)
    mask = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    att = jax.nn.softmax(logits, axis=-1)
    return self.out(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d))


class Block(nnx.Module):
  """Pre-LN Transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = Attention(dim, heads, rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.fc2 = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nnx.Module):
  """Embedding + positions, ``layers`` blocks in order, final LayerNorm, output head."""

  def __init__(self, vocab: int, context: int, rngs: nnx.Rngs, dim: int = 64,
               heads: int = 4, layers: int = 2):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, dim)))
    self.blocks = nnx.List([Block(dim, heads, rngs) for _ in range(layers)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids) + self.pos[: ids.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x))
