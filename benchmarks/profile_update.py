"""Where an optimizer update's time and memory go: XLA's view (issue 7 profiles).

  python3 benchmarks/profile_update.py --family cnn --size 1e6 --optimizers adamw,"ramda exact"
  python3 benchmarks/profile_update.py --hlo "ramda exact"   # also print the fusions

For each optimizer of ``benchmarks/run.py`` on one model: the jitted update's
median time, XLA's compiled memory analysis (temporaries per parameter byte),
cost analysis (bytes accessed per parameter byte), and a census of the
optimized HLO: the number of fusions / loops and the "full-size passes", i.e.
the fusions (outside and inside ``while`` bodies) whose output is at least a
tenth of the largest parameter leaf. That census is the text profile quoted in
BENCHMARKS.md: each full-size pass streams one or more arrays through memory,
so their count is what an elementwise update's time follows.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _models
import run


def hlo_census(text: str, big: int) -> dict:
  """Counts fusions and large elementwise passes in optimized HLO text."""
  comps = {}
  cur = None
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      cur = m.group(1)
      comps[cur] = []
    elif cur is not None:
      comps[cur].append(line)
  entry = next(n for n in comps if n.startswith("main"))
  while_bodies = set()
  for lines in comps.values():
    for ln in lines:
      m = re.search(r"while\(.*body=%?([\w.\-]+)", ln)
      if m:
        while_bodies.add(m.group(1))

  def passes(name, seen=()):
    out = []
    for ln in comps.get(name, []):
      m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (fusion|copy|while|call|conditional)\(", ln)
      if not m:
        continue
      shape = m.group(2)
      dims = re.findall(r"\[([\d,]*)\]", shape)
      size = max((math.prod(int(d) for d in ds.split(",") if d) for ds in dims), default=1)
      if m.group(3) in ("fusion", "copy") and size >= big:
        kind = re.search(r"kind=(\w+)", ln)
        out.append((m.group(1), shape[:60], kind.group(1) if kind else m.group(3)))
    return out

  census = {"entry_big_passes": passes(entry)}
  census["loop_big_passes"] = {b: passes(b) for b in sorted(while_bodies)}
  census["while_loops"] = len(while_bodies)
  census["fusions"] = sum(ln.count(" fusion(") for lines in comps.values() for ln in lines)
  return census


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--family", default="cnn")
  ap.add_argument("--size", default="1e6")
  ap.add_argument("--optimizers", default=None, help="comma-separated names of run.py")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--hlo", default=None, help="print the big passes of this optimizer")
  ap.add_argument("--dump", default=None, help="write this optimizer's optimized HLO here")
  args = ap.parse_args(argv)
  n = int(float(args.size))
  if args.family == "cnn":
    params = _models.cnn_params(_models.cnn_width_for(n))
  else:
    params = _models.transformer_params(_models.transformer_width_for(n), layers=4)
  pbytes = _models.nbytes(params)
  biggest = max(x.size for x in jax.tree.leaves(params))
  key = jax.random.PRNGKey(1)
  grads = [jax.tree.map(lambda x, i=i: 1e-2 * jax.random.normal(
      jax.random.fold_in(key, i), x.shape, x.dtype), params) for i in range(3)]
  opts = run.optimizers(params)
  names = args.optimizers.split(",") if args.optimizers else list(opts)
  print(f"{args.family} {_models.count(params):,} params, largest leaf {biggest:,}; "
        f"load {os.getloadavg()}")
  print("| optimizer | ms | XLA temp / param | bytes accessed / param | fusions | loops "
        "| big passes (entry) | big passes (loops) |")
  print("|---|---|---|---|---|---|---|---|")
  for name in names:
    opt = opts[name]
    step = run.make_step(opt)
    p = run.copy(params)
    state = run.copy(opt.init(p))
    compiled = step.lower(p, state, grads[0]).compile()
    mem = run.memory_analysis(compiled)
    acc = run.bytes_accessed(compiled)
    text = compiled.as_text()
    census = hlo_census(text, biggest // 10)
    if args.dump and name == args.dump.split(":")[0]:
      with open(args.dump.split(":", 1)[1], "w") as f:
        f.write(text)
    for i in range(3):
      p, state, _ = compiled(p, state, grads[i % 3])
    times = []
    for i in range(args.reps):
      t0 = time.perf_counter()
      p, state, _ = compiled(p, state, grads[i % 3])
      jax.block_until_ready((p, state))
      times.append(time.perf_counter() - t0)
    loop_passes = sum(len(v) for v in census["loop_big_passes"].values())
    print(f"| {name} | {1e3 * statistics.median(times):.3f} | "
          f"{mem.get('temp_size_in_bytes', float('nan')) / pbytes:.2f} | "
          f"{(acc or float('nan')) / pbytes:.1f} | {census['fusions']} | "
          f"{census['while_loops']} | {len(census['entry_big_passes'])} | {loop_passes} |",
          flush=True)
    if args.hlo == name:
      for x in census["entry_big_passes"]:
        print("   entry:", *x)
      for b, v in census["loop_big_passes"].items():
        for x in v:
          print(f"   {b}:", *x)
    del p, state, compiled
  print(f"load {os.getloadavg()}")
  jnp.zeros(1).block_until_ready()


if __name__ == "__main__":
  main()
