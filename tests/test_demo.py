"""The demo command (examples/demo.py): bad input is refused before training; --quick
runs end to end, writes the tables and plots, RAMDA's model has exact zero groups and its
compaction is reported."""

import json
import pathlib
import re
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


@pytest.mark.parametrize("flags, message", [
    (["--optimizers", "ramda,sgd"], "unknown optimizer sgd"),
    (["--tasks", "mnist"], "unknown task mnist"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--out", "{file}/sub"], "cannot write to the output directory"),
])
def test_bad_input_exits_before_training(tmp_path, flags, message):
  # The real command: non-zero exit, the message on stderr, nothing trained or written
  # (the checks run before any training starts; training would print a table).
  blocker = tmp_path / "file"
  blocker.write_text("")
  out = tmp_path / "out"
  flags = [f.format(file=blocker) for f in flags]
  r = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--quick",
                      "--out", str(out), *flags], capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 2
  assert message in r.stderr
  assert "###" not in r.stdout
  assert not (out / "results.md").exists()


def _run(out, *flags, timeout=300):
  r = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), *flags,
                      "--no-progress", "--out", str(out)],
                     capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, r.stderr[-2000:]
  return r


def _check_outputs(out, tasks, optimizers):
  md = (out / "results.md").read_text()
  res = json.loads((out / "results.json").read_text())
  for task in tasks:
    assert f"### {task}" in md
    png = out / f"{task}.png"
    assert png.stat().st_size > 1000
    for name in optimizers:
      if task == "identification":
        if name != "adamw":
          assert name in res["tasks"][task]["methods"]
        continue
      assert f"| {name} |" in md
      assert len(res["tasks"][task][name]["metric"]) >= 1
  return res


def test_quick_default_command(tmp_path):
  # The whole default --quick command, end to end (about 30 s on 2 CPU cores): tables
  # and plots of every quick task, exact zero groups in RAMDA's model, its compaction.
  out = tmp_path / "out"
  r = _run(out, "--quick")
  res = _check_outputs(out, list(demo.QUICK_TASKS), list(demo.DEFAULT_OPTIMIZERS))
  cnn = res["tasks"]["cnn"]
  ramda = cnn["ramda"]
  # Exact zero groups in RAMDA's final weights (the ramp reached c = 1).
  assert sum(z for z, _ in ramda["zero_groups"].values()) > 0
  assert ramda["group_sparsity"][-1] > 0
  # The dense baseline has no exact zeros in its kernels.
  assert cnn["adamw"]["group_sparsity"][-1] == 0
  assert sum(z for z, _ in cnn["adamw"]["zero_groups"].values()) == 0
  for name in ("ramda", "rmda"):
    assert res["tasks"]["identification"]["methods"][name]["identified_at"] is not None
  # The compilation cache went to the output directory.
  assert any((out / ".jax_cache").iterdir())
  _check_compaction(res, r.stdout, (out / "results.md").read_text())


def _check_compaction(res, stdout, md):
  # RAMDA's CNN was compacted (only it with --quick): smaller, as accurate (its zero
  # groups are cut exactly), and the one-line summary states the measured numbers.
  assert list(res["compaction"]) == ["ramda"]
  rep = res["compaction"]["ramda"]
  o, c = rep["original"], rep["compact"]
  assert c["params"] < o["params"] and c["flops"] < o["flops"]
  # The demo CNN: Conv 1->16, Conv 16->32, Linear 512->64, Linear 64->10, with biases.
  assert o["params"] == 160 + 4640 + 32832 + 650
  assert [w for _, w in o["widths"]] == [16, 32, 64, 10]
  assert all(wc <= wo for (_, wc), (_, wo) in zip(c["widths"], o["widths"]))
  assert o["latency_s"] > 0 and c["latency_s"] > 0
  line = rep["summary"]
  fewer = round(100 * (1 - c["flops"] / o["flops"]))
  assert line.startswith(f"RAMDA-trained CNN: {fewer}% fewer FLOPs, latency x")
  if o["accuracy"] == c["accuracy"]:
    assert f"same accuracy ({c['accuracy']:.1f}% vs {o['accuracy']:.1f}%)" in line
  else:
    assert f"accuracy {c['accuracy']:.1f}% vs {o['accuracy']:.1f}%" in line
  # Accuracy recomputed from the weights is that of the table (the last evaluation).
  assert o["accuracy"] == pytest.approx(res["tasks"]["cnn"]["ramda"]["metric"][-1],
                                        abs=1e-3)
  assert abs(c["accuracy"] - o["accuracy"]) <= 100 / 300 + 1e-9  # at most one image
  assert line in stdout and line in md
  assert re.search(r"\| parameters \| 38,282 \| [\d,]+ \|", md)


def test_identification_ignores_epochs_and_strength(capsys, tmp_path):
  # --epochs/--strength do not apply to the identification task: a warning says so.
  demo.parse_args(["--tasks", "logreg,identification", "--epochs", "3", "--out",
                   str(tmp_path)])
  err = capsys.readouterr().err
  assert "--epochs does not apply to the identification task" in err
  assert "they apply to logreg" in err
  demo.parse_args(["--tasks", "identification", "--strength", "1e-3", "--out", str(tmp_path)])
  assert "--strength does not apply" in capsys.readouterr().err
  # No warning without those flags, nor without the identification task.
  demo.parse_args(["--out", str(tmp_path)])
  demo.parse_args(["--tasks", "cnn", "--epochs", "3", "--out", str(tmp_path)])
  assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_quick_lm_and_proxssi(tmp_path):
  # The tiny Transformer (not in the default --quick) and every optimizer choice.
  out = tmp_path / "out"
  _run(out, "--quick", "--tasks", "lm,identification", "--optimizers", "all", timeout=600)
  res = _check_outputs(out, ["lm", "identification"], list(demo.OPTIMIZERS))
  assert "proxssi" in res["tasks"]["identification"]["methods"]
