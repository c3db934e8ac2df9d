r"""Command line for the sparsejax experiments (flags only; the work is in ``train.py``).

Usage::

  python -m experiments.main --config experiments/configs/rigl.py --workdir /tmp/sparsejax_rigl
  python -m experiments.main --config experiments/configs/rigl.py:smoke --workdir /tmp/smoke
  python -m experiments.main --config experiments/configs/set.py \
      --config.dst.sparsity=0.95 --workdir /tmp/sparsejax_set95

``--config`` takes a config file, optionally with a preset after a colon (``file.py:smoke``);
fields can be overridden with ``--config.<field>=<value>``; the config is locked, so a
misspelt field fails. Rerunning with the same ``--workdir`` resumes from the latest checkpoint;
a config that differs from the one the run was started with is refused unless
``--allow_config_change`` is given (bookkeeping fields such as ``stop_after_step`` excepted).

Multi-process (multi-host) runs start JAX's distributed runtime first
(:mod:`experiments.distributed`): every process runs the same command with its own
``--process_id`` (or ``JAX_PROCESS_ID``), e.g. two processes on one machine::

  python -m experiments.main --config experiments/configs/resnet18_cifar10.py \
      --workdir /tmp/r18 --coordinator_address localhost:1234 --num_processes 2 --process_id 0
  python -m experiments.main ... --process_id 1

On Cloud TPU, Slurm and Open MPI ``--distributed`` alone is enough (JAX detects the rest).
See docs/SCALE.md.
"""

from __future__ import annotations

import argparse
import logging as pylogging
import os
import sys
from collections.abc import Sequence

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import distributed

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory for checkpoints, metrics.jsonl and plots (resumes if present)."
)
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file, optionally with a preset: experiments/configs/rigl.py:smoke.",
  lock_config=True,
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  "allow_config_change",
  False,
  "Resume a workdir whose run was started with another config (the change is appended to "
  "config_changes.jsonl; config.json is never rewritten).",
)
# The distributed flags are read by _start_distributed, before absl parses the command line
# (defined here for --help and so that absl accepts them).
flags.DEFINE_bool(
  "distributed",
  False,
  "Start JAX's distributed runtime even without --num_processes (JAX then detects Cloud "
  "TPU, Slurm, Open MPI or Kubernetes clusters).",
)
flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0's coordinator (default $JAX_COORDINATOR_ADDRESS).",
)
flags.DEFINE_integer("num_processes", None, "Number of processes (default $JAX_NUM_PROCESSES).")
flags.DEFINE_integer(
  "process_id", None, "This process's id, 0 .. num_processes-1 (default $JAX_PROCESS_ID)."
)
flags.DEFINE_integer(
  "initialization_timeout",
  300,
  "Seconds to wait for the coordinator and every process to connect.",
)
flags.DEFINE_integer(
  "heartbeat_timeout",
  100,
  "Seconds without a heartbeat after which a process counts as dead and the others stop.",
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Drops INFO chatter from orbax and tensorstore (warnings and errors still show)."""

  _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorstore{os.sep}")

  def filter(self, record) -> bool:
    return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in self._NOISY)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported only now: importing sparsejax may touch the JAX backend, which must come after
  # jax.distributed.initialize (_parse_flags).
  from experiments import train  # pylint: disable=g-import-not-at-top

  logging.info("JAX process %d/%d", jax.process_index(), jax.process_count())
  logging.info("JAX devices: %r", jax.devices())
  train.train_and_evaluate(
    _load_config(), _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
  )


def _load_config() -> ml_collections.ConfigDict:
  """``--config``'s value; a clear usage error when the file could not be loaded."""
  config = _CONFIG.value
  if isinstance(config, ml_collections.ConfigDict):
    return config
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  if not os.path.exists(path):
    raise app.UsageError(
      f"--config: no such file {path!r} (give a config file, optionally with a preset: "
      "--config experiments/configs/rigl.py:smoke)."
    )
  try:  # config_flags defers a load error to the first access of the config.
    config.lock()
  except OSError as e:
    raise app.UsageError(f"--config: could not load {path!r}: {e}") from None
  raise app.UsageError(f"--config {path!r}: get_config() returned {config!r}, not a ConfigDict.")


def _start_distributed(argv: Sequence[str]) -> None:
  """Starts JAX's distributed runtime from the command line, before the config is loaded.

  absl loads ``--config`` while it parses the flags, and loading a config imports sparsejax,
  which may touch the JAX backend: ``jax.distributed.initialize`` must come first, so the
  distributed flags are read here, from ``argv``, ahead of absl.
  """
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  parser.add_argument("--distributed", nargs="?", const="true", default="false")
  parser.add_argument("--nodistributed", action="store_true")
  for name in ("coordinator_address", "num_processes", "process_id"):
    parser.add_argument(f"--{name}")
  parser.add_argument("--initialization_timeout", default="300")
  parser.add_argument("--heartbeat_timeout", default="100")
  known, _ = parser.parse_known_args(list(argv[1:]))
  timeouts = {}
  for name in ("initialization_timeout", "heartbeat_timeout"):
    try:
      timeouts[name] = int(getattr(known, name))
    except ValueError:
      raise ValueError(f"--{name} must be an integer; got {getattr(known, name)!r}.") from None
  settings = distributed.resolve(
    known.coordinator_address, known.num_processes, known.process_id, **timeouts
  )
  detect = known.distributed.lower() in ("true", "1", "yes") and not known.nodistributed
  distributed.initialize(settings, detect=detect)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, after starting the distributed runtime (:func:`_start_distributed`)."""
  try:
    _start_distributed(argv)
  except (ValueError, TimeoutError) as e:
    sys.exit(f"FATAL Flags error: {e}")
  return app.parse_flags_with_usage(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
