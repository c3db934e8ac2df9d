"""The jitted step functions of a run and the flat states they run on.

The model and optimizer travel through ``jit`` as flat lists of arrays (:class:`StateDefs`
holds their structure). :func:`initialize` creates them sharded from the first allocation:
the init function is jitted with the mesh's ``out_shardings``
(:func:`experiments.parallel.state_shardings`), so no device (and no process) ever holds
more than its shards of the params, the masks or the moments. :func:`jit_steps` compiles
the train step with the same in/out shardings, and the readers (masks, forward weights,
evaluation) with replicated outputs, which every process can fetch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sparsejax as sj
from experiments import parallel, sparse_steps


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
  label_smoothing: float = 0.0
  compute: bool = False  # truly sparse layers (config.sparse_compute): experiments/sparse_steps.py

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


def _loss_and_logits(model, optimizer, x, y, sparse, label_smoothing=0.0):
  forward = forward_model(model, optimizer, sparse)
  logits = forward(x)
  if forward is not model:  # batch-norm statistics updated by the forward pass
    nnx.update(model, nnx.state(forward, nnx.BatchStat))
  if label_smoothing:
    labels = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(logits, labels)
  else:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return loss.mean(), logits


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
  if defs.compute:
    return sparse_steps.train_step(defs, mstate, ostate, ever, x, y)
  model, optimizer = defs.merge(mstate, ostate)
  old = sparse_masks(optimizer, defs.sparse)
  grad_fn = nnx.value_and_grad(_loss_and_logits, has_aux=True)
  (loss, logits), grads = grad_fn(model, optimizer, x, y, defs.sparse, defs.label_smoothing)
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


def eval_step(defs: StateDefs, mstate, ostate, x, y, weight):
  """Weighted test-loss sum, correct count and weight sum of one batch (padding weighs 0).

  Batch-norm models use their running averages (``model.eval()``); the loss is the plain
  cross-entropy (no label smoothing).
  """
  model, optimizer = defs.merge(mstate, ostate)
  model.eval()
  logits = forward_model(model, optimizer, defs.sparse)(x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
  return jnp.sum(loss * weight), jnp.sum(correct * weight), jnp.sum(weight)


def current_masks(defs: StateDefs, mstate, ostate) -> list[jax.Array]:
  """The sparse layers' current masks."""
  model, optimizer = defs.merge(mstate, ostate)
  if defs.compute:
    return [m for _, m in sparse_steps.layers(model)]
  return sparse_masks(optimizer, defs.sparse)


def forward_weights(defs: StateDefs, mstate, ostate) -> list[jax.Array]:
  """The param leaves the forward pass uses."""
  model, optimizer = defs.merge(mstate, ostate)
  if defs.compute:
    return [w for _, w in sparse_steps.weights(model)]
  return jax.tree.leaves(nnx.state(forward_model(model, optimizer, defs.sparse), nnx.Param))


class StepFns(NamedTuple):
  """The jitted step functions of a run (``fetch`` gathers arrays for the host)."""

  train: Any
  eval: Any
  masks: Any
  weights: Any
  fetch: Any = jax.device_get
  topology: Any = None  # truly sparse runs: the step of scheduled mask updates


# --------------------------------------------------------------------------------------
# Creating the state.
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def timer(name: str):
  """Logs the wall time of the block."""
  t0 = time.monotonic()
  yield
  logging.info("%s took %.2f s", name, time.monotonic() - t0)


def _build(create, tx: optax.GradientTransformation, sparse: bool):
  """Model, optimizer and ever-active masks; the model starts sparse."""
  if isinstance(tx, sj.sparse.SparseDST):
    return sparse_steps.build(create, tx)
  model = create()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  if sparse:  # start sparse (a no-op for methods that keep dense weights, e.g. SR-STE).
    nnx.update(model, sj.apply_masks(nnx.state(model, nnx.Param), optimizer.opt_state))
  return model, optimizer, [m | False for m in sparse_masks(optimizer, sparse)]


def init_objects(create, tx: optax.GradientTransformation, sparse: bool):
  """Model, optimizer and ever-active masks as NNX objects, in one compiled program."""
  with timer("init"):
    return nnx.jit(lambda: _build(create, tx, sparse))()


class State(NamedTuple):
  """A run's flat device state and what describes it.

  Attributes:
    defs: the states' structure.
    mstate: the model's state leaves.
    ostate: the optimizer's state leaves.
    ever: the ever-active masks.
    mask_paths: the sparse layers' paths.
    param_paths: the paths of the forward weights (:func:`forward_weights` order).
    num_params: the number of param elements.
    shardings: ``(model, optimizer, ever)`` leaf shardings, or None without a mesh.
  """

  defs: StateDefs
  mstate: list[jax.Array]
  ostate: list[jax.Array]
  ever: list[jax.Array]
  mask_paths: list[str]
  param_paths: tuple[str, ...]
  num_params: int
  shardings: tuple[list[NamedSharding], list[NamedSharding], list[NamedSharding]] | None


def initialize(config, create, tx: optax.GradientTransformation, sparse: bool, mesh) -> State:
  """The run's state, created directly into its shardings on ``mesh`` (or one device).

  The structure comes from ``nnx.eval_shape`` (nothing allocated); then one jitted
  program with ``out_shardings`` creates the model, the optimizer (DST masks included) and
  the ever-active masks where they live, so each device allocates only its shards.
  """
  compute = isinstance(tx, sj.sparse.SparseDST)
  if compute and mesh is not None:
    raise ValueError("config.sparse_compute=True runs on one device (no config.mesh).")
  model, optimizer, _ = nnx.eval_shape(lambda: _build(create, tx, sparse))
  mdef, mtree = nnx.split(model)
  odef, otree = nnx.split(optimizer)
  smoothing = float(config.get("label_smoothing", 0.0))
  defs = StateDefs(
    mdef, jax.tree.structure(mtree), odef, jax.tree.structure(otree), sparse, smoothing, compute
  )
  mask_paths = [p for p, _ in sparse_layers(optimizer, sparse)]
  params = nnx.state(model, nnx.Param)
  param_paths = tuple(p for p, _ in sj.metrics.sparse_leaves(params))
  if compute:
    mask_paths, param_paths = sparse_steps.paths(model)
  num_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))

  def init():
    model, optimizer, ever = _build(create, tx, sparse)
    return jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(optimizer)), ever

  shardings = None
  if mesh is not None:
    m_sh, o_sh, by_path = parallel.state_shardings(
      mesh, mtree, otree, min_shard_size=int(config.mesh.min_shard_size)
    )
    shardings = (m_sh, o_sh, parallel.shardings_for_paths(mask_paths, by_path, mesh))
  init = jax.jit(init) if shardings is None else jax.jit(init, out_shardings=shardings)
  with timer("init"):
    mstate, ostate, ever = init()
  return State(defs, mstate, ostate, ever, mask_paths, param_paths, num_params, shardings)


def jit_steps(state: State, mesh) -> StepFns:
  """Compiles the train step (donating the state) and the readers for ``state``."""
  defs = state.defs
  train = functools.partial(train_step, defs)
  readers = {
    "eval": functools.partial(eval_step, defs),
    "masks": functools.partial(current_masks, defs),
    "weights": functools.partial(forward_weights, defs),
  }
  if mesh is None:
    train_jit = jax.jit(train, donate_argnums=(0, 1, 2))
    topology = None
    if defs.compute:
      step = functools.partial(sparse_steps.topology_step, defs)
      topology = jax.jit(step, donate_argnums=(0, 1, 2))
    return StepFns(train_jit, *(jax.jit(f) for f in readers.values()), topology=topology)
  # Params, masks and moments sharded like their params, counters replicated, the batch
  # split over data x fsdp; jit's in/out shardings keep every step on that layout.
  m_sh, o_sh, ever_sh = state.shardings
  batch_sh = parallel.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  train_jit = jax.jit(
    train,
    in_shardings=(m_sh, o_sh, ever_sh, batch_sh, batch_sh),
    out_shardings=(m_sh, o_sh, ever_sh, replicated),
    donate_argnums=(0, 1, 2),
  )
  # Replicated outputs: every process can read them (a multi-process array is readable on
  # the host only when each process holds all of it).
  gather = jax.jit(lambda tree: tree, out_shardings=replicated)
  return StepFns(
    train_jit,
    *(jax.jit(f, out_shardings=replicated) for f in readers.values()),
    fetch=lambda tree: jax.device_get(gather(tree)),
  )
