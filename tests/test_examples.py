"""The two NNX examples the README points to run and do what they say: train, and zero groups.

(The demo, data_parallel.py and identification.py have tests of their own.)
"""

import re
import subprocess

from scripts import run_script


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
  return run_script("examples", script, *args)


def _zero_counts(stdout: str, what: str) -> list[tuple[int, int]]:
  return [(int(a), int(b)) for a, b in re.findall(rf"(\d+)/(\d+) zero {what}", stdout)]


def test_quickstart_trains_and_zeroes_rows():
  proc = _run("quickstart.py")
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = re.findall(r"val acc ([\d.]+)\s+group sparsity ([\d.]+)", proc.stdout)[-1]
  acc, sparsity = map(float, last)
  assert acc > 0.9 and sparsity > 0.2, proc.stdout
  counts = _zero_counts(proc.stdout, "rows")
  assert len(counts) == 2 and all(0 < z < n for z, n in counts), proc.stdout


def test_flax_nnx_cnn_trains_and_zeroes_groups():
  proc = _run("flax_nnx_cnn.py", "--epochs", "5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  sparsity = float(re.findall(r"group sparsity ([\d.]+)", proc.stdout)[-1])
  acc = float(re.search(r"train accuracy ([\d.]+)", proc.stdout).group(1))
  assert sparsity > 0.5 and acc > 0.5, proc.stdout
  counts = _zero_counts(proc.stdout, "groups")
  assert len(counts) == 4 and any(z > 0 for z, _ in counts), proc.stdout


def test_flax_nnx_cnn_refuses_too_few_epochs():
  """Fewer than 5 epochs end before the last stage, with no zero group (README)."""
  proc = _run("flax_nnx_cnn.py", "--epochs", "4")
  assert proc.returncode != 0 and "epochs" in proc.stderr, proc.stderr[-3000:]
