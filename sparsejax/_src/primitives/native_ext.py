"""Loading the native XLA FFI extensions that ``setup.py`` builds (one loader for all).

Each extension module exposes ``registrations()``: a dict of FFI target name -> PyCapsule
handler, registered with XLA for the CPU platform on first use. An extension is
unavailable when it is not built (no C++ compiler at install time, another platform),
when ``SPARSEJAX_DISABLE_NATIVE=1``, or when registration fails; the reason is kept, and
every caller then uses its XLA path.
"""

from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType

import jax


class NativeExtension:
  """One native extension module, imported and registered at most once (thread-safe).

  Args:
    module: the extension's import path, e.g. ``"sparsejax._src.kernels._condensed_native"``.
    what: how errors name it, e.g. ``"native condensed kernel"``.
  """

  def __init__(self, module: str, what: str):
    self.module = module
    self.what = what
    self._lock = threading.Lock()
    self._loaded: bool | None = None
    self._reason = "not loaded yet"
    self._ext: ModuleType | None = None

  def load(self) -> bool:
    """Imports the extension and registers its FFI targets once; returns success."""
    with self._lock:
      if self._loaded is None:
        self._loaded, self._reason = self._import_and_register()
      return self._loaded

  def _import_and_register(self) -> tuple[bool, str]:
    if os.environ.get("SPARSEJAX_DISABLE_NATIVE", "").strip() not in ("", "0"):
      return False, "disabled by SPARSEJAX_DISABLE_NATIVE"
    try:
      ext = importlib.import_module(self.module)
    except ImportError as e:
      return False, f"extension {self.module} is not built ({e})"
    try:
      for name, capsule in ext.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    except Exception as e:  # noqa: BLE001 - any registration failure means "no native".
      return False, f"XLA FFI registration failed: {e!r}"
    self._ext = ext
    return True, ""

  @property
  def reason(self) -> str:
    """Why the extension is unavailable (empty string when it is available)."""
    self.load()
    return self._reason

  @property
  def ext(self) -> ModuleType | None:
    """The loaded extension module, or ``None`` when it is unavailable."""
    return self._ext if self.load() else None

  def require(self) -> None:
    """Raises ``RuntimeError`` with the reason when the extension is unavailable."""
    if not self.load():
      raise RuntimeError(f"{self.what} unavailable: {self._reason}")
