"""DST overhead on a jitted train step: plain Optax vs static/SET/RigL/SRigL at 90% sparsity.

For an MLP (784-1024-1024-1024-10, batch 128) and a small CNN, in one process, with
donated buffers as in real training, interleaved repetitions (A B C ...), median of many:

  (a) normal step / dense step           (target <= 1.05x)
  (b) mask-update step / dense step
  (c) amortized overhead at ΔT = 100:  (99·normal + update) / (100·dense) - 1   (target <= 3%)
  (d) the compile time of each jitted step (SRigL vs RigL in the headline)

Run:  python benchmarks/dst_step.py            (about 2-4 minutes on 2 cores)
      python benchmarks/dst_step.py --quick    (smoke run)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import sparsejax as sj  # noqa: E402


def mlp_model(quick: bool):
  width = 256 if quick else 1024
  sizes = [784, width, width, width, 10]
  key = jax.random.PRNGKey(0)
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    key, sub = jax.random.split(key)
    params[f"dense{i}"] = {
      "kernel": jax.random.normal(sub, (a, b)) / jnp.sqrt(a),
      "bias": jnp.zeros(b),
    }

  def apply(p, x):
    h = x
    for i in range(len(sizes) - 1):
      h = h @ p[f"dense{i}"]["kernel"] + p[f"dense{i}"]["bias"]
      if i < len(sizes) - 2:
        h = jax.nn.relu(h)
    return h

  x = jax.random.normal(jax.random.PRNGKey(1), (128, 784))
  return params, apply, x


def cnn_model(quick: bool):
  side = 16 if quick else 28
  key = jax.random.split(jax.random.PRNGKey(2), 4)
  params = {
    "conv0": {"kernel": jax.random.normal(key[0], (3, 3, 1, 32)) / 3.0, "bias": jnp.zeros(32)},
    "conv1": {"kernel": jax.random.normal(key[1], (3, 3, 32, 64)) / 17.0, "bias": jnp.zeros(64)},
    "dense0": {
      "kernel": jax.random.normal(key[2], ((side // 4) ** 2 * 64, 256)) / 40.0,
      "bias": jnp.zeros(256),
    },
    "dense1": {"kernel": jax.random.normal(key[3], (256, 10)) / 16.0, "bias": jnp.zeros(10)},
  }

  def conv(h, p):
    y = jax.lax.conv_general_dilated(
      h, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    y = jax.nn.relu(y + p["bias"])
    return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

  def apply(p, x):
    h = conv(conv(x, p["conv0"]), p["conv1"])
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ p["dense0"]["kernel"] + p["dense0"]["bias"])
    return h @ p["dense1"]["kernel"] + p["dense1"]["bias"]

  x = jax.random.normal(jax.random.PRNGKey(3), (128 if not quick else 32, side, side, 1))
  return params, apply, x


def make_step(tx, apply, x, y):
  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return jax.jit(step, donate_argnums=(0, 1))


def bench_model(name, model_fn, quick, rounds, last_layer):
  params, apply, x = model_fn(quick)
  y = jax.random.randint(jax.random.PRNGKey(4), (x.shape[0],), 0, 10)
  inner = lambda: optax.sgd(0.01, momentum=0.9)  # noqa: E731
  kw = dict(sparsity=0.9, update_every=100, end_step=10**6)
  methods = {
    "dense": inner(),
    "static": sj.static_sparse(inner(), sparsity=0.9),
    "set": sj.set_(inner(), **kw),
    "rigl": sj.rigl(inner(), **kw),
    "srigl": sj.srigl(inner(), last_layer=last_layer, **kw),
  }
  runners, compile_s, kernels = {}, {}, {}
  calls = rounds + 8  # warm-up and timed calls of one runner, with room to spare
  for mname, tx in methods.items():
    state = {"p": jax.tree.map(jnp.copy, params), "s": tx.init(params)}
    t0 = time.perf_counter()
    step = make_step(tx, apply, x, y).lower(state["p"], state["s"]).compile()
    compile_s[mname] = time.perf_counter() - t0
    # XLA kernels (fusions) and while loops of the compiled step: what compile time and
    # compile-time memory grow with.
    text = step.as_text()
    kernels[mname] = (text.count(" fusion("), text.count(" while("))
    # The step counter is set before each call (1: a normal step, 100: a mask update). The
    # counters are made and committed to the device before timing: a scalar made inside the
    # timed call (`jnp.int32(count)`) cost ~0.4 ms per call here (2.5-3% of the dense
    # step), charged to the DST rows only, while a training loop passes the counter its
    # previous step returned. Donation consumes each counter, so there is one per call.
    counts = (
      {c: [_common.on_device(c) for _ in range(calls)] for c in (1, 100)}
      if mname != "dense"
      else None
    )

    def run(count, step=step, state=state, counts=counts):
      s = state["s"]
      if counts is not None:
        s = s._replace(count=counts[count].pop())
      state["p"], state["s"] = step(state["p"], s)
      _common.block(state["p"])

    runners[mname] = run
  # Two interleaved groups: normal steps with dense, then update steps with dense. Mixing
  # both in one round lets every big update step (which frees and re-allocates hundreds of
  # MB) slow down whatever runs next; in training a normal step follows an update step once
  # per ΔT steps, not every time.
  dense_fn = lambda: runners["dense"](0)  # noqa: E731
  normal_fns = {"dense": dense_fn}
  update_fns = {"dense": dense_fn}
  for mname in methods:
    if mname == "dense":
      continue
    normal_fns[f"{mname}:normal"] = lambda r=runners[mname]: r(1)
    if mname != "static":
      update_fns[f"{mname}:update"] = lambda r=runners[mname]: r(100)
  normal_times = _common.interleaved(normal_fns, rounds=rounds, warmup=3)
  update_times = _common.interleaved(update_fns, rounds=max(3, rounds // 4), warmup=1, seed=1)
  times = {**update_times, **normal_times}
  dense = _common.med(normal_times["dense"])
  dense_upd = _common.med(update_times["dense"])
  print(f"\n{name}: dense step median {dense * 1e3:.2f} ms (min {min(times['dense']) * 1e3:.2f})")
  print(
    f"{'method':<8} {'normal/dense':>13} {'update/dense':>13} {'amortized ΔT=100':>17} "
    f"{'compile s':>10} {'kernels':>8} {'loops':>6}"
  )
  rows = {}
  for mname in methods:
    if mname == "dense":
      continue
    normal = _common.med(times[f"{mname}:normal"]) / dense
    update = (
      _common.med(times[f"{mname}:update"]) / dense_upd if f"{mname}:update" in times else None
    )
    amort = (99 * normal + (update if update is not None else normal)) / 100 - 1
    rows[mname] = (normal, update, amort, compile_s[mname])
    upd = f"{update:13.2f}" if update is not None else f"{'-':>13}"
    print(
      f"{mname:<8} {normal:13.3f} {upd} {amort * 100:16.1f}% {compile_s[mname]:10.2f} "
      f"{kernels[mname][0]:8d} {kernels[mname][1]:6d}"
    )
  print(
    f"{'dense':<8} {'':>13} {'':>13} {'':>17} {compile_s['dense']:10.2f} "
    f"{kernels['dense'][0]:8d} {kernels['dense'][1]:6d}"
  )
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="small models, few rounds (smoke run)")
  ap.add_argument("--rounds", type=int, default=None)
  args = ap.parse_args()
  rounds = args.rounds or (5 if args.quick else 40)
  print(_common.environment())
  mlp = bench_model(
    "MLP 784-3x1024-10, batch 128, SGD momentum, 90% ERK", mlp_model, args.quick, rounds, None
  )
  bench_model(
    "CNN 2 conv + 2 dense, batch 128, SGD momentum, 90% ERK",
    cnn_model,
    args.quick,
    rounds,
    "^dense1/",
  )
  n, u, a, c = mlp["rigl"]
  print(
    f"\nheadline: MLP RigL normal step {n:.3f}x dense, update step {u:.1f}x, amortized "
    f"overhead at ΔT=100 {a * 100:.1f}%; SRigL step compiles in {mlp['srigl'][3] / c:.2f}x "
    "RigL's time"
  )


if __name__ == "__main__":
  main()
