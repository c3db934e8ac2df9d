"""Tests for sparsejax's topology metrics, metric writers, progress reporter and plots.

Every expected number is worked out by hand in the comments.
"""

import json
import logging as pylogging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax._src.metrics import topology as M
from sparsejax._src.integration import plotting as P

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


# -- writers -----------------------------------------------------------------------------


def test_jsonl_writer_lines_and_hparams(tmp_path):
  w = M.JsonlWriter(tmp_path)
  w.write_scalars(1, {"loss": jnp.float32(0.5), "acc": np.float64(0.25), "n": np.int32(7)})
  w.write_scalars(2, {"loss": 0.25})
  w.write_scalars(3, {})  # nothing written
  w.write_hparams({"lr": 0.1, "dst": {"method": "rigl"}, "t": (1, 2)})
  w.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
    {"step": 1, "loss": 0.5, "acc": 0.25, "n": 7},
    {"step": 2, "loss": 0.25},
  ]
  assert json.loads((tmp_path / "hparams.json").read_text()) == {
    "lr": 0.1,
    "dst": {"method": "rigl"},
    "t": [1, 2],
  }
  # Appends on reopen.
  w2 = M.JsonlWriter(tmp_path)
  w2.write_scalars(4, {"loss": 0.125})
  w2.flush()
  assert len(M.read_jsonl(tmp_path)) == 3
  w2.close()


def test_read_jsonl_skips_truncated_last_line_but_not_middle(tmp_path):
  p = tmp_path / "metrics.jsonl"
  p.write_text('{"step": 1, "a": 1}\n{"step": 2, "a"')
  assert M.read_jsonl(p) == [{"step": 1, "a": 1}]
  p.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2"):
    M.read_jsonl(p)


def test_logging_writer_logs(caplog):
  caplog.set_level(pylogging.INFO)
  M.LoggingWriter("train").write_scalars(5, {"loss": 0.5, "acc": jnp.float32(1.0)})
  assert any("[5] train acc=1, loss=0.5" in r.getMessage() for r in caplog.records)


class _Recorder:
  def __init__(self):
    self.calls = []

  def write_scalars(self, step, scalars):
    self.calls.append(("scalars", step, dict(scalars)))

  def write_hparams(self, hparams):
    self.calls.append(("hparams", dict(hparams)))

  def flush(self):
    self.calls.append(("flush",))

  def close(self):
    self.calls.append(("close",))


def test_multi_writer_forwards_everything_and_protocol():
  a, b = _Recorder(), _Recorder()
  assert isinstance(a, M.MetricWriter)
  w = M.MultiWriter([a, b])
  w.write_hparams({"x": 1})
  w.write_scalars(3, {"y": 2})
  w.flush()
  w.close()
  assert (
    a.calls
    == b.calls
    == [
      ("hparams", {"x": 1}),
      ("scalars", 3, {"y": 2}),
      ("flush",),
      ("close",),
    ]
  )


def test_tensorboard_writer_missing_dependency_is_clear(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  with pytest.raises(ImportError, match=r"sparsejax\[tensorboard\]"):
    M.TensorBoardWriter(tmp_path)


def test_create_default_writer(tmp_path):
  w = M.create_default_writer(tmp_path)
  w.write_scalars(1, {"a": 1.0})
  w.close()
  assert M.read_jsonl(tmp_path) == [{"step": 1, "a": 1.0}]
  only_log = M.create_default_writer(tmp_path / "other", just_logging=True)
  assert isinstance(only_log, M.LoggingWriter)
  assert not (tmp_path / "other" / "metrics.jsonl").exists()


# -- progress ----------------------------------------------------------------------------


def test_report_progress_line_rate_eta_and_sections():
  lines = []
  rec = _Recorder()
  p = M.ReportProgress(100, writer=rec, every_steps=10, every_secs=None, log_fn=lines.append)
  with p.timed("train_step"):  # first call: compile notice, not averaged
    pass
  assert lines[0].startswith("train_step: first call, compiling")
  assert "first call took" in lines[1]
  assert p(0, t=0.0) is False  # starts the clock
  for _ in range(2):
    with p.timed("train_step"):
      pass
  with p.timed("mask_update", first_call_compiles=False):
    pass
  assert p(5, t=1.0) is False  # not a multiple of 10
  assert p(10, t=2.0) is True
  line = lines[-1]
  # 10 steps in 2 s -> 5 steps/s; 90 steps left -> 18 s.
  assert line.startswith("step 10/100 (10.0%) | 5.0 steps/s | ETA 0:18")
  assert "train_step" in line and "mask_update" in line
  scalars = rec.calls[-1][2]
  assert scalars["perf/steps_per_sec"] == pytest.approx(5.0)
  assert "perf/train_step_ms" in scalars and "perf/mask_update_ms" in scalars
  # Sections reset after a report; totals do not.
  assert p(20, t=4.0) is True
  assert "train_step" not in lines[-1]
  summary = p.summary()
  assert summary["train_step"]["calls"] == 2 and summary["mask_update"]["calls"] == 1
  assert summary["train_step"]["first_call_s"] >= 0.0


def test_report_progress_time_based_and_final_step():
  lines = []
  p = M.ReportProgress(50, every_steps=None, every_secs=10.0, log_fn=lines.append)
  p(1, t=0.0)
  assert p(2, t=5.0) is False
  assert p(3, t=11.0) is True
  assert p(50, t=12.0) is True  # the last step always reports
  assert "step 50/50 (100.0%)" in lines[-1]


def test_report_progress_validates_arguments():
  with pytest.raises(ValueError, match="every_steps"):
    M.ReportProgress(10, every_steps=0)
  with pytest.raises(ValueError, match="every_secs"):
    M.ReportProgress(10, every_secs=-1.0)


# -- plots -------------------------------------------------------------------------------


def test_plots_write_png_files(tmp_path):
  pytest.importorskip("matplotlib")
  records = [
    {"step": 0, "dst/ever_active": 0.1},
    {"step": 10, "train/loss": 2.0, "dst/turnover": 0.3, "dst/ever_active": 0.15},
    {"step": 20, "train/loss": 1.0, "eval/accuracy": 0.5, "dst/turnover": 0.1},
  ]
  figs = {
    "curves.png": P.plot_curves({"rigl": records, "set": records[:2]}),
    "topology.png": P.plot_topology({"rigl": records}),
    "sparsity.png": P.plot_layer_sparsity({"a": 0.9, "b": 0.5}, {"a": 0.91, "b": 0.5}),
    "fan_in.png": P.plot_fan_in_heatmap([0, 10], [[1, 2, 3], [2, 2, 2]], layer="a"),
  }
  for name, fig in figs.items():
    path = P.save_figure(fig, tmp_path / "plots" / name)
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_fan_in_heatmap_rejects_bad_shape():
  pytest.importorskip("matplotlib")
  with pytest.raises(ValueError, match="len\\(steps\\)=3"):
    P.plot_fan_in_heatmap([0, 1, 2], [[1, 2]])


def test_plotting_without_matplotlib_is_clear(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
  with pytest.raises(ImportError, match="matplotlib"):
    P.plot_layer_sparsity({"a": 0.5})
