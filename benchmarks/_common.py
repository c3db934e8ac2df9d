"""Shared helpers for the benchmarks: environment banner and interleaved timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import jax


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def environment() -> str:
  dev = jax.devices()[0]
  return (
    f"jax {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind}, "
    f"CPU {cpu_model()}, {os.cpu_count()} cores"
  )


def block(x):
  return jax.block_until_ready(x)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict:
  """Times each ``fn()`` (which must block) round-robin; returns per-name lists of seconds."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def med(xs) -> float:
  return statistics.median(xs)
