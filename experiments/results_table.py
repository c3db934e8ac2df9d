r"""Baseline table: dense, static, SET, RigL (and SRigL / N:M when available) on MNIST-1D.

Runs every method at 80/90/95% sparsity (ERK) with 3 seeds using the method config files in
``experiments/configs/`` unchanged except for ``dst.sparsity`` and the seeds, then writes
``experiments/RESULTS.md`` (test accuracy mean ± 95% CI, wall time, the configs used, and
whether RigL ≥ SET ≥ static holds at 90–95%) and ``results.json`` next to the runs::

  python -m experiments.results_table --workdir /tmp/sparsejax_results

Each run has its own workdir under ``--workdir``; rerunning the command resumes: finished
runs are read back from their checkpoints instead of being trained again. A persistent JAX
compilation cache in ``<workdir>/jax_cache`` lets runs that share a program skip compiling.
Budget: about 30 minutes on 2 CPU cores (``--jobs 2`` runs two trainings at once).
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import importlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

_DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
_BOOKKEEPING = (
  "seed",
  "dst.seed",
  "dst.sparsity",
  "checkpoint_every_steps",
  "progress_every_secs",
  "write_plots",
)
# Two-sided 95% Student-t quantiles for n-1 degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the table."""

  config_file: str  # module under experiments.configs
  preset: str
  method: str
  sparsity: float
  seed: int

  @property
  def name(self) -> str:
    tag = self.config_file + (f"-{self.preset}" if self.preset else "")
    return f"{tag}_s{self.sparsity:g}_seed{self.seed}"


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
  """Mean and half-width of the two-sided 95% Student-t confidence interval."""
  n = len(values)
  m = statistics.fmean(values)
  if n < 2:
    return m, float("nan")
  t = _T95.get(n - 1, 1.96)
  return m, t * statistics.stdev(values) / math.sqrt(n)


def make_config(run: Run, workdir: str, num_train_steps: int | None):
  """The method's config file with this run's sparsity and seeds."""
  from experiments import builders  # pylint: disable=g-import-not-at-top

  module = importlib.import_module(f"experiments.configs.{run.config_file}")
  config = module.get_config(run.preset or None)
  config.seed = run.seed
  fields = builders.METHODS[config.dst.method].fields
  if "seed" in fields:  # the mask seed, for methods that draw random masks
    config.dst.seed = run.seed
  if "sparsity" in fields and run.config_file != "nm":
    config.dst.sparsity = run.sparsity
  if num_train_steps:
    config.num_train_steps = num_train_steps
  config.data.cache_dir = os.path.join(workdir, "data")
  config.jax_cache_dir = os.path.join(workdir, "jax_cache")
  config.write_plots = False
  config.checkpoint_every_steps = 0  # only the final checkpoint
  config.progress_every_secs = 30.0
  return config


def _overrides(config) -> dict[str, Any]:
  base = importlib.import_module("experiments.configs.default").get_config().to_dict()
  out = {}

  def walk(a, b, prefix=""):
    for k, v in b.items():
      if isinstance(v, dict):
        walk(a.get(k, {}), v, f"{prefix}{k}.")
      elif a.get(k) != v and k not in ("cache_dir", "jax_cache_dir"):
        out[prefix + k] = v

  walk(base, config.to_dict())
  return out


def run_one(run: Run, workdir: str, num_train_steps: int | None) -> dict[str, Any]:
  """Trains (or reads back) one run; returns its result row."""
  from experiments import train  # pylint: disable=g-import-not-at-top

  config = make_config(run, workdir, num_train_steps)
  run_dir = os.path.join(workdir, run.name)
  done_path = os.path.join(run_dir, "result.json")
  if os.path.exists(done_path):  # finished by an earlier invocation.
    with open(done_path, encoding="utf-8") as f:
      return json.load(f)
  t0 = time.monotonic()
  result = train.train_and_evaluate(config, run_dir)
  row = {
    **dataclasses.asdict(run),
    "name": run.name,
    "test_accuracy": result["test_accuracy"],
    "sparsity_realised": result["sparsity"],
    "flops_ratio": result["flops_sparse"] / result["flops_dense"],
    "wall_time_s": time.monotonic() - t0,
    "num_train_steps": int(config.num_train_steps),
    "overrides": _overrides(config),
  }
  with open(done_path, "w", encoding="utf-8") as f:
    json.dump(row, f, indent=2)
  return row


def plan(methods: Sequence[str], sparsities: Sequence[float], seeds: Sequence[int]) -> list[Run]:
  """All runs: dense once per seed, each sparse method at each sparsity and seed."""
  runs = []
  for method in methods:
    if method == "dense":
      runs += [Run("dense", "", "dense", 0.0, s) for s in seeds]
    elif method == "nm":
      runs += [Run("nm", "", "rigl 2:4", 0.5, s) for s in seeds]
    elif method == "nm_sr_ste":
      runs += [Run("nm", "sr_ste", "nm_sr_ste 2:4", 0.5, s) for s in seeds]
    else:
      runs += [Run(method, "", method, sp, s) for sp in sparsities for s in seeds]
  return runs


def _fmt(values: Sequence[float]) -> str:
  m, ci = mean_ci(values)
  if math.isnan(ci):
    return f"{100 * m:.1f} (n=1)"
  return f"{100 * m:.1f} ± {100 * ci:.1f}"


def _order_section(acc: dict[tuple[str, float], list[float]], sparsities: list[float]) -> list[str]:
  """The RigL ≥ SET ≥ static verdict at each sparsity ≥ 90%."""
  lines = ["", "## Does RigL ≥ SET ≥ static hold?", ""]
  for s in [s for s in sparsities if s >= 0.9]:
    have = all((m, s) in acc for m in ("rigl", "set", "static"))
    if not have:
      lines.append(f"* {100 * s:g}%: not all of rigl/set/static were run.")
      continue
    means = {m: mean_ci(acc[(m, s)]) for m in ("rigl", "set", "static")}
    order_ok = means["rigl"][0] >= means["set"][0] >= means["static"][0]
    detail = ", ".join(
      f"{m} {100 * means[m][0]:.1f} ± {100 * means[m][1]:.1f}" for m in ("rigl", "set", "static")
    )
    overlap = []
    for a, b in (("rigl", "set"), ("set", "static")):
      (ma, ca), (mb, cb) = means[a], means[b]
      if abs(ma - mb) < max(ca, cb):
        overlap.append(f"{a} vs {b}")
    verdict = "holds" if order_ok else "does NOT hold"
    note = (
      f"; the difference(s) {', '.join(overlap)} lie within the 95% CI (not significant)"
      if overlap
      else "; both gaps exceed the 95% CIs"
    )
    lines.append(f"* {100 * s:g}%: the order {verdict} on the means ({detail}){note}.")
  return lines


def _topology_section(rows: list[dict[str, Any]]) -> list[str]:
  """The final topology of the first seed's runs."""
  lines: list[str] = []
  first_seed = min(r["seed"] for r in rows)
  topo_rows = [r for r in rows if r.get("topology") and r["seed"] == first_seed]
  layers = sorted({layer for r in topo_rows for layer in r["topology"]})
  if topo_rows and layers:
    lines += [
      "",
      f"## Topology at the end of training (seed {first_seed})",
      "",
      "Active neurons and fan-in range (min–max over active neurons) per sparse layer, from "
      "the last topology record of each run's `metrics.jsonl`.",
      "",
      "| run | " + " | ".join(f"`{layer}`" for layer in layers) + " |",
      "| --- | " + " | ".join("---" for _ in layers) + " |",
    ]
    for r in topo_rows:
      cells = []
      for layer in layers:
        t = r["topology"].get(layer)
        cells.append(
          f"{t['active_neurons']} active, {t['fan_in_min']}–{t['fan_in_max']}" if t else "dense"
        )
      label = f"{r['method']} {100 * r['sparsity']:g}%"
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return lines


def _configs_section(rows: list[dict[str, Any]], sparsities: list[float]) -> list[str]:
  """Each config file and its differences from default.py."""
  lines = [
    "",
    "## Configs",
    "",
    "Each row is its config file run with the overrides below (plus `seed` = the seed, "
    "`dst.seed` = the seed for methods with random masks, and bookkeeping fields: "
    "`data.cache_dir`, `jax_cache_dir`, `write_plots=False`, `checkpoint_every_steps=0`, "
    "`progress_every_secs=30`).",
    "",
  ]
  seen = set()
  for r in rows:
    key = (r["config_file"], r["preset"])
    if key in seen:
      continue
    seen.add(key)
    preset = f":{r['preset']}" if r["preset"] else ""
    over = {k: v for k, v in r["overrides"].items() if k not in _BOOKKEEPING}
    sweep = (
      ""
      if r["config_file"] in ("dense", "nm")
      else " with `--config.dst.sparsity` ∈ {" + ", ".join(f"{s:g}" for s in sparsities) + "}"
    )
    lines.append(
      f"* `experiments/configs/{r['config_file']}.py{preset}`{sweep}; differences from "
      f"`default.py`: `{json.dumps(over, sort_keys=True)}`"
    )
  return lines


def write_markdown(rows: list[dict[str, Any]], path: str, meta: dict[str, Any]) -> str:
  """Writes the RESULTS.md table and returns its text."""
  by: dict[tuple[str, float], list[dict]] = {}
  for r in rows:
    by.setdefault((r["method"], r["sparsity"]), []).append(r)
  sparsities = sorted({r["sparsity"] for r in rows if r["method"] not in ("dense",)} - {0.5})
  methods = []
  for r in rows:
    if r["method"] not in methods:
      methods.append(r["method"])
  acc = {k: [r["test_accuracy"] for r in v] for k, v in by.items()}
  lines = [
    "# sparsejax baselines on MNIST-1D",
    "",
    "Generated by `python -m experiments.results_table` "
    f"({meta['date']}; {meta['total_wall_min']:.1f} min wall clock over "
    f"{meta.get('invocations', 1)} invocation(s), {meta['sum_run_min']:.1f} min summed over "
    f"runs; {meta['machine']}; the machine was shared with other work, so times are "
    "indicative).",
    "",
    "Test accuracy (%) on the 1000 MNIST-1D test samples, mean ± 95% confidence interval "
    f"(Student t) over seeds {meta['seeds']}; every sparse layer allocation is ERK.",
    "",
    "| method | " + " | ".join(f"{100 * s:g}% sparse" for s in sparsities) + " | wall time / run |",
    "| --- | " + " | ".join("---:" for _ in sparsities) + " | ---: |",
  ]
  for method in methods:
    cells = []
    walls = [r["wall_time_s"] for r in rows if r["method"] == method]
    for s in sparsities:
      if method == "dense":
        cells.append(_fmt(acc[("dense", 0.0)]) + " (dense)")
      elif (method, s) in acc:
        cells.append(_fmt(acc[(method, s)]))
      elif (method, 0.5) in acc:
        cells.append(_fmt(acc[(method, 0.5)]) + " (50%, 2:4)" if s == sparsities[0] else "–")
      else:
        cells.append("–")
    lines.append(f"| {method} | " + " | ".join(cells) + f" | {statistics.fmean(walls):.0f} s |")
  lines += _order_section(acc, sparsities)
  lines += _topology_section(rows)
  lines += _configs_section(rows, sparsities)
  lines += [
    "",
    "Reproduce one cell: `python -m experiments.main --config experiments/configs/rigl.py "
    "--config.dst.sparsity=0.95 --config.seed=1 --config.dst.seed=1 --workdir /tmp/rigl95_1`.",
    "",
    f"Raw numbers: `results.json` in the results workdir ({len(rows)} runs).",
    "",
  ]
  text = "\n".join(lines)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return text


def _define_flags() -> None:
  flags.DEFINE_string("workdir", "/tmp/sparsejax_results", "Where the runs go (resumable).")
  flags.DEFINE_string("out", _DEFAULT_OUT, "Markdown file to write.")
  flags.DEFINE_list(
    "methods", ["dense", "static", "set", "rigl", "srigl", "nm"], "Methods (rows) to run."
  )
  flags.DEFINE_list("sparsities", ["0.8", "0.9", "0.95"], "Sparsities (columns).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
  flags.DEFINE_integer("num_train_steps", 0, "Override the configs' step count (0: keep).")
  flags.DEFINE_integer("jobs", 1, "Trainings run at once (separate processes).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  workdir = os.path.abspath(f.workdir)
  os.makedirs(workdir, exist_ok=True)
  runs = plan(f.methods, [float(s) for s in f.sparsities], [int(s) for s in f.seeds])
  logging.info("%d runs planned in %s", len(runs), workdir)
  t0 = time.monotonic()
  rows: list[dict[str, Any]] = []
  if f.jobs <= 1:
    for i, run in enumerate(runs):
      rows.append(run_one(run, workdir, f.num_train_steps or None))
      print(f"[{i + 1}/{len(runs)}] {run.name}: {rows[-1]['test_accuracy']:.4f}", flush=True)
  else:
    ctx = multiprocessing.get_context("spawn")  # JAX is not fork-safe.
    with futures.ProcessPoolExecutor(f.jobs, mp_context=ctx) as pool:
      jobs = {pool.submit(run_one, r, workdir, f.num_train_steps or None): r for r in runs}
      for i, fut in enumerate(futures.as_completed(jobs)):
        rows.append(fut.result())
        print(
          f"[{i + 1}/{len(runs)}] {jobs[fut].name}: {rows[-1]['test_accuracy']:.4f}", flush=True
        )
    order = {r.name: i for i, r in enumerate(runs)}
    rows.sort(key=lambda r: order[r["name"]])
  total = time.monotonic() - t0
  for row in rows:
    row["topology"] = final_topology(os.path.join(workdir, row["name"]))
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as fh:
    json.dump(rows, fh, indent=2)
  invocations = _record_invocation(workdir, total, f.jobs, len(rows))
  meta = {
    "date": time.strftime("%Y-%m-%d"),
    "total_wall_min": sum(i["wall_min"] for i in invocations),
    "invocations": len(invocations),
    "sum_run_min": sum(r["wall_time_s"] for r in rows) / 60.0,
    "machine": f"{os.cpu_count()} CPU cores, jobs={max(i['jobs'] for i in invocations)}",
    "seeds": ", ".join(f.seeds),
  }
  print(write_markdown(rows, f.out, meta))


def _record_invocation(workdir: str, seconds: float, jobs: int, n_runs: int) -> list[dict]:
  """Appends this invocation's wall time to ``<workdir>/timing.json``; returns all of them."""
  path = os.path.join(workdir, "timing.json")
  invocations = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as fh:
      invocations = json.load(fh)
  invocations.append(
    {
      "date": time.strftime("%Y-%m-%d %H:%M"),
      "wall_min": seconds / 60.0,
      "jobs": jobs,
      "runs": n_runs,
    }
  )
  with open(path, "w", encoding="utf-8") as fh:
    json.dump(invocations, fh, indent=2)
  return invocations


def final_topology(run_dir: str) -> dict[str, dict[str, float]]:
  """Per layer, the active neurons and fan-in range of the last topology record of a run."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  import sparsejax as sj  # pylint: disable=g-import-not-at-top

  last: dict[str, Any] = {}
  for rec in sj.metrics.read_jsonl(path):
    if any(k.startswith("active_neurons/") for k in rec):
      last = rec
  out: dict[str, dict[str, float]] = {}
  for k, v in last.items():
    if k.startswith("active_neurons/"):
      layer = k[len("active_neurons/") :]
      out[layer] = {
        "active_neurons": v,
        "fan_in_min": last.get(f"fan_in/{layer}/min"),
        "fan_in_max": last.get(f"fan_in/{layer}/max"),
      }
  return out


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  _define_flags()
  app.run(main)
