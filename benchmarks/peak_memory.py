"""Peak memory of a whole training run, dense vs every method, and XLA temp sizes.

Each method trains the MLP of ``dst_step.py`` (784-3x1024-10, batch 128, SGD momentum,
90% ERK, ΔT=100, drop fraction 0.3 cosine) in a fresh child process, so the peak resident
set size (``VmHWM`` of the child) is the run's own: parameters, optimizer state, masks,
XLA's buffers and temporaries, and the allocator's behaviour across steps. The parent also
reports each compiled step's XLA temp buffer (``memory_analysis().temp_size_in_bytes``):
on CPU, a temp buffer above glibc's 32 MiB mmap threshold is mapped afresh and
page-faulted on every step, which is what DST's update branch must stay clear of.

Run:  python benchmarks/peak_memory.py            (about 4 minutes: 5 repeats)
      python benchmarks/peak_memory.py --quick    (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("dense", "static", "set", "rigl", "srigl", "gmp", "granet")


def _vm_hwm_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def child(method: str, steps: int, width: int) -> dict:
  """Trains ``steps`` steps with ``method``; returns peak RSS, temp size, time."""
  import jax
  import jax.numpy as jnp
  import optax

  import sparsejax as sj

  sizes = [784, width, width, width, 10]
  key = jax.random.PRNGKey(0)
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    key, sub = jax.random.split(key)
    params[f"dense{i}"] = {"kernel": jax.random.normal(sub, (a, b)) / a**0.5, "bias": jnp.zeros(b)}
  x = jax.random.normal(jax.random.PRNGKey(1), (128, 784))
  y = jax.random.randint(jax.random.PRNGKey(2), (128,), 0, 10)
  inner = optax.sgd(0.01, momentum=0.9)
  end = max(2, int(0.75 * steps))
  kw = dict(sparsity=0.9, update_every=100, end_step=end)
  tx = {
    "dense": lambda: inner,
    "static": lambda: sj.static_sparse(inner, sparsity=0.9),
    "set": lambda: sj.set_(inner, **kw),
    "rigl": lambda: sj.rigl(inner, **kw),
    "srigl": lambda: sj.srigl(inner, **kw),
    "gmp": lambda: sj.gmp(inner, sparsity=0.9, end_step=end, update_every=100),
    "granet": lambda: sj.granet(inner, sparsity=0.9, end_step=end, update_every=100),
  }[method]()

  def loss(p):
    h = x
    for i in range(len(sizes) - 1):
      h = h @ p[f"dense{i}"]["kernel"] + p[f"dense{i}"]["bias"]
      h = jax.nn.relu(h) if i < len(sizes) - 2 else h
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  if method != "dense":
    params = sj.apply_masks(params, state)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
  t0 = time.perf_counter()
  for _ in range(steps):
    params, state = compiled(params, state)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - t0
  return {"method": method, "peak_rss_mib": _vm_hwm_mib(), "temp_mib": temp, "seconds": seconds}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="256-wide MLP, 120 steps")
  parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=5, help="child runs per method (median)")
  args = parser.parse_args()
  width = 256 if args.quick else 1024
  steps = args.steps or (120 if args.quick else 300)
  if args.child:
    print(json.dumps(child(args.child, steps, width)), flush=True)
    return
  root = Path(__file__).resolve().parents[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  runs = {method: [] for method in METHODS}
  # Interleaved repeats (dense, static, ..., dense, static, ...), median per method: one
  # child's peak varies by ±20 MiB from run to run (which allocator arena serves which
  # thread), as much as the differences measured.
  for _ in range(args.repeats):
    for method in METHODS:
      out = subprocess.run(
        [sys.executable, __file__, "--child", method, "--steps", str(steps)]
        + (["--quick"] if args.quick else []),
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env=env,
      )
      runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
  rows = {
    m: {
      "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
      "range": (min(r["peak_rss_mib"] for r in rs), max(r["peak_rss_mib"] for r in rs)),
      "temp_mib": rs[0]["temp_mib"],
      "seconds": statistics.median(r["seconds"] for r in rs),
    }
    for m, rs in runs.items()
  }
  dense = rows["dense"]["peak_rss_mib"]
  print(
    f"MLP 784-3x{width}-10, batch 128, {steps} steps (ΔT=100), one child process per method "
    f"and repeat, median of {args.repeats} interleaved repeats"
  )
  print(
    f"{'method':<8} {'peak RSS MiB':>13} {'(min-max)':>13} {'vs dense':>9} {'XLA temp MiB':>13} "
    f"{'run s':>7}"
  )
  for method, r in rows.items():
    low, high = r["range"]
    print(
      f"{method:<8} {r['peak_rss_mib']:13.1f} {f'{low:.0f}-{high:.0f}':>13} "
      f"{r['peak_rss_mib'] / dense:9.3f} {r['temp_mib']:13.1f} {r['seconds']:7.2f}"
    )
  worst = max((r["peak_rss_mib"] / dense, m) for m, r in rows.items() if m != "dense")
  print(f"headline: worst DST peak RSS {worst[0]:.3f}x dense ({worst[1]})")


if __name__ == "__main__":
  main()
