"""Tests for sparsejax's topology metrics (sparsity, turnover, ever-active, fan-in, FLOPs).

Every expected number is worked out by hand in the comments.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax.metrics as sjm
from sparsejax._src import tree as tree_lib
from sparsejax._src.metrics import topology as M

# Two layers. "a/kernel" [in=3, out=2]; "b/kernel" [in=2, out=2]; "a/bias" dense.
OLD = {
  "a": {
    "kernel": np.array([[1, 0], [1, 0], [0, 1]], bool),  # nnz 3 of 6, fan-in (2, 1)
    "bias": None,
  },
  "b": {"kernel": np.array([[1, 0], [0, 0]], bool)},  # nnz 1 of 4, fan-in (1, 0)
}
NEW = {
  "a": {
    "kernel": np.array([[1, 0], [0, 1], [0, 1]], bool),  # (1,0)->(1,1): 1 grown of 3
    "bias": None,
  },
  "b": {"kernel": np.array([[0, 0], [0, 1]], bool)},  # 1 grown of 1
}


def test_sparse_leaves_skips_dense_and_names_paths():
  leaves = M.sparse_leaves(OLD)
  assert [p for p, _ in leaves] == ["a/kernel", "b/kernel"]


def test_sparse_leaves_accepts_masked_node():
  tree = {"w": np.ones((2, 2), bool), "b": optax.MaskedNode()}
  assert [p for p, _ in M.sparse_leaves(tree)] == ["w"]


def test_mask_summary_by_hand():
  s = M.mask_summary(OLD)
  assert int(s["a/kernel"]["nnz"]) == 3 and s["a/kernel"]["size"] == 6
  assert float(s["a/kernel"]["sparsity"]) == pytest.approx(0.5)
  assert int(s["b/kernel"]["nnz"]) == 1
  assert float(s["b/kernel"]["sparsity"]) == pytest.approx(0.75)
  # total over masked layers: 4 nnz of 10 -> 0.6 sparse.
  assert int(s["total"]["nnz"]) == 4 and s["total"]["size"] == 10
  assert float(s["total"]["sparsity"]) == pytest.approx(0.6)


def test_mask_turnover_by_hand():
  t = M.mask_turnover(OLD, NEW)
  assert float(t["a/kernel"]) == pytest.approx(1 / 3)
  assert float(t["b/kernel"]) == pytest.approx(1.0)
  # total: 2 grown of 4 previously active.
  assert float(t["total"]) == pytest.approx(0.5)


def test_mask_turnover_identical_and_empty():
  assert float(M.mask_turnover(OLD, OLD)["total"]) == 0.0
  empty = {"w": np.zeros((2, 2), bool)}
  assert float(M.mask_turnover(empty, empty)["w"]) == 0.0


def test_mask_turnover_rejects_different_layers():
  with pytest.raises(ValueError, match="different sparse layers"):
    M.mask_turnover(OLD, {"a": NEW["a"]})
  with pytest.raises(ValueError, match="differ in shape"):
    M.mask_turnover({"w": np.ones((2, 2), bool)}, {"w": np.ones((2, 3), bool)})


def test_mask_turnover_under_jit_matches_numpy():
  old = jax.tree.map(jnp.asarray, OLD)
  new = jax.tree.map(jnp.asarray, NEW)
  got = jax.jit(M.mask_turnover)(old, new)
  want = M.mask_turnover(OLD, NEW)
  for k in want:
    assert float(got[k]) == pytest.approx(float(want[k]))


def test_ever_active_by_hand():
  ever = M.update_ever_active(M.init_ever_active(OLD), NEW)
  # a: OLD ∪ NEW = [[1,0],[1,1],[0,1]] -> 4 of 6; b: [[1,0],[0,1]] -> 2 of 4.
  f = M.ever_active_fraction(ever)
  assert float(f["a/kernel"]) == pytest.approx(4 / 6)
  assert float(f["b/kernel"]) == pytest.approx(2 / 4)
  assert float(f["total"]) == pytest.approx(6 / 10)
  assert ever["a"]["bias"] is None


def test_ever_active_is_monotone_under_jit():
  ever = jax.tree.map(jnp.asarray, M.init_ever_active(OLD))
  step = jax.jit(M.update_ever_active)
  ever = step(ever, jax.tree.map(jnp.asarray, NEW))
  ever = step(ever, jax.tree.map(jnp.asarray, OLD))
  assert float(M.ever_active_fraction(ever)["total"]) == pytest.approx(0.6)


def test_fan_in_stats_dense_kernel():
  st = M.fan_in_stats(OLD)
  a, b = st["a/kernel"], st["b/kernel"]
  # a: fan-in (2, 1): min 1, max 2, mean 1.5, std 0.5, both neurons active.
  assert (int(a["min"]), int(a["max"]), int(a["active_neurons"]), a["neurons"]) == (1, 2, 2, 2)
  assert float(a["mean"]) == pytest.approx(1.5)
  assert float(a["std"]) == pytest.approx(0.5)
  # b: fan-in (1, 0): only neuron 0 is active -> stats over it alone.
  assert (int(b["min"]), int(b["max"]), int(b["active_neurons"])) == (1, 1, 1)
  assert float(b["mean"]) == pytest.approx(1.0)


def test_fan_in_conv_kernel_counts_window_and_inputs():
  # Conv [kh=2, kw=1, in=2, out=3]: fan-in of neuron j sums over kh·kw·in = 4 entries.
  m = np.zeros((2, 1, 2, 3), bool)
  m[0, 0, 0, 0] = m[1, 0, 1, 0] = True  # neuron 0: 2
  m[:, :, :, 1] = True  # neuron 1: 4
  np.testing.assert_array_equal(M._fan_in(m), [2, 4, 0])  # noqa: SLF001
  st = M.fan_in_stats({"conv": m})["conv"]
  assert (int(st["min"]), int(st["max"]), int(st["active_neurons"]), st["neurons"]) == (2, 4, 2, 3)


def test_fan_in_no_active_neurons_is_zero():
  st = M.fan_in_stats({"w": np.zeros((3, 2), bool)})["w"]
  assert (int(st["min"]), int(st["max"]), int(st["active_neurons"])) == (0, 0, 0)
  assert float(st["mean"]) == 0.0


def test_fan_in_stats_under_jit():
  got = jax.jit(M.fan_in_stats)(jax.tree.map(jnp.asarray, OLD))
  assert int(got["a/kernel"]["max"]) == 2


def test_estimate_flops_dense_and_conv():
  params = {
    "conv": {"kernel": np.ones((3, 4, 8)), "bias": np.ones(8)},  # 96 weights
    "fc": {"kernel": np.ones((16, 10)), "bias": np.ones(10)},  # 160 weights
  }
  masks = {
    "conv": {"kernel": np.zeros((3, 4, 8), bool), "bias": None},
    "fc": {"kernel": None, "bias": None},  # dense leaf of a masked model
  }
  masks["conv"]["kernel"][0, :, 0] = True  # 4 active
  out = M.estimate_flops(params, masks, positions={"conv/kernel": 5})
  # conv: dense 2·96·5 = 960, sparse 2·4·5 = 40; fc: 2·160 = 320 both; biases ignored.
  assert out["layers"]["conv/kernel"] == {"dense": 960, "sparse": 40, "positions": 5}
  assert out["dense"] == 1280 and out["sparse"] == 360
  assert out["ratio"] == pytest.approx(360 / 1280)
  assert out["unknown_positions"] == []


def test_estimate_flops_reports_unknown_conv_positions_and_counts_nonzeros():
  w = np.zeros((2, 2, 3))
  w[0, 0, 0] = 1.0
  out = M.estimate_flops({"conv": w})  # no masks: sparse = nonzeros of the params
  assert out["unknown_positions"] == ["conv"]
  assert (out["dense"], out["sparse"]) == (24, 2)


def test_estimate_flops_on_shape_dtype_structs():
  params = {"w": jax.ShapeDtypeStruct((4, 5), jnp.float32)}
  assert M.estimate_flops(params)["dense"] == 40


def test_to_scalars_flattens_and_converts():
  out = M.to_scalars({"a": {"b": jnp.int32(3), "c": np.float32(0.5)}, "n": 2, "s": "x"}, "p")
  assert out == {"p/a/b": 3, "p/a/c": 0.5, "p/n": 2}
  assert isinstance(out["p/a/b"], int) and isinstance(out["p/a/c"], float)


# -- masks pytrees of every kind ---------------------------------------------------------


def _boxed(tree):
  """``tree`` with every mask array inside an NNX ``Variable`` (an nnx.Optimizer's state)."""
  return jax.tree.map(lambda m: m if m is None else nnx.Variable(m), tree)


def test_metrics_unwrap_nnx_variables():
  boxed_old, boxed_new = _boxed(OLD), _boxed(NEW)
  assert [p for p, _ in M.sparse_leaves(boxed_old)] == ["a/kernel", "b/kernel"]
  assert M.to_scalars(M.mask_summary(boxed_old)) == M.to_scalars(M.mask_summary(OLD))
  assert M.to_scalars(M.mask_turnover(boxed_old, boxed_new)) == M.to_scalars(
    M.mask_turnover(OLD, NEW)
  )
  assert M.to_scalars(M.fan_in_stats(boxed_old)) == M.to_scalars(M.fan_in_stats(OLD))
  ever = M.update_ever_active(M.init_ever_active(boxed_old), boxed_new)
  assert float(M.ever_active_fraction(ever)["total"]) == pytest.approx(6 / 10)
  flops = M.estimate_flops(
    {"w": nnx.Param(np.ones((3, 2)))}, {"w": nnx.Variable(OLD["a"]["kernel"])}
  )
  assert flops["layers"] == {"w": {"dense": 12, "sparse": 6, "positions": 1}}


def test_metrics_dense_markers_none_and_masked_node_agree():
  masked_node = jax.tree.map(
    lambda m: optax.MaskedNode() if m is None else m, OLD, is_leaf=lambda x: x is None
  )
  assert masked_node["a"]["bias"] == optax.MaskedNode()
  assert M.to_scalars(M.mask_summary(masked_node)) == M.to_scalars(M.mask_summary(OLD))
  ever = M.init_ever_active(masked_node)
  assert ever["a"]["bias"] == optax.MaskedNode()
  assert M.to_scalars(M.ever_active_fraction(ever)) == M.to_scalars(M.ever_active_fraction(OLD))


def test_host_masks_are_computed_with_numpy():
  # NumPy in, NumPy out: no dispatch to a device (and nothing to compile).
  values = [
    M.mask_summary(OLD)["total"]["nnz"],
    M.mask_turnover(OLD, NEW)["total"],
    M.ever_active_fraction(OLD)["total"],
    M.fan_in_stats(OLD)["a/kernel"]["mean"],
  ]
  assert all(isinstance(v, np.ndarray | np.generic) for v in values), [type(v) for v in values]
  device = M.mask_summary(jax.tree.map(jnp.asarray, OLD))["total"]["nnz"]
  assert isinstance(device, jax.Array)


def test_mask_summary_without_sparse_leaves():
  s = M.mask_summary({"b": None})
  assert s == {"total": {"sparsity": s["total"]["sparsity"], "nnz": 0, "size": 0}}
  assert float(s["total"]["sparsity"]) == 1.0


def test_public_namespace_serves_the_shared_tree_helpers():
  assert sjm.sparse_leaves is tree_lib.sparse_leaves is M.sparse_leaves
