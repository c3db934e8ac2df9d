"""Helpers of the multi-process tests: launch ``experiments.main`` as N local processes.

Each process gets ``--xla_force_host_platform_device_count`` fake CPU devices, the
coordinator on a free localhost port, and its own log file. Processes run in their own
session, so a test that fails or times out kills exactly the processes it started (their
process groups), never anything else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
  """A TCP port nobody listens on right now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(devices: int, xla_flags: Sequence[str] = ()) -> dict[str, str]:
  """The environment of a child with ``devices`` fake CPU devices (and more XLA flags)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  flags += [*xla_flags, f"--xla_force_host_platform_device_count={devices}"]
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(name, None)
  return env


@dataclasses.dataclass
class Group:
  """Processes started together (one per process id)."""

  procs: list[subprocess.Popen]
  logs: list[Path]

  def wait(self, timeout: float) -> list[int]:
    """Return codes; on timeout every process is killed and the codes are None."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in self.procs:
      try:
        codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
      except subprocess.TimeoutExpired:
        self.kill()
        return [None] * len(self.procs)
    return codes

  def kill(self, index: int | None = None) -> None:
    """SIGKILLs process ``index`` (default all) and its children."""
    for i, p in enumerate(self.procs):
      if (index is None or i == index) and p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()

  def log(self, i: int) -> str:
    return self.logs[i].read_text(errors="replace")

  def tail(self, chars: int = 3000) -> str:
    return "\n".join(f"--- process {i} ---\n{self.log(i)[-chars:]}" for i in range(len(self.logs)))


def launch(
  args: Sequence[str],
  *,
  processes: int,
  devices: int,
  log_prefix: Path,
  port: int | None = None,
  xla_flags: Sequence[str] = (),
) -> Group:
  """Starts ``python -m experiments.main *args`` as ``processes`` processes.

  With ``processes > 1`` each gets ``--coordinator_address localhost:<port>
  --num_processes N --process_id i``.
  """
  port = port or free_port()
  procs, logs = [], []
  for i in range(processes):
    cmd = [sys.executable, "-m", "experiments.main", *args]
    if processes > 1:
      cmd += [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}"]
      cmd += [f"--process_id={i}"]
    log = Path(f"{log_prefix}.p{i}.log")
    env = child_env(devices, xla_flags)
    with open(log, "w") as f:
      procs.append(
        subprocess.Popen(
          cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
      )
    logs.append(log)
  return Group(procs, logs)


def records(workdir: Path, name: str = "metrics.jsonl") -> list[dict]:
  """The JSON records of a run's ``metrics.jsonl`` (or another JSONL file)."""
  path = Path(workdir) / name
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
