"""Orbax checkpointing for sparse training runs: save, keep-N, safe restore.

A checkpoint holds one pytree ``state`` (by convention ``{"model": nnx.state(model),
"optimizer": nnx.state(optimizer), "step": int, "data_state": {...}}``; the DST masks,
counters and PRNG key live inside the optimizer state) and the run's resolved config as
JSON, written with ``ocp.args.Composite(state=StandardSave, config=JsonSave)``::

  ckpt = sparsejax.CheckpointManager(workdir + "/checkpoints", max_to_keep=3)
  if ckpt.latest_step() is not None:
    state, config = ckpt.restore(target)    # target: the freshly built state (or abstract)
  ...
  ckpt.save(step, state, config=config.to_dict())
  ckpt.close()                               # waits for async saves

Safety rules:

* **Restore against a target.** ``target`` (concrete arrays or ``jax.ShapeDtypeStruct``)
  fixes the pytree types, so ``NamedTuple`` states such as ``DynamicSparseState`` come back
  as themselves, not as dicts.
* **Refuse foreign checkpoints.** Before reading any array, the stored tree (paths, shapes,
  dtypes) is compared with the target; on any difference :class:`CheckpointMismatchError`
  (a ``ValueError``) lists the mismatching paths and shapes. Nothing is written or deleted.
* **Never start over silently.** An unreadable, truncated or corrupt checkpoint raises
  :class:`CorruptCheckpointError` naming the directory and the cause.
* **Delete only through keep-N.** Checkpoints are removed only by the ``max_to_keep``
  policy of the manager that wrote newer ones; orbax's temporary-directory cleanup is off.

Typed PRNG keys (``jax.random.key``) are stored as their key data and re-wrapped on restore.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

STATE_ITEM = "state"
CONFIG_ITEM = "config"


class CheckpointMismatchError(ValueError):
  """A checkpoint's tree (paths, shapes or dtypes) differs from the restore target."""


class CorruptCheckpointError(RuntimeError):
  """A checkpoint exists but cannot be read (truncated, corrupt or incomplete files)."""


# --------------------------------------------------------------------------------------
# Typed PRNG keys.
# --------------------------------------------------------------------------------------


def _is_typed_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
  """Replaces typed PRNG keys by their uint32 key data (arrays or ShapeDtypeStructs)."""

  def conv(x):
    if not _is_typed_key(x):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.eval_shape(jax.random.key_data, x)
    return jax.random.key_data(x)

  return jax.tree.map(conv, tree)


def _data_to_keys(tree: Any, like: Any) -> Any:
  """Inverse of :func:`_keys_to_data`, taking key implementations from ``like``."""

  def conv(x, ref):
    if not _is_typed_key(ref):
      return x
    return jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))

  return jax.tree.map(conv, tree, like)


def abstract_like(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` (with sharding) for every array leaf; other leaves kept.

  Use it to build a restore target without holding a second copy of the arrays.

  Args:
    tree: a pytree of ``jax.Array``, NumPy arrays, ``ShapeDtypeStruct`` or other leaves.

  Returns:
    The same tree with a ``ShapeDtypeStruct`` per array (a ``jax.Array``'s sharding kept).
  """

  def conv(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray):
      return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x

  return jax.tree.map(conv, tree)


# --------------------------------------------------------------------------------------
# Structure comparison.
# --------------------------------------------------------------------------------------


def _leaf_signature(x: Any) -> tuple[tuple[int, ...], str]:
  shape = tuple(int(d) for d in getattr(x, "shape", np.shape(x)))
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    dtype = np.asarray(x).dtype
  return shape, str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype


def _flat_signatures(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  flat = ocp.tree.to_flat_dict(tree, sep="/")
  # NNX Variables store their array under "value": show "model/l1/kernel", not ".../value".
  return {k.removesuffix("/value"): _leaf_signature(v) for k, v in flat.items()}


def _scalar_kind(dtype: str) -> str:
  """Python scalars are stored as int64/float64: compare scalars by kind, not width."""
  kind = np.dtype(dtype).kind
  return {"i": "int", "u": "int", "f": "float", "b": "bool"}.get(kind, dtype)


def compare_trees(stored: Any, target: Any, *, max_lines: int = 20) -> list[str]:
  """Lists the differences between a stored tree's metadata and a target tree.

  Args:
    stored: metadata tree (``ArrayMetadata``/``ScalarMetadata`` leaves) or arrays.
    target: the restore target (arrays, ShapeDtypeStructs or Python scalars).
    max_lines: cap on the number of reported differences.

  Returns:
    Human-readable lines, empty if the trees agree on paths, shapes and dtypes.
  """
  s = _flat_signatures(stored)
  t = _flat_signatures(_keys_to_data(target))
  lines = []
  for key in sorted(set(s) | set(t)):
    if key not in t:
      lines.append(f"  {key}: only in the checkpoint (shape {s[key][0]}, {s[key][1]})")
    elif key not in s:
      lines.append(f"  {key}: only in this run (shape {t[key][0]}, {t[key][1]})")
    else:
      (ss, sd), (ts, td) = s[key], t[key]
      scalar = ss == () and ts == ()
      dtype_differs = (_scalar_kind(sd) != _scalar_kind(td)) if scalar else sd != td
      if ss != ts or dtype_differs:
        lines.append(f"  {key}: checkpoint {ss} {sd} vs this run {ts} {td}")
  if len(lines) > max_lines:
    lines = lines[:max_lines] + [f"  ... and {len(lines) - max_lines} more"]
  return lines


# --------------------------------------------------------------------------------------
# The manager.
# --------------------------------------------------------------------------------------


def _prepare_directory(directory: str) -> None:
  """Creates ``directory`` if needed; raises a clear error if it cannot be used.

  Orbax would take an existing *file* for an empty checkpoint directory (``latest_step()``
  None, i.e. a silent fresh start) and fails with a bare ``OSError`` traceback on a path it
  cannot create. The error keeps the class of the underlying ``OSError``.
  """
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise NotADirectoryError(
      f"CheckpointManager: `directory` {directory!r} is a file, not a directory. Pass a "
      "directory for the checkpoints (it is created if missing), e.g. <workdir>/checkpoints."
    )
  try:
    os.makedirs(directory, exist_ok=True)
    os.listdir(directory)
  except OSError as e:
    raise type(e)(
      f"CheckpointManager: `directory` {directory!r} cannot be created or read "
      f"({e.strerror or e}). Check that no part of the path is a file or a broken link and "
      "that you may write there."
    ) from e


class CheckpointManager:
  """A small wrapper around ``orbax.checkpoint.CheckpointManager`` with safe restores.

  Args:
    directory: the checkpoint directory (one sub-directory per step).
    max_to_keep: keep the newest N checkpoints (None keeps all). Only this policy ever
      deletes checkpoints.
    save_interval_steps: orbax skips ``save`` calls closer than this to the previous save
      (``force=True`` overrides).
    async_save: write in a background thread (call :meth:`wait_until_finished` or
      :meth:`close` before exiting).

  Raises:
    ValueError: ``max_to_keep < 1``.
    NotADirectoryError: ``directory`` is a file.
    OSError: ``directory`` cannot be created or read (the subclass of the cause, e.g.
      ``PermissionError``, or ``NotADirectoryError`` when a parent is a file).
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1,
    async_save: bool = True,
  ):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None; got {max_to_keep}.")
    self.directory = os.path.abspath(os.fspath(directory))
    _prepare_directory(self.directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      save_interval_steps=save_interval_steps,
      create=True,
      cleanup_tmp_directories=False,
      enable_async_checkpointing=async_save,
    )
    self._mngr = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        STATE_ITEM: ocp.StandardCheckpointHandler(),
        CONFIG_ITEM: ocp.JsonCheckpointHandler(),
      },
    )

  # -- queries -------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest saved step, or None if there is no checkpoint."""
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    """All saved steps, ascending."""
    return sorted(self._mngr.all_steps())

  def step_dir(self, step: int) -> str:
    """The directory of checkpoint ``step``."""
    return os.path.join(self.directory, str(step))

  def read_config(self, step: int | None = None) -> dict[str, Any] | None:
    """The config JSON stored with checkpoint ``step`` (default latest).

    Args:
      step: the checkpoint step; default the latest.

    Returns:
      The stored config dict, or None when the checkpoint has none or it cannot be read.

    Raises:
      FileNotFoundError: ``step`` is None and there is no checkpoint.
    """
    step = self._resolve_step(step)
    try:
      restored = self._mngr.restore(
        step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()})
      )
    except Exception:  # noqa: BLE001 - the config is optional metadata.
      return None
    return restored[CONFIG_ITEM]

  def _resolve_step(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    return int(step)

  # -- save ----------------------------------------------------------------------------

  def save(
    self,
    step: int,
    state: Any,
    config: Mapping[str, Any] | None = None,
    *,
    force: bool = False,
  ) -> bool:
    """Saves ``state`` (and ``config`` as JSON) as checkpoint ``step``.

    Args:
      step: the step number (also the directory name).
      state: the pytree to save.
      config: JSON-serialisable run configuration (e.g. ``config.to_dict()``).
      force: save even if ``save_interval_steps`` would skip this step.

    Returns:
      Whether a checkpoint was written (orbax may skip it per ``save_interval_steps``;
      saving a step that already exists is skipped too).
    """
    if int(step) in self._mngr.all_steps():
      return False
    items = {STATE_ITEM: ocp.args.StandardSave(_keys_to_data(state))}
    if config is not None:
      items[CONFIG_ITEM] = ocp.args.JsonSave(dict(config))
    return bool(self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force))

  # -- restore -------------------------------------------------------------------------

  def check_compatible(self, target: Any, step: int | None = None) -> None:
    """Raises if checkpoint ``step`` (default latest) cannot be restored into ``target``.

    Only metadata is read: nothing is restored, written or deleted.

    Args:
      target: the restore target (see :meth:`restore`).
      step: the checkpoint step; default the latest.

    Raises:
      FileNotFoundError: ``step`` is None and there is no checkpoint.
      CheckpointMismatchError: paths, shapes or dtypes differ (all listed).
      CorruptCheckpointError: the checkpoint's metadata cannot be read.
    """
    step = self._resolve_step(step)
    where = self.step_dir(step)
    try:
      metadata = self._mngr.item_metadata(step)
      stored = metadata[STATE_ITEM]
    except Exception as e:  # noqa: BLE001 - orbax raises many types on bad files.
      raise CorruptCheckpointError(
        f"Checkpoint {where} is unreadable or incomplete ({type(e).__name__}: "
        f"{str(e)[:500]}). Refusing to start from scratch over it: move or delete that "
        "directory yourself, or use another --workdir."
      ) from e
    if stored is None:
      raise CorruptCheckpointError(
        f"Checkpoint {where} has no '{STATE_ITEM}' item (incomplete or not written by "
        "sparsejax). Refusing to start from scratch over it: move or delete it yourself."
      )
    diffs = compare_trees(stored, target)
    if diffs:
      raise CheckpointMismatchError(
        f"Checkpoint {where} does not match this run's state ({len(diffs)} difference(s) "
        "in paths/shapes/dtypes):\n"
        + "\n".join(diffs)
        + "\nIt was probably written by a different model or config. Nothing was "
        "restored, overwritten or deleted. Use a fresh --workdir, or rerun with the config "
        f"stored in {os.path.join(where, CONFIG_ITEM)}."
      )

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any] | None]:
    """Restores checkpoint ``step`` (default latest) into the structure of ``target``.

    Args:
      target: a pytree like the saved state: concrete arrays or ``jax.ShapeDtypeStruct``
        (e.g. ``jax.eval_shape`` of the init function, or the freshly built state). Its
        pytree types (NamedTuples, NNX ``State``) and shardings are used for the result.
      step: the step to restore; default the latest.

    Returns:
      ``(state, config)``; ``config`` is the stored JSON dict or None.

    Raises:
      FileNotFoundError: there is no checkpoint.
      CheckpointMismatchError: the checkpoint does not fit ``target``.
      CorruptCheckpointError: the checkpoint cannot be read.
    """
    step = self._resolve_step(step)
    self.check_compatible(target, step)
    abstract = abstract_like(_keys_to_data(target))
    try:
      restored = self._mngr.restore(
        step,
        args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)}),
      )
      state = restored[STATE_ITEM]
    except Exception as e:  # noqa: BLE001
      raise CorruptCheckpointError(
        f"Checkpoint {self.step_dir(step)} could not be read ({type(e).__name__}: "
        f"{str(e)[:500]}). It is probably truncated or corrupt. Refusing to start from "
        "scratch over it: move or delete that directory yourself, or use another --workdir."
      ) from e
    return _data_to_keys(state, target), self.read_config(step)

  # -- lifecycle -----------------------------------------------------------------------

  def wait_until_finished(self) -> None:
    """Blocks until asynchronous saves are on disk."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
