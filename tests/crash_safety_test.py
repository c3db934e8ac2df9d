"""Crash safety: a run killed with SIGKILL at random moments resumes exactly.

A RigL smoke run is launched through the real command line, killed at seeded random moments
(early, mid-save or while training, chosen by checkpoint progress, not wall time), and
relaunched until it finishes. The final checkpoint (params, masks, optimizer state, DST
count and key, data position) and the metrics must equal an uninterrupted run's, bit for bit.
This test is slow (a few minutes) and runs in .ci/run via ``-m slow -k crash``.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 200


def _command(workdir: Path, cache: Path) -> list[str]:
  return [
    sys.executable,
    "-m",
    "experiments.main",
    "--config",
    str(ROOT / "experiments" / "configs" / "rigl.py") + ":smoke",
    "--workdir",
    str(workdir),
    f"--config.num_train_steps={STEPS}",
    "--config.checkpoint_every_steps=20",
    "--config.max_checkpoints_to_keep=3",
    "--config.dst.update_every=25",
    f"--config.jax_cache_dir={cache}",
    f"--config.data.cache_dir={cache / 'data'}",
  ]


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def _final_state(workdir: Path) -> dict:
  state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(STEPS) / "state")
  return ocp.tree.to_flat_dict(state, sep="/")


def _metrics(workdir: Path) -> list[str]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  import json

  out = []
  for line in lines:
    record = {k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
    if set(record) != {"step"}:
      out.append(json.dumps(record, sort_keys=True))
  return out


def _latest_step(workdir: Path, include_partial: bool = False) -> int:
  """Largest checkpoint step in the workdir (``include_partial``: also unfinished saves)."""
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return 0
  steps = [0]
  for entry in directory.iterdir():
    head = entry.name.split(".", 1)[0]
    if head.isdigit() and (include_partial or entry.name.isdigit()):
      steps.append(int(head))
  return max(steps)


def _wait_for_a_random_moment(proc, workdir: Path, rng: random.Random) -> str:
  """Waits (at most 300 s, or until ``proc`` exits) for a seeded random moment of the run.

  The moments follow the run's checkpoint progress, never a fixed wall time: a save takes
  tens of milliseconds and twenty training steps fewer, so a delay of seconds would let the
  run finish first. A moment is one of: early (restore, compilation, the first steps), in
  the middle of a save (the save's temporary directory exists), or while training (a save
  just finished). The target save is at most two saves ahead of the last finished one.

  Returns:
    The kind of moment, with its target step, for the failure message.
  """
  kind = rng.choice(["early", "save", "train"])
  target = _latest_step(workdir) + 20 * rng.randint(1, 2)
  deadline = time.monotonic() + 300
  if kind == "early":
    time.sleep(rng.uniform(0.2, 1.5))
    return kind
  while proc.poll() is None and time.monotonic() < deadline:
    if _latest_step(workdir, include_partial=kind == "save") >= target:
      time.sleep(rng.uniform(0.0, 0.02))
      break
    time.sleep(0.002)
  return f"{kind}@{target}"


@pytest.mark.slow
def test_crash_safety_sigkill_at_random_moments_resumes_bit_exact(tmp_path):
  cache = tmp_path / "cache"
  reference = tmp_path / "reference"
  done = subprocess.run(
    _command(reference, cache), env=_env(), capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, done.stderr[-3000:]

  killed = tmp_path / "killed"
  rng = random.Random(1234)
  log = tmp_path / "killed.log"
  kills = []
  for _ in range(12):  # bounded: a handful of kills, then run to completion
    with open(log, "wb") as err_file:
      proc = subprocess.Popen(
        _command(killed, cache), env=_env(), stdout=subprocess.DEVNULL, stderr=err_file
      )
    if len(kills) < 4:
      moment = _wait_for_a_random_moment(proc, killed, rng)
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills.append(moment)
        continue
    proc.wait(timeout=600)
    assert proc.returncode == 0, log.read_text()[-3000:]
    break
  else:
    pytest.fail("the killed run never completed")
  # The moments are chosen by checkpoint progress, not by wall time, so the run cannot finish
  # before its planned kills whatever the speed of the machine.
  assert len(kills) == 4, kills

  a, b = _final_state(reference), _final_state(killed)
  assert sorted(a) == sorted(b)
  assert any("masks" in k for k in a)
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
  assert _metrics(killed) == _metrics(reference)
