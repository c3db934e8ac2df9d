r"""The results table in the form of RigL's Table 1 on MNIST-1D, and the SRigL study.

Runs dense, static, SNIP, SET, RigL, SRigL, GMP, GraNet (and RigL 2:4) at 80/90/95%
sparsity (ERK) with 3 seeds, each from its config file in ``experiments/configs/``
unchanged except for ``dst.sparsity`` and the seeds, plus the SRigL-at-95% study
(``experiments/srigl_study.py``; ``--nostudy`` skips it), then writes
``experiments/RESULTS.md`` (per sparsity: test accuracy mean ± 95% CI, training and
inference FLOPs relative to dense; wall time; whether RigL ≥ SET ≥ static holds at 90–95%;
the final topology; the configs; the study) and ``results.json`` next to the runs::

  python -m experiments.results_table --workdir /tmp/sparsejax_results --jobs 2

Each run has its own workdir under ``--workdir``; rerunning the command resumes: finished
runs are read back from their ``result.json`` instead of being trained again (a finished
run of a config that has changed since is refused, naming the fields). A persistent JAX
compilation cache in ``<workdir>/jax_cache`` lets runs that share a program skip compiling.
Text written by hand below the marker line of ``RESULTS.md``
(:data:`experiments.results_markdown.HAND_WRITTEN_MARKER`) is kept. Budget: about 75 table
runs and 27 study runs of 20–150 s each on 2 CPU cores (``--jobs 2`` runs two at once).

Modules: ``results_runs`` (one run: config, workdir, row), ``results_markdown`` (the text),
``training_flops`` (training FLOPs from a run's mask history), ``srigl_study`` (the study).
"""

from __future__ import annotations

import concurrent.futures as futures
import functools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

from experiments import results_markdown as md
from experiments import results_runs, srigl_study, training_flops

_DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")

# The names the module had before it was split (tests and notebooks import them from here).
Run = results_runs.Run
make_config = results_runs.make_config
run_one = results_runs.run_one
final_topology = results_runs.final_topology
mean_ci = md.mean_ci
write_markdown = md.write_markdown


#: The table's rows (``--methods``): each a config file, ``nm`` = RigL 2:4 at 50%.
METHODS = ("dense", "static", "snip", "set", "rigl", "srigl", "gmp", "granet", "nm")


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


def _define_flags() -> None:
  flags.DEFINE_string("workdir", "/tmp/sparsejax_results", "Where the runs go (resumable).")
  flags.DEFINE_string("out", _DEFAULT_OUT, "Markdown file to write.")
  flags.DEFINE_list("methods", list(METHODS), "Methods (rows) to run.")
  flags.DEFINE_list("sparsities", ["0.8", "0.9", "0.95"], "Sparsities (columns).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
  flags.DEFINE_integer("num_train_steps", 0, "Override the configs' step count (0: keep).")
  flags.DEFINE_integer("jobs", 1, "Trainings run at once (separate processes).")
  flags.DEFINE_bool("study", True, "Also run the SRigL-at-95% study (srigl_study.py).")


def run_all(runs: Sequence[Run], workdir: str, num_steps: int | None, jobs: int) -> list[dict]:
  """Runs (or reads back) every run, ``jobs`` at a time; returns the rows in plan order.

  A run that fails is reported and left out (the others go on); rerunning resumes.
  """
  rows: dict[str, dict[str, Any]] = {}
  failed: list[str] = []

  def done(i: int, run: Run, fn) -> None:
    try:
      rows[run.name] = fn()
      print(f"[{i + 1}/{len(runs)}] {run.name}: {rows[run.name]['test_accuracy']:.4f}", flush=True)
    except Exception as e:  # noqa: BLE001 - report, keep the other runs going
      failed.append(run.name)
      logging.error("Run %s failed: %r", run.name, e)

  if jobs <= 1:
    for i, run in enumerate(runs):
      done(i, run, functools.partial(run_one, run, workdir, num_steps))
  else:
    ctx = multiprocessing.get_context("spawn")  # JAX is not fork-safe.
    with futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
      submitted = {pool.submit(run_one, r, workdir, num_steps): r for r in runs}
      for i, fut in enumerate(futures.as_completed(submitted)):
        done(i, submitted[fut], fut.result)
  if failed:
    logging.error("%d run(s) failed: %s", len(failed), ", ".join(failed))
  return [rows[r.name] for r in runs if r.name in rows]


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  workdir = os.path.abspath(f.workdir)
  os.makedirs(workdir, exist_ok=True)
  seeds = [int(s) for s in f.seeds]
  runs = plan(f.methods, [float(s) for s in f.sparsities], seeds)
  table_names = {r.name for r in runs}
  if f.study:
    runs += [r for r in srigl_study.plan(seeds) if r.name not in table_names]
  logging.info("%d runs planned in %s", len(runs), workdir)
  t0 = time.monotonic()
  all_rows = run_all(runs, workdir, f.num_train_steps or None, f.jobs)
  total = time.monotonic() - t0
  for row in all_rows:
    run_dir = os.path.join(workdir, row["name"])
    row["topology"] = final_topology(run_dir)
    if row.get("train_flops_ratio") is None:  # a row written before training FLOPs existed
      row["train_flops_ratio"] = training_flops.run_training_flops(run_dir)["ratio"]
  rows = [r for r in all_rows if r["name"] in table_names]
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as fh:
    json.dump(all_rows, fh, indent=2)
  invocations = _record_invocation(workdir, total, f.jobs, len(all_rows))
  meta = {
    "date": time.strftime("%Y-%m-%d"),
    "total_wall_min": sum(i["wall_min"] for i in invocations),
    "invocations": len(invocations),
    "sum_run_min": sum(r["wall_time_s"] for r in all_rows) / 60.0,
    "machine": f"{os.cpu_count()} CPU cores, jobs={max(i['jobs'] for i in invocations)}",
    "seeds": ", ".join(f.seeds),
  }
  by_name = {r["name"]: r for r in all_rows}
  study = (lambda: srigl_study.section(by_name, seeds)) if f.study else None
  print(write_markdown(rows, f.out, meta, study))


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


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  _define_flags()
  app.run(main)
