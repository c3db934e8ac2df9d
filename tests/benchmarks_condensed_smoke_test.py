"""Smoke test: benchmarks/condensed_inference.py --quick runs and prints its table.

Checks only that the script runs and prints its table and headline, never timings.
"""

import os
import pathlib
import subprocess
import sys

import pytest

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "condensed_inference.py"


@pytest.mark.slow
def test_condensed_inference_quick_prints_table():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, str(_SCRIPT), "--quick"],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  lines = out.stdout.splitlines()
  assert any(line.startswith("jax ") and "backend cpu" in line for line in lines)
  assert any(line.startswith("cpu: ") and "cpu_count" in line for line in lines)
  header = [line for line in lines if line.startswith("| layer K->N |")]
  assert len(header) == 1 and "dense us" in header[0] and "gather us (x)" in header[0]
  rows = [line for line in lines if line.startswith("| 3072->768 | 90% |")]
  assert len(rows) == 2  # batch 1 and 8
  assert "max relative error" in out.stdout
  assert lines[-1].startswith("HEADLINE")
