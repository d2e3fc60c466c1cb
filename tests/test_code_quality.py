"""The package stays ruff-clean and mypy-clean: CI runs the README's test command only."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
  )


def test_ruff_finds_nothing():
  pytest.importorskip("ruff")  # in the `test` extra
  result = _run("ruff", "check", "--no-cache", ".")
  assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing_in_the_package(tmp_path):
  pytest.importorskip("mypy")  # in the `test` extra; settings in pyproject.toml
  result = _run("mypy", "--cache-dir", str(tmp_path), "--no-error-summary")
  assert result.returncode == 0, result.stdout + result.stderr
