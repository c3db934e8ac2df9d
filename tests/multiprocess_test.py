"""Multi-process runs on JAX's distributed runtime: 2 processes × 4 CPU devices on localhost.

Every run is ``python -m experiments.main`` (RigL smoke config on an MLP, 120 steps, mask
updates every 20 steps, a loss logged every step, checkpoints every 20 steps) on a
``data=2 × fsdp=4`` mesh, started as processes of their own (``tests/_multihost.py``):

* ``one``: 1 process × 8 devices; ``two``: 2 processes × 4 devices. ``two`` follows ``one``
  with the tolerance of ``tests/experiments_mesh_test.py`` (losses within 2e-6, identical
  masks and accuracy; params within 1e-5), and only process 0 wrote the files;
* the final checkpoint of ``two`` (written by both processes, each its shards) restores on 2
  processes, sharded over their 8 devices, bit for bit as on one process;
* ``killed``: the same run; process 1 is SIGKILLed after the checkpoint of step 40, process 0
  stops on its own (missing heartbeats, ``--heartbeat_timeout=10``); relaunching both
  resumes from the last complete checkpoint and ends exactly as ``two``.

Slow (about 3 minutes on 2 cores); ``.ci/run`` runs it in its slow stage.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import _multihost as mh
import numpy as np
import pytest

pytestmark = pytest.mark.slow

STEPS = 120
ARGS = [
  "--config=experiments/configs/rigl.py:smoke",
  f"--config.num_train_steps={STEPS}",
  "--config.dst.update_every=20",
  "--config.log_every_steps=1",
  f"--config.eval_every_steps={STEPS}",
  "--config.checkpoint_every_steps=20",
  "--config.max_checkpoints_to_keep=10",
  "--config.async_checkpointing=False",
  "--config.model=mlp",
  "--config.mesh.data=2",
  "--config.mesh.fsdp=4",
  "--config.mesh.min_shard_size=256",
]
TIMEOUT_S = 600


def _args(workdir, root) -> list[str]:
  return [*ARGS, f"--workdir={workdir}", f"--config.data.cache_dir={root / 'data'}"]


def _run(root, name, *, processes, devices, extra=()) -> mh.Group:
  group = mh.launch(
    [*_args(root / name, root), *extra],
    processes=processes,
    devices=devices,
    log_prefix=root / name,
  )
  codes = group.wait(TIMEOUT_S)
  assert codes == [0] * processes, f"{name}: exit codes {codes}\n{group.tail()}"
  return group


def _final_arrays(workdir) -> dict[str, np.ndarray]:
  """The final checkpoint's params and masks, read on this (single-device) process."""
  import jax
  import orbax.checkpoint as ocp

  step_dir = workdir / "checkpoints" / str(STEPS) / "state"
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
    checkpointer.metadata(step_dir).item_metadata,
    is_leaf=lambda x: hasattr(x, "shape"),
  )
  flat = ocp.tree.to_flat_dict(checkpointer.restore(step_dir, target), sep="/")
  return {k: np.asarray(v) for k, v in flat.items() if k.startswith(("model/", "optimizer/"))}


def _losses(workdir) -> np.ndarray:
  return np.array([[r["step"], r["train/loss"]] for r in mh.records(workdir) if "train/loss" in r])


def _perf(record: dict) -> bool:
  return all(k == "step" or k.startswith("perf/") for k in record)


@pytest.fixture(scope="module", name="root")
def fixture_root(tmp_path_factory):
  return tmp_path_factory.mktemp("multiprocess")


@pytest.fixture(scope="module", name="one")
def fixture_one(root):
  _run(root, "one", processes=1, devices=8)
  return root / "one"


@pytest.fixture(scope="module", name="two")
def fixture_two(root):
  group = _run(root, "two", processes=2, devices=4)
  return root / "two", group


def test_multiprocess_run_equals_one_process(one, two):
  two, group = two
  assert "JAX process 1/2" in group.log(1) and "JAX process 0/2" in group.log(0)
  a, b = _losses(one), _losses(two)
  assert a.shape == b.shape == (STEPS, 2)
  np.testing.assert_array_equal(a[:, 0], b[:, 0])
  np.testing.assert_allclose(b[:, 1], a[:, 1], rtol=0, atol=2e-6)
  final_a = [r for r in mh.records(one) if "final/test_accuracy" in r]
  final_b = [r for r in mh.records(two) if "final/test_accuracy" in r]
  assert final_a[0]["final/test_accuracy"] == final_b[0]["final/test_accuracy"]
  arrays_a, arrays_b = _final_arrays(one), _final_arrays(two)
  assert arrays_a.keys() == arrays_b.keys()
  masks = [k for k in arrays_a if "/masks/" in k]
  assert len(masks) == 3
  for k in arrays_a:
    if arrays_a[k].dtype == bool:
      np.testing.assert_array_equal(arrays_b[k], arrays_a[k], err_msg=k)
    else:
      np.testing.assert_allclose(arrays_b[k], arrays_a[k], rtol=0, atol=1e-5, err_msg=k)


def test_multiprocess_process_zero_writes_the_files(one, two):
  two, group = two
  for name in ("metrics.jsonl", "topology.jsonl"):
    # Progress records (perf/*) follow the wall clock; every other record is written once.
    keys_one = [sorted(r) for r in mh.records(one, name) if not _perf(r)]
    keys_two = [sorted(r) for r in mh.records(two, name) if not _perf(r)]
    assert keys_one and keys_two == keys_one, name
  assert len(mh.records(two)) > STEPS  # a train record every step, evaluation, topology
  assert (two / "config.json").is_file() and (two / "hparams.json").is_file()
  assert sorted(p.name for p in (two / "checkpoints").iterdir()) == sorted(
    str(s) for s in range(20, STEPS + 1, 20)
  )
  assert "Final test accuracy" in group.log(0) and "Final test accuracy" in group.log(1)


def test_multiprocess_checkpoint_restores_bit_exactly(root, two):
  two, _ = two
  state_dir = two / "checkpoints" / str(STEPS) / "state"
  child = str(mh.ROOT / "tests" / "_restore_child.py")
  single = root / "restore_one.json"
  subprocess.run(
    [sys.executable, child, str(state_dir), str(single)],
    env=mh.child_env(1),
    cwd=mh.ROOT,
    check=True,
    timeout=TIMEOUT_S,
    capture_output=True,
  )
  port, procs, out = mh.free_port(), [], root / "restore_two.json"
  for i in range(2):
    cmd = [sys.executable, child, str(state_dir), str(out), "--distributed"]
    cmd += [f"localhost:{port}", "2", str(i)]
    procs.append(subprocess.Popen(cmd, env=mh.child_env(4), cwd=mh.ROOT, start_new_session=True))
  group = mh.Group(procs, [])
  assert group.wait(TIMEOUT_S) == [0, 0]
  a, b = json.loads(single.read_text()), json.loads(out.read_text())
  assert b["processes"] == 2 and b["sharded_arrays"] >= 10, b
  assert len(a["digests"]) >= 20 and a["digests"] == b["digests"]


def test_multiprocess_kill_one_process_and_relaunch_resumes(root, two):
  two, _ = two
  workdir = root / "killed"
  args = [*_args(workdir, root), "--heartbeat_timeout=10"]
  group = mh.launch(args, processes=2, devices=4, log_prefix=root / "killed_first")
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not (workdir / "checkpoints" / "40").is_dir():
      assert time.monotonic() < deadline and group.procs[0].poll() is None, group.tail()
      time.sleep(0.1)
    group.kill(1)
    t0 = time.monotonic()
    codes = group.wait(120)  # process 0 notices the missing heartbeats and stops
    stopped_after = time.monotonic() - t0
  finally:
    group.kill()
  assert codes[0] not in (0, None), f"process 0 should fail, got {codes}\n{group.tail()}"
  assert stopped_after < 120
  done = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert 40 in done and max(done) < STEPS, done
  relaunched = _run(root, "killed", processes=2, devices=4, extra=["--heartbeat_timeout=10"])
  assert f"Resumed from checkpoint step {max(done)}" in relaunched.log(0)
  # The resumed run ends exactly as the uninterrupted one.
  np.testing.assert_array_equal(_losses(workdir), _losses(two))
  arrays, reference = _final_arrays(workdir), _final_arrays(two)
  for k in reference:
    np.testing.assert_array_equal(arrays[k], reference[k], err_msg=k)
