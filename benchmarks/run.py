"""The optax_ramda benchmark suite: one command, one process (issue 7, BENCHMARKS.md).

  python3 benchmarks/run.py            # full suite (~1e5, 1e6, 1e7 parameters)
  python3 benchmarks/run.py --quick    # 1e5 and 1e6 only, fewer repetitions
  python3 benchmarks/run.py --json results.json
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python3 benchmarks/run.py
      # with an allocator that keeps freed memory mapped (BENCHMARKS.md, "Allocator")

Sections (each a Markdown table on stdout):

1. ``update``: the jitted optimizer step (``opt.update`` + ``optax.apply_updates``,
   params and state donated, in output order: see ``make_step``) of every
   optimizer -- RAMDA with every solver in
   ``optax_ramda._src.solvers.SOLVERS``, RMDA, ProxGen with every solver,
   ProxSGD, and RAMDA without a regularizer (its elementwise floor) -- on CNN
   and Transformer-like trees of about 1e5, 1e6, 1e7 parameters with the
   paper's groupings, as the median over repetitions after warm-up, and its
   ratio to ``optax.adamw`` and ``optax.contrib.madgrad`` on the same trees.
   All optimizers of one model are timed round-robin (``interleaved_times``),
   so load from other processes hits them alike; CPU time is reported too.
   Also optimizer-state bytes per parameter byte (from ``opt.init``), the
   update's temporary memory from XLA's compiled memory analysis, XLA's cost
   analysis "bytes accessed", and the solver iterations per step: mean per
   leaf, and per parameter (weighted by leaf size: the sweeps or Newton
   evaluations that the average entry goes through).
2. ``scaling``: the log-log slope of update time against parameter count, from
   1e5 to 1e7 (least squares) and between 1e6 and 1e7.
3. ``train step``: a jitted forward + backward + update of a small CNN and a
   small Transformer on synthetic data, ratio to the same step with AdamW, and
   the solver iterations per step (mean over all leaves, unregularized ones
   counting 0, and max) over the run.
4. ``compile``: trace+lower and XLA compile time of the step for a Transformer
   with many (72) regularized leaves, ratio to AdamW's; cold (``jax.clear_caches``
   before each), round-robin over the optimizers, median of the repeats.

Nothing here is CPU-specific: every timing ends in ``jax.block_until_ready``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

try:
  import resource
except ImportError:  # not on Unix
  resource = None

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_ramda
from optax_ramda._src import solvers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _models

# Hyperparameters: the papers' usual settings for CNNs; the strength is large
# enough that a share of groups is screened (the solvers' realistic regime).
LR = {"adamw": 1e-3, "madgrad": 1e-2, "ramda": 1e-2, "rmda": 1e-1, "prox_adamw": 1e-3,
      "prox_sgd": 1e-1}
STRENGTH = 1e-4


def optimizers(params) -> dict[str, optax.GradientTransformation]:
  """Every optimizer of the suite, baselines first, for this parameter tree."""
  reg = optax_ramda.group_lasso(_models.group_spec(params))
  opts = {
      "adamw": optax.adamw(LR["adamw"]),
      "madgrad": optax.contrib.madgrad(LR["madgrad"]),
      "ramda (no reg)": optax_ramda.ramda(LR["ramda"]),
  }
  for name in solvers.SOLVERS:
    opts[f"ramda {name}"] = optax_ramda.ramda(LR["ramda"], STRENGTH, reg, solver=name)
  opts["rmda"] = optax_ramda.rmda(LR["rmda"], STRENGTH, reg)
  for name in solvers.SOLVERS:
    opts[f"prox_adamw {name}"] = optax_ramda.prox_adamw(
        LR["prox_adamw"], STRENGTH, reg, solver=name
    )
  opts["prox_sgd"] = optax_ramda.prox_sgd(LR["prox_sgd"], STRENGTH, reg)
  return opts


def iteration_vector(state) -> jax.Array:
  """Solver iterations of every leaf as one int32 vector (empty if none).

  The solve stage keeps them as one vector per field (``SolveState``).
  """
  its = optax.tree_utils.tree_get(state, "iterations", default=None)
  if its is None:
    return jnp.zeros([0], jnp.int32)
  return jnp.asarray(its, jnp.int32).reshape(-1)


def make_step(opt) -> Callable:
  """``step(params, state, grads) -> (params, state, iterations)``, jitted.

  The donated arguments come first and in the order of the outputs: JAX pairs
  each output with the first donated input of the same shape and dtype, so a
  step taking ``(state, params)`` and returning ``(params, state)`` would write
  the new params into the old ``x0`` buffer (and so on), and XLA would add a
  full copy of such leaves to keep the old values readable (measured on the
  1e6 CNN: XLA's bytes accessed per param byte 18 -> 10 for adamw, 26 -> 14
  for RAMDA without a regularizer, 62 -> 50 for RAMDA exact).
  """

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, iteration_vector(state)

  return jax.jit(step, donate_argnums=(0, 1))


def _rusage() -> tuple[float, float]:
  """(minor page faults, system CPU seconds) of this process so far; NaN off Unix."""
  if resource is None:
    return float("nan"), float("nan")
  r = resource.getrusage(resource.RUSAGE_SELF)
  return float(r.ru_minflt), r.ru_stime


def interleaved_times(runners: dict[str, Callable[[int], object]], reps: int) -> dict:
  """Median wall, CPU and system seconds and page faults of each runner, round-robin.

  Round ``i`` calls every runner once (starting at a different one each
  round), so a change of machine load during the measurement hits every
  optimizer alike and the ratios stay meaningful on a shared machine. CPU
  time (``time.process_time``, all threads of this process) is reported too:
  it does not count time spent waiting for a core. So are the minor page
  faults and the system (kernel) CPU time of each call: XLA allocates an
  update's temporaries afresh at every call, and when the allocator returns
  them to the operating system in between (glibc does for blocks of more than
  32 MiB), every call pays to map and zero them again (BENCHMARKS.md,
  "Allocator").

  Returns ``{name: (wall_s, cpu_s, sys_s, minor_faults)}`` (medians).
  """
  names = list(runners)
  cols = {k: ([], [], [], []) for k in names}
  for i in range(reps):
    for k in names[i % len(names):] + names[: i % len(names)]:
      f0, s0 = _rusage()
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(runners[k](i))
      t1, c1 = time.perf_counter(), time.process_time()
      f1, s1 = _rusage()
      for col, v in zip(cols[k], (t1 - t0, c1 - c0, s1 - s0, f1 - f0)):
        col.append(v)
  return {k: tuple(statistics.median(c) for c in cols[k]) for k in names}


def copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def state_bytes(state) -> int:
  return _models.nbytes(state)


def memory_analysis(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    m = None
  if m is None:
    return {}
  keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
          "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def bytes_accessed(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(cost, list):
    cost = cost[0] if cost else None
  if not cost:
    return None
  return float(cost.get("bytes accessed", float("nan")))


# --- 1. update ---------------------------------------------------------------


def bench_update(family: str, target: int, reps: int, warmup: int, log) -> list[dict]:
  if family == "cnn":
    params = _models.cnn_params(_models.cnn_width_for(target))
  else:
    params = _models.transformer_params(_models.transformer_width_for(target), layers=4)
  n = _models.count(params)
  pbytes = _models.nbytes(params)
  sizes = np.array([x.size for x in jax.tree.leaves(params)], dtype=float)
  key = jax.random.PRNGKey(1)
  # A small pool of gradients (cycled), scaled like real gradients of each leaf.
  grads = [
      jax.tree.map(
          lambda x, i=i: 1e-2 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype),
          params,
      )
      for i in range(3)
  ]
  rows, runners, state_of = [], {}, {}
  for name, opt in optimizers(params).items():
    step = make_step(opt)
    p = copy(params)
    state = copy(opt.init(p))  # madgrad's state holds the params' own buffers
    sbytes = state_bytes(state)
    t0 = time.perf_counter()
    compiled = step.lower(p, state, grads[0]).compile()
    compile_s = time.perf_counter() - t0
    mem = memory_analysis(compiled)
    acc = bytes_accessed(compiled)
    its = []
    for i in range(warmup):
      p, state, it = compiled(p, state, grads[i % 3])
      its.append(it)
    holder = {"p": p, "s": state, "its": its}

    def run(i, holder=holder, compiled=compiled):
      holder["p"], holder["s"], it = compiled(holder["p"], holder["s"], grads[i % 3])
      holder["its"].append(it)
      return holder["p"], holder["s"]

    runners[name], state_of[name] = run, holder
    rows.append({
        "family": family, "params": n, "optimizer": name,
        "compile_s": compile_s, "state_bytes_per_param_byte": sbytes / pbytes,
        "temp_bytes_per_param_byte": mem.get("temp_size_in_bytes", float("nan")) / pbytes,
        "bytes_accessed_per_param_byte": (acc / pbytes) if acc is not None else float("nan"),
        "memory": mem,
    })
  times = interleaved_times(runners, reps)
  for row in rows:
    name, holder = row["optimizer"], state_of[row["optimizer"]]
    its = np.array([np.asarray(x) for x in holder["its"]], dtype=float)  # after timing
    row["time_s"], row["cpu_s"], row["sys_s"], row["minor_faults"] = times[name]
    row["mean_iterations"] = float(its.mean()) if its.size else 0.0
    row["max_iterations"] = float(its.max()) if its.size else 0.0
    # Weighted by leaf size: the sweeps (PG) or Newton evaluations (exact) of
    # the average parameter, what the solver's full-size work follows.
    row["weighted_iterations"] = float((its @ sizes).mean() / sizes.sum()) if its.size else 0.0
    row["group_sparsity"] = _z_group_sparsity(holder["p"], params)
    log(f"  {family} {n:>9,d} {name:22s} {row['time_s'] * 1e3:9.3f} ms (cpu "
        f"{row['cpu_s'] * 1e3:8.3f})  compile {row['compile_s']:6.2f} s  iters "
        f"{row['mean_iterations']:.1f}")
  state_of.clear()
  base = {r["optimizer"]: r["time_s"] for r in rows}
  for r in rows:
    r["vs_adamw"] = r["time_s"] / base["adamw"]
    r["vs_madgrad"] = r["time_s"] / base["madgrad"]
  return rows


def _z_group_sparsity(params, like) -> float:
  """Weighted group sparsity of the current params (exact zeros), for context."""
  reg = optax_ramda.group_lasso(_models.group_spec(like))
  return float(optax_ramda.structure(params, reg).weighted_group_sparsity)


def scaling(rows: list[dict]) -> list[dict]:
  out = []
  keys = sorted({(r["family"], r["optimizer"]) for r in rows}, key=lambda k: (k[0], 0))
  order = {name: i for i, name in enumerate(dict.fromkeys(r["optimizer"] for r in rows))}
  keys.sort(key=lambda k: (k[0], order[k[1]]))
  for fam, name in keys:
    pts = sorted((r["params"], r["time_s"]) for r in rows
                 if r["family"] == fam and r["optimizer"] == name)
    if len(pts) < 2:
      continue
    x = np.log([p for p, _ in pts])
    y = np.log([t for _, t in pts])
    slope = float(np.polyfit(x, y, 1)[0])
    last = float((y[-1] - y[-2]) / (x[-1] - x[-2]))
    out.append({"family": fam, "optimizer": name, "exponent_fit": slope,
                "exponent_last_decade": last, "sizes": [p for p, _ in pts]})
  return out


# --- 3. whole training step ---------------------------------------------------


def bench_train(family: str, steps: int, warmup: int, batch: int, log) -> list[dict]:
  if family == "cnn":
    # The model size: a VGG-style CNN of about 1e6 parameters.
    params = _models.cnn_params(_models.cnn_width_for(10**6))
    data = lambda k: _models.cnn_batch(k, batch)

    def loss_fn(p, xy):
      x, y = xy
      logits = _models.cnn_apply(p, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  else:
    params = _models.transformer_params(128, layers=2)
    data = lambda k: _models.token_batch(k, batch, 64)

    def loss_fn(p, xy):
      x, y = xy
      logits = _models.transformer_apply(p, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  batches = [data(jax.random.PRNGKey(100 + i)) for i in range(warmup + steps)]
  keep = ("adamw", "madgrad", "ramda (no reg)", "rmda", "prox_sgd")
  opts = {k: v for k, v in optimizers(params).items()
          if k in keep or k.startswith(("ramda ", "prox_adamw "))}
  rows, runners, state_of = [], {}, {}
  for name, opt in opts.items():

    def step(p, state, xy, opt=opt):  # donated args first, in output order
      loss, g = jax.value_and_grad(loss_fn)(p, xy)
      updates, state = opt.update(g, state, p)
      return optax.apply_updates(p, updates), state, loss, iteration_vector(state)

    step = jax.jit(step, donate_argnums=(0, 1))
    p = copy(params)
    state = copy(opt.init(p))  # madgrad's state holds the params' own buffers
    compiled = step.lower(p, state, batches[0]).compile()
    its, losses = [], []
    for i in range(warmup):
      p, state, loss, it = compiled(p, state, batches[i])
      its.append(it)
      losses.append(loss)
    holder = {"p": p, "s": state, "its": its, "losses": losses}

    def run(i, holder=holder, compiled=compiled):
      holder["p"], holder["s"], loss, it = compiled(holder["p"], holder["s"], batches[warmup + i])
      holder["its"].append(it)
      holder["losses"].append(loss)
      return holder["p"], loss

    runners[name], state_of[name] = run, holder
  times = interleaved_times(runners, steps)
  for name, holder in state_of.items():
    its = np.array([np.asarray(x) for x in holder["its"]], dtype=float)
    losses = [float(x) for x in holder["losses"]]
    rows.append({
        "family": family, "params": _models.count(params), "optimizer": name,
        "time_s": times[name][0], "cpu_s": times[name][1],
        "sys_s": times[name][2], "minor_faults": times[name][3],
        "mean_iterations": float(its.mean()) if its.size else 0.0,
        "max_iterations": float(its.max()) if its.size else 0.0,
        "iterations_per_step": [float(x) for x in its.mean(axis=1)] if its.size else [],
        "loss_first": losses[0], "loss_last": losses[-1],
    })
    log(f"  {family} step {name:22s} {rows[-1]['time_s'] * 1e3:9.3f} ms  iters "
        f"{rows[-1]['mean_iterations']:.1f}  loss {losses[0]:.3f} -> {losses[-1]:.3f}")
  state_of.clear()
  base = {r["optimizer"]: r["time_s"] for r in rows}
  for r in rows:
    r["vs_adamw"] = r["time_s"] / base["adamw"]
  return rows


# --- 4. compile time -----------------------------------------------------------


def bench_compile(layers: int, repeats: int, log) -> list[dict]:
  params = _models.transformer_params(64, layers=layers)
  n_reg = sum(s is not None for s in jax.tree.leaves(
      _models.group_spec(params), is_leaf=lambda s: s is None or hasattr(s, "reduce_axes")))
  grads = jax.tree.map(jnp.ones_like, params)
  opts = optimizers(params)
  lower_t = {name: [] for name in opts}
  compile_t = {name: [] for name in opts}
  for r in range(repeats):  # round-robin, cold: no trace or lowering cache
    names = list(opts)
    for name in names[r % len(names):] + names[: r % len(names)]:
      opt = opts[name]
      state = opt.init(params)
      jax.clear_caches()
      step = make_step(opt)  # a fresh jit
      t0 = time.perf_counter()
      lowered = step.lower(params, state, grads)
      t1 = time.perf_counter()
      lowered.compile()
      t2 = time.perf_counter()
      lower_t[name].append(t1 - t0)
      compile_t[name].append(t2 - t1)
  rows = []
  for name in opts:
    rows.append({"optimizer": name, "regularized_leaves": n_reg,
                 "leaves": len(jax.tree.leaves(params)),
                 "lower_s": statistics.median(lower_t[name]),
                 "compile_s": statistics.median(compile_t[name])})
    log(f"  compile {name:22s} lower {rows[-1]['lower_s']:.2f} s  "
        f"compile {rows[-1]['compile_s']:.2f} s")
  base = next(r for r in rows if r["optimizer"] == "adamw")
  for r in rows:
    r["compile_vs_adamw"] = r["compile_s"] / base["compile_s"]
    r["total_vs_adamw"] = (r["lower_s"] + r["compile_s"]) / (base["lower_s"] + base["compile_s"])
  return rows


# --- report ------------------------------------------------------------------------


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
  head = "| " + " | ".join(h for h, _, _ in cols) + " |"
  sep = "|" + "|".join("---" for _ in cols) + "|"
  lines = [head, sep]
  for r in rows:
    lines.append("| " + " | ".join(format(r[k], f) if f else str(r[k]) for _, k, f in cols)
                 + " |")
  return "\n".join(lines)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def machine() -> dict:
  info = {"platform": platform.platform(), "python": platform.python_version(),
          "jax": jax.__version__, "optax": optax.__version__,
          "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
          # The memory allocator decides whether an update's temporaries are
          # re-mapped at every call (BENCHMARKS.md, "Allocator").
          "allocator_env": {k: v for k, v in os.environ.items()
                            if k == "LD_PRELOAD" or k.startswith("MALLOC_")}}
  try:
    with open("/proc/cpuinfo") as f:
      names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    info["cpu"] = names[0] if names else "?"
  except OSError:
    pass
  try:
    info["loadavg"] = os.getloadavg()
  except OSError:
    pass
  return info


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="1e5 and 1e6 only, fewer repetitions")
  ap.add_argument("--sizes", default=None, help="comma-separated targets, e.g. 1e5,1e6")
  ap.add_argument("--families", default="cnn,transformer")
  ap.add_argument("--sections", default="update,train,compile")
  ap.add_argument("--json", default=None, help="also write all rows to this file")
  args = ap.parse_args(argv)
  log = lambda s: print(s, file=sys.stderr, flush=True)

  sizes = [int(float(s)) for s in (args.sizes or ("1e5,1e6" if args.quick else "1e5,1e6,1e7"))
           .split(",")]
  reps = {1e5: 40, 1e6: 20, 1e7: 5} if not args.quick else {1e5: 10, 1e6: 6, 1e7: 2}
  pick = lambda n: reps[min(reps, key=lambda k: abs(math.log(k) - math.log(n)))]
  sections = args.sections.split(",")
  t_start = time.perf_counter()
  info = machine()
  log(f"machine: {info}")
  if not info["allocator_env"] and platform.system() == "Linux":
    log("note: default allocator; with glibc, updates with large temporaries pay page faults "
        "at every call (the 'sys ms' and 'faulted MB' columns). BENCHMARKS.md, 'Allocator'.")
  out = {"machine": info, "args": vars(args)}

  if "update" in sections:
    rows = []
    for fam in args.families.split(","):
      for n in sizes:
        rows += bench_update(fam, n, reps=pick(n), warmup=3, log=log)
    out["update"] = rows
    out["scaling"] = scaling(rows)
    print("\n### Update time (median, ms) and ratios\n")
    print(table(rows, [("model", "family", ""), ("params", "params", ","),
                       ("optimizer", "optimizer", ""), ("ms", "time_ms", ".3f"),
                       ("cpu ms", "cpu_ms", ".3f"), ("sys ms", "sys_ms", ".2f"),
                       ("faulted MB", "fault_mb", ".1f"),
                       ("x adamw", "vs_adamw", ".2f"), ("x madgrad", "vs_madgrad", ".2f"),
                       ("iters/leaf", "mean_iterations", ".1f"),
                       ("iters/param", "weighted_iterations", ".1f"),
                       ("max iters", "max_iterations", ".0f")]
                 ) if _add_ms(rows) else "")
    mem_rows = [r for r in rows
                if r["params"] == max(q["params"] for q in rows if q["family"] == r["family"])]
    print("\n### Memory (largest size): bytes per parameter byte\n")
    print(table(mem_rows, [("model", "family", ""), ("params", "params", ","),
                           ("optimizer", "optimizer", ""),
                           ("state", "state_bytes_per_param_byte", ".3f"),
                           ("XLA temp", "temp_bytes_per_param_byte", ".3f"),
                           ("XLA bytes accessed", "bytes_accessed_per_param_byte", ".1f")]))
    print("\n### Scaling exponent of update time (log-log slope)\n")
    print(table(out["scaling"], [("model", "family", ""), ("optimizer", "optimizer", ""),
                                 ("fit over all sizes", "exponent_fit", ".2f"),
                                 ("last decade", "exponent_last_decade", ".2f")]))

  if "train" in sections:
    rows = []
    steps = 6 if args.quick else 20
    for fam in args.families.split(","):
      rows += bench_train(fam, steps=steps, warmup=3, batch=16 if args.quick else 32, log=log)
    out["train"] = rows
    _add_ms(rows)
    print("\n### Whole training step (forward + backward + update), median ms\n")
    print(table(rows, [("model", "family", ""), ("params", "params", ","),
                       ("optimizer", "optimizer", ""), ("ms", "time_ms", ".2f"),
                       ("cpu ms", "cpu_ms", ".2f"), ("sys ms", "sys_ms", ".2f"),
                       ("faulted MB", "fault_mb", ".1f"), ("x adamw", "vs_adamw", ".3f"),
                       ("iters/leaf/step", "mean_iterations", ".1f"),
                       ("max iters", "max_iterations", ".0f"),
                       ("loss first", "loss_first", ".3f"), ("loss last", "loss_last", ".3f")]))

  if "compile" in sections:
    rows = bench_compile(layers=12, repeats=1 if args.quick else 2, log=log)
    out["compile"] = rows
    print(f"\n### Compile time of the step, Transformer with {rows[0]['leaves']} leaves "
          f"({rows[0]['regularized_leaves']} regularized)\n")
    print(table(rows, [("optimizer", "optimizer", ""), ("trace+lower s", "lower_s", ".2f"),
                       ("XLA compile s", "compile_s", ".2f"),
                       ("compile x adamw", "compile_vs_adamw", ".2f"),
                       ("total x adamw", "total_vs_adamw", ".2f")]))

  out["wall_s"] = time.perf_counter() - t_start
  log(f"total {out['wall_s']:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1, default=str)


def _add_ms(rows) -> bool:
  for r in rows:
    r["time_ms"] = 1e3 * r["time_s"]
    r["cpu_ms"] = 1e3 * r.get("cpu_s", float("nan"))
    r["sys_ms"] = 1e3 * r.get("sys_s", float("nan"))
    r["fault_mb"] = r.get("minor_faults", float("nan")) * _PAGE / 1e6
  return True


if __name__ == "__main__":
  main()
