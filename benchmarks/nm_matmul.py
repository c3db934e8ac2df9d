"""N:M sparse matmul vs dense ``jnp.dot``: batch sizes x N:M ratios x {fp32, bf16}.

What is timed (forward only, ``jax.jit``-ed, outputs blocked on):

* ``jnp.dot``: ``jnp.dot(x, W)`` with the same N:M-masked weights stored dense.
* ``dense32a`` (16-bit dtypes only): the same dense dot written like the N:M
  paths, ``jnp.dot(x, W, preferred_element_type=float32).astype(dtype)`` (f32
  accumulation, as the Pallas kernels and the reference do). On XLA:CPU this
  formulation is much faster in bf16 than the plain ``jnp.dot``, so it is the
  like-for-like baseline; the speedup column uses it when present.
* ``N:M``: ``sparsejax`` ``nm_matmul(x, nms)``, i.e. what a user gets:
  on GPU/TPU the compiled Pallas kernels, on CPU the pure-JAX reference
  (compare + select decompression, then a dense dot). The header says which.

All variants of one (dtype, batch) point run in one process, interleaved in a
freshly shuffled order every round; each cell is the median over rounds, and
a speedup is the median over rounds of the paired ratio t_baseline / t_variant.
Achieved bandwidth counts bytes = x + W as stored + y (dense: the dense W;
N:M: values + int8 indices as held in memory; the packed-metadata size that
``NMSparse.nbytes`` reports is smaller and printed in the weights table).

Run:  python benchmarks/nm_matmul.py            (about 1-2 minutes on 2 CPU cores)
      python benchmarks/nm_matmul.py --quick    (smoke run, ~15-30 s)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import sparsejax as sj  # noqa: E402

_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def _path_name() -> str:
  """Which N:M path ``nm_matmul`` takes on this backend, in words."""
  backend = jax.default_backend()
  if backend == "gpu":
    return "Pallas kernels (Triton, compiled)"
  if backend == "tpu":
    return "Pallas kernels (Mosaic, compiled)"
  return "reference (decompress + dot, XLA)"


def _parse_nm(text: str) -> list[tuple[int, int]]:
  """Parses ``"2:4,1:8"`` into ``[(2, 4), (1, 8)]``."""
  pairs = []
  for item in text.split(","):
    n, m = item.split(":")
    pairs.append((int(n), int(m)))
  return pairs


def _time_point(fns: dict, rounds: int, budget_s: float, rng: random.Random) -> dict:
  """Interleaved, shuffled timing of blocking callables; returns seconds per call."""
  for fn in fns.values():  # compile + warm up
    fn()
    fn()
  # Fewer rounds when a point is slow, so the full run stays within its budget.
  t0 = time.perf_counter()
  for fn in fns.values():
    fn()
  per_round = time.perf_counter() - t0
  rounds = max(5, min(rounds, int(budget_s / max(per_round, 1e-9))))
  return _common.interleaved(fns, rounds, warmup=0, seed=rng.randrange(2**31))


def main(argv: list[str] | None = None) -> int:
  """Runs the benchmark and prints the tables and the headline; returns the exit code."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small smoke run")
  parser.add_argument("--k", type=int, default=None, help="contraction size K")
  parser.add_argument("--nout", type=int, default=None, help="output features Nout")
  parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
  parser.add_argument("--nm", default=None, help="comma-separated N:M ratios, e.g. 2:4,1:8")
  parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16")
  parser.add_argument("--rounds", type=int, default=None, help="max interleaved rounds")
  parser.add_argument("--budget", type=float, default=None, help="seconds per (dtype, B) point")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  quick = args.quick
  k = args.k or (256 if quick else 2048)
  nout = args.nout or (256 if quick else 2048)
  batches = [int(b) for b in (args.batches or ("1,32" if quick else "1,8,64,256")).split(",")]
  pairs = _parse_nm(args.nm or ("2:4,1:8" if quick else "2:4,1:4,2:8,1:8"))
  dtypes = [d.strip() for d in args.dtypes.split(",")]
  rounds = args.rounds or (5 if quick else 30)
  budget = args.budget or (0.5 if quick else 4.0)
  rng = random.Random(args.seed)

  dev = jax.devices()[0]
  print("N:M sparse matmul benchmark (sparsejax benchmarks/nm_matmul.py)")
  print(
    f"jax {jax.__version__} | backend {jax.default_backend()} | device {dev.device_kind} | "
    f"CPU {_common.cpu_model()} | os.cpu_count() {os.cpu_count()}"
  )
  print(
    f"N:M path timed: {_path_name()} | baselines: jnp.dot on the dense masked weights; "
    "for 16-bit dtypes also dense32a (same dot with f32 accumulation = 'vs baseline')"
  )
  print(
    f"K={k} Nout={nout} | batches {batches} | N:M {[f'{n}:{m}' for n, m in pairs]} | "
    f"dtypes {dtypes} | up to {rounds} shuffled rounds per point, median"
  )
  print()

  key = jax.random.key(args.seed)
  kx, kw = jax.random.split(key)
  w32 = jax.random.normal(kw, (k, nout), jnp.float32)
  compressed = {nm: sj.nm.nm_compress(w32, *nm) for nm in pairs}

  print("weights per N:M (bytes as stored; packed = NMSparse.nbytes, 2/4-bit indices):")
  for dname in dtypes:
    dt = _DTYPES[dname]
    dense_b = k * nout * jnp.dtype(dt).itemsize
    cells = []
    for (n, m), nms in compressed.items():
      nms_d = nms.replace(values=nms.values.astype(dt))
      mem = nms_d.values.nbytes + nms_d.indices.nbytes
      cells.append(
        f"{n}:{m} {mem / dense_b:6.1%} in memory (int8 idx), {nms_d.nbytes / dense_b:6.2%} packed"
      )
    print(f"  {dname}: dense {dense_b / 2**20:.2f} MiB | " + " | ".join(cells))
  print()

  header = (
    f"| {'dtype':5} | {'B':>5} | {'variant':8} | {'median us':>10} | {'min us':>9} | "
    f"{'GB/s':>7} | {'vs jnp.dot':>10} | {'vs baseline':>11} |"
  )
  print(header)
  print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")

  results = []
  for dname in dtypes:
    dt = _DTYPES[dname]
    w_dense = {nm: nms.todense().astype(dt) for nm, nms in compressed.items()}
    nms_dt = {nm: nms.replace(values=nms.values.astype(dt)) for nm, nms in compressed.items()}
    dense_w = w_dense[pairs[0]]  # any mask: dense cost does not depend on it
    dot = jax.jit(jnp.dot)
    dot32a = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    sparse = jax.jit(sj.nm.nm_matmul)
    baseline = "jnp.dot" if dt == jnp.float32 else "dense32a"
    for b in batches:
      x = jax.random.normal(jax.random.fold_in(kx, b), (b, k), jnp.float32).astype(dt)
      itemsize = jnp.dtype(dt).itemsize
      io_bytes = (b * k + b * nout) * itemsize
      fns = {"jnp.dot": lambda x=x, w=dense_w: jax.block_until_ready(dot(x, w))}
      nbytes = {"jnp.dot": io_bytes + k * nout * itemsize}
      if baseline == "dense32a":
        fns["dense32a"] = lambda x=x, w=dense_w: jax.block_until_ready(dot32a(x, w))
        nbytes["dense32a"] = nbytes["jnp.dot"]
      for (n, m), nms in nms_dt.items():
        name = f"{n}:{m}"
        fns[name] = lambda x=x, s=nms: jax.block_until_ready(sparse(x, s))
        nbytes[name] = io_bytes + nms.values.nbytes + nms.indices.nbytes
      times = _time_point(fns, rounds, budget, rng)
      for name, ts in times.items():
        med = statistics.median(ts)
        r_dot = statistics.median(d / t for d, t in zip(times["jnp.dot"], ts, strict=True))
        r_base = statistics.median(d / t for d, t in zip(times[baseline], ts, strict=True))
        gbs = nbytes[name] / med / 1e9
        results.append((dname, b, name, med, r_base))
        print(
          f"| {dname:5} | {b:>5} | {name:8} | {med * 1e6:>10.1f} | {min(ts) * 1e6:>9.1f} | "
          f"{gbs:>7.2f} | {r_dot:>9.2f}x | {r_base:>10.2f}x |"
        )

  sparse_rows = [r for r in results if ":" in r[2]]
  best = max(sparse_rows, key=lambda r: r[4])
  worst = min(sparse_rows, key=lambda r: r[4])
  print()
  print(
    f"HEADLINE: {jax.default_backend()} ({_path_name()}), K={k} Nout={nout}: N:M vs "
    f"like-for-like dense ranges {worst[4]:.2f}x ({worst[2]} {worst[0]} B={worst[1]}) to "
    f"{best[4]:.2f}x ({best[2]} {best[0]} B={best[1]}); >1 means faster than dense."
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
