"""Tests for sparsejax's metric writers and progress reporter."""

import json
import logging as pylogging
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax._src.metrics import progress as PR
from sparsejax._src.metrics import writers as W

# -- writers -----------------------------------------------------------------------------


def test_jsonl_writer_lines_and_hparams(tmp_path):
  w = W.JsonlWriter(tmp_path)
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
  w2 = W.JsonlWriter(tmp_path)
  w2.write_scalars(4, {"loss": 0.125})
  w2.flush()
  assert len(W.read_jsonl(tmp_path)) == 3
  w2.close()


def test_read_jsonl_skips_truncated_last_line_but_not_middle(tmp_path):
  p = tmp_path / "metrics.jsonl"
  p.write_text('{"step": 1, "a": 1}\n{"step": 2, "a"')
  assert W.read_jsonl(p) == [{"step": 1, "a": 1}]
  p.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2"):
    W.read_jsonl(p)


def test_logging_writer_logs(caplog):
  caplog.set_level(pylogging.INFO)
  W.LoggingWriter("train").write_scalars(5, {"loss": 0.5, "acc": jnp.float32(1.0)})
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
  assert isinstance(a, W.MetricWriter)
  w = W.MultiWriter([a, b])
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
    W.TensorBoardWriter(tmp_path)


def test_create_default_writer(tmp_path):
  w = W.create_default_writer(tmp_path)
  w.write_scalars(1, {"a": 1.0})
  w.close()
  assert W.read_jsonl(tmp_path) == [{"step": 1, "a": 1.0}]
  only_log = W.create_default_writer(tmp_path / "other", just_logging=True)
  assert isinstance(only_log, W.LoggingWriter)
  assert not (tmp_path / "other" / "metrics.jsonl").exists()


# -- progress ----------------------------------------------------------------------------


def test_report_progress_line_rate_eta_and_sections():
  lines = []
  rec = _Recorder()
  p = PR.ReportProgress(100, writer=rec, every_steps=10, every_secs=None, log_fn=lines.append)
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
  p = PR.ReportProgress(50, every_steps=None, every_secs=10.0, log_fn=lines.append)
  p(1, t=0.0)
  assert p(2, t=5.0) is False
  assert p(3, t=11.0) is True
  assert p(50, t=12.0) is True  # the last step always reports
  assert "step 50/50 (100.0%)" in lines[-1]


def test_report_progress_validates_arguments():
  with pytest.raises(ValueError, match="every_steps"):
    PR.ReportProgress(10, every_steps=0)
  with pytest.raises(ValueError, match="every_secs"):
    PR.ReportProgress(10, every_secs=-1.0)
