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
2. builds the data (offline), the NNX model and ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
   where ``tx`` is the transformation of ``config.dst.method``
   (:data:`experiments.builders.METHODS`), and starts sparse (``sparsejax.apply_masks``);
3. resumes from the latest checkpoint in ``<workdir>/checkpoints`` if there is one
   (:mod:`experiments.workdir`: a checkpoint of another model is refused with a
   ``ValueError``; a corrupt one raises, never a silent fresh start; a config that differs
   from the one the run was started with is refused unless ``allow_config_change``);
4. trains with a jitted :func:`train_step` that compiles once, writing metrics to the log
   and to ``<workdir>/metrics.jsonl``, a progress line, checkpoints, and plots in
   ``<workdir>/plots/`` at the end; prints the final test accuracy and returns the final
   metrics.

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

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

import sparsejax as sj
from experiments import builders, config_lib, parallel, run_metrics
from experiments import models as models_lib
from experiments import workdir as workdir_lib
from experiments.run_metrics import say

# --------------------------------------------------------------------------------------
# The step functions (pure, on flat lists of state arrays; jitted once per run).
# --------------------------------------------------------------------------------------


class StateDefs(NamedTuple):
  """The static structure of the flat model and optimizer states.

  The states travel through ``jit`` as flat lists of arrays: dispatch then skips NNX's
  Python-level pytree flattening (about 1 ms per step for the experiments' models).
  """

  model: Any  # nnx.GraphDef
  model_tree: Any  # jax PyTreeDef of nnx.state(model)
  optimizer: Any
  optimizer_tree: Any
  sparse: bool  # the optimizer is a sparsejax transformation

  def merge(self, mstate: Sequence[jax.Array], ostate: Sequence[jax.Array]):
    """The model and optimizer of the flat states."""
    model = nnx.merge(self.model, jax.tree.unflatten(self.model_tree, mstate))
    optimizer = nnx.merge(self.optimizer, jax.tree.unflatten(self.optimizer_tree, ostate))
    return model, optimizer


def sparse_layers(optimizer: nnx.Optimizer, sparse: bool) -> list[tuple[str, jax.Array]]:
  """``(path, mask)`` of the sparse layers (``sparsejax.get_masks``); [] when dense."""
  if not sparse:
    return []
  return sj.metrics.sparse_leaves(sj.get_masks(optimizer.opt_state))


def sparse_masks(optimizer: nnx.Optimizer, sparse: bool) -> list[jax.Array]:
  """The sparse layers' masks, in tree order; [] when dense."""
  return [m for _, m in sparse_layers(optimizer, sparse)]


def forward_model(model: nnx.Module, optimizer: nnx.Optimizer, sparse: bool) -> nnx.Module:
  """The model with the weights its forward pass uses (``sparsejax.forward_params``)."""
  if not sparse:
    return model
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, sj.forward_params(params, optimizer.opt_state), rest)


def _loss_and_logits(model, optimizer, x, y, sparse):
  logits = forward_model(model, optimizer, sparse)(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


def train_step(defs: StateDefs, mstate, ostate, ever, x, y):
  """One optimizer step.

  Args:
    defs: the states' structure.
    mstate: the model's state leaves.
    ostate: the optimizer's state leaves.
    ever: per sparse layer, the OR of every mask so far.
    x: the batch's inputs.
    y: the batch's integer labels.

  Returns:
    ``(mstate, ostate, ever, metrics)``; ``metrics`` has the batch ``loss``, the number of
    ``correct`` predictions and ``grown_nnz`` (``[layers, 2]``: per sparse layer, weights
    that became active in this step, and the active weights before it).
  """
  model, optimizer = defs.merge(mstate, ostate)
  old = sparse_masks(optimizer, defs.sparse)
  grad_fn = nnx.value_and_grad(_loss_and_logits, has_aux=True)
  (loss, logits), grads = grad_fn(model, optimizer, x, y, defs.sparse)
  optimizer.update(model, grads)
  new = sparse_masks(optimizer, defs.sparse)
  counts = [
    jnp.stack([jnp.sum(n & ~o, dtype=jnp.int32), jnp.sum(o, dtype=jnp.int32)])
    for o, n in zip(old, new, strict=True)
  ]
  ever = [e | n for e, n in zip(ever, new, strict=True)]
  metrics = {
    "loss": loss,
    "correct": jnp.sum(jnp.argmax(logits, -1) == y, dtype=jnp.int32),
    "grown_nnz": jnp.stack(counts) if counts else jnp.zeros((0, 2), jnp.int32),
  }
  return jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(optimizer)), ever, metrics


def eval_step(defs: StateDefs, mstate, ostate, x, y):
  """Test loss and accuracy of the forward pass (``sparsejax.forward_params``)."""
  model, optimizer = defs.merge(mstate, ostate)
  loss, logits = _loss_and_logits(model, optimizer, x, y, defs.sparse)
  return loss, jnp.mean(jnp.argmax(logits, -1) == y)


def current_masks(defs: StateDefs, mstate, ostate) -> list[jax.Array]:
  """The sparse layers' current masks."""
  return sparse_masks(defs.merge(mstate, ostate)[1], defs.sparse)


def forward_weights(defs: StateDefs, mstate, ostate) -> list[jax.Array]:
  """The param leaves the forward pass uses."""
  model, optimizer = defs.merge(mstate, ostate)
  return jax.tree.leaves(nnx.state(forward_model(model, optimizer, defs.sparse), nnx.Param))


class StepFns(NamedTuple):
  """The jitted step functions of a run."""

  train: Any
  eval: Any
  masks: Any
  weights: Any


# --------------------------------------------------------------------------------------
# Setup.
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _timer(name: str):
  t0 = time.monotonic()
  yield
  logging.info("%s took %.2f s", name, time.monotonic() - t0)


def _init(create, tx: optax.GradientTransformation, sparse: bool):
  """Model, optimizer and ever-active masks, in one compiled program."""

  @nnx.jit
  def init():
    model = create()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    if sparse:  # start sparse (a no-op for methods that keep dense weights, e.g. SR-STE).
      nnx.update(model, sj.apply_masks(nnx.state(model, nnx.Param), optimizer.opt_state))
    return model, optimizer, [m | False for m in sparse_masks(optimizer, sparse)]

  with _timer("init"):
    return init()


def _place(config, model, optimizer, ever, sparse: bool, mask_paths: Sequence[str]):
  """Splits the objects into flat states, places them on the mesh and jits the steps.

  Returns:
    ``(defs, fns, mstate, ostate, ever, mesh_info)``.
  """
  mdef, mtree = nnx.split(model)
  odef, otree = nnx.split(optimizer)
  defs = StateDefs(mdef, jax.tree.structure(mtree), odef, jax.tree.structure(otree), sparse)
  mstate, ostate = jax.tree.leaves(mtree), jax.tree.leaves(otree)
  mesh = parallel.make_mesh(config.mesh)
  train = functools.partial(train_step, defs)
  if mesh is None:
    train_jit = jax.jit(train, donate_argnums=(0, 1, 2))
    mesh_info = parallel.describe(None)
  else:
    # Params, masks and moments sharded like their params, counters replicated, the batch
    # split over data x fsdp; jit's in/out shardings keep every step on that layout.
    m_sh, o_sh, by_path = parallel.state_shardings(
      mesh, mtree, otree, min_shard_size=int(config.mesh.min_shard_size)
    )
    ever_sh = parallel.shardings_for_paths(mask_paths, by_path, mesh)
    mstate, ostate = jax.device_put(mstate, m_sh), jax.device_put(ostate, o_sh)
    ever = jax.device_put(list(ever), ever_sh)
    batch_sh = parallel.batch_sharding(mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    train_jit = jax.jit(
      train,
      in_shardings=(m_sh, o_sh, ever_sh, batch_sh, batch_sh),
      out_shardings=(m_sh, o_sh, ever_sh, replicated),
      donate_argnums=(0, 1, 2),
    )
    mesh_info = parallel.describe(mesh, m_sh)
    say(f"Mesh {mesh_info}.")
  fns = StepFns(
    train=train_jit,
    eval=jax.jit(functools.partial(eval_step, defs)),
    masks=jax.jit(functools.partial(current_masks, defs)),
    weights=jax.jit(functools.partial(forward_weights, defs)),
  )
  return defs, fns, mstate, ostate, list(ever), mesh_info


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
  """A run ready to train: its state (restored if resuming) and its static facts."""

  defs: StateDefs
  fns: StepFns
  recorder: run_metrics.Recorder
  schedule: builders.MaskSchedule
  state: TrainState
  resumed_from: int | None
  mesh_info: dict[str, Any]
  learning_rate: optax.Schedule
  num_params: int


def setup(config: ml_collections.ConfigDict, ds, train_iter, ckpt, workdir: str) -> Run:
  """Builds the model and optimizer, restores the latest checkpoint, jits the steps."""
  num_steps = int(config.num_train_steps)
  create = builders.model_factory(config, ds.input_shape, ds.num_classes)
  positions = builders.kernel_positions(create)  # definition order: first ... output layer
  lr_schedule = builders.learning_rate_schedule(config, num_steps)
  init_masks = builders.initial_masks(config, list(positions), create, ds)
  tx = builders.build_transformation(config, num_steps, lr_schedule, list(positions), init_masks)
  builders.check_allocation(config, tx, create)
  sparse = isinstance(tx, sj.SparseTransformation)
  model, optimizer, ever = _init(create, tx, sparse)
  mask_paths = [p for p, _ in sparse_layers(optimizer, sparse)]
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  param_paths = tuple(p for p, _ in sj.metrics.sparse_leaves(params))
  window = run_metrics.Window.empty(len(mask_paths))
  resumed_from, ever, window = workdir_lib.restore(ckpt, model, optimizer, ever, train_iter, window)
  defs, fns, mstate, ostate, ever, mesh_info = _place(
    config, model, optimizer, ever, sparse, mask_paths
  )
  schedule = builders.mask_schedule(config, num_steps)
  recorder = run_metrics.Recorder(
    masks_fn=fns.masks,
    weights_fn=fns.weights,
    eval_fn=fns.eval,
    mask_paths=tuple(mask_paths),
    param_paths=param_paths,
    positions=positions,
    drop_fraction=schedule.drop_fraction,
    target_sparsity=schedule.target_sparsity,
    sparse=sparse,
    topology_path=os.path.join(workdir, "topology.jsonl"),
  )
  state = TrainState(mstate, ostate, ever, resumed_from or 0, window)
  num_params = models_lib.count_params(model)
  return Run(defs, fns, recorder, schedule, state, resumed_from, mesh_info, lr_schedule, num_params)


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
  workdir = workdir_lib.prepare(workdir)
  ckpt = sj.checkpoint.CheckpointManager(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=int(config.max_checkpoints_to_keep),
    async_save=bool(config.async_checkpointing),
  )
  record = workdir_lib.RunRecord(workdir, ckpt)
  changes = record.check(config, allow_config_change)  # refuses before anything is written.
  if config.jax_cache_dir:
    builders.enable_compilation_cache(config.jax_cache_dir)
  builders.import_extra_modules(config.extra_imports)
  ds, train_iter = builders.load_data(config, workdir)
  run = setup(config, ds, train_iter, ckpt, workdir)
  state, recorder = run.state, run.recorder
  workdir_lib.truncate_metrics(workdir, run.resumed_from)
  writer = sj.metrics.create_default_writer(workdir, tensorboard=bool(config.tensorboard))
  if record.write(config, state.step, changes):
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
  x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
  lr_fn = jax.jit(run.learning_rate)
  outputs = run_metrics.StepOutputs(state.window, len(recorder.mask_paths))
  if state.step == 0 and recorder.sparse:
    writer.write_scalars(0, recorder.topology(state))

  steps_run = 0
  while state.step < num_steps and (stop_at < 0 or state.step < stop_at):
    scheduled = bool(run.schedule.updates[state.step])
    x, y = next(train_iter)
    section = "mask_update" if scheduled else "train_step"
    with progress.timed(section, first_call_compiles=not scheduled):
      state.mstate, state.ostate, state.ever, out = run.fns.train(
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
        rec, params, masks = recorder.evaluate(state, x_test, y_test)
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
  final, _, _ = recorder.evaluate(state, x_test, y_test)  # also when the run was complete.
  result = _result(config, run, final, progress, compiles, t_start)
  if config.write_plots and state.step == num_steps and steps_run:
    workdir_lib.write_plots(workdir)
  writer.close()
  return result
