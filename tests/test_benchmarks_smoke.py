"""The benchmark suite's one command (benchmarks/run.py) runs end to end on a tiny model.

Timings are not checked (they are measured in BENCHMARKS.md, never asserted);
this only keeps the command, its sections and its JSON record from rotting.
"""

import json
import subprocess

from scripts import run_script
from xla_version import JAXLIB


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
  """Runs ``benchmarks/<script>`` with ``args`` from the repository root; asserts success."""
  proc = run_script("benchmarks", script, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_update_section_runs_and_records_every_optimizer(tmp_path):
  out = tmp_path / "bench.json"
  proc = _run("run.py", "--sizes", "1e4", "--families", "cnn", "--sections", "update",
              "--json", str(out))
  rec = json.loads(out.read_text())
  names = [r["optimizer"] for r in rec["update"]]
  for want in ("adamw", "madgrad", "ramda (no reg)", "ramda exact", "ramda pg", "rmda",
               "prox_adamw exact", "prox_adamw pg", "prox_sgd"):
    assert want in names
  by = {r["optimizer"]: r for r in rec["update"]}
  for r in rec["update"]:
    assert r["time_s"] > 0 and r["minor_faults"] >= 0 and r["sys_s"] >= 0
  # State sizes are exact, whatever the machine: RAMDA x0, V, U; ProxGen m, v.
  assert abs(by["ramda exact"]["state_bytes_per_param_byte"] - 3) < 0.01
  assert abs(by["prox_adamw exact"]["state_bytes_per_param_byte"] - 2) < 0.01
  assert by["adamw"]["vs_adamw"] == 1.0
  assert "allocator_env" in rec["machine"]
  assert "| ramda exact |" in proc.stdout


def test_compile_profile_splits_xla_time_and_counts_kernels(tmp_path):
  out = tmp_path / "compile.json"
  proc = _run("compile_profile.py", "--layers", "1", "--repeats", "1", "--optimizers",
              "adamw,ramda exact", "--json", str(out))
  rows = {r["optimizer"]: r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {"adamw", "ramda exact"}
  for r in rows.values():
    # The CPU compiler's log lines and dump files were found and parsed.
    assert 0 < r["llvm_s"] < r["compile_s"]
    if JAXLIB >= (0, 10, 2):  # older CPU compilers log no HLO-pass time (measured: 0.10.1)
      assert 0 < r["hlo_passes_s"] < r["compile_s"]
    assert r["kernels"] > 0 and r["fusions"] > 0 and r["instructions"] > 0
  assert "| ramda exact |" in proc.stdout
