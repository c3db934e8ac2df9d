"""Eager (un-jitted) use: ``tx.update`` and ``tx.init`` called from Python, step by step.

Notebooks, quick scripts and the README's plain-pytree snippet call the transformation
eagerly. ``update`` then runs a compiled copy of itself (compiled once per tree structure
and shapes), so every call after the first costs about what a jitted step costs. Measured:
RigL wrapping Adam on one 64x64 layer (normal and mask-update steps), next to plain
``optax.adam`` eagerly, and 200 eager steps of the README's custom-rule example.

Run:  python benchmarks/eager_update.py            (about 30 seconds)
      python benchmarks/eager_update.py --quick    (smoke run)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import sparsejax as sj  # noqa: E402


def _median_ms(fn, calls: int) -> float:
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer calls")
  args = parser.parse_args()
  calls = 10 if args.quick else 50
  print(_common.environment())
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (64, 64))}
  grads = {"w": jax.random.normal(jax.random.PRNGKey(1), (64, 64))}
  tx = sj.rigl(optax.adam(1e-3), sparsity=0.9, update_every=10, end_step=1000)
  t0 = time.perf_counter()
  state = tx.init(params)
  jax.block_until_ready(state)
  first_init = (time.perf_counter() - t0) * 1e3
  t0 = time.perf_counter()
  jax.block_until_ready(tx.update(grads, state, params))
  first_update = (time.perf_counter() - t0) * 1e3
  init_ms = _median_ms(lambda: tx.init(params), calls)
  normal_ms = _median_ms(
    lambda: tx.update(grads, state._replace(count=jnp.int32(1)), params), calls
  )
  update_ms = _median_ms(
    lambda: tx.update(grads, state._replace(count=jnp.int32(10)), params), calls
  )
  adam = optax.adam(1e-3)
  adam_state = adam.init(params)
  adam_ms = _median_ms(lambda: adam.update(grads, adam_state, params), calls)
  print(f"RigL(Adam), one 64x64 layer, eager, median of {calls} calls after the first:")
  print(f"  first init {first_init:8.1f} ms   then {init_ms:7.2f} ms")
  print(
    f"  first update {first_update:6.1f} ms   normal step {normal_ms:7.2f} ms   "
    f"mask-update step {update_ms:7.2f} ms"
  )
  print(f"  optax.adam alone, eager: {adam_ms:7.2f} ms")

  def custom(ctx):  # the README's custom rule
    return jnp.abs(ctx.grad) + jnp.abs(ctx.inner_moments[0])

  tx2 = sj.dynamic_sparse(
    optax.adam(1e-3), sparsity=0.95, end_step=150, update_every=20, grow=custom
  )
  state2 = tx2.init(params)
  steps = 50 if args.quick else 200
  t0 = time.perf_counter()
  p = params
  for _ in range(steps):
    u, state2 = tx2.update(grads, state2, p)
    p = optax.apply_updates(p, u)
  jax.block_until_ready(p)
  print(f"  README custom rule, {steps} eager steps: {time.perf_counter() - t0:.2f} s")
  print(
    f"headline: eager RigL(Adam) update after the first call {normal_ms:.1f} ms "
    f"(mask-update step {update_ms:.1f} ms)"
  )


if __name__ == "__main__":
  main()
