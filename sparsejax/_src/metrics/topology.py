"""Topology metrics, metric writers and a progress reporter for sparse training.

Three groups, none of which runs a training loop:

* **Topology metrics** on masks pytrees (a bool array per sparse leaf, ``None`` or
  ``optax.MaskedNode()`` for dense leaves, e.g. :func:`sparsejax.get_masks`'s output):
  :func:`mask_summary` (per-layer and total sparsity / nnz), :func:`mask_turnover`,
  :func:`update_ever_active` + :func:`ever_active_fraction` (in-time over-parameterisation),
  :func:`fan_in_stats` and :func:`estimate_flops`. Everything except :func:`estimate_flops`
  is written with ``jax.numpy`` and works inside ``jax.jit``; outside jit, turn the results
  into Python numbers with :func:`to_scalars`.
* **Metric writers** with CLU-compatible method names (``write_scalars``,
  ``write_hparams``, ``flush``, ``close``), so a ``clu.metric_writers`` writer can be passed
  wherever a :class:`MetricWriter` is expected: :class:`LoggingWriter`,
  :class:`JsonlWriter` (``metrics.jsonl``), :class:`MultiWriter`,
  :class:`TensorBoardWriter` (optional ``tensorboardX``) and :func:`create_default_writer`.
* :class:`ReportProgress`: a periodic progress line (step, %, steps/s, ETA, time per timed
  section such as ``train_step``, ``mask_update``, ``eval``, ``checkpoint``) and a notice on
  the first (compiling) call of each timed section. No TensorFlow needed.

Conventions: a *neuron* is one entry of a kernel's **last** axis (Flax ``Dense`` kernels are
``[in, out]``, ``Conv`` kernels ``[..., in, out]``); its *fan-in* is the number of active
weights over all other axes. Layer names are paths such as ``"layer1/kernel"``.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from sparsejax._src import base
from sparsejax._src import tree as tree_lib

Scalar = int | float | np.number | np.ndarray | jax.Array
TOTAL = "total"

# --------------------------------------------------------------------------------------
# Masks pytrees.
# --------------------------------------------------------------------------------------


def _is_dense_leaf(x: Any) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def _unwrap(x: Any) -> Any:
  """Unwraps NNX Variable-like containers (``.value``) to their array."""
  if x is None or isinstance(x, jax.Array | np.ndarray) or not hasattr(x, "value"):
    return x
  return x.value


def sparse_leaves(masks: Any) -> list[tuple[str, jax.Array]]:
  """The ``(path, mask)`` pairs of the sparse leaves of a masks pytree, in tree order.

  Args:
    masks: a params-structured pytree with a mask array per sparse leaf and ``None`` or
      ``optax.MaskedNode()`` for dense leaves (NNX ``State``, dicts, lists all work).

  Returns:
    A list of ``(path, mask)`` with paths like ``"layer1/kernel"``; dense leaves skipped.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_dense_leaf)
  out = []
  for path, leaf in flat:
    leaf = _unwrap(leaf)
    if _is_dense_leaf(leaf):
      continue
    out.append((tree_lib.path_to_str(path), leaf))
  return out


def _xp(*arrays: Any):
  """NumPy for host arrays (no per-op dispatch or compilation), jax.numpy otherwise."""
  if all(isinstance(a, np.ndarray | np.generic | bool | int | float) for a in arrays):
    return np
  return jnp


def _as_bool(m: Any) -> jax.Array:
  xp = _xp(m)
  m = xp.asarray(m)
  return m if m.dtype == np.bool_ else m != 0


def _count(m: Any) -> jax.Array:
  xp = _xp(m)
  return xp.sum(_as_bool(m), dtype=xp.int32)


def _safe_div(num: Any, den: Any) -> jax.Array:
  xp = _xp(num, den)
  num = xp.asarray(num, xp.float32)
  den = xp.asarray(den, xp.float32)
  return xp.where(den > 0, num / xp.where(den > 0, den, 1.0), xp.float32(0.0))


def mask_summary(masks: Any) -> dict[str, dict[str, jax.Array]]:
  """Per-layer and total sparsity and nnz of a masks pytree.

  Args:
    masks: masks pytree (see :func:`sparse_leaves`).

  Returns:
    ``{path: {"sparsity", "nnz", "size"}, ..., "total": {...}}`` where ``"total"`` sums
    over the sparse (masked) layers only. ``sparsity = 1 - nnz / size``. Values are JAX
    scalars (``size`` is a Python int).

  Example::

    >>> mask_summary({"w": np.array([[1, 0], [0, 0]], bool), "b": None})["w"]["nnz"]
    Array(1, dtype=int32)
  """
  out: dict[str, dict[str, Any]] = {}
  nnz_tot = 0
  size_tot = 0
  for path, m in sparse_leaves(masks):
    nnz = _count(m)
    size = int(np.prod(m.shape, dtype=np.int64))
    out[path] = {"sparsity": 1.0 - _safe_div(nnz, size), "nnz": nnz, "size": size}
    nnz_tot = nnz_tot + nnz
    size_tot += size
  out[TOTAL] = {"sparsity": 1.0 - _safe_div(nnz_tot, size_tot), "nnz": nnz_tot, "size": size_tot}
  return out


def _check_same_structure(a: Any, b: Any, names: tuple[str, str]) -> tuple[list, list]:
  la, lb = sparse_leaves(a), sparse_leaves(b)
  pa, pb = [p for p, _ in la], [p for p, _ in lb]
  if pa != pb:
    raise ValueError(f"`{names[0]}` and `{names[1]}` have different sparse layers: {pa} vs {pb}.")
  for (p, x), (_, y) in zip(la, lb, strict=True):
    if x.shape != y.shape:
      raise ValueError(
        f"`{names[0]}` and `{names[1]}` differ in shape at {p!r}: {x.shape} vs {y.shape}."
      )
  return la, lb


def mask_turnover(old_masks: Any, new_masks: Any) -> dict[str, jax.Array]:
  """Fraction of the active positions that changed between two masks pytrees.

  Per layer ``|new ∧ ¬old| / |old|``: the share of the previously active connections that
  were replaced. With nnz preserved (every DST update) this equals ``|old ∧ ¬new| / |old|``
  and half the Hamming distance over ``|old|``. A layer with no active position has
  turnover 0.

  Args:
    old_masks: masks before the update.
    new_masks: masks after the update (same sparse layers and shapes).

  Returns:
    ``{path: turnover, ..., "total": turnover over all sparse layers}`` (JAX float32).

  Raises:
    ValueError: if the two trees do not have the same sparse layers and shapes.
  """
  lo, ln = _check_same_structure(old_masks, new_masks, ("old_masks", "new_masks"))
  out = {}
  grown_tot = old_tot = 0
  for (path, o), (_, n) in zip(lo, ln, strict=True):
    o, n = _as_bool(o), _as_bool(n)
    xp = _xp(o, n)
    grown = xp.sum(n & ~o, dtype=xp.int32)
    nnz = xp.sum(o, dtype=xp.int32)
    out[path] = _safe_div(grown, nnz)
    grown_tot, old_tot = grown_tot + grown, old_tot + nnz
  out[TOTAL] = _safe_div(grown_tot, old_tot)
  return out


def init_ever_active(masks: Any) -> Any:
  """Starts an "ever active" record: the masks themselves, as bool (dense leaves kept)."""
  return jax.tree.map(
    lambda m: m if _is_dense_leaf(m) else _as_bool(_unwrap(m)), masks, is_leaf=_is_dense_leaf
  )


def update_ever_active(ever_active: Any, masks: Any) -> Any:
  """OR-accumulates ``masks`` into ``ever_active`` (same structure; jit-safe).

  Call after every mask update (or every step: it is cheap) to track in-time
  over-parameterisation (Liu et al. 2021, https://arxiv.org/abs/2102.02887).
  """
  _check_same_structure(ever_active, masks, ("ever_active", "masks"))
  return jax.tree.map(
    lambda e, m: e if _is_dense_leaf(e) else _as_bool(_unwrap(e)) | _as_bool(_unwrap(m)),
    ever_active,
    masks,
    is_leaf=_is_dense_leaf,
  )


def ever_active_fraction(ever_active: Any) -> dict[str, jax.Array]:
  """Fraction of the positions of each sparse layer that have ever been active.

  Args:
    ever_active: an OR-accumulated masks pytree (:func:`update_ever_active`).

  Returns:
    ``{path: fraction, ..., "total": fraction over all sparse layers}``. For a static mask
    this is the density ``1 - sparsity``; dynamic methods explore more of the weights.
  """
  out = {}
  n_tot = 0
  size_tot = 0
  for path, e in sparse_leaves(ever_active):
    n = _count(e)
    size = int(np.prod(e.shape, dtype=np.int64))
    out[path] = _safe_div(n, size)
    n_tot, size_tot = n_tot + n, size_tot + size
  out[TOTAL] = _safe_div(n_tot, size_tot)
  return out


def _fan_in(mask: Any) -> jax.Array:
  """Per-neuron fan-in of one mask: active weights summed over all but the last axis."""
  m = _as_bool(mask)
  if m.ndim < 2:
    raise ValueError(f"fan-in needs a kernel with ndim >= 2; got shape {m.shape}.")
  xp = _xp(m)
  return xp.sum(m.reshape((-1, m.shape[-1])), axis=0, dtype=xp.int32)


def fan_in_stats(masks: Any) -> dict[str, dict[str, jax.Array]]:
  """Fan-in statistics of each sparse layer, over its **active** neurons.

  A neuron (an entry of the last axis) is active if it has at least one active incoming
  weight. Layers with ``ndim < 2`` are skipped.

  Args:
    masks: masks pytree.

  Returns:
    ``{path: {"min", "max", "mean", "std", "active_neurons", "neurons"}}``; the statistics
    are over active neurons only (all 0 when the layer has none). Constant fan-in
    structures (SRigL) have ``min == max``.
  """
  out = {}
  for path, m in sparse_leaves(masks):
    if np.ndim(m) < 2:
      continue
    xp = _xp(m)
    f = _fan_in(m)
    active = f > 0
    n_active = xp.sum(active, dtype=xp.int32)
    big = np.iinfo(np.int32).max
    fmin = xp.where(n_active > 0, xp.min(xp.where(active, f, big)), 0)
    fmax = xp.max(xp.where(active, f, 0))
    mean = _safe_div(xp.sum(f), n_active)
    var = _safe_div(xp.sum(xp.where(active, (f - mean) ** 2, 0.0)), n_active)
    out[path] = {
      "min": fmin,
      "max": fmax,
      "mean": mean,
      "std": xp.sqrt(var),
      "active_neurons": n_active,
      "neurons": int(f.shape[0]),
    }
  return out


def _default_is_kernel(path: str, shape: Sequence[int]) -> bool:
  del path
  return len(shape) >= 2


def estimate_flops(
  params: Any,
  masks: Any = None,
  positions: Mapping[str, int] | None = None,
  *,
  is_kernel: Callable[[str, Sequence[int]], bool] = _default_is_kernel,
) -> dict[str, Any]:
  """Estimated forward FLOPs per example, dense vs sparse (host-side, not jit-able).

  The estimate counts 2 FLOPs (multiply + add) per active kernel weight per application:

  * ``Dense`` kernel ``[in, out]``: ``2·in·out`` dense, ``2·nnz`` sparse;
  * ``Conv`` kernel ``[*window, in, out]``: ``2·prod(window)·in·out·P`` dense and
    ``2·nnz·P`` sparse, where ``P`` is the number of output positions (the product of the
    output spatial dimensions, e.g. ``H_out·W_out``), given in ``positions``.

  Biases, activations, normalisation and pooling are ignored (small next to the kernels),
  and so is the gather/scatter cost of real sparse kernels: the "sparse" number is what an
  ideal sparse implementation would need, not what masked dense compute costs (masked
  training executes the dense FLOPs). A training step costs about 3× the forward FLOPs
  (forward, backward w.r.t. activations and w.r.t. weights; Evci et al. 2020, appendix H).

  Args:
    params: params pytree (arrays or ``jax.ShapeDtypeStruct``).
    masks: optional masks pytree with the same sparse leaves as ``params`` (``None`` or
      ``MaskedNode`` at dense leaves). Without masks, the sparse count is the nonzero count
      of ``params``.
    positions: ``{path: P}`` output positions per kernel application (default 1, right for
      ``Dense`` layers; give it for convolutions and for Dense layers applied per token).
    is_kernel: which leaves count as kernels (default: ``ndim >= 2``).

  Returns:
    ``{"dense": int, "sparse": int, "ratio": sparse/dense, "layers": {path: {"dense",
    "sparse", "positions"}}, "unknown_positions": [kernel paths with ndim > 2 that were not
    in positions and so were counted once]}``.
  """
  positions = dict(positions or {})
  mask_by_path = dict(sparse_leaves(masks)) if masks is not None else {}
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_dense_leaf)
  layers: dict[str, dict[str, int]] = {}
  unknown = []
  dense_tot = sparse_tot = 0
  for path, leaf in flat:
    leaf = _unwrap(leaf)
    if _is_dense_leaf(leaf) or not hasattr(leaf, "shape"):
      continue
    name = tree_lib.path_to_str(path)
    shape = tuple(int(d) for d in leaf.shape)
    if not is_kernel(name, shape):
      continue
    size = int(np.prod(shape, dtype=np.int64))
    if name in mask_by_path:
      nnz = int(np.count_nonzero(np.asarray(mask_by_path[name])))
    elif masks is not None:
      nnz = size  # a dense leaf of a masked model.
    elif isinstance(leaf, jax.ShapeDtypeStruct):
      nnz = size
    else:
      nnz = int(np.count_nonzero(np.asarray(leaf)))
    if name not in positions and len(shape) > 2:
      unknown.append(name)
    p = int(positions.get(name, 1))
    d, s = 2 * size * p, 2 * nnz * p
    layers[name] = {"dense": d, "sparse": s, "positions": p}
    dense_tot += d
    sparse_tot += s
  return {
    "dense": dense_tot,
    "sparse": sparse_tot,
    "ratio": sparse_tot / dense_tot if dense_tot else 1.0,
    "layers": layers,
    "unknown_positions": unknown,
  }


def _to_python(x: Any) -> Any:
  x = np.asarray(jax.device_get(x))
  if x.ndim != 0:
    raise ValueError(f"expected a scalar, got an array of shape {x.shape}.")
  if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
    return int(x)
  return float(x)


def to_scalars(tree: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
  """Flattens a nested dict of scalar metrics into ``{"a/b/c": python_number}``.

  Transfers JAX arrays to the host once (``jax.device_get``). Non-numeric values (lists,
  strings) are dropped.

  Args:
    tree: nested mapping, e.g. ``{"l1/kernel": {"min": Array(3)}}``.
    prefix: prepended to every key (``"fan_in"`` → ``"fan_in/l1/kernel/min"``).
    sep: key separator.

  Returns:
    A flat dict of Python ints/floats.
  """
  tree = jax.device_get(tree)
  out: dict[str, Any] = {}

  def rec(node: Any, key: str) -> None:
    if isinstance(node, Mapping):
      for k, v in node.items():
        rec(v, f"{key}{sep}{k}" if key else str(k))
      return
    if isinstance(node, bool | numbers.Number | np.ndarray | np.generic | jax.Array):
      if np.ndim(node) == 0:
        out[key] = _to_python(node)

  rec(tree, prefix)
  return out


# --------------------------------------------------------------------------------------
# Metric writers.
# --------------------------------------------------------------------------------------


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
    if not scalars:
      return
    values = to_scalars(dict(scalars))
    tag = f" {self._collection}" if self._collection else ""
    body = ", ".join(f"{k}={_format_value(v)}" for k, v in sorted(values.items()))
    logging.info("[%d]%s %s", int(step), tag, body)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info("Hyperparameters: %s", json.dumps(_jsonable(hparams), sort_keys=True))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


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
    if not scalars:
      return
    record = {"step": int(step)}
    record.update(to_scalars(dict(scalars)))
    self._handle().write(json.dumps(record) + "\n")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    path = os.path.join(self.directory, "hparams.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(_jsonable(hparams), f, indent=2, sort_keys=True)
    os.replace(tmp, path)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


class MultiWriter:
  """Forwards every call to each of ``writers``, in order."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self) -> None:
    for w in self.writers:
      w.flush()

  def close(self) -> None:
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
    for k, v in to_scalars(dict(scalars)).items():
      self._writer.add_scalar(k, v, global_step=int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    text = json.dumps(_jsonable(hparams), indent=2, sort_keys=True)
    self._writer.add_text("hparams", f"```\n{text}\n```", global_step=0)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
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


# --------------------------------------------------------------------------------------
# Progress.
# --------------------------------------------------------------------------------------


def _default_log_fn() -> Callable[[str], None]:
  """absl INFO when it is visible (under absl.app), else print (notebooks, scripts)."""
  if logging.level_info():
    return logging.info
  return lambda msg: print(msg, flush=True)


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ReportProgress:
  """Reports training progress every ``every_steps`` steps or ``every_secs`` seconds.

  Same constructor and ``timed`` names as ``clu.periodic_actions.ReportProgress``. Call it
  with the step number after each training step; it returns True when it reported. The
  line shows the step, percentage, steps/s, ETA and, for each section timed with
  :meth:`timed` since the last report, the mean time per call and its share of wall time::

    step 1200/3000 (40.0%) | 85.3 steps/s | ETA 0:21 | train_step 9.1 ms (78%),
    mask_update 15.2 ms (1%), eval 48.0 ms (3%)

  The first call of each timed section usually includes JIT compilation: it is announced
  ("compiling") and reported separately, and left out of the averages. The first call of
  the reporter only starts the clock, so compilation does not distort steps/s.

  ``timed`` measures the wall time of its block. JAX dispatches asynchronously, so to time
  device work block on the block's outputs inside it (``jax.block_until_ready``).

  Args:
    num_train_steps: total steps, for the percentage and ETA (None: unknown).
    writer: optional :class:`MetricWriter`; receives ``perf/steps_per_sec``,
      ``perf/uptime`` and ``perf/<section>_ms`` at each report.
    every_steps: report when ``step % every_steps == 0``.
    every_secs: report when this many seconds passed since the last report.
    log_fn: where the line goes; default absl INFO when visible (``absl.app``), else print.
  """

  def __init__(
    self,
    num_train_steps: int | None,
    writer: MetricWriter | None = None,
    every_steps: int | None = None,
    every_secs: float | None = 60.0,
    log_fn: Callable[[str], None] | None = None,
  ):
    if every_steps is not None and every_steps < 1:
      raise ValueError(f"every_steps must be >= 1 or None; got {every_steps}.")
    if every_secs is not None and every_secs <= 0:
      raise ValueError(f"every_secs must be > 0 or None; got {every_secs}.")
    self.num_train_steps = num_train_steps
    self.writer = writer
    self.every_steps = every_steps
    self.every_secs = every_secs
    self._log = log_fn or _default_log_fn()
    self._t0 = time.monotonic()
    self._last_time: float | None = None
    self._last_step: int | None = None
    self._sections: dict[str, list[float]] = {}  # name -> [seconds, calls] since report
    self._totals: dict[str, list[float]] = {}  # name -> [seconds, calls] overall
    self._first_calls: dict[str, float] = {}
    self.last_line: str | None = None

  @contextlib.contextmanager
  def timed(self, name: str, *, first_call_compiles: bool = True) -> Iterator[None]:
    """Times the enclosed block under ``name`` (e.g. ``"train_step"``, ``"mask_update"``).

    Args:
      name: section name shown in the progress line.
      first_call_compiles: announce the first call as a compilation and keep it out of the
        averages (set False for sections that do not compile, e.g. checkpoint writes).
    """
    first = first_call_compiles and name not in self._first_calls
    if first:
      self._log(f"{name}: first call, compiling (this can take a while for large models)...")
    start = time.monotonic()
    try:
      yield
    finally:
      elapsed = time.monotonic() - start
      if first:
        self._first_calls[name] = elapsed
        self._log(f"{name}: first call took {elapsed:.2f} s (includes compilation).")
      else:
        for table in (self._sections, self._totals):
          acc = table.setdefault(name, [0.0, 0])
          acc[0] += elapsed
          acc[1] += 1

  def _should_report(self, step: int, now: float) -> bool:
    if self.num_train_steps is not None and step >= self.num_train_steps:
      return True
    if self.every_steps is not None and step % self.every_steps == 0:
      return True
    assert self._last_time is not None
    return self.every_secs is not None and now - self._last_time >= self.every_secs

  def __call__(self, step: int, t: float | None = None) -> bool:
    """Records that ``step`` finished; reports if due. Returns whether it reported."""
    now = time.monotonic() if t is None else t
    step = int(step)
    if self._last_time is None:
      self._last_time, self._last_step = now, step
      self._sections.clear()
      return False
    if step == self._last_step or not self._should_report(step, now):
      return False
    dt = max(now - self._last_time, 1e-9)
    steps_per_sec = (step - self._last_step) / dt
    parts = [self._step_text(step), f"{steps_per_sec:.1f} steps/s"]
    if self.num_train_steps is not None and steps_per_sec > 0:
      remaining = max(self.num_train_steps - step, 0) / steps_per_sec
      parts.append(f"ETA {_format_duration(remaining)}")
    timings = []
    scalars: dict[str, float] = {
      "perf/steps_per_sec": steps_per_sec,
      "perf/uptime": now - self._t0,
    }
    for name, (secs, calls) in sorted(self._sections.items()):
      if calls:
        ms = 1e3 * secs / calls
        timings.append(f"{name} {ms:.2f} ms ({100.0 * secs / dt:.0f}%)")
        scalars[f"perf/{name}_ms"] = ms
    if timings:
      parts.append(", ".join(timings))
    self.last_line = " | ".join(parts)
    self._log(self.last_line)
    if self.writer is not None:
      self.writer.write_scalars(step, scalars)
    self._sections.clear()
    self._last_time, self._last_step = now, step
    return True

  def _step_text(self, step: int) -> str:
    if self.num_train_steps:
      pct = 100.0 * step / self.num_train_steps
      return f"step {step}/{self.num_train_steps} ({pct:.1f}%)"
    return f"step {step}"

  def summary(self) -> dict[str, dict[str, float]]:
    """Per timed section: ``{"total_s", "calls", "mean_ms", "first_call_s"}`` so far."""
    out = {}
    for name in sorted(set(self._totals) | set(self._first_calls)):
      secs, calls = self._totals.get(name, [0.0, 0])
      out[name] = {
        "total_s": secs,
        "calls": int(calls),
        "mean_ms": 1e3 * secs / calls if calls else float("nan"),
        "first_call_s": self._first_calls.get(name, float("nan")),
      }
    return out


__all__ = (
  "MetricWriter",
  "LoggingWriter",
  "JsonlWriter",
  "MultiWriter",
  "TensorBoardWriter",
  "create_default_writer",
  "read_jsonl",
  "ReportProgress",
  "sparse_leaves",
  "mask_summary",
  "mask_turnover",
  "init_ever_active",
  "update_ever_active",
  "ever_active_fraction",
  "fan_in_stats",
  "estimate_flops",
  "to_scalars",
)
