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
"""

from __future__ import annotations

import logging as pylogging
import os
from collections.abc import Sequence

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import train

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


if __name__ == "__main__":
  app.run(main)
