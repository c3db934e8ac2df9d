"""Time of one mask update alone, per layer size, for RigL, SET and SRigL.

One sparse layer (90% sparsity) of 1024², 4096², 8192² and a 3×3×512×512 conv kernel: the
jitted ``tx.update`` at a mask-update step minus the same call at a normal step (median of
interleaved repetitions), the growth exponent of the cost with layer size, and the memory
high-water mark: XLA's temporary buffer size for the update step and the process's peak RSS.

Run:  python benchmarks/mask_update.py           (about 3 minutes on 2 cores)
      python benchmarks/mask_update.py --quick   (1024² and 2048² only)
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import sparsejax as sj  # noqa: E402

METHODS = {"rigl": sj.rigl, "set": sj.set_, "srigl": sj.srigl}


def bench_layer(shape, method, rounds):
  tx = (
    METHODS[method](
      optax.sgd(0.01, momentum=0.9),
      sparsity=0.9,
      update_every=100,
      end_step=10**6,
      keep_last_dense=False,
      no_ablation="$^",
    )
    if method == "srigl"
    else METHODS[method](
      optax.sgd(0.01, momentum=0.9), sparsity=0.9, update_every=100, end_step=10**6
    )
  )
  key = jax.random.PRNGKey(0)
  params = {"w": jax.random.normal(key, shape)}
  state = tx.init(params)
  params = sj.apply_masks(params, state)
  grads = {"w": jax.random.normal(jax.random.PRNGKey(1), shape)}
  update = jax.jit(tx.update)
  compiled = update.lower(grads, state, params).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
  s_update = state._replace(count=jnp.int32(100))
  s_normal = state._replace(count=jnp.int32(1))
  times = _common.interleaved(
    {
      "update": lambda: _common.block(compiled(grads, s_update, params)),
      "normal": lambda: _common.block(compiled(grads, s_normal, params)),
    },
    rounds=rounds,
    warmup=1,
  )
  return (
    _common.med(times["update"]) - _common.med(times["normal"]),
    _common.med(times["normal"]),
    temp,
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  print(_common.environment())
  shapes = (
    [(1024, 1024), (2048, 2048)]
    if args.quick
    else [(1024, 1024), (4096, 4096), (8192, 8192), (3, 3, 512, 512)]
  )
  print(f"{'layer':<18} {'method':<6} {'mask update':>12} {'normal step':>12} {'XLA temp':>10}")
  results = {}
  for shape in shapes:
    size = math.prod(shape)
    rounds = 7 if size <= 2**22 else 3
    for method in METHODS:
      dt, normal, temp = bench_layer(shape, method, rounds)
      results[(shape, method)] = dt
      print(
        f"{'x'.join(map(str, shape)):<18} {method:<6} {dt * 1e3:10.1f}ms {normal * 1e3:10.1f}ms "
        f"{temp / 2**20:8.0f}MB",
        flush=True,
      )
  print(
    f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB"
  )
  square = [s for s in shapes if len(s) == 2]
  for method in METHODS:
    a, b = square[0], square[-1]
    ta, tb = results[(a, method)], results[(b, method)]
    exponent = math.log(tb / ta) / math.log(math.prod(b) / math.prod(a))
    print(f"{method}: cost grows as size^{exponent:.2f} from {a[0]}² to {b[0]}²")
  big = (4096, 4096) if (4096, 4096) in shapes else square[-1]
  print(
    f"headline: RigL mask update of a {big[0]}x{big[1]} layer: {results[(big, 'rigl')] * 1e3:.0f} ms"
  )


if __name__ == "__main__":
  main()
