"""Condensed (SRigL constant fan-in) inference vs dense on the CPU.

Question: how fast is ``sparsejax.condensed_matmul`` against the dense layer it
replaces, per path, sparsity and batch size, and which path should ``method="auto"``
take? Reference: Lasby et al., "Dynamic Sparse Training with Structured Sparsity"
(SRigL), ICLR 2024, https://arxiv.org/abs/2305.02299 (claims 3.4-3.6x vs dense at 90%
sparsity, batch 1, CPU).

Variants (all jitted, float32, weights passed as arguments, outputs ``[B, N]``):

* ``dense``: ``x @ W + b`` with the pre-masked kernel (pruned entries stored as 0);
  the baseline every ratio is relative to.
* ``masked``: ``x @ (W * mask) + b`` (what DST code does when it masks in the forward).
* ``native``: ``condensed_matmul(method="native")``, the C++ XLA FFI kernel.
* ``gather``: ``condensed_matmul(method="gather")``, XLA take + einsum.
* ``scatter``: ``condensed_matmul(method="dense")`` on a layer without a dense copy
  (scatter to dense inside the call, then matmul): the large-batch fallback without
  ``keep_dense``.

Layers: Linear 4096->4096 and 3072->768 (SRigL's ViT-B/16 MLP output layer), sparsity
80/90/95/99% (k = round((1 - s) * K) inputs per output, no ablation), batch 1/8/64.
Method: all variants of one point are timed round-robin in shuffled order in one
process, after warm-up, with ``block_until_ready``; cells give the median time per call
and the ratio of medians vs ``dense`` (> 1: faster than dense). Variants slower than
0.15 s/call get at most 5 rounds.

Run: ``python benchmarks/condensed_inference.py`` (full, < 5 min on 2 cores) or
``--quick`` (smoke run, one small point). The last line is the headline.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import sparsejax as sj  # noqa: E402

cd = sj.condensed

SLOW_S = 0.15
SLOW_ROUNDS = 5


def environment() -> list[str]:
  """Lines describing the machine, library versions and native-kernel status."""
  n_aff = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
  return [
    f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
    f"jax {jax.__version__}, backend {jax.default_backend()}, "
    f"device {jax.devices()[0].device_kind}, sparsejax {sj.__version__}",
    f"cpu: {_common.cpu_model()}, cpu_count {os.cpu_count()}, usable {n_aff}, "
    f"load average {' '.join(f'{v:.2f}' for v in load)}",
    f"python {platform.python_version()}, numpy {np.__version__}",
    f"native kernel: {cd.native_available()} "
    f"(isa {cd.native_cpu_isa()}) "
    f"{cd.native_unavailable_reason()}",
  ]


def make_layer(perm: np.ndarray, n_in: int, n_out: int, sparsity: float, rng):
  """Constant-fan-in layer: the first k of a random permutation of inputs per output."""
  k = max(1, round((1.0 - sparsity) * n_in))
  idx = np.sort(perm[:, :k], axis=1)  # [N, k]
  mask = np.zeros((n_in, n_out), bool)
  mask[idx.T, np.arange(n_out)[None, :]] = True
  kernel = np.where(mask, rng.standard_normal((n_in, n_out), np.float32), 0).astype(np.float32)
  bias = rng.standard_normal(n_out, np.float32)
  return kernel, mask, bias, k


@jax.jit
def f_dense(x, w, b):
  """Dense baseline ``x @ W + b``."""
  return x @ w + b


@jax.jit
def f_masked(x, w, m, b):
  """Masked dense ``x @ (W * mask) + b``."""
  return x @ (w * m) + b


@jax.jit
def f_native(x, c):
  """Condensed matmul, native C++ kernel."""
  return cd.condensed_matmul(x, c, method="native")


@jax.jit
def f_gather(x, c):
  """Condensed matmul, XLA gather path."""
  return cd.condensed_matmul(x, c, method="gather")


@jax.jit
def f_scatter(x, c):
  """Condensed matmul, dense path without a stored dense copy."""
  return cd.condensed_matmul(x, c, method="dense")


def time_point(fns: dict, rounds: int, rng) -> dict[str, np.ndarray]:
  """Interleaved timing: each round runs every variant once, in shuffled order."""
  per_call = {}
  for name, f in fns.items():  # warm-up (compile) + one timed call to spot slow ones
    f().block_until_ready()
    t = time.perf_counter()
    f().block_until_ready()
    per_call[name] = time.perf_counter() - t
  times: dict[str, list[float]] = {name: [] for name in fns}
  names = list(fns)
  for r in range(rounds):
    rng.shuffle(names)
    for name in names:
      if per_call[name] > SLOW_S and r >= SLOW_ROUNDS:
        continue
      t = time.perf_counter()
      fns[name]().block_until_ready()
      times[name].append(time.perf_counter() - t)
  return {name: np.asarray(v) for name, v in times.items()}


def main(argv=None) -> int:
  """Runs the benchmark and prints the table and the headline; returns the exit code."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="smoke run: one small point")
  p.add_argument("--rounds", type=int, default=None, help="rounds per point")
  p.add_argument("--sizes", default=None, help="e.g. 4096x4096,3072x768 (K x N)")
  p.add_argument("--sparsities", default=None, help="e.g. 0.8,0.9,0.95,0.99")
  p.add_argument("--batches", default=None, help="e.g. 1,8,64")
  p.add_argument("--variants", default="masked,native,gather,scatter")
  args = p.parse_args(argv)

  if args.quick:
    sizes, sparsities, batches, rounds = [(3072, 768)], [0.9], [1, 8], 3
  else:
    sizes, sparsities, batches, rounds = (
      [(4096, 4096), (3072, 768)],
      [0.8, 0.9, 0.95, 0.99],
      [1, 8, 64],
      15,
    )
  if args.sizes:
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
  if args.sparsities:
    sparsities = [float(v) for v in args.sparsities.split(",")]
  if args.batches:
    batches = [int(v) for v in args.batches.split(",")]
  if args.rounds:
    rounds = args.rounds
  variants = [v for v in args.variants.split(",") if v]
  if "native" in variants and not cd.native_available():
    variants.remove("native")

  print("# condensed_inference: condensed (SRigL) vs dense inference, fp32, CPU")
  cli = argv if argv is not None else sys.argv[1:]
  print("command: python " + " ".join([sys.argv[0], *cli]))
  for line in environment():
    print(line)
  print(f"rounds per point: {rounds} (variants > {SLOW_S}s/call: {SLOW_ROUNDS})")
  print()

  header = (
    "| layer K->N | sparsity | k | B | auto picks | dense us | "
    + " | ".join(f"{v} us (x)" for v in variants)
    + " | native GB/s | dense GB/s |"
  )
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  rng = np.random.default_rng(0)
  t_start = time.perf_counter()
  headline = None
  max_err = 0.0
  for n_in, n_out in sizes:
    perm = np.argsort(rng.random((n_out, n_in), np.float32), axis=1)
    for s in sparsities:
      kernel, mask, bias, k = make_layer(perm, n_in, n_out, s, rng)
      c = cd.condense(kernel, mask, bias)
      w, m, b = jnp.asarray(kernel), jnp.asarray(mask), jnp.asarray(bias)
      for batch in batches:
        x = jnp.asarray(rng.standard_normal((batch, n_in), np.float32))
        fns = {"dense": lambda x=x, w=w, b=b: f_dense(x, w, b)}
        if "masked" in variants:
          fns["masked"] = lambda x=x, w=w, m=m, b=b: f_masked(x, w, m, b)
        if "native" in variants:
          fns["native"] = lambda x=x, c=c: f_native(x, c)
        if "gather" in variants:
          fns["gather"] = lambda x=x, c=c: f_gather(x, c)
        if "scatter" in variants:
          fns["scatter"] = lambda x=x, c=c: f_scatter(x, c)
        ref = np.asarray(fns["dense"]())
        for name in fns:
          if name != "dense":
            err = np.abs(np.asarray(fns[name]()) - ref).max() / np.abs(ref).max()
            max_err = max(max_err, float(err))
        times = time_point(fns, rounds, rng)
        med = {name: float(np.median(t)) for name, t in times.items()}
        cells = []
        for v in variants:
          cells.append(f"{med[v] * 1e6:.0f} ({med['dense'] / med[v]:.2f}x)")
        bytes_cond = cd.condensed_nbytes(c) + x.nbytes + 4 * batch * n_out
        bytes_dense = kernel.nbytes + bias.nbytes + x.nbytes + 4 * batch * n_out
        gbs_n = f"{bytes_cond / med['native'] / 1e9:.1f}" if "native" in med else "-"
        gbs_d = f"{bytes_dense / med['dense'] / 1e9:.1f}"
        pick = cd.select_condensed_method(c, batch)
        print(
          f"| {n_in}->{n_out} | {s:.0%} | {k} | {batch} | {pick} | "
          f"{med['dense'] * 1e6:.0f} | " + " | ".join(cells) + f" | {gbs_n} | {gbs_d} |",
          flush=True,
        )
        if (n_in, n_out, s, batch) == (4096, 4096, 0.9, 1) and "native" in med:
          headline = times
  print()
  print(f"max relative error of any variant vs dense: {max_err:.2e}")
  print(f"total time: {time.perf_counter() - t_start:.0f} s")
  if headline is not None:
    td, tn = headline["dense"], headline["native"]
    for name, t in (("dense", td), ("native", tn)):
      print(
        f"4096x4096 90% B=1 {name}: min {t.min() * 1e6:.0f} / median {np.median(t) * 1e6:.0f}"
        f" / max {t.max() * 1e6:.0f} us over {t.size} rounds"
      )
    print(
      f"HEADLINE condensed(native)/dense speedup at 90% sparsity, batch 1, Linear "
      f"4096x4096 fp32: {np.median(td) / np.median(tn):.2f}x (ratio of medians; "
      f"median paired ratio {np.median(td / tn):.2f}x, ratio of minima "
      f"{td.min() / tn.min():.2f}x)"
    )
  else:
    print("HEADLINE (90%, batch 1, 4096x4096 native) not measured in this run")
  return 0


if __name__ == "__main__":
  sys.exit(main())
