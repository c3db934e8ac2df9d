"""Bad multi-process input fails fast with an error naming the flag or field (no hang).

* ``distributed.resolve``: flags first, then ``JAX_*`` environment variables; a process id
  out of range, a non-integer, a bad address or timeout are ``ValueError``s naming the flag;
* the launcher (``python -m experiments.main``, subprocesses): a process id out of range
  fails before JAX starts; an unreachable coordinator fails after
  ``--initialization_timeout`` (JAX itself would abort with a bare DEADLINE_EXCEEDED);
  a global batch not divisible by processes × devices (2 processes × 2 devices) fails in
  both processes naming ``config.batch_size``;
* a data directory with no records fails naming ``config.data.dir``.
"""

from __future__ import annotations

import time

import _multihost as mh
import pytest

from experiments import distributed

SMOKE = ["--config=experiments/configs/rigl.py:smoke", "--config.model=mlp"]


def test_resolve_reads_flags_then_environment():
  env = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "3",
  }
  s = distributed.resolve(environ=env)
  assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.1:1234", 4, 3)
  assert s.multiprocess
  s = distributed.resolve("host:99", 2, 0, environ=env)
  assert (s.coordinator_address, s.num_processes, s.process_id) == ("host:99", 2, 0)
  assert not distributed.resolve(environ={}).multiprocess
  assert not distributed.initialize(distributed.resolve(environ={}))  # nothing to start


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (
      {"num_processes": 2, "process_id": 2},
      r"--process_id \(or \$JAX_PROCESS_ID\)=2 is out of range",
    ),
    ({"num_processes": 2, "process_id": -1}, r"--process_id .*=-1 is out of range"),
    ({"num_processes": 0}, r"--num_processes .* must be >= 1"),
    ({"num_processes": "two"}, r"--num_processes .* must be an integer"),
    ({"coordinator_address": "nohost"}, r"--coordinator_address .* must be host:port"),
    ({"coordinator_address": "h:99999"}, r"--coordinator_address .* must be host:port"),
    ({"initialization_timeout": 0}, r"--initialization_timeout must be >= 1"),
  ],
)
def test_resolve_refuses_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distributed.resolve(**kwargs, environ={})


def test_initialize_needs_the_address_and_id():
  with pytest.raises(ValueError, match=r"--num_processes .*=2 needs --coordinator_address"):
    distributed.initialize(distributed.resolve(num_processes=2, process_id=1, environ={}))


def _fails(args, *, processes=1, devices=1, tmp_path, limit_s):
  t0 = time.monotonic()
  group = mh.launch(
    [*SMOKE, f"--workdir={tmp_path / 'run'}", *args],
    processes=processes,
    devices=devices,
    log_prefix=tmp_path / "launch",
  )
  codes = group.wait(limit_s)
  elapsed = time.monotonic() - t0
  assert None not in codes, f"hung past {limit_s} s\n{group.tail()}"
  assert all(c != 0 for c in codes), group.tail()
  return [group.log(i) for i in range(processes)], elapsed


def test_cli_process_id_out_of_range(tmp_path):
  (log,), _ = _fails(
    ["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"],
    tmp_path=tmp_path,
    limit_s=120,
  )
  assert "--process_id (or $JAX_PROCESS_ID)=2 is out of range: process ids are 0 .. 1" in log


def test_cli_unreachable_coordinator_times_out_clearly(tmp_path):
  port = mh.free_port()
  args = [f"--coordinator_address=localhost:{port}", "--num_processes=2", "--process_id=1"]
  (log,), elapsed = _fails([*args, "--initialization_timeout=3"], tmp_path=tmp_path, limit_s=120)
  assert f"--coordinator_address (or $JAX_COORDINATOR_ADDRESS)='localhost:{port}'" in log
  assert "no coordinator answered within --initialization_timeout=3 s" in log
  assert "DEADLINE_EXCEEDED" not in log


def test_cli_global_batch_not_divisible_by_processes_times_devices(tmp_path):
  logs, _ = _fails(
    ["--config.batch_size=6", "--config.mesh.data=-1"],
    processes=2,
    devices=2,
    tmp_path=tmp_path,
    limit_s=300,
  )
  for log in logs:
    assert (
      "config.batch_size=6 must be divisible by the number of processes × devices per process "
      "= 2 × 2 = 4" in log
    ), log[-3000:]


def test_data_directory_without_records(tmp_path):
  from experiments import train
  from experiments.configs import resnet18_cifar10

  config = resnet18_cifar10.get_config("smoke")
  config.data.dir = str(tmp_path)
  with pytest.raises(ValueError, match=r"config.data.dir=.* has no records for split 'train'"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_jax_distributed_can_start_after_importing_sparsejax():
  """Importing sparsejax creates no JAX array: the backend is still free to start."""
  import subprocess
  import sys

  code = (
    "import sparsejax, jax; "
    f"jax.distributed.initialize('localhost:{mh.free_port()}', num_processes=1, process_id=0)"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], env=mh.child_env(1), capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]
