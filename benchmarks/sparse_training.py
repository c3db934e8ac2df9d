"""Truly sparse training vs dense and masked-dense: full training-step time and memory.

An MLP ``width -> width -> width -> width -> 10`` (three sparse ``width x width`` layers,
ReLU, a dense 10-way head), Adam, softmax cross-entropy, for hidden widths 1024 and 4096,
batches 1/32/128/256 and sparsities 80/90/95/99% (uniform per layer), three ways in one
process with donated buffers as in real training:

* ``dense``: ``jax.grad`` + ``optax.adam`` on dense kernels;
* ``masked``: ``sj.rigl(optax.adam)`` on dense kernels with masks (the simulation every
  JAX DST library runs; its mask update runs every ΔT steps inside the step);
* ``sparse``: ``sj.sparse.truly_sparse(sj.rigl(optax.adam))`` on values + CSR topology:
  native XLA FFI kernels for forward, dX and dValues; the topology step (dense gradient
  ``xᵀ·dy``, RigL's drop-and-grow, topology rebuild) runs separately every ΔT steps.

A step is forward + backward + optimizer; mask updates are amortized at ΔT = 100:
``(99 · regular + update) / 100``, the update step timed on its own. Repetitions are
interleaved (regular steps together, update steps together) and the table shows medians.
Memory is the bytes of weights + Adam state (masked: + bool masks; sparse: + topology).

The last line is the headline: ``4096 MLP B=128 90% sparse/dense X.XXx; 99%
sparse/masked Y.YYx`` (speedups, higher is better).

Run:  python benchmarks/sparse_training.py            (the full grid, about 30-60 min)
      python benchmarks/sparse_training.py --quick    (4096 / B=128 / 90%, 99%; < 5 min)
      python benchmarks/sparse_training.py --smoke    (width 256, seconds; the smoke test)
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import sparsejax as sj  # noqa: E402

DEPTH = 3
CLASSES = 10
DELTA_T = 100
LAYERS = [f"l{i}" for i in range(DEPTH)]


def init_params(width: int, seed: int = 0) -> dict:
  keys = jax.random.split(jax.random.PRNGKey(seed), DEPTH + 1)
  params = {}
  for i, name in enumerate(LAYERS):
    w = jax.random.normal(keys[i], (width, width), jnp.float32) / np.sqrt(width)
    params[name] = {"kernel": w, "bias": jnp.zeros((width,), jnp.float32)}
  head = jax.random.normal(keys[-1], (width, CLASSES), jnp.float32) / np.sqrt(width)
  params["head"] = {"kernel": head, "bias": jnp.zeros((CLASSES,), jnp.float32)}
  return params


def dense_loss(params, x, y):
  h = x
  for name in LAYERS:
    h = jax.nn.relu(h @ params[name]["kernel"] + params[name]["bias"])
  logits = h @ params["head"]["kernel"] + params["head"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def sparse_loss(params, topos, x, y, probes=None):
  h = x
  for name in LAYERS:
    key = f"{name}/values"
    probe = None if probes is None else probes[key]
    z = sj.sparse.sparse_matmul(
      h, params[name]["values"], topos[key], params[name]["bias"], probe=probe
    )
    h = jax.nn.relu(z)
  logits = h @ params["head"]["kernel"] + params["head"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def masked_method(sparsity: float, update_every: int):
  return sj.rigl(
    optax.adam(1e-3),
    sparsity=sparsity,
    distribution="uniform",
    first_layer="^l0/kernel$",
    last_layer="^head/kernel$",
    keep_last_dense=True,
    update_every=update_every,
    end_step=10**7,
    drop_fraction=0.3,
  )


# ---------------------------------------------------------------------------------------
# Step functions (state carried and donated, as in training).
# ---------------------------------------------------------------------------------------


def make_dense(params):
  tx = optax.adam(1e-3)
  params = jax.tree.map(jnp.copy, params)  # donated: keep the caller's arrays

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, x, y):
    loss, g = jax.value_and_grad(dense_loss)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  return step, [params, tx.init(params)]


def make_masked(params, sparsity: float, update_every: int):
  tx = masked_method(sparsity, update_every)
  state = tx.init(params)
  params = jax.tree.map(jnp.copy, sj.apply_masks(params, state))  # donated below

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, x, y):
    loss, g = jax.value_and_grad(dense_loss)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  if update_every == 1:  # count 0 is never an update step: make the timed calls updates.
    params, state, _ = step(params, state, *_batch(1, params["l0"]["kernel"].shape[0]))
  return step, [params, state]


def make_sparse(params, sparsity: float):
  tx = sj.sparse.truly_sparse(masked_method(sparsity, DELTA_T))
  masks = tx.masked.init(params).masks
  sparams, topos = {"head": jax.tree.map(jnp.copy, params["head"])}, {}
  for name in LAYERS:
    csr = sj.sparse.SparseCSR.from_dense(params[name]["kernel"], masks[name]["kernel"])
    sparams[name] = {"values": csr.values, "bias": jnp.copy(params[name]["bias"])}
    topos[f"{name}/values"] = csr.topology
  state = tx.init(sparams)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, t, x, y):
    loss, g = jax.value_and_grad(sparse_loss)(p, t, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def topology_step(p, s, t, x, y):
    probes = {k: jnp.zeros((v.n_in, v.n_out), jnp.float32) for k, v in t.items()}
    loss, (g, dense) = jax.value_and_grad(sparse_loss, argnums=(0, 4))(p, t, x, y, probes)
    upd = sj.sparse.update_topology(tx, s, p, g, t, dense)
    u, s = tx.update(upd.grads, upd.opt_state, upd.params, sparse_slots=upd.sparse_slots)
    return optax.apply_updates(upd.params, u), s, upd.topologies, loss

  return step, topology_step, [sparams, state, topos]


def _batch(batch: int, width: int, seed: int = 1):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (batch, width), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, CLASSES)
  return x, y


def _runner(step, state: list, batch):
  """A blocking closure that runs one step and carries the (donated) state."""

  def run():
    *new, loss = step(*state, *batch)
    state[: len(new)] = new
    jax.block_until_ready(loss)

  return run


# ---------------------------------------------------------------------------------------
# One (width, batch) group: dense and masked once, sparse per sparsity.
# ---------------------------------------------------------------------------------------


def run_group(width: int, batch: int, sparsities, rounds: int, update_rounds: int) -> list[dict]:
  params = init_params(width)
  data = _batch(batch, width)
  regular, updates, nbytes = {}, {}, {}
  dense_step, dense_state = make_dense(params)
  regular["dense"] = _runner(dense_step, dense_state, data)
  nbytes["dense"] = sj.sparse.tree_nbytes(dense_state)
  # Masked: its mask update costs the same at any sparsity; time it at the first one.
  m_step, m_state = make_masked(params, sparsities[0], DELTA_T)
  regular["masked"] = _runner(m_step, m_state, data)
  mu_step, mu_state = make_masked(params, sparsities[0], 1)
  updates["masked_update"] = _runner(mu_step, mu_state, data)
  for s in sparsities:
    mb_state = make_masked(params, s, DELTA_T)[1]
    nbytes[f"masked{s}"] = sj.sparse.tree_nbytes(mb_state)
    step, topo_step, state = make_sparse(params, s)
    nbytes[f"sparse{s}"] = sj.sparse.tree_nbytes(state)
    nbytes[f"values{s}"] = sj.sparse.tree_nbytes(state[:2])
    regular[f"sparse{s}"] = _runner(step, state, data)
    updates[f"sparse{s}_update"] = _runner(topo_step, state, data)
  t_reg = _common.interleaved(regular, rounds=rounds, warmup=1)
  t_upd = _common.interleaved(updates, rounds=update_rounds, warmup=1)
  med = {k: _common.med(v) for k, v in {**t_reg, **t_upd}.items()}
  dense = med["dense"]
  masked = ((DELTA_T - 1) * med["masked"] + med["masked_update"]) / DELTA_T
  rows = []
  for s in sparsities:
    key = f"sparse{s}"
    sparse = ((DELTA_T - 1) * med[key] + med[f"{key}_update"]) / DELTA_T
    rows.append(
      dict(
        width=width,
        batch=batch,
        sparsity=s,
        dense_ms=dense * 1e3,
        masked_ms=masked * 1e3,
        sparse_ms=sparse * 1e3,
        masked_step_ms=med["masked"] * 1e3,
        sparse_step_ms=med[key] * 1e3,
        sparse_update_ms=med[f"{key}_update"] * 1e3,
        masked_update_ms=med["masked_update"] * 1e3,
        vs_dense=dense / sparse,
        vs_masked=masked / sparse,
        mem_dense=nbytes["dense"],
        mem_masked=nbytes[f"masked{s}"],
        mem_sparse=nbytes[key],
        mem_values=nbytes[f"values{s}"],
      )
    )
  return rows


def print_rows(rows: list[dict]) -> None:
  print(
    f"{'width':>6} {'B':>4} {'S':>5} | {'dense':>8} {'masked':>8} {'sparse':>8} | "
    f"{'sp step':>8} {'sp upd':>8} {'m upd':>8} | {'x dense':>7} {'x mask':>7} | "
    f"{'mem/dense':>9} {'(no topo)':>9} {'masked':>7}"
  )
  for r in rows:
    print(
      f"{r['width']:>6} {r['batch']:>4} {r['sparsity'] * 100:>4.0f}% | "
      f"{r['dense_ms']:>8.2f} {r['masked_ms']:>8.2f} {r['sparse_ms']:>8.2f} | "
      f"{r['sparse_step_ms']:>8.2f} {r['sparse_update_ms']:>8.1f} {r['masked_update_ms']:>8.1f} | "
      f"{r['vs_dense']:>6.2f}x {r['vs_masked']:>6.2f}x | "
      f"{r['mem_sparse'] / r['mem_dense']:>9.3f} {r['mem_values'] / r['mem_dense']:>9.3f} "
      f"{r['mem_masked'] / r['mem_dense']:>7.3f}",
      flush=True,
    )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="4096 / B=128 / 90%% and 99%% only")
  parser.add_argument(
    "--smoke", action="store_true", help="a seconds-long run at width 256 (for the tests)"
  )
  parser.add_argument("--rounds", type=int, default=None, help="regular-step repetitions")
  args = parser.parse_args(argv)
  print(_common.environment())
  print(
    f"sparse kernels: native={sj.sparse.native_available()} isa={sj.sparse.native_cpu_isa()} "
    f"(times in ms per training step; mask updates amortized at ΔT={DELTA_T})"
  )
  if args.smoke:
    grid = [(256, 32, (0.9, 0.99))]
    rounds, update_rounds = args.rounds or 2, 1
  elif args.quick:
    grid = [(4096, 128, (0.9, 0.99))]
    rounds, update_rounds = args.rounds or 5, 2
  else:
    sparsities = (0.8, 0.9, 0.95, 0.99)
    grid = [(w, b, sparsities) for w in (1024, 4096) for b in (1, 32, 128, 256)]
    rounds, update_rounds = args.rounds or 9, 3
  t0 = time.monotonic()
  rows = []
  print_rows([])
  for width, batch, sparsities in grid:
    group = run_group(width, batch, sparsities, rounds, update_rounds)
    print_rows(group)
    rows += group
  print(f"({time.monotonic() - t0:.0f} s)")
  by_key = {(r["width"], r["batch"], r["sparsity"]): r for r in rows}
  width, batch = (256, 32) if args.smoke else (4096, 128)
  r90, r99 = by_key[(width, batch, 0.9)], by_key[(width, batch, 0.99)]
  print(
    f"memory at 90%: weights + Adam state + topology {r90['mem_sparse'] / r90['mem_dense']:.3f}x "
    f"dense ({r90['mem_values'] / r90['mem_dense']:.3f}x without the topology)"
  )
  print(
    f"headline: {width} MLP B={batch} 90% sparse/dense {r90['vs_dense']:.2f}x; "
    f"99% sparse/masked {r99['vs_masked']:.2f}x"
  )


if __name__ == "__main__":
  main()
