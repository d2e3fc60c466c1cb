"""The main job: structured models trained with RAMDA, RMDA, ProxGen, ProxSGD and AdamW.

(``--optimizers`` also accepts ``proxssi``: ProxGen's subproblem solved exactly.)

Tasks (all data ship with the install, see ``demo_models.py``):

* ``cnn``: a small CNN on scikit-learn's 8x8 digits, channel-wise groups on the Conv
  kernels and input-wise groups on the Dense kernels (ALGORITHMS.md §9);
* ``lm``: a character-level Transformer on CPython's ``pydoc_data.topics``, input-wise
  groups on the attention q/k/v/out and MLP projections (and the output head);
* ``logreg``: group-LASSO multinomial logistic regression on the digits pixels (one
  group per pixel), the papers' convex case;
* ``identification``: the convex problem of ``identification.py``, whose optimal support
  is certified, showing which methods find and keep it. It has its own fixed data,
  lambda and schedule: ``--epochs`` and ``--strength`` do not apply to it (a warning
  says so when they are given).

Every method uses the paper's stage-wise schedule (spec §7): milestones at 1/2 and 3/4
of the run, lr x 0.1 at each; RAMDA/RMDA restart there and their interpolation weight
ramps to c = 1 in the last stage, so their final weights carry exact zero groups.
Hyperparameters: ``LEARNING_RATES`` and ``TASK_DEFAULTS`` below (fixed, not tuned).
The CNNs trained with exact zero groups are then compacted (``optax_ramda.compact``)
and measured before and after (parameters, FLOPs, CPU latency, accuracy; the functions
of ``benchmarks/compaction.py``); with ``--quick`` only RAMDA's.
Output (in ``--out``): ``results.md`` (the tables), ``results.json`` (all histories) and
PNG plots per task; JAX's compilation cache in ``--out/.jax_cache`` (compiling is most
of a ``--quick`` run, so a second run starts faster). Usage::

  python3 examples/demo.py                 # the full run (about 70 s on 2 CPU cores)
  python3 examples/demo.py --quick         # a smoke run (< 1 min on 2 CPU cores)
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
from typing import Any, NamedTuple

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
# Every choice of --optimizers; the default runs all but ``proxssi``, ProxGen's
# subproblem solved exactly (``optax_ramda.prox_ssi``, Deleu & Bengio), which differs from
# ``proxgen`` (the same Adam subproblem solved inexactly by proximal gradient) only in
# the solver.
OPTIMIZERS = ("ramda", "rmda", "proxgen", "proxsgd", "adamw", "proxssi")
DEFAULT_OPTIMIZERS = ("ramda", "rmda", "proxgen", "proxsgd", "adamw")
# --quick skips the Transformer (compiling its training steps would not fit the minute):
# ``--quick --tasks lm`` runs a tiny version of it.
QUICK_TASKS = ("cnn", "logreg", "identification")

# Hyperparameters: fixed per method *before* any run, not tuned on these tasks: each
# method's default learning rate in its own paper/package family (RAMDA like MADGRAD
# 1e-2; RMDA and ProxSGD like SGD with momentum 1e-1; ProxGen, ProxSSI and the dense
# AdamW baseline Adam's 1e-3). RAMDA/RMDA use c0 = 0.1 (so c reaches 1 99 steps into the
# last stage, spec §7), ProxSGD its default c = 0.1. The same ``strength`` per task for
# all. Subproblem solvers: RAMDA the library's default (exact), ProxGen the paper's PG
# (``solver="pg"``), ProxSSI exact.
LEARNING_RATES = {"ramda": 1e-2, "rmda": 1e-1, "proxgen": 1e-3, "proxsgd": 1e-1,
                  "adamw": 1e-3, "proxssi": 1e-3}

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
    # The library's default subproblem solver (``solver=None``: exact for group LASSO).
    return optax_ramda.ramda(lr, momentum=c0, **common)
  if name == "rmda":
    return optax_ramda.rmda(lr, momentum=c0, **common)
  if name == "proxgen":
    # The paper's ProxGen: its Adam subproblem solved by proximal gradient. (The
    # library's default, ``solver=None``, solves it exactly: that is ``proxssi``.)
    return optax_ramda.prox_adamw(lr, solver="pg", **common)
  if name == "proxsgd":
    return optax_ramda.prox_sgd(lr, momentum=0.1, **common)
  if name == "proxssi":
    return optax_ramda.prox_ssi(lr, **common)
  if name == "adamw":
    sched = optax.piecewise_constant_schedule(lr, {m: 0.1 for m in milestones})
    return optax.adamw(sched)
  raise ValueError(f"unknown optimizer {name!r}")


# --- one training run ---------------------------------------------------------------


class Task(NamedTuple):
  """What the runs of one task share: data, initial weights and compiled functions.

  The gradient and the evaluation do not depend on the optimizer, so they are compiled
  once per task; only the optimizer's update is compiled per run. (Splitting the step
  into a jitted gradient and a jitted update gives bit-identical results to one fused
  step, and halves the compilation of a task: the model's forward and backward pass
  is compiled once instead of once per optimizer.)
  """

  name: str
  split: demo_models.Split
  graphdef: Any  # the model without its weights: nnx.merge(graphdef, State(params))
  init_params: Any
  reg: Any
  value_and_grad: Any  # jitted (params, x, y) -> (loss, grads)
  evaluate: Any  # jitted (params, x, y) -> (loss, accuracy, StructureReport)
  epochs: int
  batch: int
  strength: float


def build(task: str, seed: int, quick: bool):
  """Model and data split for one task."""
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


def prepare(task: str, args: argparse.Namespace) -> Task:
  """Builds the model once; every optimizer of the task starts from the same weights."""
  d = TASK_DEFAULTS[task]
  model, split = build(task, args.seed, args.quick)
  graphdef, state = nnx.split(model)
  reg = optax_ramda.group_lasso(demo_models.paper_groups)

  def logits_fn(p, x):
    return nnx.merge(graphdef, nnx.State(p))(x)

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, x), y).mean()

  @jax.jit
  def evaluate(p, x, y):
    lg = logits_fn(p, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(lg, y).mean()
    return loss, jnp.mean(jnp.argmax(lg, -1) == y), optax_ramda.structure(p, reg)

  return Task(
      name=task, split=split, graphdef=graphdef, init_params=nnx.to_pure_dict(state),
      reg=reg,
      value_and_grad=jax.jit(jax.value_and_grad(loss_fn)), evaluate=evaluate,
      epochs=args.epochs or (d["quick_epochs"] if args.quick else d["epochs"]),
      batch=d["batch"], strength=d["strength"] if args.strength is None else args.strength)


def train_one(t: Task, opt_name: str, args: argparse.Namespace, progress: bool = True):
  """Trains one model; returns its history (per epoch) and the final params."""
  from tqdm import tqdm

  split, batch = t.split, t.batch
  n = len(split.x_train)
  spe = n // batch
  total = t.epochs * spe
  milestones = (max(1, total // 2), max(2, 3 * total // 4))
  tx = make_optimizer(opt_name, LEARNING_RATES[opt_name], t.strength, t.reg, milestones,
                      total)
  # A copy: the update donates its inputs, and the initial weights serve every run.
  params = jax.tree.map(jnp.array, t.init_params)
  opt_state = tx.init(params)

  # Params and state donated in the order they are returned, so XLA updates them in place
  # (the other order made XLA copy buffers in benchmarks/run.py; BENCHMARKS.md).
  def update(p, s, g):
    upd, s = tx.update(g, s, p)
    return optax.apply_updates(p, upd), s

  update = jax.jit(update, donate_argnums=(0, 1))

  rng = np.random.default_rng(args.seed + 1)
  hist: dict[str, Any] = {k: [] for k in ("metric", "group_sparsity",
                                          "unstructured_sparsity", "epoch_time")}
  bar = tqdm(total=total, desc=f"{t.name}/{opt_name}", leave=False, disable=not progress,
             mininterval=1.0)
  for _ in range(t.epochs):
    t0 = time.perf_counter()
    order = rng.permutation(n)
    for i in range(spe):
      idx = order[i * batch:(i + 1) * batch]
      loss, grads = t.value_and_grad(params, split.x_train[idx], split.y_train[idx])
      params, opt_state = update(params, opt_state, grads)
      bar.update(1)
    jax.block_until_ready(params)
    hist["epoch_time"].append(time.perf_counter() - t0)
    vloss, vacc, rep = t.evaluate(params, split.x_val, split.y_val)
    gs, us = float(rep.weighted_group_sparsity), float(rep.unstructured_sparsity)
    hist["metric"].append(math.exp(float(vloss)) if t.name == "lm" else 100 * float(vacc))
    hist["group_sparsity"].append(100 * gs)
    hist["unstructured_sparsity"].append(100 * us)
    bar.set_postfix(metric=f"{hist['metric'][-1]:.2f}", sparsity=f"{100 * gs:.1f}%")
  bar.close()
  # Time per epoch: the median over the epochs after the first (which compiles).
  hist["time_per_epoch"] = float(np.median(hist["epoch_time"][1:] or hist["epoch_time"]))
  # Exact zero groups per regularized layer of the final weights: [zero, total].
  hist["zero_groups"] = {k: [int(v.zero_groups), int(v.num_groups)]
                         for k, v in rep.per_leaf.items()}
  return hist, params


# --- compaction of the trained CNNs (issue 6) ------------------------------------------


LABELS = {"ramda": "RAMDA", "rmda": "RMDA", "proxgen": "ProxGen", "proxsgd": "ProxSGD",
          "adamw": "AdamW", "proxssi": "ProxSSI"}


def _compaction_module():
  """``benchmarks/compaction.py`` (its measurements: params, FLOPs, latency, accuracy)."""
  import importlib.util

  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "compaction.py"
  spec = importlib.util.spec_from_file_location("_demo_compaction_benchmark", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def compact_cnn(t: Task, name: str, params: Any, quick: bool) -> dict[str, Any]:
  """``optax_ramda.compact`` on a trained CNN; the benchmark's report of both models.

  Latency: the jitted forward on a batch of 256 validation images, the median of 50
  calls (10 with ``--quick``) after 5 (2) warm-up calls, the two models timed
  alternately (``benchmarks/compaction.py``: ``report``).
  """
  bench = _compaction_module()
  model = nnx.merge(t.graphdef, nnx.State(params))
  model.eval()
  t0 = time.perf_counter()
  small = optax_ramda.compact(model, t.split.x_val[:64])
  seconds = time.perf_counter() - t0
  # Measured with XLA's optimizations on, also in --quick (which turns them off to
  # compile faster): latencies of unoptimized code would say little.
  off = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    rep = bench.report(model, small, t.split.x_val, t.split.y_val, batch=256,
                       repeats=10 if quick else 50, warmup=2 if quick else 5,
                       label=f"{LABELS[name]}-trained CNN")
  finally:
    jax.config.update("jax_disable_most_optimizations", off)
  rep["compact_s"] = seconds
  rep["summary"] = bench.summary_line(rep)
  rep["markdown"] = bench.markdown(rep)
  return rep


def compaction_targets(hists: dict[str, dict[str, Any]], quick: bool) -> list[str]:
  """The CNNs to compact: those with exact zero groups (only RAMDA's with ``--quick``,
  as compacting takes ~8 s per model); the dense baseline has nothing to cut."""
  names = [n for n, h in hists.items()
           if n != "adamw" and sum(z for z, _ in h["zero_groups"].values()) > 0]
  return [n for n in names if n == "ramda"] if quick else names


def _identification_stage(args: argparse.Namespace) -> int:
  return 300 if args.quick else 1000


def run_identification(args: argparse.Namespace, out: pathlib.Path) -> dict[str, Any]:
  """The problem of ``identification.py``: fixed data and lambda; ``--epochs`` and
  ``--strength`` do not apply (its stage length is 1000 steps, 300 with ``--quick``).
  The proximal methods run here (not the dense ``adamw``); ``proxssi`` is
  ``identification``'s ProxGen with ``solver="exact"``, which is ``prox_ssi``."""
  problem = identification.make_problem(seed=0)
  opt = identification.solve_optimum(problem)
  identification.certify(opt)
  stage = _identification_stage(args)
  res: dict[str, Any] = {"optimal_nonzero_groups": int(opt.support.sum()),
                         "groups": problem.groups, "residual": opt.residual,
                         "max_zero_ratio": opt.max_zero_ratio, "stage": stage, "methods": {}}
  traces = {}
  for name in args.optimizers_list:
    if name == "proxssi":
      tr = identification.train("proxgen", problem, opt, stage=stage, seed=args.seed,
                                solver="exact")
    elif name in identification.METHODS:
      tr = identification.train(name, problem, opt, stage=stage, seed=args.seed)
    else:
      continue
    traces[name] = tr
    sm = identification.summarize(tr)
    sm["fraction_last_stage"] = float(tr.match[2 * stage:].mean())
    res["methods"][name] = sm
  if traces:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for name, tr in traces.items():
      line, = axes[0].plot(tr.nonzero_groups, lw=1, label=name)
      axes[1].plot(np.cumsum(tr.match) / np.arange(1, len(tr.match) + 1), lw=1, label=name)
      at = res["methods"][name]["identified_at"]
      if at is not None:  # the optimal support from this step to the end: a marker
        axes[0].plot(at, opt.support.sum(), marker="v", ms=8, color=line.get_color(),
                     ls="none", label=f"{name}: optimal from step {at} on")
        axes[1].axvline(at, color=line.get_color(), ls="--", lw=0.8)
    axes[0].axhline(opt.support.sum(), color="k", ls=":", label="optimal")
    for m in (stage, 2 * stage):
      for ax in axes:
        ax.axvline(m, color="gray", lw=0.5)
    axes[0].set(xlabel="step", ylabel="non-zero groups of x", title="support size")
    axes[1].set(xlabel="step", ylabel="fraction of steps so far",
                title="steps with the optimal support")
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.79, 1))
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


def compaction_text(reps: dict[str, dict[str, Any]]) -> str:
  """One line per compacted CNN, then the first one's table."""
  lines = ["#### cnn compacted (optax_ramda.compact: zero groups cut out)", ""]
  lines += [f"* {r['summary']} (compact() took {r['compact_s']:.1f} s)" for r in reps.values()]
  first = next(iter(reps.values()))
  return "\n".join([*lines, "", first["markdown"]]) + "\n"


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
                 help=f"comma-separated from {','.join(TASKS)} or 'all' (default: all; "
                 f"with --quick: {','.join(QUICK_TASKS)})")
  p.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                 help=f"comma-separated from {','.join(OPTIMIZERS)} or 'all' (default: "
                 "%(default)s)")
  p.add_argument("--epochs", type=int, default=None,
                 help="epochs per run of cnn, lm, logreg (default: per task, see "
                 "TASK_DEFAULTS); identification has its own fixed schedule")
  p.add_argument("--strength", type=float, default=None,
                 help="group-LASSO strength lambda of cnn, lm, logreg (default: per task); "
                 "identification has its own fixed lambda")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="demo_out", help="output directory")
  p.add_argument("--cache", default=None,
                 help="JAX's persistent compilation cache directory, which makes a second "
                 "run start faster (default: OUT/.jax_cache; '' for none)")
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
  if args.cache is None:
    args.cache = str(out / ".jax_cache")
  given = [f for f, v in (("--epochs", args.epochs), ("--strength", args.strength))
           if v is not None]
  if "identification" in args.tasks_list and given:
    verb = "do" if len(given) > 1 else "does"
    print(f"warning: {' and '.join(given)} {verb} not apply to the identification task, which "
          f"keeps its own fixed problem (lambda = 0.35 lambda_max, 3 stages of "
          f"{_identification_stage(args)} steps); they apply to "
          f"{', '.join(t for t in args.tasks_list if t != 'identification') or 'no task'}",
          file=sys.stderr)
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  import matplotlib

  matplotlib.use("Agg")
  if args.cache:
    # Compiled functions are stored on disk and reused by the next run with the same
    # shapes and settings; compilation is most of a --quick run's time.
    jax.config.update("jax_compilation_cache_dir", args.cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  if args.quick:
    # Compiling is most of a --quick run (~170 small compilations in compact() alone):
    # XLA's cheap mode halves it. The trained numbers barely change, but its time/epoch
    # is that of less optimized code (the compaction latencies are measured optimized).
    jax.config.update("jax_disable_most_optimizations", True)
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
    t = prepare(task, args)
    hists, final = {}, {}
    for name in args.optimizers_list:
      hists[name], final[name] = train_one(t, name, args, progress=not args.no_progress)
    results["tasks"][task] = hists
    plot_task(task, hists, out)
    md.append(table(task, hists))
    print(md[-1])
    if task == "cnn":
      reps = {n: compact_cnn(t, n, final[n], args.quick)
              for n in compaction_targets(hists, args.quick)}
      results["compaction"] = reps
      if reps:
        md.append(compaction_text(reps))
        print(md[-1])
  if args.quick:
    md.append("(--quick compiles with XLA's optimizations mostly off, which halves its "
              "compile time: its time/epoch is that of less optimized code.)\n")
  results["seconds"] = time.perf_counter() - t_start
  md.append(f"Total time: {results['seconds']:.0f} s on {os.cpu_count()} CPU cores "
            f"(jax {jax.__version__}).\n")
  (out / "results.md").write_text("\n".join(md))
  (out / "results.json").write_text(json.dumps(results, indent=1))
  print(md[-1])
  return results


if __name__ == "__main__":
  main()
