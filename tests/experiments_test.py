"""End-to-end tests of experiments/: smoke runs, exact resume, errors, metrics, plots.

The runs share a JAX persistent compilation cache and a dataset cache (session fixtures),
so a program compiled by one test is reused by the others.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

import sparsejax as sj
from sparsejax._src.integration import checkpointing as C
from sparsejax._src.metrics import topology as M

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
if str(REPO) not in sys.path:  # experiments/ is a folder of the repo, not an installed package.
  sys.path.insert(0, str(REPO))

from experiments import train  # noqa: E402

# (config module, preset, required sparsejax function or None)
CONFIGS = [
  ("dense", "smoke", None),
  ("static", "smoke", "static_sparse"),
  ("set", "smoke", "set_"),
  ("rigl", "smoke", "rigl"),
  # SRigL's train step alone compiles in 30+ s on a loaded 2-core CPU.
  pytest.param("srigl", "smoke", "srigl", marks=pytest.mark.slow),
  ("nm", "smoke", "rigl"),
  ("nm", "sr_ste,smoke", "nm_sr_ste"),
]


@pytest.fixture(scope="session", name="shared")
def fixture_shared(tmp_path_factory):
  return {
    "jax_cache": str(tmp_path_factory.mktemp("jax_cache")),
    "data": str(tmp_path_factory.mktemp("data")),
  }


def _config(module: str, shared, preset: str = "smoke", **overrides):
  config = importlib.import_module(f"experiments.configs.{module}").get_config(preset)
  config.jax_cache_dir = shared["jax_cache"]
  config.data.cache_dir = shared["data"]
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _records(workdir, drop_perf: bool = True) -> list[dict]:
  out = []
  for r in M.read_jsonl(Path(workdir) / "metrics.jsonl"):
    if drop_perf:
      r = {k: v for k, v in r.items() if not k.startswith("perf/")}
      if set(r) == {"step"}:
        continue
    out.append(r)
  return out


def _snapshot(directory) -> dict[str, tuple[int, int, str]]:
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        digest = hashlib.sha1(fh.read()).hexdigest()
      st = os.stat(p)
      out[p] = (st.st_size, st.st_mtime_ns, digest)
  return out


@pytest.fixture(scope="module", name="rigl_run")
def fixture_rigl_run(shared, tmp_path_factory):
  """One RigL smoke run with plots, shared by the read-only tests below."""
  workdir = tmp_path_factory.mktemp("rigl_smoke")
  result = train.train_and_evaluate(_config("rigl", shared, write_plots=True), str(workdir))
  return workdir, result


# -- every config runs ---------------------------------------------------------------------


@pytest.mark.parametrize(("module", "preset", "needs"), CONFIGS)
def test_smoke_run_every_config(shared, tmp_path, module, preset, needs):
  if needs is not None and not hasattr(sj, needs):
    pytest.skip(f"sparsejax.{needs} is not available in this version")
  config = _config(module, shared, preset)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == config.num_train_steps
  assert 0.0 <= result["test_accuracy"] <= 1.0
  assert result["train_step_compiles"] == 1
  records = _records(tmp_path)
  assert records[-1]["final/test_accuracy"] == pytest.approx(result["test_accuracy"])
  if config.dst.method == "dense":
    assert result["sparsity"] == 0.0
  else:
    assert result["sparsity"] == pytest.approx(config.dst.sparsity, abs=0.02)
  with C.CheckpointManager(tmp_path / "checkpoints") as ckpt:
    assert ckpt.latest_step() == config.num_train_steps


@pytest.mark.parametrize(
  ("module", "preset", "needs"), [("rigl", "smoke", "rigl"), ("nm", "sr_ste,smoke", "nm_sr_ste")]
)
def test_resume_is_bit_exact(shared, tmp_path, module, preset, needs):
  if not hasattr(sj, needs):
    pytest.skip(f"sparsejax.{needs} is not available in this version")
  full_dir, split_dir = tmp_path / "full", tmp_path / "split"
  full = train.train_and_evaluate(_config(module, shared, preset), str(full_dir))
  # Stop at 225: not a multiple of the log (50), eval (200) or update (50) periods.
  first = train.train_and_evaluate(
    _config(module, shared, preset, stop_after_step=225), str(split_dir)
  )
  assert first["step"] == 225 and first["resumed_from"] is None
  second = train.train_and_evaluate(_config(module, shared, preset), str(split_dir))
  assert second["resumed_from"] == 225 and second["step"] == 400
  assert second["test_accuracy"] == full["test_accuracy"]
  assert second["test_loss"] == full["test_loss"]
  # Params, masks, optimizer state, DST count/key, data position: identical bit for bit.
  a = ocp.StandardCheckpointer().restore(full_dir / "checkpoints" / "400" / "state")
  b = ocp.StandardCheckpointer().restore(split_dir / "checkpoints" / "400" / "state")
  flat_a, flat_b = ocp.tree.to_flat_dict(a, sep="/"), ocp.tree.to_flat_dict(b, sep="/")
  assert sorted(flat_a) == sorted(flat_b)
  assert any("masks" in k for k in flat_a) or module == "nm"  # SR-STE keeps no masks
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)
  # Metrics (all but the wall-clock perf/* keys) and topology snapshots: identical.
  assert _records(split_dir) == _records(full_dir)
  assert (split_dir / "topology.jsonl").read_text() == (full_dir / "topology.jsonl").read_text()


def test_rerun_of_finished_run_changes_nothing(shared, rigl_run, tmp_path):
  workdir, result = rigl_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  before = _records(copy)
  again = train.train_and_evaluate(_config("rigl", shared, write_plots=True), str(copy))
  assert again["resumed_from"] == 400 and again["test_accuracy"] == result["test_accuracy"]
  assert _records(copy) == before


# -- metrics and plots -----------------------------------------------------------------------


def test_metrics_jsonl_has_documented_keys(rigl_run):
  workdir, _ = rigl_run
  records = _records(workdir)
  assert all(isinstance(r["step"], int) for r in records)
  keys = set().union(*records)
  layers = ["convs/0/kernel", "convs/1/kernel", "convs/2/kernel", "head/kernel"]
  expected = {
    "train/loss",
    "train/accuracy",
    "learning_rate",
    "eval/loss",
    "eval/accuracy",
    "sparsity/total",
    "sparsity/global",
    "nnz/total",
    "flops/dense",
    "flops/sparse",
    "flops/ratio",
    "dst/turnover",
    "dst/drop_fraction",
    "dst/ever_active",
    "final/test_accuracy",
    "final/test_loss",
  }
  for layer in layers:
    expected |= {
      f"sparsity/{layer}",
      f"dst/turnover/{layer}",
      f"fan_in/{layer}/min",
      f"fan_in/{layer}/max",
      f"active_neurons/{layer}",
      f"final/weight_sparsity/{layer}",
    }
  assert expected <= keys, sorted(expected - keys)
  assert {k for k in M.read_jsonl(workdir / "metrics.jsonl")[-1]} >= {"step"}
  assert any(k.startswith("perf/steps_per_sec") for r in M.read_jsonl(workdir) for k in r)
  # Mask updates at counts 50, ..., 250 (update_every 50, end 0.75·400 = 300), logged at
  # the number of completed steps; the drop fraction is 0.3·½(1+cos(π·t/300)).
  updates = [r for r in records if "dst/turnover" in r]
  assert [r["step"] for r in updates] == [51, 101, 151, 201, 251]
  assert updates[0]["dst/drop_fraction"] == pytest.approx(0.15 * (1 + np.cos(np.pi / 6)))
  assert updates[1]["dst/drop_fraction"] == pytest.approx(0.225)
  assert all(0.0 <= r["dst/turnover"] <= 1.0 for r in updates)
  ever = [r["dst/ever_active"] for r in records if "dst/ever_active" in r]
  assert ever == sorted(ever) and ever[0] == pytest.approx(
    1 - records[0]["sparsity/total"], abs=1e-6
  )
  assert json.loads((workdir / "config.json").read_text())["dst"]["method"] == "rigl"
  topo = M.read_jsonl(workdir / "topology.jsonl")
  assert [t["step"] for t in topo] == [0, 51, 101, 151, 201, 251]
  assert len(topo[0]["fan_in"]["head/kernel"]) == 10


def test_plots_written(rigl_run):
  pytest.importorskip("matplotlib")
  workdir, _ = rigl_run
  names = sorted(os.listdir(workdir / "plots"))
  assert {"curves.png", "layer_sparsity.png", "topology.png", "fan_in_head_kernel.png"} <= set(
    names
  )


def test_plot_cli_functions(rigl_run, tmp_path):
  pytest.importorskip("matplotlib")
  from experiments import plot

  workdir, _ = rigl_run
  paths = plot.write_comparison_plots([str(workdir), str(workdir)], str(tmp_path), ["a", "b"])
  assert [os.path.basename(p) for p in paths] == ["curves.png", "topology.png"]
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    plot.write_run_plots(str(tmp_path))


# -- custom criterion through config.extra_imports ---------------------------------------------


def test_custom_criterion_by_import(shared, tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(str(TESTS))
  sys.modules.pop("sparsejax_test_criterion", None)
  config = _config("rigl", shared, extra_imports=("sparsejax_test_criterion",))
  config.dst.grow = "tests_gradient_plus_momentum"
  result = train.train_and_evaluate(config, str(tmp_path))
  module = sys.modules["sparsejax_test_criterion"]
  assert module.CALLS["traced"] > 0  # the registered function built the grow scores
  assert result["step"] == 400
  assert json.loads((tmp_path / "config.json").read_text())["extra_imports"] == [
    "sparsejax_test_criterion"
  ]


def test_unregistered_criterion_and_missing_module_fail_clearly(shared, tmp_path):
  config = _config("rigl", shared)
  config.dst.grow = "no_such_criterion"
  with pytest.raises(ValueError, match="no_such_criterion.*register_criterion"):
    train.train_and_evaluate(config, str(tmp_path))
  config = _config("rigl", shared, extra_imports=("no_such_module_xyz",))
  with pytest.raises(ImportError, match="no_such_module_xyz"):
    train.train_and_evaluate(config, str(tmp_path))


# -- bad input ------------------------------------------------------------------------------


def _run_main(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "experiments.main", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_main_requires_workdir():
  proc = _run_main("--config", "experiments/configs/rigl.py:smoke")
  assert proc.returncode != 0
  assert "workdir" in proc.stderr


def test_main_rejects_config_typo(tmp_path):
  proc = _run_main(
    "--config",
    "experiments/configs/rigl.py:smoke",
    "--config.dst.sparsityy=0.5",
    f"--workdir={tmp_path}",
  )
  assert proc.returncode != 0
  assert "sparsityy" in proc.stderr and 'Did you mean "sparsity"' in proc.stderr
  assert not (tmp_path / "metrics.jsonl").exists()


def test_unknown_preset():
  with pytest.raises(ValueError, match=r"Unknown config preset\(s\) \['smok'\]"):
    _config("rigl", {"jax_cache": "", "data": ""}, preset="smok")


def test_config_typo_in_python_fails(shared, tmp_path):
  config = _config("rigl", shared)
  config.unlock()
  config.dst.sparsityy = 0.5
  with pytest.raises(ValueError, match=r"Unknown config field 'config.dst.sparsityy'"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("dst__method", "rigl2", r"config.dst.method='rigl2'; allowed values: dense, static"),
    ("dataset", "mnist", r"config.dataset='mnist'; allowed values: mnist1d, digits"),
    ("model", "resnet", r"config.model='resnet'; allowed values: mlp, cnn1d, cnn2d"),
    ("dst__distribution", "erk2", r"config.dst.distribution='erk2'"),
    ("dst__sparsity", 1.0, r"config.dst.sparsity must be in \[0, 1\)"),
  ],
)
def test_bad_values_fail_clearly(shared, tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(_config("rigl", shared, **{field: value}), str(tmp_path))


def test_checkpoint_from_other_model_is_refused_and_nothing_changes(shared, rigl_run, tmp_path):
  workdir, _ = rigl_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  before = _snapshot(copy)
  config = _config("rigl", shared, model_kwargs__cnn_channels=8)
  with pytest.raises(ValueError, match=r"convs/1/kernel: checkpoint \(3, 32, 32\) float32 vs "):
    train.train_and_evaluate(config, str(copy))
  assert _snapshot(copy) == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(shared, rigl_run, tmp_path):
  workdir, _ = rigl_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  for f in (copy / "checkpoints" / "400" / "state" / "d").iterdir():
    os.truncate(f, f.stat().st_size // 3)
  before = _snapshot(copy)
  with pytest.raises(
    C.CorruptCheckpointError, match=r"checkpoints/400 (could not be read|is unreadable)"
  ):
    train.train_and_evaluate(_config("rigl", shared), str(copy))
  assert _snapshot(copy) == before


# -- slow ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_main_smoke_end_to_end(tmp_path):
  proc = _run_main("--config", "experiments/configs/rigl.py:smoke", f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Final test accuracy" in proc.stdout
  assert (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_full_rigl_config_reaches_sensible_accuracy(shared, tmp_path):
  config = importlib.import_module("experiments.configs.rigl").get_config()
  config.data.cache_dir = shared["data"]
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["test_accuracy"] >= 0.8
  assert result["sparsity"] == pytest.approx(0.9, abs=0.005)


def test_results_table_statistics_and_markdown(tmp_path):
  from experiments import results_table as rt

  m, ci = rt.mean_ci([0.8, 0.9, 1.0])  # sd 0.1, t(2) = 4.303 -> 4.303 · 0.1 / √3
  assert m == pytest.approx(0.9) and ci == pytest.approx(4.303 * 0.1 / np.sqrt(3))
  accs = {"dense": 0.95, "static": 0.80, "set": 0.84, "rigl": 0.86}
  rows = []
  for method, acc in accs.items():
    for s in [0.0] if method == "dense" else [0.9, 0.95]:
      for seed in range(3):
        rows.append(
          {
            "config_file": method,
            "preset": "",
            "method": method,
            "sparsity": s,
            "seed": seed,
            "test_accuracy": acc - (0.02 if s == 0.95 else 0.0) + 0.001 * seed,
            "wall_time_s": 30.0,
            "overrides": {"dst.method": method},
          }
        )
  meta = {
    "date": "today",
    "total_wall_min": 1.0,
    "sum_run_min": 2.0,
    "machine": "2 cores",
    "seeds": "0, 1, 2",
  }
  text = rt.write_markdown(rows, str(tmp_path / "RESULTS.md"), meta)
  assert "| rigl | 86.1 ± 0.2 | 84.1 ± 0.2 | 30 s |" in text
  assert "| dense | 95.1 ± 0.2 (dense) |" in text
  assert "90%: the order holds on the means" in text
  assert (tmp_path / "RESULTS.md").read_text() == text
