"""Sharded DST: step time and mask-update time on 1 vs 8 (fake CPU) devices.

For overhead visibility, not speed: the 8 "devices" are XLA's fake host devices
(``--xla_force_host_platform_device_count=8``) sharing the same CPU cores, so the sharded
step runs the same total work plus the partitioning and collective overhead. Two child
processes, one per device count (the flag must be set before JAX starts):

* 1 device: ``jax.jit`` of the train step, no mesh;
* 8 devices: a 2×4 ``("data", "fsdp")`` mesh (Auto axes), FSDP param specs
  (``sparsejax.sharding.fsdp_param_specs``, largest divisible axis), batch sharded over both axes,
  ``jax.jit(step, in_shardings=..., out_shardings=...)`` with optimizer-state shardings from
  ``sparsejax.sharding.opt_state_shardings``.

Per method: the median time of a normal step and of a mask-update step (the same compiled
step fed a state whose count is a normal or an update step; interleaved rounds), their
difference (the mask update alone), and the compile time. The 8-device child also compiles
one mask update (``structure.drop_and_grow``) of a single layer sharded along ``in`` or
``out`` on an 8-device mesh and counts the collectives in the optimized HLO: which axis
keeps each structure's selection local (docs/SHARDING.md).

Run:  python benchmarks/sharded_step.py           (MLP 512-2048-2048-16, batch 256; ~10 min)
      python benchmarks/sharded_step.py --quick   (MLP 128-512-512-16, batch 64; RigL, SRigL)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2}


def _shape_bytes(shape_text: str) -> int:
  """Bytes of an HLO result type such as ``s32[1,65536]{1,0}`` or a tuple of them."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES.get(dtype, 4 if dtype[-2:] in ("32",) else 8 if "64" in dtype else 4)
  return total


def count_collectives(hlo_text: str) -> dict:
  """Static count and result bytes of each collective kind in optimized HLO text.

  Collectives in ``conditional`` branches (which run only when taken) are counted apart
  under ``"branch"``; collectives inside ``while`` bodies (the selections' radix passes and
  column-chunk loops) are counted once (``in_loops`` says how many are), so a count is per
  loop iteration.
  """
  bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo_text))
  branches = set(re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", hlo_text))
  for m in re.finditer(r"branch_computations=\{([^}]*)\}", hlo_text):
    branches |= {b.strip().lstrip("%") for b in m.group(1).split(",")}
  current = None
  out = {k: {"n": 0, "bytes": 0} for k in (*_COLLECTIVES, "branch")}
  in_loops = 0
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if m and "=" not in line.split("{")[0]:
      current = m.group(1)
      continue
    for kind in _COLLECTIVES:
      m = re.search(rf"=\s*(.*?)\s{kind}(?:-start)?\(", line)
      if m:
        key = "branch" if current in branches else kind
        out[key]["n"] += 1
        out[key]["bytes"] += _shape_bytes(m.group(1))
        in_loops += current in bodies
        break
  out["in_loops"] = in_loops
  return out


# ----------------------------------------------------------------------------------------
# Child: runs under a fixed device count.
# ----------------------------------------------------------------------------------------


def child(args) -> None:
  sys.path.insert(0, str(HERE))
  sys.path.insert(0, str(ROOT))
  import _common
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import sparsejax as sj

  n_dev = jax.device_count()
  sizes = tuple(int(s) for s in args.sizes.split(","))
  batch = args.batch
  update_every = 100

  methods = {
    "rigl": lambda: sj.rigl(
      optax.adam(1e-3), sparsity=0.9, update_every=update_every, end_step=10**6
    ),
    "set": lambda: sj.set_(
      optax.adam(1e-3), sparsity=0.9, update_every=update_every, end_step=10**6
    ),
    "srigl": lambda: sj.srigl(
      optax.adam(1e-3), sparsity=0.9, update_every=update_every, end_step=10**6
    ),
    "rigl_nm24": lambda: sj.rigl(
      optax.adam(1e-3), structure=sj.NM(2, 4), update_every=update_every, end_step=10**6
    ),
  }

  def make_params():
    key = jax.random.PRNGKey(0)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
      key, sub = jax.random.split(key)
      params[f"layer{i}"] = {
        "kernel": jax.random.normal(sub, (a, b)) / np.sqrt(a),
        "bias": jnp.zeros(b),
      }
    return params

  def loss(params, x, y):
    h = x
    n = len(sizes) - 1
    for i in range(n):
      h = h @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"]
      if i < n - 1:
        h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  x = jax.random.normal(kx, (batch, sizes[0]))
  y = jax.random.randint(ky, (batch,), 0, sizes[-1])

  results = {"devices": n_dev, "environment": _common.environment(), "methods": {}}
  for name in args.methods.split(","):
    tx = methods[name]()
    params = make_params()

    def step(p, s, xb, yb, tx=tx):
      g = jax.grad(loss)(p, xb, yb)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    if n_dev == 1:
      state = tx.init(params)
      params = sj.apply_masks(params, state)
      rep = None
      jitted = jax.jit(step)
      xb, yb = x, y
    else:
      mesh = jax.make_mesh((2, n_dev // 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
      psh = sj.sharding.named_shardings(
        mesh, sj.sharding.fsdp_param_specs(params, mesh, axis="fsdp")
      )
      params = jax.device_put(params, psh)
      state = sj.sharding.shard_dst_init(tx, params, psh)
      params = sj.apply_masks(params, state)
      ssh = sj.sharding.opt_state_shardings(tx, state, psh)
      bsh = NamedSharding(mesh, P(("data", "fsdp")))
      rep = NamedSharding(mesh, P())
      jitted = jax.jit(step, in_shardings=(psh, ssh, bsh, bsh), out_shardings=(psh, ssh))
      xb, yb = jax.device_put(x, bsh), jax.device_put(y, bsh)
    t0 = time.perf_counter()
    compiled = jitted.lower(params, state, xb, yb).compile()
    compile_s = time.perf_counter() - t0

    def with_count(c, state=state, rep=rep):
      count = jnp.int32(c) if rep is None else jax.device_put(jnp.int32(c), rep)
      return state._replace(count=count)

    s_update, s_normal = with_count(update_every), with_count(1)
    times = _common.interleaved(
      {
        "update": lambda c=compiled, s=s_update, p=params: _common.block(c(p, s, xb, yb)),
        "normal": lambda c=compiled, s=s_normal, p=params: _common.block(c(p, s, xb, yb)),
      },
      rounds=args.rounds,
      warmup=2,
    )
    normal, update = _common.med(times["normal"]), _common.med(times["update"])
    results["methods"][name] = {
      "step_ms": normal * 1e3,
      "update_step_ms": update * 1e3,
      "mask_update_ms": (update - normal) * 1e3,
      "compile_s": compile_s,
    }
    print(f"[{n_dev} dev] {name}: done", file=sys.stderr, flush=True)

  if n_dev > 1:
    results["comm"] = communication(args, n_dev)
  print("RESULT " + json.dumps(results), flush=True)


def communication(args, n_dev: int) -> dict:
  """Collectives and time of one mask update of one layer, sharded along `in` or `out`.

  Runs in the child (imports after the parent set the device count).
  """
  import _common
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import sparsejax as sj

  mesh = jax.make_mesh((n_dev,), ("x",), axis_types=(AxisType.Auto,))
  layer = tuple(int(s) for s in args.layer.split("x"))
  conv = tuple(int(s) for s in args.conv.split("x"))
  comm = {}
  cases = [
    (sname, structure, layer, axis_name)
    for sname, structure in (
      ("unstructured", sj.Unstructured()),
      ("fan_in", sj.ConstantFanIn()),
      ("nm24", sj.NM(2, 4)),
    )
    for axis_name in ("in", "out")
  ]
  cases += [
    (f"conv {sname}", structure, conv, "in")
    for sname, structure in (("unstructured", sj.Unstructured()), ("fan_in", sj.ConstantFanIn()))
  ]
  for sname, structure, shape, axis_name in cases:
    sparsity = 0.5 if sname == "nm24" else 0.9
    # sharded along `in` (second to last axis) or `out` (the last)
    spec = [None] * len(shape)
    spec[-2 if axis_name == "in" else -1] = "x"
    sh = NamedSharding(mesh, P(*spec))

    def update(mask, w, g, structure=structure, sparsity=sparsity):
      n_drop = jnp.floor(jnp.sum(mask, dtype=jnp.int32) * 0.3).astype(jnp.int32)
      ctx = sj.ScoreContext(w, g, mask, jax.random.PRNGKey(0), 0, "w", (), sparsity)
      return structure.drop_and_grow(ctx, jnp.abs(w), jnp.abs(g), n_drop)

    f = jax.jit(update, in_shardings=(sh, sh, sh), out_shardings=sh)
    mask = structure.random_mask(jax.random.PRNGKey(0), shape, sparsity)
    w = jax.random.normal(jax.random.PRNGKey(1), shape) * mask
    g = jax.random.normal(jax.random.PRNGKey(2), shape)
    compiled = f.lower(mask, w, g).compile()
    counts = count_collectives(compiled.as_text())
    args_on = [jax.device_put(a, sh) for a in (mask, w, g)]
    t = _common.interleaved(
      {"u": lambda c=compiled, a=args_on: _common.block(c(*a))}, rounds=args.rounds
    )
    comm[f"{sname}/{axis_name}"] = {**counts, "ms": _common.med(t["u"]) * 1e3}
  return {"layer": list(layer), "conv": list(conv), "mesh": n_dev, "structures": comm}


# ----------------------------------------------------------------------------------------
# Parent: one child per device count, then the tables.
# ----------------------------------------------------------------------------------------


def _loadavg() -> str:
  try:
    with open("/proc/loadavg") as f:
      return f.read().split()[0]
  except OSError:
    return "n/a"


def run_child(n_dev: int, argv: list[str]) -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  if n_dev > 1:
    flags.append(f"--xla_force_host_platform_device_count={n_dev}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  proc = subprocess.run(
    [sys.executable, __file__, "--child", *argv], env=env, capture_output=True, text=True
  )
  sys.stderr.write(proc.stderr[-2000:] if proc.returncode else "")
  if proc.returncode:
    raise SystemExit(f"child with {n_dev} device(s) failed (rc={proc.returncode})")
  line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
  return json.loads(line[len("RESULT ") :])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--sizes", default=None, help="MLP widths, e.g. 512,2048,2048,16")
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--methods", default=None, help="comma list of rigl,set,srigl,rigl_nm24")
  ap.add_argument("--rounds", type=int, default=None)
  ap.add_argument("--layer", default=None, help="layer of the communication table, e.g. 1024x1024")
  ap.add_argument("--conv", default=None, help="conv kernel of the table, e.g. 3x3x256x256")
  ap.add_argument("--devices", type=int, default=8)
  args = ap.parse_args()
  defaults = (
    dict(
      sizes="128,512,512,16",
      batch=64,
      methods="rigl,srigl",
      rounds=7,
      layer="512x512",
      conv="3x3x64x64",
    )
    if args.quick
    else dict(
      sizes="512,2048,2048,16",
      batch=256,
      methods="rigl,set,srigl,rigl_nm24",
      rounds=15,
      layer="2048x2048",
      conv="3x3x256x256",
    )
  )
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.child:
    child(args)
    return
  argv = [
    f"--sizes={args.sizes}",
    f"--batch={args.batch}",
    f"--methods={args.methods}",
    f"--rounds={args.rounds}",
    f"--layer={args.layer}",
    f"--conv={args.conv}",
  ]
  t0 = time.perf_counter()
  load_before = _loadavg()
  one = run_child(1, argv)
  many = run_child(args.devices, argv)
  print(one["environment"])
  print(f"load average (1 min) before/after: {load_before} / {_loadavg()} (shared machine)")
  print(
    f"MLP {args.sizes}, batch {args.batch}, sparsity 0.9 (N:M 2:4), Adam; "
    f"{args.devices} devices = 2x{args.devices // 2} ('data','fsdp') mesh, fake CPU devices"
  )
  print()
  hdr = (
    f"{'method':<10} {'step 1dev':>10} {'step 8dev':>10} {'ratio':>6} "
    f"{'mask upd 1dev':>14} {'mask upd 8dev':>14} {'compile 1/8':>12}"
  )
  print(hdr.replace("8dev", f"{args.devices}dev"))
  print("-" * len(hdr))
  for name in one["methods"]:
    a, b = one["methods"][name], many["methods"][name]
    print(
      f"{name:<10} {a['step_ms']:>8.2f}ms {b['step_ms']:>8.2f}ms "
      f"{b['step_ms'] / a['step_ms']:>5.2f}x {a['mask_update_ms']:>12.2f}ms "
      f"{b['mask_update_ms']:>12.2f}ms {a['compile_s']:>5.1f}/{b['compile_s']:<5.1f}s"
    )
  comm = many.get("comm")
  if comm:
    print()
    print(
      f"One mask update (drop_and_grow) of a {'x'.join(map(str, comm['layer']))} [in, out] "
      f"layer (f32 scores {comm['layer'][0] * comm['layer'][1] * 4 / 2**20:.1f} MiB; 'conv': a "
      f"{'x'.join(map(str, comm['conv']))} [h, w, in, out] kernel) on a "
      f"{comm['mesh']}-device mesh: collectives in the optimized HLO (count, result bytes; one "
      "per loop body: a collective inside a loop runs once per iteration); 'in cond': inside "
      "a conditional branch"
    )
    hdr2 = (
      f"{'structure/sharded axis':<24} {'all-reduce':>16} {'all-gather':>16} {'other':>6} "
      f"{'in cond':>17} {'ms':>8}"
    )
    print(hdr2)
    print("-" * len(hdr2))
    for key, c in comm["structures"].items():
      other = sum(c[k]["n"] for k in ("all-to-all", "collective-permute", "reduce-scatter"))
      ar, ag, br = c["all-reduce"], c["all-gather"], c["branch"]
      print(
        f"{key:<24} {ar['n']:>4} ({ar['bytes'] / 1024:>7.1f}KiB) {ag['n']:>4} "
        f"({ag['bytes'] / 1024:>7.1f}KiB) {other:>6} {br['n']:>4} ({br['bytes'] / 1024:>7.1f}KiB)"
        f" {c['ms']:>8.2f}"
      )
  ratios = [many["methods"][n]["step_ms"] / one["methods"][n]["step_ms"] for n in one["methods"]]
  upd = [many["methods"][n]["mask_update_ms"] for n in one["methods"]]
  upd1 = [one["methods"][n]["mask_update_ms"] for n in one["methods"]]
  print()
  print(
    f"HEADLINE: {args.devices} fake CPU devices vs 1: step time x{min(ratios):.2f}-"
    f"{max(ratios):.2f}; mask update {min(upd):.1f}-{max(upd):.1f} ms vs "
    f"{min(upd1):.1f}-{max(upd1):.1f} ms on 1 device (same total work on the same cores: "
    f"this is partitioning/collective overhead, not a speedup measurement); "
    f"{time.perf_counter() - t0:.0f} s"
  )


if __name__ == "__main__":
  main()
