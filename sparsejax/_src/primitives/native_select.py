"""The native CPU twin of the exact top-k selection (an XLA FFI call).

``sparsejax/_src/primitives/csrc/select_ffi.cc`` is compiled at install time by
``setup.py`` into ``sparsejax._src.primitives._select_native``. It computes exactly what
``selection._select_2d`` computes (same keys, same thresholds, ties by index; the tests
compare the two on every strategy), as one custom call: a mask update on the CPU then
compiles to a few dozen XLA kernels instead of several hundred, which is most of its
compile time and of its compile-time memory, and runs 2-5x faster (benchmarks/RESULTS.md).

It is used only where it cannot change a program's memory layout: on a CPU process with
one device (``jax.device_count() == 1``). With several devices an array may be sharded,
and XLA would gather a custom call's operands onto every device; the XLA path keeps the
selection local to the shards there (docs/SHARDING.md). If the extension is missing (no
C++ compiler at install time, another platform, or ``SPARSEJAX_DISABLE_NATIVE=1``) the
XLA path is used.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "sparsejax_select"

_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": None, "reason": "not loaded yet"}


def _load() -> bool:
  """Imports the extension and registers its FFI target once; returns success."""
  with _lock:
    if _state["loaded"] is not None:
      return _state["loaded"]
    if os.environ.get("SPARSEJAX_DISABLE_NATIVE", "").strip() not in ("", "0"):
      _state.update(loaded=False, reason="disabled by SPARSEJAX_DISABLE_NATIVE")
      return False
    try:
      from sparsejax._src.primitives import _select_native as ext  # type: ignore[attr-defined]
    except ImportError as e:
      _state.update(loaded=False, reason=f"extension _select_native is not built ({e})")
      return False
    try:
      for name, capsule in ext.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    except Exception as e:  # noqa: BLE001 - any registration failure means "no native".
      _state.update(loaded=False, reason=f"XLA FFI registration failed: {e!r}")
      return False
    _state.update(loaded=True, reason="")
    return True


def available() -> bool:
  """Whether the native selection is built and registered with XLA."""
  return _load()


def unavailable_reason() -> str:
  """Why the native selection is unavailable (empty string when it is available)."""
  _load()
  return _state["reason"]


def usable() -> bool:
  """Whether selections traced now may take the native path: it is available and the
  process has one device (no array can be sharded)."""
  return _load() and jax.device_count() == 1


def select_2d(
  scores: jax.Array,
  k: jax.Array,
  candidates: jax.Array | None,
  *,
  per_column: bool,
  threads: int = 0,
) -> jax.Array:
  """``selection._select_2d`` as one FFI call (CPU only: callers wrap it in
  ``lax.platform_dependent``).

  Args:
    scores: ``[L, G]`` float scores (cast to float32, as the XLA path does).
    k: int32 ``[1, 1]`` (whole array) or ``[1, G]`` (per column).
    candidates: optional bool ``[L, G]``.
    per_column: select per column (ties by row) or over the whole array (ties by flat
      index).
    threads: at most this many threads (0: XLA's intra-op pool, at most 8). The result
      does not depend on it (the tests check).

  Returns:
    bool ``[L, G]``.
  """
  if not _load():
    raise RuntimeError(f"native selection unavailable: {_state['reason']}")
  call = jax.ffi.ffi_call(
    TARGET, jax.ShapeDtypeStruct(scores.shape, jnp.bool_), vmap_method="sequential"
  )
  cands = jnp.zeros((0,), jnp.bool_) if candidates is None else candidates.astype(jnp.bool_)
  return call(
    scores.astype(jnp.float32),
    cands,
    k.astype(jnp.int32),
    per_column=np.int64(1 if per_column else 0),
    threads=np.int64(threads),
  )
