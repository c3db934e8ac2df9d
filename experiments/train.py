"""Training and evaluation for the sparsejax experiments.

:func:`train_and_evaluate` is the one entry point shared by the command line
(``experiments/main.py``), the tests and the notebooks::

  from experiments import train
  from experiments.configs import rigl
  metrics = train.train_and_evaluate(rigl.get_config("smoke"), "/tmp/run")

What a run does:

1. validates the config against ``configs/default.py`` (:mod:`experiments.config_lib`:
   unknown fields and bad values are errors naming the field and the allowed values) and
   imports ``config.extra_imports`` (so a module that calls
   ``sparsejax.register_criterion`` can provide ``config.dst.grow``);
2. builds the data (offline, or tfds records from ``config.data.dir``; each process loads
   only its rows of every global batch), the NNX model and ``nnx.Optimizer(model, tx,
   wrt=nnx.Param)`` where ``tx`` is the transformation of ``config.dst.method``
   (:data:`experiments.builders.METHODS`), created directly into the mesh's shardings
   (:func:`experiments.steps.initialize`), and starts sparse (``sparsejax.apply_masks``);
3. resumes from the latest checkpoint in ``<workdir>/checkpoints`` if there is one
   (:mod:`experiments.workdir`: a checkpoint of another model is refused with a
   ``ValueError``; a corrupt one raises, never a silent fresh start; a config that differs
   from the one the run was started with is refused unless ``allow_config_change``);
4. trains with a jitted :func:`train_step` that compiles once, writing metrics to the log
   and to ``<workdir>/metrics.jsonl``, a progress line, checkpoints, and plots in
   ``<workdir>/plots/`` at the end; prints the final test accuracy and returns the final
   metrics. In a multi-process run (:mod:`experiments.distributed`) process 0 writes the
   files and every process its shards of the checkpoints.

``metrics.jsonl`` keys (one JSON object per line, always with ``step`` = number of completed
optimizer steps):

* every ``log_every_steps``: ``train/loss``, ``train/accuracy`` (means over the window),
  ``learning_rate``;
* every ``eval_every_steps`` and at the end: ``eval/loss``, ``eval/accuracy`` (test split),
  ``sparsity/total`` (over masked layers), ``sparsity/global`` (zeros over all params),
  ``sparsity/<layer>``, ``nnz/total``, ``flops/dense``, ``flops/sparse``, ``flops/ratio``
  (estimated forward FLOPs per example, :func:`sparsejax.metrics.estimate_flops`);
* topology records, one code path for every method: at each scheduled mask update
  (``builders.mask_schedule``: the method's schedule; static and SR-STE have
  none), and at a log step when masks changed since the last topology record (SR-STE
  recomputes its N:M masks every step, so it reports there, with the turnover summed over
  the window): ``dst/turnover`` and ``dst/turnover/<layer>`` (weights grown since the last
  topology record over the active weights), ``dst/drop_fraction`` (at scheduled updates of
  methods with a drop fraction: ``sparsejax.drop_fraction_schedule``), ``dst/ever_active``
  (fraction of sparse-layer weights active at any time so far), ``fan_in/<layer>/min``,
  ``fan_in/<layer>/max``, ``fan_in/<layer>/mean``, ``active_neurons/<layer>``,
  ``sparsity/<layer>``, ``sparsity/total`` (the mask history of ``training_flops.py``);
  at scheduled updates ``dst/update_step`` (the update count ``t``) and for gmp/granet
  ``dst/target_sparsity`` (``sparsejax.gradual_sparsity(t)``); at step 0 the same keys
  (no turnover) for the initial masks, and ``flops/dense/<layer>`` (per kernel);
* at the end: ``final/test_accuracy``, ``final/test_loss`` and
  ``final/weight_sparsity/<layer>`` (zeros in the weights the forward pass uses,
  ``sparsejax.forward_params``);
* from the progress reporter: ``perf/steps_per_sec``, ``perf/uptime``, ``perf/<section>_ms``
  (wall-clock timings; the only keys that differ between otherwise identical runs).

Mask-update steps are logged at ``step = t + 1`` where ``t`` is the update count of the
step that changed the masks (``sparsejax.is_mask_update_step(t)``).

``<workdir>/topology.jsonl`` holds the per-neuron fan-in of every sparse layer at step 0 and
at each topology record (for the fan-in heat map); ``config.json`` and ``hparams.json``
hold the config the run was started with (written once), ``config_changes.jsonl`` the
changes allowed on resumption.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import optax
from absl import logging

import sparsejax as sj
from experiments import builders, config_lib, distributed, parallel, run_metrics, steps
from experiments import workdir as workdir_lib
from experiments.run_metrics import say

# The step functions and the flat states live in ``steps.py`` (names kept here for callers).
StateDefs, StepFns = steps.StateDefs, steps.StepFns
train_step, eval_step = steps.train_step, steps.eval_step
sparse_layers, sparse_masks, forward_model = (
  steps.sparse_layers,
  steps.sparse_masks,
  steps.forward_model,
)
_init = steps.init_objects  # NNX objects (tests); runs use steps.initialize


# --------------------------------------------------------------------------------------
# Records.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainState:
  """What the loop carries from step to step (all of it is checkpointed)."""

  mstate: list[jax.Array]
  ostate: list[jax.Array]
  ever: list[jax.Array]
  step: int
  window: run_metrics.Window


# --------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------


class Run(NamedTuple):
  """A run ready to train: its state (restored if resuming) and its static facts.

  ``place`` turns this process's rows of a training batch into the global batch on the
  mesh; ``eval_batches()`` yields the placed ``(x, y, weight)`` evaluation batches.
  """

  defs: StateDefs
  fns: StepFns
  recorder: run_metrics.Recorder
  schedule: builders.MaskSchedule
  state: TrainState
  resumed_from: int | None
  mesh_info: dict[str, Any]
  learning_rate: optax.Schedule
  num_params: int
  place: Any
  eval_batches: Any


def setup(config: ml_collections.ConfigDict, ds, train_iter, ckpt, workdir: str, mesh=None) -> Run:
  """Builds the model and optimizer on ``mesh``, restores the latest checkpoint, jits the steps."""
  num_steps = int(config.num_train_steps)
  create = builders.model_factory(config, ds.input_shape, ds.num_classes)
  positions = builders.kernel_positions(create)  # definition order: first ... output layer
  lr_schedule = builders.learning_rate_schedule(config, num_steps)
  init_masks = builders.initial_masks(config, list(positions), create, ds)
  tx = builders.build_transformation(config, num_steps, lr_schedule, list(positions), init_masks)
  builders.check_allocation(config, tx, create)
  sparse = isinstance(tx, sj.SparseTransformation)
  init = steps.initialize(config, create, tx, sparse, mesh)  # sharded from the first allocation
  window = run_metrics.Window.empty(len(init.mask_paths))
  resumed_from, mstate, ostate, ever, window = workdir_lib.restore(
    ckpt, init.defs, init.mstate, init.ostate, init.ever, train_iter, window
  )
  fns = steps.jit_steps(init, mesh)
  mesh_info = parallel.describe(mesh, init.shardings[0] if init.shardings else ())
  if mesh is not None:
    say(f"Mesh {mesh_info} over {jax.process_count()} process(es).")
  schedule = builders.mask_schedule(config, num_steps)
  recorder = run_metrics.Recorder(
    masks_fn=fns.masks,
    weights_fn=fns.weights,
    eval_fn=fns.eval,
    mask_paths=tuple(init.mask_paths),
    param_paths=init.param_paths,
    positions=positions,
    drop_fraction=schedule.drop_fraction,
    target_sparsity=schedule.target_sparsity,
    sparse=sparse or init.defs.compute,
    topology_path=os.path.join(workdir, "topology.jsonl") if distributed.is_primary() else "",
    fetch=fns.fetch,
  )
  state = TrainState(mstate, ostate, ever, resumed_from or 0, window)
  place = parallel.BatchPlacer(mesh, int(config.batch_size))
  evals = parallel.BatchPlacer(mesh, parallel.eval_batch_size(config, ds.eval_size, mesh))
  eval_batches = lambda: map(evals, ds.eval_batches(evals.batch_size, evals.rows))  # noqa: E731
  return Run(
    init.defs,
    fns,
    recorder,
    schedule,
    state,
    resumed_from,
    mesh_info,
    lr_schedule,
    init.num_params,
    place,
    eval_batches,
  )


def _save(ckpt, config: ml_collections.ConfigDict, run: Run, train_iter) -> None:
  state = run.state
  workdir_lib.save(
    ckpt,
    config,
    state.step,
    model=jax.tree.unflatten(run.defs.model_tree, state.mstate),
    optimizer=jax.tree.unflatten(run.defs.optimizer_tree, state.ostate),
    data_state=train_iter.get_state(),
    ever=state.ever,
    window=state.window,
  )


def _result(config, run: Run, final: Mapping[str, Any], progress, compiles: int, t_start):
  """The dict :func:`train_and_evaluate` returns; prints the final line."""
  result = {
    "method": config.dst.method,
    "step": run.state.step,
    "test_accuracy": final["eval/accuracy"],
    "test_loss": final["eval/loss"],
    "sparsity": final["sparsity/total"],
    "sparsity_global": final["sparsity/global"],
    "flops_dense": final["flops/dense"],
    "flops_sparse": final["flops/sparse"],
    "wall_time_s": time.monotonic() - t_start,
    "train_step_compiles": int(compiles),
    "resumed_from": run.resumed_from,
    "timings": progress.summary(),
    "mesh": run.mesh_info,
  }
  step, num_steps = run.state.step, int(config.num_train_steps)
  if step < num_steps:
    say(f"Stopped at step {step}/{num_steps} (config.stop_after_step); resume by rerunning.")
  else:
    print(
      f"Final test accuracy: {result['test_accuracy']:.4f} ({config.dst.method}, "
      f"sparsity {result['sparsity']:.3f}, step {step}, {result['wall_time_s']:.1f} s)",
      flush=True,
    )
  return result


def _open_workdir(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool):
  """``(workdir, checkpoint manager, run record, allowed config changes)``.

  Refuses a changed config before anything is written.
  """
  workdir = workdir_lib.prepare(workdir)
  ckpt = sj.checkpoint.CheckpointManager(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=int(config.max_checkpoints_to_keep),
    async_save=bool(config.async_checkpointing),
  )
  record = workdir_lib.RunRecord(workdir, ckpt)
  return workdir, ckpt, record, record.check(config, allow_config_change)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict[str, Any]:
  """Trains and evaluates one configuration; resumes from ``workdir`` if possible.

  Args:
    config: an experiment config (see ``configs/default.py``).
    workdir: directory for checkpoints, ``metrics.jsonl``, ``topology.jsonl``, plots, the
      config and the cached dataset.
    allow_config_change: resume a run started with another config (the change is
      appended to ``config_changes.jsonl``; ``config.json`` is never rewritten).

  Returns:
    Final metrics: ``test_accuracy``, ``test_loss``, ``step``, ``sparsity``,
    ``sparsity_global``, ``flops_dense``, ``flops_sparse``, ``wall_time_s``,
    ``train_step_compiles``, ``resumed_from`` (step or None), ``method``, ``mesh`` (axis
    sizes and how many param leaves are sharded; ``{"devices": 1}`` without a mesh).

  Raises:
    ValueError: a bad config, a checkpoint in ``workdir`` from a different model, or
      (:class:`experiments.workdir.ConfigChangedError`) a config that differs from the
      run's without ``allow_config_change``.
    NotADirectoryError: ``workdir`` is an existing file.
    sparsejax.checkpoint.CorruptCheckpointError: a checkpoint in ``workdir`` that cannot be read.
  """
  t_start = time.monotonic()
  config = config_lib.validate_config(config)
  workdir, ckpt, record, changes = _open_workdir(config, workdir, allow_config_change)
  if config.jax_cache_dir:
    builders.enable_compilation_cache(config.jax_cache_dir)
  builders.import_extra_modules(config.extra_imports)
  mesh = parallel.make_mesh(config.mesh)
  ds, train_iter = builders.load_data(
    config, workdir, parallel.process_rows(mesh, config.batch_size)
  )
  run = setup(config, ds, train_iter, ckpt, workdir, mesh)
  state, recorder = run.state, run.recorder
  primary = distributed.is_primary()  # process 0 writes the files; every process checkpoints
  if primary:
    workdir_lib.truncate_metrics(workdir, run.resumed_from)
  writer = sj.metrics.create_default_writer(workdir, tensorboard=bool(config.tensorboard))
  if primary and record.write(config, state.step, changes):
    writer.write_hparams(config.to_dict())
  logging.info("Resolved config:\n%s", config)
  say(f"Model {config.model}: {run.num_params} parameters; method {config.dst.method}.")
  num_steps, stop_at = int(config.num_train_steps), int(config.stop_after_step)
  progress = sj.metrics.ReportProgress(
    num_steps,
    writer=writer,
    every_steps=int(config.progress_every_steps) or None,
    every_secs=float(config.progress_every_secs) or None,
    log_fn=say,
  )
  lr_fn = jax.jit(run.learning_rate)
  outputs = run_metrics.StepOutputs(state.window, len(recorder.mask_paths))
  if state.step == 0 and recorder.sparse:
    writer.write_scalars(0, recorder.topology(state))

  steps_run = 0
  while state.step < num_steps and (stop_at < 0 or state.step < stop_at):
    scheduled = bool(run.schedule.updates[state.step])
    x, y = run.place(next(train_iter))
    section = "mask_update" if scheduled else "train_step"
    step_fn = run.fns.topology if scheduled and run.fns.topology else run.fns.train
    with progress.timed(section, first_call_compiles=not scheduled):
      state.mstate, state.ostate, state.ever, out = step_fn(
        state.mstate, state.ostate, state.ever, x, y
      )
      if scheduled:
        jax.block_until_ready(out)
    state.step += 1
    steps_run += 1
    outputs.append(out)
    step, last = state.step, state.step == num_steps
    is_log = step % int(config.log_every_steps) == 0 or last
    if scheduled or is_log:
      outputs.flush()
      if scheduled or state.window.grown.any():  # a scheduled update, or masks that moved.
        writer.write_scalars(step, recorder.mask_change(state, outputs.nnz, scheduled))
    if is_log:
      lr = float(lr_fn(step - 1))
      writer.write_scalars(step, run_metrics.train_record(state.window, config.batch_size, lr))
      state.window.reset_train()
    if step % int(config.eval_every_steps) == 0 or last:
      outputs.flush()
      with progress.timed("eval"):
        rec, params, masks = recorder.evaluate(state, run.eval_batches())
      if last:
        rec["final/test_accuracy"], rec["final/test_loss"] = rec["eval/accuracy"], rec["eval/loss"]
        rec.update(run_metrics.final_weight_sparsity(params, masks))
      writer.write_scalars(step, rec)
    ckpt_every = int(config.checkpoint_every_steps)
    if (ckpt_every and step % ckpt_every == 0) or last or step == stop_at:
      outputs.flush()
      writer.flush()
      with progress.timed("checkpoint", first_call_compiles=False):
        _save(ckpt, config, run, train_iter)
    if len(outputs.pending) >= 256:
      outputs.flush()
    progress(step)

  outputs.flush()
  writer.flush()
  ckpt.close()
  compiles = run.fns.train._cache_size()  # pylint: disable=protected-access
  if steps_run and compiles != 1:
    logging.warning("The train step compiled %d times (expected 1).", compiles)
  final, _, _ = recorder.evaluate(state, run.eval_batches())  # also when the run was complete.
  result = _result(config, run, final, progress, compiles, t_start)
  if primary and config.write_plots and state.step == num_steps and steps_run:
    workdir_lib.write_plots(workdir)
  writer.close()
  return result
