"""A periodic progress line for training loops, with per-section timings.

:class:`ReportProgress` prints the step, percentage, steps/s, ETA and the time per timed
section (``train_step``, ``mask_update``, ``eval``, ``checkpoint`` ...), and announces the
first (compiling) call of each timed section. Same names as
``clu.periodic_actions.ReportProgress``; no TensorFlow needed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

from absl import logging

from sparsejax._src.metrics.writers import MetricWriter


def _default_log_fn() -> Callable[[str], None]:
  """absl INFO when it is visible (under absl.app), else print (notebooks, scripts)."""
  if logging.level_info():
    return logging.info
  return lambda msg: print(msg, flush=True)


def _format_duration(seconds: float) -> str:
  """``"m:ss"`` or ``"h:mm:ss"``; ``"?"`` when not finite."""
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

  Raises:
    ValueError: ``every_steps < 1`` or ``every_secs <= 0``.
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

    Yields:
      Nothing; the block's wall time is recorded when it exits (also on an exception).
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
    """Records that ``step`` finished and reports if a report is due.

    Args:
      step: the step that just finished.
      t: the time (``time.monotonic()`` seconds); default now. For tests.

    Returns:
      Whether a progress line was written. The first call only starts the clock.
    """
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
    """Timings of every timed section so far.

    Returns:
      ``{name: {"total_s", "calls", "mean_ms", "first_call_s"}}``, sorted by name; the
      first (compiling) call is in ``first_call_s`` only; NaN where there is no call.
    """
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
