"""Runs a repository script the way the README does: this interpreter, from the repository root."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_script(folder: str, script: str, *args: str) -> subprocess.CompletedProcess:
  """``python3 <folder>/<script> <args>`` from the repository root (not checked)."""
  return subprocess.run(
      [sys.executable, str(ROOT / folder / script), *args],
      capture_output=True, text=True, timeout=600, cwd=ROOT,
  )
