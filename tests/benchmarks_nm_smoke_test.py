"""Smoke test: benchmarks/nm_matmul.py --quick runs and prints its table and headline."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_nm_matmul_benchmark_quick():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "nm_matmul.py"), "--quick", "--rounds", "3"],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = proc.stdout
  assert "backend cpu" in out and "os.cpu_count()" in out
  assert "| dtype |     B | variant  |  median us |" in out
  for row in ("| fp32  |     1 | jnp.dot", "| fp32  |    32 | 2:4", "| bf16  |     1 | dense32a"):
    assert row in out, row
  last = out.strip().splitlines()[-1]
  assert last.startswith("HEADLINE: cpu"), last
