"""Metric writers with ``clu.metric_writers`` method names, and a JSONL reader.

Every writer has ``write_scalars``, ``write_hparams``, ``flush`` and ``close``, so a
``clu.metric_writers`` writer can be passed wherever a :class:`MetricWriter` is expected:
:class:`LoggingWriter` (absl logging), :class:`JsonlWriter` (``metrics.jsonl``),
:class:`MultiWriter`, :class:`TensorBoardWriter` (optional ``tensorboardX``) and
:func:`create_default_writer`, the combination the experiments use. :func:`read_jsonl` reads
a ``metrics.jsonl`` file back. No TensorFlow needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np
from absl import logging

from sparsejax._src.metrics.topology import to_scalars

Scalar = int | float | np.number | np.ndarray | jax.Array


@runtime_checkable
class MetricWriter(Protocol):
  """What sparsejax needs from a metric writer; the names match ``clu.metric_writers``.

  Any object with these four methods works, including CLU writers.
  """

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    """Writes scalar metrics for ``step``."""

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records the hyperparameters of the run (once per run)."""

  def flush(self) -> None:
    """Makes everything written so far durable/visible."""

  def close(self) -> None:
    """Flushes and releases resources."""


def _jsonable(x: Any) -> Any:
  """Converts numbers, arrays, tuples and mappings into JSON-serialisable values."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_jsonable(v) for v in x]
  if isinstance(x, jax.Array | np.ndarray | np.generic):
    arr = np.asarray(jax.device_get(x))
    return arr.item() if arr.ndim == 0 else arr.tolist()
  if x is None or isinstance(x, bool | int | float | str):
    return x
  return str(x)


def _hparams_json(hparams: Mapping[str, Any], indent: int | None = None) -> str:
  """``hparams`` as JSON text with sorted keys (arrays and tuples made serialisable)."""
  return json.dumps(_jsonable(hparams), indent=indent, sort_keys=True)


def _format_value(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.6g}"
  return str(v)


class LoggingWriter:
  """Writes metrics as ``absl.logging.info`` lines: ``[step] key=value, ...``.

  Args:
    collection: optional label printed after the step, e.g. ``"train"``.
  """

  def __init__(self, collection: str | None = None):
    self._collection = collection

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    """Logs the scalar metrics of ``step``, sorted by key (nothing when empty)."""
    if not scalars:
      return
    values = to_scalars(dict(scalars))
    tag = f" {self._collection}" if self._collection else ""
    body = ", ".join(f"{k}={_format_value(v)}" for k, v in sorted(values.items()))
    logging.info("[%d]%s %s", int(step), tag, body)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Logs the hyperparameters as one JSON line."""
    logging.info("Hyperparameters: %s", _hparams_json(hparams))

  def flush(self) -> None:
    """Nothing to flush (logging writes immediately)."""

  def close(self) -> None:
    """Nothing to release."""


class JsonlWriter:
  """Appends one JSON object per ``write_scalars`` call to ``<directory>/metrics.jsonl``.

  Each line is ``{"step": step, key: value, ...}`` with Python numbers (NaN and infinities
  are written as ``NaN`` / ``Infinity``, which Python's ``json`` and pandas read back).
  Hyperparameters go to ``<directory>/hparams.json`` (rewritten on each call), so the
  JSONL file holds step records only. Read it back with :func:`read_jsonl`.

  Args:
    directory: where the files go (created if needed).
    filename: the JSONL file name.
  """

  def __init__(self, directory: str | os.PathLike, filename: str = "metrics.jsonl"):
    self.directory = os.fspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    self.path = os.path.join(self.directory, filename)
    self._file = None

  def _handle(self):
    if self._file is None:
      self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open.
    return self._file

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    """Appends ``{"step": step, **scalars}`` as one line (nothing when empty)."""
    if not scalars:
      return
    record = {"step": int(step)}
    record.update(to_scalars(dict(scalars)))
    self._handle().write(json.dumps(record) + "\n")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Writes ``hparams.json`` atomically (a temporary file, then a rename)."""
    path = os.path.join(self.directory, "hparams.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(_hparams_json(hparams, indent=2))
    os.replace(tmp, path)

  def flush(self) -> None:
    """Flushes the JSONL file."""
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    """Closes the JSONL file (a later write reopens it in append mode)."""
    if self._file is not None:
      self._file.close()
      self._file = None


class MultiWriter:
  """Forwards every call to each of ``writers``, in order.

  Args:
    writers: the :class:`MetricWriter` objects to write to.
  """

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    """Calls ``write_scalars(step, scalars)`` on every writer."""
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Calls ``write_hparams(hparams)`` on every writer."""
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self) -> None:
    """Flushes every writer."""
    for w in self.writers:
      w.flush()

  def close(self) -> None:
    """Closes every writer."""
    for w in self.writers:
      w.close()


class TensorBoardWriter:
  """TensorBoard event files through ``tensorboardX`` (optional dependency).

  Args:
    logdir: directory of the event files.

  Raises:
    ImportError: if ``tensorboardX`` is not installed, with the install command.
  """

  def __init__(self, logdir: str | os.PathLike):
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
        "TensorBoardWriter needs tensorboardX: pip install 'sparsejax[tensorboard]' "
        "(or pip install tensorboardX). Metrics still go to metrics.jsonl without it."
      ) from e
    self._writer = SummaryWriter(logdir=os.fspath(logdir))

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    """Adds one scalar event per metric at ``step``."""
    for k, v in to_scalars(dict(scalars)).items():
      self._writer.add_scalar(k, v, global_step=int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Adds the hyperparameters as a JSON text summary (tag ``hparams``)."""
    self._writer.add_text("hparams", f"```\n{_hparams_json(hparams, indent=2)}\n```", global_step=0)

  def flush(self) -> None:
    """Flushes the event file."""
    self._writer.flush()

  def close(self) -> None:
    """Closes the event file."""
    self._writer.close()


def create_default_writer(
  workdir: str | os.PathLike | None,
  *,
  just_logging: bool | None = None,
  tensorboard: bool = False,
  filename: str = "metrics.jsonl",
) -> MetricWriter:
  """The writer the experiments use: absl logging + ``metrics.jsonl`` (+ TensorBoard).

  Mirrors ``clu.metric_writers.create_default_writer``.

  Args:
    workdir: directory for ``metrics.jsonl`` (and event files); None means logging only.
    just_logging: only log (no files). Default ``jax.process_index() > 0``, so that in a
      multi-host run only host 0 writes files.
    tensorboard: also write TensorBoard event files under ``workdir`` (needs tensorboardX).
    filename: the JSONL file name.

  Returns:
    A :class:`MetricWriter`.

  Raises:
    ImportError: ``tensorboard=True`` without ``tensorboardX`` installed.
  """
  if just_logging is None:
    just_logging = jax.process_index() > 0
  if just_logging or workdir is None:
    return LoggingWriter()
  writers: list[MetricWriter] = [LoggingWriter(), JsonlWriter(workdir, filename)]
  if tensorboard:
    writers.append(TensorBoardWriter(workdir))
  return MultiWriter(writers)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a ``metrics.jsonl`` file into a list of records (a truncated last line is skipped).

  Args:
    path: the JSONL file, or a directory containing ``metrics.jsonl``.

  Returns:
    The records in file order.

  Raises:
    FileNotFoundError: there is no such file.
    ValueError: a line other than the last is not valid JSON (named as ``path:line``).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  records = []
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1:  # a line cut by a crash mid-write.
        logging.warning("Skipping a truncated last line in %s.", path)
        continue
      raise ValueError(f"{path}:{i + 1} is not valid JSON: {line[:200]!r}") from None
  return records
