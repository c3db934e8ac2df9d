"""``config.mesh``: the experiments on a ("data", "fsdp", "model") mesh of 8 fake CPU devices.

The runs happen in one child process (``_experiments_mesh_child.py``) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, so this process keeps one device.
What is asserted:

* mesh runs shard params and compile the train step once;
* data parallel (8), data x FSDP (2x2) and FSDP x tensor parallel (2x2) runs follow the
  single-device run within float noise (the sharded matmuls sum in another order), with
  identical masks after two mask updates;
* three axes > 1 are refused: XLA computes wrong gradients there (a strict xfail on a
  plain-JAX reproduction records it, and flips when JAX fixes it);
* stopping and resuming on the mesh is bit-exact (losses, masks, accuracy);
* bad ``config.mesh`` values fail with errors naming the field.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import _multihost as mh
import jax
import numpy as np
import pytest

from experiments import config_lib
from experiments.configs import rigl

_CHILD = Path(__file__).with_name("_experiments_mesh_child.py")
_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", name="runs")
def fixture_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("mesh_runs")
  env = mh.child_env(8)
  proc = subprocess.run(
    [sys.executable, str(_CHILD), str(root)],
    env=env,
    cwd=_ROOT,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = {}
  for line in proc.stdout.splitlines():
    if line.startswith("{"):
      r = json.loads(line)
      out[r["name"]] = r
  return out


def _losses(run):
  return np.array([loss for _, loss in run["losses"]])


@pytest.mark.parametrize("name", ["mesh221", "mesh122"])
def test_mesh_run_is_sharded_and_compiles_once(runs, name):
  r = runs[name]["result"]
  assert r["mesh"]["devices"] == 4
  want = tuple(int(c) for c in name[-3:])
  assert (r["mesh"]["data"], r["mesh"]["fsdp"], r["mesh"]["model"]) == want
  assert r["mesh"]["sharded_param_leaves"] >= 3, r["mesh"]  # the three kernels at least
  assert r["train_step_compiles"] == 1
  assert r["step"] == 60 and len(runs[name]["losses"]) == 60
  assert runs["single"]["result"]["mesh"] == {"devices": 1}


@pytest.mark.parametrize("name", ["data8", "mesh221", "mesh122"])
def test_mesh_run_follows_the_single_device_run(runs, name):
  """Only the order of float sums differs (observed: at most 1 ulp of the loss, 2.4e-7)."""
  single, mesh = _losses(runs["single"]), _losses(runs[name])
  np.testing.assert_allclose(mesh, single, rtol=0, atol=2e-6)
  assert runs[name]["masks"] == runs["single"]["masks"]  # after 2 mask updates
  assert runs[name]["result"]["sparsity"] == runs["single"]["result"]["sparsity"]


@pytest.mark.xfail(
  strict=True,
  reason="XLA SPMD partitioning (jax 0.10.2, CPU) gives wrong gradients for a 3-layer MLP "
  "with kernels over (fsdp, model) and the batch over (data, fsdp) on a 2x2x2 mesh (plain "
  "JAX, no sparsejax); config.mesh therefore refuses three axes > 1. When this passes, JAX "
  "has fixed it: lift the check in experiments/parallel.py.",
)
def test_xla_three_axis_mesh_gradients(runs):
  assert runs["xla_three_axis_grad"]["max_abs_error"] < 1e-5, runs["xla_three_axis_grad"]


def test_resume_on_the_mesh_is_bit_exact(runs):
  first, resumed, full = runs["mesh221_first"], runs["mesh221_resumed"], runs["mesh221"]
  assert first["result"]["step"] == 25 and resumed["result"]["resumed_from"] == 25
  assert resumed["losses"] == full["losses"]
  assert resumed["masks"] and resumed["masks"] == full["masks"]
  assert resumed["result"]["test_accuracy"] == full["result"]["test_accuracy"]


@pytest.mark.parametrize(
  ("mesh", "batch_size", "match"),
  [
    ((2, 1, 1), 32, r"config.mesh asks for 2 devices .* only 1 exist"),
    ((-1, -1, 1), 32, r"At most one of config.mesh"),
    ((0, 1, 1), 32, r"config.mesh.data must be a positive integer or -1"),
    ((2, 2, 2), 32, r"at most two of data, fsdp and model may exceed 1"),
    ((1, 1, 1), 0, r"config.batch_size"),
  ],
)
def test_bad_mesh_config_fails_clearly(mesh, batch_size, match):
  c = rigl.get_config("smoke")
  c.mesh.data, c.mesh.fsdp, c.mesh.model = mesh
  c.batch_size = batch_size
  with pytest.raises(ValueError, match=match):
    config_lib.validate_config(c)


def test_optimizer_state_follows_param_shardings():
  """Masks and Adam moments take their param's sharding; counters and the key are replicated."""
  import optax
  from flax import nnx
  from jax.sharding import AxisType, PartitionSpec

  import sparsejax as sj
  from experiments import models, parallel

  mesh = jax.sharding.AbstractMesh((2, 2, 1), parallel.AXES, axis_types=(AxisType.Auto,) * 3)
  model = models.create_model("mlp", (40,), 10, seed=0, mlp_features=(64, 32))
  opt = nnx.Optimizer(model, sj.rigl(optax.adam(0.1), sparsity=0.9, end_step=100), wrt=nnx.Param)
  model_sh, opt_sh, by_path = parallel.state_shardings(
    mesh, nnx.state(model), nnx.state(opt), min_shard_size=256
  )
  assert by_path["hidden/0/kernel"].spec == PartitionSpec("fsdp", None)
  assert by_path["hidden/0/bias"].spec == PartitionSpec(None)  # 64 < min_shard_size
  specs = {
    sj.path_to_str(p): s.spec
    for (p, _), s in zip(jax.tree_util.tree_flatten_with_path(nnx.state(opt))[0], opt_sh)
  }
  for param in ("hidden/0/kernel", "hidden/1/kernel", "head/kernel"):
    for prefix in (
      "opt_state/masks/",
      "opt_state/inner_state/0/mu/",
      "opt_state/inner_state/0/nu/",
    ):
      assert specs[prefix + param] == by_path[param].spec, (prefix, param)
  for name in ("opt_state/count", "opt_state/key", "opt_state/skipped_updates", "step"):
    assert specs[name] == PartitionSpec(), name
  assert len(model_sh) == len(jax.tree.leaves(nnx.state(model)))
