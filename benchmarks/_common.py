"""Shared helpers for the benchmarks: environment banner and interleaved timing."""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np


def cpu_model() -> str:
  """The CPU model name from ``/proc/cpuinfo`` (or ``platform``)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def environment() -> str:
  """One line naming jax, the backend, the device and the CPU."""
  dev = jax.devices()[0]
  return (
    f"jax {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind}, "
    f"CPU {cpu_model()}, {os.cpu_count()} cores"
  )


def block(x):
  """``jax.block_until_ready(x)``."""
  return jax.block_until_ready(x)


def on_device(value: int) -> jax.Array:
  """An int32 scalar committed to the default device (made before any timing starts)."""
  return jax.device_put(np.int32(value), jax.devices()[0])


def interleaved(
  fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2, seed: int = 0
) -> dict:
  """Times each ``fn()`` (which must block) round-robin; returns per-name lists of seconds.

  The order inside each round is shuffled (seeded), so that no function always runs right
  after the same neighbour: a call that frees a lot of memory or evicts the caches (e.g. a
  mask-update step) would otherwise bias the one that always follows it.
  """
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  rng = random.Random(seed)
  names = list(fns)
  times = {name: [] for name in fns}
  for _ in range(rounds):
    rng.shuffle(names)
    for name in names:
      t0 = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - t0)
  return times


def med(xs) -> float:
  """The median of ``xs``."""
  return statistics.median(xs)
