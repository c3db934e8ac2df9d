"""Child process of ``tests/experiments_mesh_test.py``: ``config.mesh`` on 8 fake CPU devices.

Runs RigL smoke experiments (60 steps, mask updates at 20 and 40, a loss logged every step)
on one device and on meshes, and prints one JSON line per run:
``{"name", "result" (train_and_evaluate's dict without timings), "losses", "masks"}`` where
``masks`` are the final masks' sha1 digests (from the last checkpoint). The parent asserts.

Usage: python tests/_experiments_mesh_child.py WORKDIR
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from experiments import train  # noqa: E402
from experiments.configs import rigl  # noqa: E402

STEPS = 60


def config(mesh: tuple[int, int, int], workdir_root: str, **overrides):
  c = rigl.get_config("smoke")
  c.num_train_steps = STEPS
  c.dst.update_every = 20
  c.log_every_steps = 1
  c.eval_every_steps = STEPS
  c.checkpoint_every_steps = 30
  c.async_checkpointing = False
  c.model = "mlp"  # kernels [40, 64], [64, 32], [32, 10]: shardable along both axes
  c.data.cache_dir = os.path.join(workdir_root, "data")
  c.jax_cache_dir = os.path.join(workdir_root, "jax_cache")
  c.mesh.data, c.mesh.fsdp, c.mesh.model = mesh
  c.mesh.min_shard_size = 256
  for k, v in overrides.items():
    c[k] = v
  return c


def run(name: str, mesh, root: str, workdir: str | None = None, **overrides) -> None:
  workdir = workdir or os.path.join(root, name)
  result = train.train_and_evaluate(config(mesh, root, **overrides), workdir)
  result.pop("timings", None)
  losses = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "train/loss" in r:
        losses.append([r["step"], r["train/loss"]])
  masks = {}
  step_dir = os.path.join(workdir, "checkpoints", str(result["step"]), "state")
  if os.path.isdir(step_dir):
    flat = ocp.tree.to_flat_dict(ocp.StandardCheckpointer().restore(step_dir), sep="/")
    for k, v in sorted(flat.items()):
      if "masks" in k:
        masks[k] = hashlib.sha1(np.asarray(v).tobytes()).hexdigest()
  print(json.dumps({"name": name, "result": result, "losses": losses, "masks": masks}), flush=True)


def xla_three_axis_grad() -> None:
  """Plain JAX, no sparsejax: the gradient of a 3-layer MLP on a 2x2x2 mesh vs one device.

  Kernels sharded ``P("fsdp", "model")``, the batch over ``("data", "fsdp")``. With jax 0.10.2
  on CPU the sharded gradients are wrong by ~2e-2 (two layers, or any two-axis mesh: exact
  to 1e-7); this is why ``config.mesh`` refuses three axes > 1.
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  sizes = (40, 64, 32, 10)
  ws = [jax.random.normal(k, (a, b)) / np.sqrt(a) for k, a, b in zip(keys, sizes, sizes[1:])]
  x = jax.random.normal(keys[3], (32, 40))

  def loss(ws, x):
    h = x
    for i, w in enumerate(ws):
      h = h @ w
      h = jnp.tanh(h) if i < len(ws) - 1 else h
    return jnp.mean(h**2)

  grad = jax.grad(loss)
  ref = jax.jit(grad)(ws, x)
  w_sh = [NamedSharding(mesh, P("fsdp", "model"))] * len(ws)
  sharded = jax.jit(grad, in_shardings=(w_sh, NamedSharding(mesh, P(("data", "fsdp")))))(ws, x)
  err = max(float(jnp.abs(a - b).max()) for a, b in zip(ref, sharded, strict=True))
  print(json.dumps({"name": "xla_three_axis_grad", "max_abs_error": err}), flush=True)


def main(root: str) -> int:
  run("single", (1, 1, 1), root)
  run("data8", (8, 1, 1), root)
  run("mesh221", (2, 2, 1), root)
  run("mesh122", (1, 2, 2), root)
  xla_three_axis_grad()
  split = os.path.join(root, "mesh221_split")
  run("mesh221_first", (2, 2, 1), root, workdir=split, stop_after_step=25)
  run("mesh221_resumed", (2, 2, 1), root, workdir=split)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
