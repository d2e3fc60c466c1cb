"""Compaction benchmark: a RAMDA-trained CNN before and after ``optax_ramda.compact`` (issue 6).

Trains the demo's CNN (``examples/demo_models.py``: Conv-ReLU-Conv-ReLU-AvgPool-Flatten-
Linear-ReLU-Linear on scikit-learn's 8x8 digits) with RAMDA, the demo's group-LASSO
groups (``demo_models.paper_groups``) and the demo's stage-wise schedule, so that its
final weights carry exact zero groups; compacts it; and compares both models::

  python3 benchmarks/compaction.py                # 40 epochs (the demo's), batch 256
  python3 benchmarks/compaction.py --quick        # a smoke run: 6 epochs, few repeats
  python3 benchmarks/compaction.py --batch 1 --repeats 200 --json compaction.json

Reported for the original and the compacted model (a Markdown table, then one line):

* ``params``: number of parameters (every ``nnx.Param``);
* ``FLOPs/example``: 2 x the multiply-adds of the Linear and Conv layers, counted
  analytically from the shapes (a Conv: output positions x kernel size; a Linear:
  positions x kernel size; biases, activations and pooling not counted), and, as a
  cross-check, XLA's ``cost_analysis()["flops"]`` of the jitted forward divided by the
  batch size (XLA's own convention: it also counts elementwise work, and its count of
  a padded convolution differs from the analytic one);
* ``latency``: the jitted forward on a batch of ``--batch`` validation images on the
  CPU, the median over ``--repeats`` calls after ``--warmup`` calls (each ends in
  ``block_until_ready``; XLA uses every core it finds, so measure on a quiet machine);
* ``accuracy``: on the digits validation split (300 images).

For use from other scripts (``examples/demo.py``), with this directory on ``sys.path``::

  import compaction
  rep = compaction.report(model, optax_ramda.compact(model, x_val[:64]), x_val, y_val)
  print(compaction.markdown(rep)); print(compaction.summary_line(rep))

Importing this module trains nothing: the training is in :func:`train`/:func:`main`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import re
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import optax_ramda

# The demo's CNN settings (examples/demo.py: LEARNING_RATES, TASK_DEFAULTS["cnn"]).
LR = 1e-2
STRENGTH = 1e-3
TRAIN_BATCH = 64
EPOCHS = 40
QUICK_EPOCHS = 6


# --- measurements ------------------------------------------------------------------------


def _layers(model: Any) -> list[Any]:
  """The layers of a chain, nested ``nnx.Sequential``s flattened; else ``[model]``."""
  if isinstance(model, nnx.Sequential):
    return [leaf for layer in model.layers for leaf in _layers(layer)]
  if isinstance(model, (list, tuple, nnx.List)):
    return [leaf for layer in model for leaf in _layers(layer)]
  return [model]


def count_params(model: Any) -> int:
  """Number of parameters (the sizes of every ``nnx.Param``)."""
  return int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def analytic_flops(model: Any, x: Any) -> int | None:
  """2 x multiply-adds of the Linear/Conv layers for one example (None if not a chain).

  Runs the chain layer by layer on the first example of ``x`` to get every layer's
  output shape. A Linear or Conv (``feature_group_count=1``) with kernel ``K`` and
  output ``y`` of shape ``(1, *positions, out)`` does ``prod(positions) * K.size``
  multiply-adds (a Conv's zero-padded taps included, as usual).
  """
  layers = _layers(model)
  if len(layers) == 1 and not isinstance(layers[0], (nnx.Linear, nnx.Conv)):
    return None
  h = jnp.asarray(x)[:1]
  macs = 0
  for layer in layers:
    h = layer(h)
    if isinstance(layer, (nnx.Linear, nnx.Conv)):
      if isinstance(layer, nnx.Conv) and layer.feature_group_count != 1:
        return None
      macs += math.prod(h.shape[1:-1]) * int(np.size(layer.kernel[...]))
    elif isinstance(layer, nnx.Module) and any(
        isinstance(m, (nnx.Linear, nnx.Conv)) for _, m in nnx.iter_graph(layer)):
      return None  # a block whose inner layers we cannot see the inputs of
  return 2 * macs


def _forward(model: Any):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)), state


def xla_flops(model: Any, x: Any) -> float | None:
  """XLA's ``cost_analysis()`` flops of the jitted forward on ``x``, per example."""
  fwd, state = _forward(model)
  try:
    cost = fwd.lower(state, jnp.asarray(x)).compile().cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, list):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"]) / len(x)


def latency(model: Any, x: Any, repeats: int = 50, warmup: int = 5) -> float:
  """Median seconds of the jitted forward on the batch ``x`` after ``warmup`` calls."""
  fwd, state = _forward(model)
  x = jnp.asarray(x)
  for _ in range(max(warmup, 1)):  # the first call compiles
    jax.block_until_ready(fwd(state, x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(state, x))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def accuracy(model: Any, x: Any, y: Any) -> float:
  """Top-1 accuracy in percent."""
  fwd, state = _forward(model)
  pred = np.asarray(jnp.argmax(fwd(state, jnp.asarray(x)), -1))
  return 100.0 * float(np.mean(pred == np.asarray(y)))


def widths(model: Any) -> list[tuple[str, int]]:
  """``(layer, output width)`` of every Linear/Conv of a chain, in order."""
  return [(f"{i}:{type(layer).__name__}", int(layer.kernel[...].shape[-1]))
          for i, layer in enumerate(_layers(model)) if isinstance(layer, (nnx.Linear, nnx.Conv))]


def _batch(x: np.ndarray, batch: int) -> np.ndarray:
  reps = -(-batch // len(x))
  return np.concatenate([x] * reps)[:batch]


def measure(model: Any, x_val: Any, y_val: Any, *, batch: int = 256, repeats: int = 50,
            warmup: int = 5) -> dict[str, Any]:
  """Parameters, FLOPs, latency and validation accuracy of one model."""
  xb = _batch(np.asarray(x_val), batch)
  return {
      "params": count_params(model),
      "flops": analytic_flops(model, xb),
      "xla_flops": xla_flops(model, xb),
      "latency_s": latency(model, xb, repeats, warmup),
      "accuracy": accuracy(model, x_val, y_val),
      "widths": widths(model),
  }


def report(model: Any, small: Any, x_val: Any, y_val: Any, *, batch: int = 256,
           repeats: int = 50, warmup: int = 5, label: str = "RAMDA-trained CNN"
           ) -> dict[str, Any]:
  """Measures the original ``model`` and its compacted ``small`` (both inference-mode).

  The two are timed alternately (original, compact, original, compact) and each gets
  the smaller of its two medians, so that a burst of load on the machine affects both.

  Returns:
    ``{"label", "batch", "repeats", "warmup", "original": {...}, "compact": {...}}``, each
    model's dict with ``params``, ``flops`` (analytic, per example, or None),
    ``xla_flops`` (per example, or None), ``latency_s``, ``accuracy`` (%) and
    ``widths`` (output width of every Linear/Conv).
  """
  kw = dict(batch=batch, repeats=repeats, warmup=warmup)
  orig, comp = measure(model, x_val, y_val, **kw), measure(small, x_val, y_val, **kw)
  xb = _batch(np.asarray(x_val), batch)
  orig["latency_s"] = min(orig["latency_s"], latency(model, xb, repeats, warmup))
  comp["latency_s"] = min(comp["latency_s"], latency(small, xb, repeats, warmup))
  return {"label": label, "batch": batch, "repeats": repeats, "warmup": warmup,
          "flops_method": "analytic: 2 x multiply-adds of Linear/Conv layers; xla_flops: "
                          "XLA cost_analysis of the jitted forward / batch",
          "original": orig, "compact": comp}


def _fmt_flops(v: float | None) -> str:
  return "n/a" if v is None else f"{v:,.0f}"


def markdown(rep: dict[str, Any]) -> str:
  """The report as a Markdown table."""
  o, c = rep["original"], rep["compact"]

  def ratio(a, b):
    return "n/a" if a is None or b is None or a == 0 else f"{b / a:.3f}"

  rows = [
      ("parameters", f"{o['params']:,}", f"{c['params']:,}", ratio(o["params"], c["params"])),
      ("FLOPs / example (analytic, Linear+Conv)", _fmt_flops(o["flops"]),
       _fmt_flops(c["flops"]), ratio(o["flops"], c["flops"])),
      ("FLOPs / example (XLA cost analysis)", _fmt_flops(o["xla_flops"]),
       _fmt_flops(c["xla_flops"]), ratio(o["xla_flops"], c["xla_flops"])),
      (f"CPU latency, batch {rep['batch']} (ms, median)", f"{1e3 * o['latency_s']:.3f}",
       f"{1e3 * c['latency_s']:.3f}", ratio(o["latency_s"], c["latency_s"])),
      ("validation accuracy (%)", f"{o['accuracy']:.2f}", f"{c['accuracy']:.2f}", ""),
      ("Linear/Conv output widths", " ".join(str(w) for _, w in o["widths"]),
       " ".join(str(w) for _, w in c["widths"]), ""),
  ]
  lines = [f"{rep['label']}: original vs compacted (optax_ramda.compact)", "",
           "| | original | compact | compact / original |", "|---|---:|---:|---:|"]
  lines += [f"| {a} | {b} | {d} | {e} |" for a, b, d, e in rows]
  return "\n".join(lines)


def summary_line(rep: dict[str, Any]) -> str:
  """One line, e.g. ``RAMDA-trained CNN: 61% fewer FLOPs, latency x0.52 (1.9x faster), ...``."""
  o, c = rep["original"], rep["compact"]
  key = "flops" if o["flops"] is not None and c["flops"] is not None else "xla_flops"
  if o[key] and c[key] is not None:
    fewer = f"{100 * (1 - c[key] / o[key]):.0f}% fewer FLOPs"
  else:
    fewer = f"{100 * (1 - c['params'] / o['params']):.0f}% fewer parameters"
  k = c["latency_s"] / o["latency_s"]
  if k < 0.95:
    lat = f"latency x{k:.2f} ({1 / k:.1f}x faster)"
  elif k > 1.05:
    lat = f"latency x{k:.2f} ({k:.1f}x slower)"
  else:
    lat = f"latency x{k:.2f} (no faster)"
  same = o["accuracy"] == c["accuracy"]  # the same number of correct validation images
  acc = (f"same accuracy ({c['accuracy']:.1f}% vs {o['accuracy']:.1f}%)" if same else
         f"accuracy {c['accuracy']:.1f}% vs {o['accuracy']:.1f}% (compact vs original)")
  return f"{rep['label']}: {fewer}, {lat}, {acc}"


# --- training (the demo's CNN with RAMDA) --------------------------------------------------


def _demo_models():
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
  import demo_models

  return demo_models


def train(epochs: int, seed: int = 0, strength: float = STRENGTH, log=print
          ) -> tuple[nnx.Sequential, Any, dict[str, Any]]:
  """Trains the demo CNN with RAMDA as ``examples/demo.py`` does; returns model, split, info.

  The stage-wise schedule of the demo: milestones at 1/2 and 3/4 of the steps (lr x 0.1
  and a restart at each), the interpolation weight ramping ``c = min(c0 sqrt(j + 1), 1)``
  with ``c0`` raised on short runs so that ``c`` reaches 1 halfway into the last stage.
  """
  import optax

  dm = _demo_models()
  split = dm.digits(seed=0, image=True)
  model = dm.cnn(nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  reg = optax_ramda.group_lasso(dm.paper_groups)
  n = len(split.x_train)
  spe = n // TRAIN_BATCH
  total = epochs * spe
  milestones = (max(1, total // 2), max(2, 3 * total // 4))
  c0 = max(0.1, 1 / math.sqrt(max(total - milestones[-1], 2) / 2))  # demo.ramp_start
  tx = optax_ramda.ramda(LR, momentum=c0, strength=strength, regularizer=reg,
                         milestones=milestones)
  opt_state = tx.init(params)

  def loss_fn(p, x, y):
    logits = nnx.merge(graphdef, nnx.State(p))(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    upd, s = tx.update(g, s, p)
    return optax.apply_updates(p, upd), s, loss

  rng = np.random.default_rng(seed + 1)
  t0 = time.perf_counter()
  for epoch in range(epochs):
    order = rng.permutation(n)
    for i in range(spe):
      idx = order[i * TRAIN_BATCH:(i + 1) * TRAIN_BATCH]
      params, opt_state, loss = step(params, opt_state, split.x_train[idx],
                                     split.y_train[idx])
    if log and (epoch + 1) % max(1, epochs // 5) == 0:
      log(f"  epoch {epoch + 1}/{epochs}: loss {float(loss):.4f}")
  rep = optax_ramda.structure(params, reg)
  info = {"epochs": epochs, "steps": total, "strength": strength, "lr": LR,
          "train_s": time.perf_counter() - t0,
          "group_sparsity": 100 * float(rep.weighted_group_sparsity),
          "zero_groups": {"/".join(re.findall(r"[\w.]+", k)): [int(v.zero_groups),
                                                              int(v.num_groups)]
                          for k, v in rep.per_leaf.items()}}
  model = nnx.merge(graphdef, nnx.State(params))
  model.eval()
  return model, split, info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true",
                 help=f"a smoke run: {QUICK_EPOCHS} epochs, 10 timing repeats")
  p.add_argument("--epochs", type=int, default=None,
                 help=f"RAMDA training epochs (default {EPOCHS}, --quick {QUICK_EPOCHS})")
  p.add_argument("--strength", type=float, default=STRENGTH, help="group-LASSO lambda")
  p.add_argument("--batch", type=int, default=256, help="batch size of the latency runs")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed calls per model (default 100, --quick 10)")
  p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="also write the report to this JSON file")
  args = p.parse_args(argv)
  args.epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)
  args.repeats = args.repeats or (10 if args.quick else 100)
  for name in ("epochs", "batch", "repeats"):
    if getattr(args, name) <= 0:
      p.error(f"--{name} must be a positive integer")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  print(f"Training the demo CNN with RAMDA for {args.epochs} epochs (lambda={args.strength})")
  model, split, info = train(args.epochs, args.seed, args.strength)
  print(f"  {info['train_s']:.1f} s; weighted group sparsity {info['group_sparsity']:.1f}%; "
        "zero groups " + ", ".join(f"{k}: {z}/{n}" for k, (z, n) in info["zero_groups"].items()))
  t0 = time.perf_counter()
  small = optax_ramda.compact(model, split.x_val[:64])
  compact_s = time.perf_counter() - t0
  rep = report(model, small, split.x_val, split.y_val, batch=args.batch,
               repeats=args.repeats, warmup=args.warmup)
  rep["training"] = info
  rep["compact_s"] = compact_s
  rep["command"] = " ".join(["python3 benchmarks/compaction.py",
                             *(argv if argv is not None else sys.argv[1:])])
  rep["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "jax": jax.__version__, "backend": jax.default_backend()}
  print()
  print(markdown(rep))
  print()
  print(f"compact() took {compact_s:.1f} s; latency on {jax.default_backend()} with "
        f"{os.cpu_count()} cores, median of {args.repeats} calls after {args.warmup} warm-up.")
  print(summary_line(rep))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rep, indent=1))
  return rep


if __name__ == "__main__":
  main()
