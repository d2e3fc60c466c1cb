"""The main job: structured models trained with RAMDA, RMDA, ProxGen, ProxSGD and AdamW.

Tasks (all data ship with the install, see ``demo_models.py``):

* ``cnn``: a small CNN on scikit-learn's 8x8 digits, channel-wise groups on the Conv
  kernels and input-wise groups on the Dense kernels (ALGORITHMS.md §9);
* ``lm``: a character-level Transformer on CPython's ``pydoc_data.topics``, input-wise
  groups on the attention q/k/v/out and MLP projections (and the output head);
* ``logreg``: group-LASSO multinomial logistic regression on the digits pixels (one
  group per pixel), the papers' convex case;
* ``identification``: the convex problem of ``identification.py``, whose optimal support
  is certified, showing which methods find and keep it.

Every method uses the paper's stage-wise schedule (spec §7): milestones at 1/2 and 3/4
of the run, lr x 0.1 at each; RAMDA/RMDA restart there and their interpolation weight
ramps to c = 1 in the last stage, so their final weights carry exact zero groups.
Output (in ``--out``): ``results.md`` (the tables), ``results.json`` (all histories) and
PNG plots per task. Usage::

  python3 examples/demo.py                 # the full run (<= 10 min on 2 CPU cores)
  python3 examples/demo.py --quick         # a smoke run (<= 1 min)
  python3 examples/demo.py --tasks cnn,logreg --optimizers ramda,rmda --epochs 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import demo_models
import identification

import optax_ramda

TASKS = ("cnn", "lm", "logreg", "identification")
OPTIMIZERS = ("ramda", "rmda", "proxgen", "proxsgd", "adamw")
# --quick skips the Transformer (its compilation alone takes ~20 s per optimizer on 2
# busy cores); ``--quick --tasks lm`` runs a tiny version of it.
QUICK_TASKS = ("cnn", "logreg", "identification")

# Hyperparameters: fixed per method *before* any run, not tuned on these tasks: each
# method's default learning rate in its own paper/package family (RAMDA like MADGRAD
# 1e-2; RMDA and ProxSGD like SGD with momentum 1e-1; ProxGen and the dense AdamW
# baseline Adam's 1e-3). RAMDA/RMDA use c0 = 0.1 (so c reaches 1 99 steps into the last
# stage, spec §7), ProxSGD its default c = 0.1. The same ``strength`` per task for all.
LEARNING_RATES = {"ramda": 1e-2, "rmda": 1e-1, "proxgen": 1e-3, "proxsgd": 1e-1,
                  "adamw": 1e-3}

# Per task: epochs (full, quick), batch size, regularization strength lambda.
TASK_DEFAULTS = {
    "cnn": dict(epochs=40, quick_epochs=6, batch=64, strength=1e-3),
    "lm": dict(epochs=5, quick_epochs=2, batch=32, strength=1e-4),
    "logreg": dict(epochs=40, quick_epochs=6, batch=64, strength=1e-3),
}


def ramp_start(last_stage_steps: int) -> float:
  """``c0 = 0.1``, raised on short runs so that c reaches 1 halfway into the last stage.

  With milestones in steps the ramp ``c = min(c0 sqrt(j + 1), 1)`` (spec §7) reaches 1
  at ``j + 1 = 1 / c0^2``; the paper's c0 = 0.1 needs 99 last-stage steps.
  """
  return max(0.1, 1 / math.sqrt(max(last_stage_steps, 2) / 2))


def make_optimizer(name: str, lr: float, strength: float, reg: Any, milestones: tuple[int, int],
                   total: int):
  """One optimizer with the stage-wise schedule; milestones and ``total`` are in steps."""
  common = dict(strength=strength, regularizer=reg, milestones=milestones)
  c0 = ramp_start(total - milestones[-1])
  if name == "ramda":
    return optax_ramda.ramda(lr, momentum=c0, **common)
  if name == "rmda":
    return optax_ramda.rmda(lr, momentum=c0, **common)
  if name == "proxgen":
    return optax_ramda.prox_adamw(lr, **common)
  if name == "proxsgd":
    return optax_ramda.prox_sgd(lr, momentum=0.1, **common)
  if name == "adamw":
    sched = optax.piecewise_constant_schedule(lr, {m: 0.1 for m in milestones})
    return optax.adamw(sched)
  raise ValueError(f"unknown optimizer {name!r}")


# --- one training run ---------------------------------------------------------------


def build(task: str, seed: int, quick: bool):
  """Model, data split, loss/metric functions for one task."""
  rngs = nnx.Rngs(seed)
  if task == "cnn":
    split = demo_models.digits(seed=0, image=True)
    model = demo_models.cnn(rngs)
  elif task == "logreg":
    split = demo_models.digits(seed=0, image=False)
    model = demo_models.logreg(rngs)
  else:
    ctx = 32
    split, vocab = demo_models.text(ctx, train_chars=20_000 if quick else 120_000,
                                    val_chars=10_000 if quick else 20_000)
    model = demo_models.CharTransformer(vocab, ctx, rngs)
  return model, split


def train_one(task: str, opt_name: str, args: argparse.Namespace, progress: bool = True):
  """Trains one model; returns its history (per epoch) and the final params."""
  from tqdm import tqdm

  d = TASK_DEFAULTS[task]
  epochs = args.epochs or (d["quick_epochs"] if args.quick else d["epochs"])
  strength = d["strength"] if args.strength is None else args.strength
  model, split = build(task, args.seed, args.quick)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  reg = optax_ramda.group_lasso(demo_models.paper_groups)
  batch = d["batch"]
  n = len(split.x_train)
  spe = n // batch
  total = epochs * spe
  milestones = (max(1, total // 2), max(2, 3 * total // 4))
  tx = make_optimizer(opt_name, LEARNING_RATES[opt_name], strength, reg, milestones, total)
  opt_state = tx.init(params)

  def logits_fn(p, x):
    return nnx.merge(graphdef, nnx.State(p))(x)

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, x), y).mean()

  def step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    upd, s = tx.update(g, s, p)
    return optax.apply_updates(p, upd), s, loss

  step = jax.jit(step, donate_argnums=(0, 1))

  @jax.jit
  def evaluate(p, x, y):
    lg = logits_fn(p, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(lg, y).mean()
    acc = jnp.mean(jnp.argmax(lg, -1) == y)
    rep = optax_ramda.structure(p, reg)
    return loss, acc, rep.weighted_group_sparsity, rep.unstructured_sparsity

  rng = np.random.default_rng(args.seed + 1)
  hist: dict[str, list[float]] = {k: [] for k in ("metric", "group_sparsity",
                                                   "unstructured_sparsity", "epoch_time")}
  bar = tqdm(total=total, desc=f"{task}/{opt_name}", leave=False, disable=not progress,
             mininterval=1.0)
  for _ in range(epochs):
    t0 = time.perf_counter()
    order = rng.permutation(n)
    for i in range(spe):
      idx = order[i * batch:(i + 1) * batch]
      params, opt_state, loss = step(params, opt_state, split.x_train[idx], split.y_train[idx])
      bar.update(1)
    loss.block_until_ready()
    hist["epoch_time"].append(time.perf_counter() - t0)
    vloss, vacc, gs, us = (float(v) for v in evaluate(params, split.x_val, split.y_val))
    hist["metric"].append(math.exp(vloss) if task == "lm" else 100 * vacc)
    hist["group_sparsity"].append(100 * gs)
    hist["unstructured_sparsity"].append(100 * us)
    bar.set_postfix(metric=f"{hist['metric'][-1]:.2f}", sparsity=f"{100 * gs:.1f}%")
  bar.close()
  # Time per epoch: the median, so the first epoch's compilation is not counted.
  hist["time_per_epoch"] = float(np.median(hist["epoch_time"]))
  return hist, params, reg


def run_identification(args: argparse.Namespace, out: pathlib.Path) -> dict[str, Any]:
  problem = identification.make_problem(seed=0)
  opt = identification.solve_optimum(problem)
  identification.certify(opt)
  stage = 300 if args.quick else 1000
  res: dict[str, Any] = {"optimal_nonzero_groups": int(opt.support.sum()),
                         "groups": problem.groups, "residual": opt.residual,
                         "max_zero_ratio": opt.max_zero_ratio, "stage": stage, "methods": {}}
  traces = {}
  for name in identification.METHODS:
    if name not in args.optimizers_list:
      continue
    tr = identification.train(name, problem, opt, stage=stage, seed=args.seed)
    traces[name] = tr
    sm = identification.summarize(tr)
    sm["fraction_last_stage"] = float(tr.match[2 * stage:].mean())
    res["methods"][name] = sm
  if traces:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for name, tr in traces.items():
      axes[0].plot(tr.nonzero_groups, lw=1, label=name)
      axes[1].plot(np.cumsum(tr.match) / np.arange(1, len(tr.match) + 1), lw=1, label=name)
    axes[0].axhline(opt.support.sum(), color="k", ls=":", label="optimal")
    for m in (stage, 2 * stage):
      for ax in axes:
        ax.axvline(m, color="gray", lw=0.5)
    axes[0].set(xlabel="step", ylabel="non-zero groups of x", title="support size")
    axes[1].set(xlabel="step", ylabel="fraction", title="steps with the optimal support")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "identification.png", dpi=70)
    plt.close(fig)
  return res


# --- plots and tables ----------------------------------------------------------------


def plot_task(task: str, hists: dict[str, dict[str, Any]], out: pathlib.Path) -> None:
  import matplotlib.pyplot as plt

  label = "val perplexity" if task == "lm" else "val accuracy (%)"
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
  for name, h in hists.items():
    ep = np.arange(1, len(h["metric"]) + 1)
    axes[0].plot(ep, h["metric"], marker=".", label=name)
    axes[1].plot(ep, h["group_sparsity"], marker=".", label=name)
    axes[2].scatter(h["group_sparsity"][-1], h["metric"][-1], label=name)
    axes[2].annotate(name, (h["group_sparsity"][-1], h["metric"][-1]), fontsize=7,
                     xytext=(3, 3), textcoords="offset points")
  axes[0].set(xlabel="epoch", ylabel=label, title=task)
  axes[1].set(xlabel="epoch", ylabel="weighted group sparsity (%)")
  axes[2].set(xlabel="weighted group sparsity (%)", ylabel=label, title="final")
  if task == "lm":
    axes[0].set_yscale("log")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / f"{task}.png", dpi=70)
  plt.close(fig)


def table(task: str, hists: dict[str, dict[str, Any]]) -> str:
  metric = "val ppl" if task == "lm" else "val acc (%)"
  lines = [f"### {task}", "",
           f"| optimizer | {metric} | weighted group sparsity (%) | unstructured sparsity (%) "
           "| time/epoch (s) |", "|---|---|---|---|---|"]
  for name, h in hists.items():
    lines.append(f"| {name} | {h['metric'][-1]:.2f} | {h['group_sparsity'][-1]:.1f} | "
                 f"{h['unstructured_sparsity'][-1]:.1f} | {h['time_per_epoch']:.2f} |")
  return "\n".join(lines) + "\n"


def identification_table(res: dict[str, Any]) -> str:
  lines = ["### identification", "",
           f"Optimal support: {res['optimal_nonzero_groups']}/{res['groups']} non-zero groups "
           f"(residual {res['residual']:.1e}, largest zero-group ratio "
           f"||grad_g||/(lam sqrt|g|) = {res['max_zero_ratio']:.3f}); 3 stages of "
           f"{res['stage']} steps.", "",
           "| optimizer | steps with optimal support (%) | in last stage (%) "
           "| support optimal from step on | final non-zero groups |", "|---|---|---|---|---|"]
  for name, sm in res["methods"].items():
    ident = sm["identified_at"] if sm["identified_at"] is not None else "never"
    lines.append(f"| {name} | {100 * sm['fraction']:.1f} | "
                 f"{100 * sm['fraction_last_stage']:.1f} | {ident} | {sm['final_nonzero']} |")
  return "\n".join(lines) + "\n"


# --- command line --------------------------------------------------------------------


def _names(value: str, choices: tuple[str, ...], what: str, parser) -> list[str]:
  names = [v.strip() for v in value.split(",") if v.strip()]
  if value.strip() == "all":
    return list(choices)
  bad = [v for v in names if v not in choices]
  if bad or not names:
    parser.error(f"unknown {what} {', '.join(bad) or repr(value)}; choose from "
                 f"{', '.join(choices)} (comma-separated) or 'all'")
  return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
  p.add_argument("--tasks", default=None,
                 help=f"comma-separated from {TASKS} or 'all' (default: all; with --quick: "
                 f"{','.join(QUICK_TASKS)})")
  p.add_argument("--optimizers", default="all",
                 help=f"comma-separated from {OPTIMIZERS} or 'all'")
  p.add_argument("--epochs", type=int, default=None,
                 help="epochs per run (default: per task, see TASK_DEFAULTS)")
  p.add_argument("--strength", type=float, default=None,
                 help="group-LASSO strength lambda (default: per task)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="demo_out", help="output directory")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  if args.tasks is None:
    args.tasks = ",".join(QUICK_TASKS) if args.quick else "all"
  args.tasks_list = _names(args.tasks, TASKS, "task", p)
  args.optimizers_list = _names(args.optimizers, OPTIMIZERS, "optimizer", p)
  if args.epochs is not None and args.epochs <= 0:
    p.error(f"--epochs must be a positive integer, got {args.epochs}")
  if args.strength is not None and not args.strength >= 0:
    p.error(f"--strength must be >= 0, got {args.strength}")
  out = pathlib.Path(args.out)
  try:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out):
      pass
  except OSError as e:
    p.error(f"cannot write to the output directory {str(out)!r} ({e.strerror}); "
            "pass a writable --out")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  import matplotlib

  matplotlib.use("Agg")
  out = pathlib.Path(args.out)
  t_start = time.perf_counter()
  results: dict[str, Any] = {"command": " ".join(["python3 examples/demo.py", *(
      argv if argv is not None else sys.argv[1:])]), "tasks": {}}
  md = [f"Command: `{results['command']}`", ""]
  for task in args.tasks_list:
    if task == "identification":
      res = run_identification(args, out)
      results["tasks"][task] = res
      md.append(identification_table(res))
      print(md[-1])
      continue
    hists = {}
    for name in args.optimizers_list:
      hist, params, reg = train_one(task, name, args, progress=not args.no_progress)
      hists[name] = hist
      if name == "ramda":
        rep = optax_ramda.structure(params, reg)
        hist["zero_groups"] = {k: [int(v.zero_groups), v.num_groups]
                               for k, v in rep.per_leaf.items()}
    results["tasks"][task] = hists
    plot_task(task, hists, out)
    md.append(table(task, hists))
    print(md[-1])
  results["seconds"] = time.perf_counter() - t_start
  md.append(f"Total time: {results['seconds']:.0f} s on {os.cpu_count()} CPU cores "
            f"(jax {jax.__version__}).\n")
  (out / "results.md").write_text("\n".join(md))
  (out / "results.json").write_text(json.dumps(results, indent=1))
  print(md[-1])
  return results


if __name__ == "__main__":
  main()
