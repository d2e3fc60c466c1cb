"""Smoke test of examples/data_parallel.py: each mode runs a few steps on 8
simulated CPU devices in a fresh process and matches its single-device replay."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode", ["data", "fsdp"])
def test_data_parallel_example_runs(mode):
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"  # --devices simulates CPU devices, also on a GPU machine
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  r = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "data_parallel.py"),
       "--devices", "8", "--mode", mode, "--steps", "3"],
      capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"8 devices, mode {mode}" in r.stdout, r.stdout
  if mode == "fsdp":
    assert "'model'" in r.stdout  # the first kernel is sharded over the model axis
  diff = re.search(r"max \|multi-device - single-device\| = (\S+)", r.stdout)
  assert diff is not None, r.stdout
  assert float(diff.group(1)) < 1e-4  # float32 rounding only
