"""The demo command (examples/demo.py): bad input is refused before training; --quick
runs end to end, writes the tables and plots, and RAMDA's model has exact zero groups."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import demo  # noqa: E402


def _error(capsys, argv):
  with pytest.raises(SystemExit) as e:
    demo.parse_args(argv)
  assert e.value.code == 2  # argparse's usage-error exit status
  return capsys.readouterr().err


def test_unknown_task(capsys, tmp_path):
  err = _error(capsys, ["--tasks", "cnn,mnist", "--out", str(tmp_path)])
  assert "unknown task mnist" in err and "choose from" in err


def test_unknown_optimizer(capsys, tmp_path):
  err = _error(capsys, ["--optimizers", "adam", "--out", str(tmp_path)])
  assert "unknown optimizer adam" in err


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_nonpositive_epochs(capsys, tmp_path, epochs):
  err = _error(capsys, ["--epochs", epochs, "--out", str(tmp_path)])
  assert "--epochs must be a positive integer" in err


def test_unwritable_output_dir(capsys, tmp_path):
  # A directory below a regular file cannot be created, even by root (chmod would not
  # stop root).
  blocker = tmp_path / "file"
  blocker.write_text("")
  err = _error(capsys, ["--out", str(blocker / "sub")])
  assert "cannot write to the output directory" in err


def test_bad_input_exits_before_training(tmp_path):
  # The real command: non-zero exit, the message on stderr, and nothing written (the
  # check runs before any training starts).
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--quick",
                      "--optimizers", "sgd", "--out", str(out)],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  assert "unknown optimizer sgd" in r.stderr
  assert not (out / "results.md").exists()


def _check_outputs(out, tasks, optimizers):
  md = (out / "results.md").read_text()
  res = json.loads((out / "results.json").read_text())
  for task in tasks:
    assert f"### {task}" in md
    png = out / f"{task}.png"
    assert png.stat().st_size > 1000
    if task == "identification":
      continue
    for name in optimizers:
      assert f"| {name} |" in md
      assert len(res["tasks"][task][name]["metric"]) >= 1
  return res


def test_quick_end_to_end(tmp_path):
  # The command in --quick mode on the CNN with RAMDA and the dense baseline (all tasks
  # and optimizers take several minutes on 2 busy cores: the slow test below).
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--quick",
                      "--tasks", "cnn", "--optimizers", "ramda,adamw",
                      "--no-progress", "--out", str(out)],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  res = _check_outputs(out, ["cnn"], ["ramda", "adamw"])
  ramda = res["tasks"]["cnn"]["ramda"]
  # Exact zero groups in RAMDA's final weights (the ramp reached c = 1).
  assert sum(z for z, _ in ramda["zero_groups"].values()) > 0
  assert ramda["group_sparsity"][-1] > 0
  # The dense baseline has no exact zeros in its kernels.
  assert res["tasks"]["cnn"]["adamw"]["group_sparsity"][-1] == 0


@pytest.mark.slow
def test_quick_default_command(tmp_path):
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--quick",
                      "--no-progress", "--out", str(out)],
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  res = _check_outputs(out, list(demo.QUICK_TASKS), list(demo.OPTIMIZERS))
  for name in ("ramda", "rmda"):
    assert res["tasks"]["identification"]["methods"][name]["identified_at"] is not None
