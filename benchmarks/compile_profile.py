"""Where the compile time of an update goes: XLA's HLO passes, LLVM, kernels.

  python3 benchmarks/compile_profile.py
  python3 benchmarks/compile_profile.py --optimizers "adamw,ramda (no reg)" --cube-root sqrt

For each optimizer of ``benchmarks/run.py``, the jitted training step of the
compile section (``run.bench_compile``: a Transformer with 196 leaves, 72 of
them regularized) is lowered and compiled cold in a fresh process, twice:

1. with XLA's CPU compiler logging its phases (``TF_CPP_VMODULE=cpu_compiler=1``):
   trace + lower time, XLA compile time, and of the latter the time in the HLO
   pass pipeline and in LLVM code generation ("JIT") of the step's module
   ("other": the rest of XLA's compile, e.g. buffer assignment and scheduling);
2. with ``--xla_dump_to``: the number of fusions and instructions (those of
   the fused computations included) in the optimized HLO, and the number of
   kernels LLVM compiled (one object file each in the dump). XLA's CPU backend
   compiles identical fused kernels once, so ``kernels`` is the number of
   distinct ones (``fusions`` counts every use).

``--cube-root sqrt`` replaces RAMDA's cube root by ``sqrt`` (an experiment:
the optimizer is then not RAMDA) to measure what the cube root costs to
compile. CPU only: the log lines and dump files are those of XLA's CPU
compiler (other backends report ``nan``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT = "adamw,madgrad,ramda (no reg),ramda exact,ramda pg,rmda,prox_adamw exact,prox_sgd"


def child(name: str, layers: int, cube_root: str) -> None:
  """Lower and compile one optimizer's step in this (fresh) process; print JSON."""
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import _models
  import run

  if cube_root == "sqrt":
    from optax_ramda._src import preconditioners

    preconditioners.cube_root = lambda u, offset=0: jnp.sqrt(u) + offset
  params = _models.transformer_params(64, layers=layers)
  grads = jax.tree.map(jnp.ones_like, params)
  opt = run.optimizers(params)[name]
  state = opt.init(params)
  step = run.make_step(opt)
  t0 = time.perf_counter()
  lowered = step.lower(params, state, grads)
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  print(json.dumps({"lower_s": t1 - t0, "compile_s": t2 - t1,
                    "backend": jax.default_backend()}))


def _run_child(name: str, layers: int, cube_root: str, env: dict) -> tuple[dict, str]:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--layers", str(layers),
         "--cube-root", cube_root]
  out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                       check=True)
  last = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
  return json.loads(last), out.stderr


def _logged_seconds(log: str, what: str) -> float:
  """Seconds of one phase of module ``jit_step`` from the CPU compiler's log."""
  m = re.search(rf"{what} \[jit_step\] for CPU[^\n]*?time: [^\n]*?\((\d+) us\)", log)
  if m is None:
    old = (" (jaxlib <= 0.10.1 logs no 'Running HLO passes' time; 0.10.2 does)"
           if what.startswith("Running HLO passes") else "")
    print(f"compile_profile: no '{what} [jit_step]' line in XLA's CPU compiler log, so that "
          f"phase is NaN{old}", file=sys.stderr)
    return float("nan")
  return int(m.group(1)) * 1e-6


def _dump_counts(folder: str) -> dict:
  """Fusions and instructions of the optimized step, and kernels LLVM compiled."""
  opt = glob.glob(os.path.join(folder, "*jit_step.cpu_after_optimizations.txt"))
  if not opt:
    return {"fusions": float("nan"), "instructions": float("nan"), "kernels": float("nan")}
  with open(opt[0]) as f:
    text = f.read()
  kernels = glob.glob(os.path.join(folder, "*jit_step.obj-file.*.o"))  # one per LLVM module
  return {"fusions": len(re.findall(r" fusion\(", text)),
          "instructions": len(re.findall(r"^\s+(?:ROOT )?%\S+ = ", text, re.M)),
          "kernels": len(kernels)}


def profile(name: str, layers: int, cube_root: str) -> dict:
  """One optimizer: timings from a logged compile, counts from a dumped one."""
  log_env = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "cpu_compiler=1"}
  times, log = _run_child(name, layers, cube_root, log_env)
  row = {"optimizer": name, **times,
         "hlo_passes_s": _logged_seconds(log, "Running HLO passes on"),
         "llvm_s": _logged_seconds(log, "Compiling")}
  with tempfile.TemporaryDirectory() as folder:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={folder}".strip()
    _run_child(name, layers, cube_root, {"XLA_FLAGS": flags})
    row.update(_dump_counts(folder))
  return row


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--optimizers", default=DEFAULT, help="comma-separated names of run.py")
  ap.add_argument("--layers", type=int, default=12, help="Transformer blocks (12: 196 leaves)")
  ap.add_argument("--repeats", type=int, default=2, help="cold compiles per optimizer (median)")
  ap.add_argument("--cube-root", choices=("ours", "sqrt"), default="ours")
  ap.add_argument("--json", help="also write the rows to this file")
  ap.add_argument("--child", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    child(args.child, args.layers, args.cube_root)
    return
  names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
  runs: dict[str, list[dict]] = {n: [] for n in names}
  for r in range(args.repeats):  # round-robin, so load from other jobs hits all alike
    for name in names[r % len(names):] + names[: r % len(names)]:
      runs[name].append(profile(name, args.layers, args.cube_root))
  cols = ("lower_s", "compile_s", "hlo_passes_s", "llvm_s")
  rows = []
  for name in names:
    row = dict(runs[name][0])
    for c in cols:
      row[c] = statistics.median(x[c] for x in runs[name])
    rows.append(row)
  base = next((r for r in rows if r["optimizer"] == "adamw"), rows[0])
  print(f"cube root: {args.cube_root}; backend {rows[0]['backend']}; median of "
        f"{args.repeats} cold compiles, each in a fresh process; ratios to {base['optimizer']}")
  print("| optimizer | trace+lower s | XLA compile s | HLO passes s | LLVM s | other s | total x "
        f"{base['optimizer']} | fusions | instructions | kernels |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    total = (r["lower_s"] + r["compile_s"]) / (base["lower_s"] + base["compile_s"])
    other = r["compile_s"] - r["hlo_passes_s"] - r["llvm_s"]
    print(f"| {r['optimizer']} | {r['lower_s']:.2f} | {r['compile_s']:.2f} | "
          f"{r['hlo_passes_s']:.2f} | {r['llvm_s']:.2f} | "
          f"{other:.2f} | {total:.2f} | {r['fusions']} | "
          f"{r['instructions']} | {r['kernels']} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"cube_root": args.cube_root, "layers": args.layers, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
