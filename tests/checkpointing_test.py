"""Tests for sparsejax's orbax checkpoint helpers (save, keep-N, safe restore)."""

import functools
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax as sj
from sparsejax._src.integration import checkpointing as C


class _MLP(nnx.Module):
  def __init__(self, hidden: int, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(8, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def _tx():
  return sj.rigl(optax.sgd(0.1, momentum=0.9), sparsity=0.5, update_every=2, end_step=8)


@functools.cache
def _built(hidden: int):
  # Built once per shape under jit (eager init would compile every op separately).
  return nnx.split(
    nnx.jit(lambda: (m := _MLP(hidden, nnx.Rngs(0)), nnx.Optimizer(m, _tx(), wrt=nnx.Param)))()
  )


def _build(hidden: int = 16):
  graphdef, state = _built(hidden)
  return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


@nnx.jit
def _step(model, opt, x):
  grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
  opt.update(model, grads)


def _train(model, opt, steps: int):
  for _ in range(steps):
    _step(model, opt, jnp.ones((4, 8)))


def _state(model, opt, step=0):
  return {
    "model": nnx.state(model),
    "optimizer": nnx.state(opt),
    "step": step,
    "data_state": {"epoch": 0, "batch": step},
  }


def _tree_equal(a, b) -> bool:
  leaves = jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))
  return all(leaves)


def _snapshot(directory: str) -> dict[str, tuple[int, int]]:
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      st = os.stat(p)
      out[p] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(name="saved")
def fixture_saved(tmp_path):
  model, opt = _build()
  _train(model, opt, 3)
  state = _state(model, opt, step=3)
  with C.CheckpointManager(tmp_path / "ckpt", max_to_keep=2) as ckpt:
    assert ckpt.save(3, state, config={"dst": {"method": "rigl"}, "lr": 0.1})
  return tmp_path / "ckpt", state


def test_roundtrip_restores_values_types_and_config(saved):
  directory, state = saved
  model, opt = _build()  # a fresh target
  ckpt = C.CheckpointManager(directory)
  assert ckpt.latest_step() == 3
  restored, config = ckpt.restore(_state(model, opt))
  ckpt.close()
  assert config == {"dst": {"method": "rigl"}, "lr": 0.1}
  assert restored["step"] == 3 and restored["data_state"] == {"epoch": 0, "batch": 3}
  assert _tree_equal(restored["model"], state["model"])
  assert _tree_equal(restored["optimizer"], state["optimizer"])
  nnx.update(opt, restored["optimizer"])
  nnx.update(model, restored["model"])
  # The DST state comes back as its NamedTuple, masks as bool, and training continues.
  dst_state = sj.find_dst_state(opt.opt_state)
  assert isinstance(dst_state, sj.DynamicSparseState)
  assert int(dst_state.count) == 3
  masks = sj.get_masks(opt.opt_state)
  assert masks["l1"]["kernel"].dtype == jnp.bool_
  _train(model, opt, 2)
  assert int(sj.find_dst_state(opt.opt_state).count) == 5


def test_restore_into_abstract_target(saved):
  directory, state = saved
  model, opt = _build()
  abstract = jax.eval_shape(lambda: _state(model, opt))
  with C.CheckpointManager(directory) as ckpt:
    restored, _ = ckpt.restore(abstract)
  assert _tree_equal(restored["model"], state["model"])


def test_keep_n_policy_and_no_overwrite(tmp_path):
  model, opt = _build()
  with C.CheckpointManager(tmp_path, max_to_keep=2, async_save=False) as ckpt:
    for step in range(1, 5):
      ckpt.save(step, _state(model, opt, step))
    assert ckpt.all_steps() == [3, 4]
    before = _snapshot(str(tmp_path / "4"))
    assert ckpt.save(4, _state(model, opt, 99)) is False  # existing step: not rewritten
    assert _snapshot(str(tmp_path / "4")) == before


def test_mismatch_names_paths_and_touches_nothing(saved):
  directory, _ = saved
  before = _snapshot(str(directory))
  model, opt = _build(hidden=32)
  ckpt = C.CheckpointManager(directory)
  with pytest.raises(C.CheckpointMismatchError) as err:
    ckpt.restore(_state(model, opt))
  ckpt.close()
  msg = str(err.value)
  assert isinstance(err.value, ValueError)
  assert "model/l1/kernel: checkpoint (8, 16) float32 vs this run (8, 32) float32" in msg
  assert "optimizer/opt_state/masks/l1/kernel" in msg
  assert "Nothing was restored, overwritten or deleted" in msg
  assert _snapshot(str(directory)) == before


def test_mismatch_on_missing_and_extra_entries(saved):
  directory, state = saved
  target = dict(state)
  target["extra"] = jnp.zeros(3)
  del target["data_state"]
  with C.CheckpointManager(directory) as ckpt, pytest.raises(C.CheckpointMismatchError) as err:
    ckpt.restore(target)
  assert "extra: only in this run" in str(err.value)
  assert "data_state/epoch: only in the checkpoint" in str(err.value)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's
@pytest.mark.parametrize(  # asyncio loop teardown after a failed read; not our error.
  "corrupt",
  [
    "truncate_data",
    "garble_data",
    "remove_state",
    "garble_metadata",
    "remove_manifest",
    "empty_step_dir",
  ],
)
def test_corrupt_checkpoint_raises_clear_error(saved, corrupt):
  directory, _ = saved
  step_dir = directory / "3"
  if corrupt == "truncate_data":
    for f in glob.glob(str(step_dir / "state" / "d" / "*")):
      os.truncate(f, os.path.getsize(f) // 2)
  elif corrupt == "garble_data":
    for f in glob.glob(str(step_dir / "state" / "d" / "*")):
      with open(f, "r+b") as fh:
        fh.write(b"\x00garbage" * 8)
  elif corrupt == "remove_state":
    import shutil

    shutil.rmtree(step_dir / "state")
  elif corrupt == "garble_metadata":
    (step_dir / "state" / "_METADATA").write_text("not json")
  elif corrupt == "remove_manifest":
    os.remove(step_dir / "state" / "manifest.ocdbt")
  elif corrupt == "empty_step_dir":
    import shutil

    shutil.rmtree(step_dir)
    step_dir.mkdir()
  model, opt = _build()
  ckpt = C.CheckpointManager(directory)
  assert ckpt.latest_step() == 3  # the checkpoint is still seen ...
  with pytest.raises(C.CorruptCheckpointError, match=r"Refusing to start from scratch"):
    ckpt.restore(_state(model, opt))  # ... and refused loudly.
  ckpt.close()


def test_no_checkpoint(tmp_path):
  model, opt = _build()
  with C.CheckpointManager(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
      ckpt.restore(_state(model, opt))


def test_typed_prng_keys_roundtrip(tmp_path):
  state = {"key": jax.random.key(7), "w": jnp.arange(3.0)}
  with C.CheckpointManager(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state)
    restored, config = ckpt.restore({"key": jax.random.key(0), "w": jnp.zeros(3)})
  assert config is None
  assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(
    jax.random.key_data(restored["key"]), jax.random.key_data(state["key"])
  )


def test_compare_trees_scalars_by_kind():
  assert C.compare_trees({"a": 1, "b": np.float32(2.0)}, {"a": np.int32(0), "b": 0.5}) == []
  diffs = C.compare_trees({"a": 1}, {"a": 0.5})
  assert diffs == ["  a: checkpoint () int64 vs this run () float64"]


def test_invalid_max_to_keep(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    C.CheckpointManager(tmp_path, max_to_keep=0)


def test_directory_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / "not_a_dir"
  path.write_text("a file")
  with pytest.raises(NotADirectoryError, match=r"`directory` .*not_a_dir' is a file, not a direct"):
    C.CheckpointManager(path)
  assert path.read_text() == "a file"  # untouched


@pytest.mark.parametrize("kind", ["parent_is_a_file", "broken_link"])
def test_directory_that_cannot_be_created_is_refused(tmp_path, kind):
  if kind == "parent_is_a_file":
    (tmp_path / "workdir").write_text("a file")
    path = tmp_path / "workdir" / "checkpoints"
  else:
    path = tmp_path / "link"
    path.symlink_to(tmp_path / "missing" / "target")
  with pytest.raises(OSError, match=r"`directory` .* cannot be created or read"):
    C.CheckpointManager(path)


def test_directory_is_created(tmp_path):
  path = tmp_path / "a" / "b" / "checkpoints"
  with C.CheckpointManager(path) as ckpt:
    assert ckpt.latest_step() is None
  assert path.is_dir()
