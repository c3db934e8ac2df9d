"""Multi-process runs on JAX's distributed runtime (``jax.distributed.initialize``).

Every process runs the same program on one global mesh; nothing here is parallelism of our
own. :func:`initialize` is called by ``experiments/main.py`` before any other JAX call:

* the coordinator address, process count and process id come from the flags
  (``--coordinator_address``, ``--num_processes``, ``--process_id``) or from the environment
  (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); with
  ``--distributed`` and none of them, JAX detects them itself (Cloud TPU, Slurm, Open MPI,
  Kubernetes);
* bad values fail at once with an error naming the flag (and its environment variable): a
  process id outside ``[0, num_processes)``, an address that is not ``host:port``; an
  unreachable coordinator fails after ``--initialization_timeout`` seconds (JAX itself would
  abort the process with a bare ``DEADLINE_EXCEEDED``, so a process other than 0 first waits
  for the coordinator's port itself);
* if a process dies, the others stop within ``--heartbeat_timeout`` seconds (JAX's
  coordination service notices the missing heartbeats and terminates them), so a job
  scheduler can restart all of them; the run resumes from the last complete checkpoint;
* on CPU the cross-process collectives are gloo (``jax_cpu_collectives_implementation``,
  already JAX 0.10's default; set explicitly when unset).

After initialization ``jax.devices()`` lists every process's devices; the experiments build
their mesh over all of them, each process loads only the rows of each batch that its devices
hold, process 0 alone writes metrics, plots and the config record, and orbax checkpoints are
written by every process (each its own shards).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Mapping

import jax
from absl import logging

ENV = {
  "coordinator_address": "JAX_COORDINATOR_ADDRESS",
  "num_processes": "JAX_NUM_PROCESSES",
  "process_id": "JAX_PROCESS_ID",
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Where to find the coordinator and who this process is (None: let JAX detect it)."""

  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  initialization_timeout: int = 300
  heartbeat_timeout: int = 100

  @property
  def multiprocess(self) -> bool:
    """Whether these settings ask for more than one process."""
    return self.num_processes is not None and self.num_processes > 1


def _where(name: str) -> str:
  return f"--{name} (or ${ENV[name]})"


def _int(name: str, value) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{_where(name)} must be an integer; got {value!r}.") from None


def resolve(
  coordinator_address: str | None = None,
  num_processes: int | str | None = None,
  process_id: int | str | None = None,
  *,
  initialization_timeout: int = 300,
  heartbeat_timeout: int = 100,
  environ: Mapping[str, str] = os.environ,
) -> Settings:
  """The settings from the flags, falling back to the ``JAX_*`` environment variables.

  Raises:
    ValueError: a non-integer count or id, a count < 1, an id outside ``[0, count)``, an
      address that is not ``host:port``, or a timeout < 1 (naming the flag).
  """
  address = coordinator_address or environ.get(ENV["coordinator_address"]) or None
  count = _int(
    "num_processes",
    num_processes if num_processes is not None else environ.get(ENV["num_processes"]),
  )
  pid = _int("process_id", process_id if process_id is not None else environ.get(ENV["process_id"]))
  if count is not None and count < 1:
    raise ValueError(f"{_where('num_processes')} must be >= 1; got {count}.")
  if pid is not None and (pid < 0 or (count is not None and pid >= count)):
    upper = f"{count - 1}" if count is not None else "num_processes - 1"
    raise ValueError(
      f"{_where('process_id')}={pid} is out of range: process ids are 0 .. {upper} "
      f"({_where('num_processes')}={count})."
    )
  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(
        f"{_where('coordinator_address')}={address!r} must be host:port (process 0's "
        "address and a free port, e.g. 10.0.0.1:1234)."
      )
  for name, value in (
    ("initialization_timeout", initialization_timeout),
    ("heartbeat_timeout", heartbeat_timeout),
  ):
    if int(value) < 1:
      raise ValueError(f"--{name} must be >= 1 s; got {value}.")
  return Settings(address, count, pid, int(initialization_timeout), int(heartbeat_timeout))


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Waits until ``address`` accepts TCP connections; a clear error after ``timeout`` s."""
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  deadline = time.monotonic() + timeout
  last: OSError | None = None
  while time.monotonic() < deadline:
    try:
      with socket.create_connection((host, int(port)), timeout=min(2.0, timeout)):
        return
    except OSError as e:
      last = e
      time.sleep(0.2)
  raise TimeoutError(
    f"{_where('coordinator_address')}={address!r}: no coordinator answered within "
    f"--initialization_timeout={timeout:g} s ({last}). Start process 0 (it runs the "
    "coordinator) and check the address and port are reachable from this host."
  )


def initialize(settings: Settings, *, detect: bool = False) -> bool:
  """Starts JAX's distributed runtime for ``settings``; returns whether it was started.

  Args:
    settings: from :func:`resolve`.
    detect: call ``jax.distributed.initialize`` even when the settings are incomplete (JAX
      then detects Cloud TPU, Slurm, Open MPI or Kubernetes clusters).

  Raises:
    ValueError: multi-process settings without a coordinator address or process id.
    TimeoutError: the coordinator did not answer within the timeout (process id > 0).
  """
  if not settings.multiprocess and not detect:
    return False
  if not detect:
    for name in ("coordinator_address", "process_id"):
      if getattr(settings, name) is None:
        raise ValueError(
          f"{_where('num_processes')}={settings.num_processes} needs {_where(name)} too "
          "(or --distributed to let JAX detect the cluster)."
        )
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if settings.process_id and settings.coordinator_address:
    _wait_for_coordinator(settings.coordinator_address, settings.initialization_timeout)
  logging.info(
    "Connecting to the JAX coordinator %s as process %s of %s (up to %d s; if this aborts "
    "with DEADLINE_EXCEEDED, a process did not start or cannot reach the coordinator).",
    settings.coordinator_address,
    settings.process_id,
    settings.num_processes,
    settings.initialization_timeout,
  )
  jax.distributed.initialize(
    coordinator_address=settings.coordinator_address,
    num_processes=settings.num_processes,
    process_id=settings.process_id,
    initialization_timeout=settings.initialization_timeout,
    heartbeat_timeout_seconds=settings.heartbeat_timeout,
  )
  return True


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0
