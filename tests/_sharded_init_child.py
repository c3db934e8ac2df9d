"""Child process of ``tests/sharded_init_test.py``: ``tx.init`` on concretely sharded params.

Runs with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set by the parent). For an
Auto-axes and an Explicit-axes ``("data", "fsdp")`` 2x4 mesh, params are placed with
``jax.device_put(params, NamedSharding(...))`` (kernels sharded along ``in``, along ``out``,
along both, replicated, and a conv kernel along ``in``) and ``tx.init(params)`` is called
eagerly (no ``jax.jit`` around it). Prints one JSON line per (mesh, method):

* ``shardings``: per sparse leaf, whether the mask's sharding equals its param's (and, on
  the Explicit mesh, whether its type carries the param's sharding);
* ``equal``: the masks equal single-device ``tx.init`` on the same (unsharded) params;
* ``memory``: per leaf, the per-device bytes (temp + output, from the compiled program's
  ``memory_analysis``) of the program that draws the mask, and of the same program on one
  device, with the number of shards.

Usage: python tests/_sharded_init_child.py
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sparsejax as sj  # noqa: E402
from sparsejax._src.transforms import pruning  # noqa: E402

# name -> (shape, spec). "wide" is large enough that the selection's fixed-size histograms
# are small next to its shards, so the memory comparison measures the shards.
LEAVES = {
  "wide/kernel": ((2048, 512), P("fsdp", None)),
  "wide/bias": ((512,), P()),
  "out_sharded/kernel": ((1024, 512), P(None, "fsdp")),
  "both/kernel": ((1024, 512), P("fsdp", "data")),
  "conv/kernel": ((3, 3, 256, 256), P(None, None, "fsdp", None)),
  "head/kernel": ((512, 16), P()),
}
METHODS = {
  "rigl": lambda: sj.rigl(optax.adam(1e-3), sparsity=0.9, end_step=100, last_layer="head"),
  "srigl": lambda: sj.srigl(
    optax.sgd(0.1, momentum=0.9), sparsity=0.9, end_step=100, last_layer="head"
  ),
  "rigl_nm24": lambda: sj.rigl(
    optax.adam(1e-3), structure=sj.NM(2, 4), end_step=100, last_layer="head"
  ),
  "static_global": lambda: sj.static_sparse(
    optax.sgd(0.1), sparsity=0.8, distribution="global", last_layer="head"
  ),
}


def make_params() -> dict:
  keys = jax.random.split(jax.random.PRNGKey(0), len(LEAVES))
  out: dict = {}
  for key, (path, (shape, _)) in zip(keys, LEAVES.items(), strict=True):
    layer, name = path.split("/")
    out.setdefault(layer, {})[name] = jax.random.normal(key, shape)
  return out


def shardings_for(mesh) -> dict:
  out: dict = {}
  for path, (_, spec) in LEAVES.items():
    layer, name = path.split("/")
    out.setdefault(layer, {})[name] = NamedSharding(mesh, spec)
  return out


def flat(tree) -> dict:
  """``{"layer/name": leaf}`` (masks of dense leaves, ``MaskedNode``, have no leaves)."""
  return {sj.path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def num_shards(leaf) -> int:
  """How many distinct blocks the leaf's sharding cuts it into."""
  blocks = leaf.sharding.devices_indices_map(tuple(leaf.shape)).values()
  return len({tuple((s.start, s.stop) for s in idx) for idx in blocks})


def per_device_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.temp_size_in_bytes + m.output_size_in_bytes)


def memory_records(tx, params_sharded) -> list[dict]:
  """Per sparse leaf: bytes per device of the sharded mask program vs one device."""
  alloc = tx.init.allocation
  plan = {lp.path: lp for lp in alloc.plan(params_sharded).leaves}
  key = jax.random.PRNGKey(0)
  out = []
  for path, leaf in flat(params_sharded).items():
    sparsity = plan[path].sparsity
    if not sparsity:
      continue
    shape, sparsity = tuple(leaf.shape), float(sparsity)
    program = pruning.sharded_mask_program(alloc.structure, shape, sparsity, leaf.sharding)
    single = jax.jit(lambda k, s=shape, sp=sparsity: alloc.structure.random_mask(k, s, sp))
    out.append(
      {
        "path": path,
        "sharded_bytes": per_device_bytes(program.lower(key).compile()),
        "single_device_bytes": per_device_bytes(single.lower(key).compile()),
        "shards": num_shards(leaf),
        "mask_bytes": int(np.prod(shape)),
      }
    )
  return out


def run(kind: str, method: str) -> None:
  axis_type = AxisType.Auto if kind == "auto" else AxisType.Explicit
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(axis_type,) * 2)
  params = make_params()
  tx = METHODS[method]()
  reference = jax.device_get(sj.get_masks(tx.init(params)))
  assert flat(reference), method
  sharded_params = jax.device_put(params, shardings_for(mesh))
  if kind == "explicit":
    with jax.set_mesh(mesh):
      state = tx.init(sharded_params)
  else:
    state = tx.init(sharded_params)
  masks = sj.get_masks(state)
  shardings, equal = {}, True
  flat_params, flat_ref = flat(sharded_params), flat(reference)
  for path, mask in flat(masks).items():
    param = flat_params[path]
    typed = True
    if kind == "explicit":
      typed = jax.typeof(mask).sharding == jax.typeof(param).sharding
    shardings[path] = {
      "mask": str(mask.sharding),
      "param": str(param.sharding),
      "equal": bool(mask.sharding.is_equivalent_to(param.sharding, mask.ndim)) and typed,
    }
    equal &= bool(np.array_equal(np.asarray(mask), np.asarray(flat_ref[path])))
  record = {"kind": kind, "method": method, "shardings": shardings, "equal": equal}
  if kind == "auto" and method in ("rigl", "srigl"):  # layer-wise and per-neuron selections
    record["memory"] = memory_records(tx, sharded_params)
  print(json.dumps(record), flush=True)


def main() -> int:
  assert jax.device_count() == 8, jax.devices()
  for kind in ("auto", "explicit"):
    for method in METHODS:
      run(kind, method)
  return 0


if __name__ == "__main__":
  sys.exit(main())
