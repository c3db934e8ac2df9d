"""Training steps for truly sparse models: a regular step and a topology step.

A truly sparse DST method needs two compiled steps (design note SPARSE_TRAINING.md §4):

* the **regular step** runs the sparse forward/backward kernels and the optimizer on the
  active weights only (``optimizer.update`` with the :class:`~sparsejax.sparse.SparseDST`);
* the **topology step**, on the method's mask-update steps only (every ΔT), also computes
  each sparse layer's dense weight gradient ``xᵀ·dy`` (a ``probe`` input), runs the masked
  method's drop-and-grow rule (:func:`sparsejax.sparse.update_topology`), rewrites the
  topologies, values and optimizer state in place, then steps the kept weights.

Python decides which one runs from the step count (:meth:`SparseDST.is_update_step`), so
neither step carries a conditional. :class:`SparseTrainStep` does this for NNX models
(``nnx.jit``); :func:`regular_update` / :func:`topology_update` are the traceable bodies for
a custom ``jax.jit`` loop, and :func:`linen_update` is the same for Linen params.

Reference: RigL (Evci et al. 2020, arXiv:1911.11134): dense gradients only every ΔT steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsejax._src import tree
from sparsejax._src.integration import sparse_layers
from sparsejax._src.kernels import sparse_train
from sparsejax._src.transforms import sparse_dst
from sparsejax._src.transforms.sparse_topology import CSRTopology

__all__ = [
  "SparseTrainStep",
  "dense_kernels",
  "dense_view",
  "layer_topologies",
  "linen_topologies",
  "linen_update",
  "regular_update",
  "topology_update",
]


def _sparse_tx(optimizer: nnx.Optimizer) -> sparse_dst.SparseDST:
  tx = optimizer.tx
  if not isinstance(tx, sparse_dst.SparseDST):
    raise TypeError(
      "the optimizer's transformation must be a SparseDST (sj.sparse.truly_sparse(...)); got "
      f"{type(tx).__name__}."
    )
  return tx


def layer_topologies(model: nnx.Module) -> dict[str, CSRTopology]:
  """``{values path: CSRTopology}`` of the model's sparse layers."""
  return {f"{p}/values": layer.topology for p, layer in sparse_layers.sparse_modules(model)}


def dense_kernels(model: nnx.Module) -> dict[str, tuple[jax.Array, jax.Array]]:
  """``{kernel path: (dense kernel, bool mask)}`` of the sparse layers (the masked twin's
  view, e.g. for metrics or to compare with masked-dense training)."""
  out = {}
  for p, layer in sparse_layers.sparse_modules(model):
    csr = layer.csr()
    out[f"{p}/kernel"] = (csr.to_dense(), csr.mask())
  return out


def dense_view(model: nnx.Module) -> tuple[dict, dict]:
  """The masked twin's view of a model with sparse layers (e.g. for metrics and records).

  Returns:
    ``(params, masks)``: nested dicts of the model's params in which every sparse layer's
    ``values`` is replaced by its dense ``kernel``, and the masks tree of
    :func:`sparsejax.get_masks` (bool masks at the sparse kernels, ``optax.MaskedNode()``
    at every other leaf). Traceable; each sparse layer costs one dense scatter.
  """
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  masks = jax.tree.map(lambda _: optax.MaskedNode(), params)
  for p, layer in sparse_layers.sparse_modules(model):
    keys = [int(k) if k.isdigit() else k for k in p.split("/")] if p else []
    node_p, node_m = params, masks
    for k in keys:
      node_p, node_m = node_p[k], node_m[k]
    csr = layer.csr()
    del node_p["values"], node_m["values"]
    node_p["kernel"], node_m["kernel"] = csr.to_dense(), csr.mask()
  return params, masks


def regular_update(loss_fn: Callable, model, optimizer, *args, has_aux: bool = False):
  """One regular step: gradients of ``loss_fn(model, *args)`` and ``optimizer.update``.

  Returns:
    ``loss_fn``'s output (``(loss, aux)`` when ``has_aux``).
  """
  out, grads = nnx.value_and_grad(loss_fn, has_aux=has_aux)(model, *args)
  optimizer.update(model, grads)
  return out


def _probes(layers) -> dict[str, jax.Array]:
  return {
    p: jnp.zeros(fan_in_out(layer.kernel_shape), layer.values[...].dtype) for p, layer in layers
  }


def fan_in_out(kernel_shape) -> tuple[int, int]:
  """``(n_in, n_out)`` of a kernel shape."""
  n_in = 1
  for d in kernel_shape[:-1]:
    n_in *= int(d)
  return n_in, int(kernel_shape[-1])


def _apply_topology(tx, opt_state, params, grads, topologies, dense):
  """update_topology + tx.update + apply_updates on pure trees."""
  upd = sparse_train.update_topology(tx, opt_state, params, grads, topologies, dense)
  updates, new_opt = tx.update(upd.grads, upd.opt_state, upd.params, sparse_slots=upd.sparse_slots)
  return optax.apply_updates(upd.params, updates), new_opt, upd.topologies


def topology_update(loss_fn: Callable, model, optimizer, *args, has_aux: bool = False):
  """One topology step (a mask update and the optimizer step of the kept weights).

  Args:
    loss_fn: ``loss_fn(model, *args) -> loss`` (``(loss, aux)`` when ``has_aux``).
    model: the NNX model with sparse layers (mutated).
    optimizer: its ``nnx.Optimizer`` over ``nnx.Param`` with a SparseDST (mutated).
    *args: the batch.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``loss_fn``'s output.
  """
  tx = _sparse_tx(optimizer)
  layers = sparse_layers.sparse_modules(model)

  def probed(m, probes):
    table = {id(layer): probes[p] for p, layer in sparse_layers.sparse_modules(m)}
    with sparse_layers.probing(table):
      return loss_fn(m, *args)

  out, (grads, probe_grads) = nnx.value_and_grad(probed, argnums=(0, 1), has_aux=has_aux)(
    model, _probes(layers)
  )
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  topologies = {f"{p}/values": layer.topology for p, layer in layers}
  dense = {f"{p}/values": probe_grads[p] for p, _ in layers}
  new_params, new_opt, new_topos = _apply_topology(
    tx, nnx.as_pure(optimizer.opt_state), params, nnx.as_pure(grads), topologies, dense
  )
  nnx.update(model, new_params)
  for p, layer in layers:
    layer.set_topology(new_topos[f"{p}/values"])
  nnx.update(optimizer.opt_state, nnx.state(new_opt))
  optimizer.step[...] += 1
  return out


def step_count(opt_state: Any) -> int:
  """The SparseDST step count of an optimizer state (a host read)."""
  return int(sparse_dst._find_state(nnx.as_pure(opt_state)).count)  # noqa: SLF001


class SparseTrainStep:
  """Train step of an NNX model with sparse layers: regular or topology step, by schedule.

  Usage::

    tx = sj.sparse.truly_sparse(sj.rigl(optax.adam(1e-3), sparsity=0.9, end_step=7500))
    model = sj.sparse.sparsify(dense_model, tx)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    train_step = sj.sparse.SparseTrainStep(loss_fn)        # loss_fn(model, x, y)
    for x, y in batches:
      loss = train_step(model, optimizer, x, y)

  Each call reads the optimizer's step count (one host read) and runs the topology step
  exactly on the method's mask-update steps. Both steps are ``nnx.jit``-compiled once.
  """

  def __init__(self, loss_fn: Callable, *, has_aux: bool = False):
    self.loss_fn = loss_fn
    self.has_aux = has_aux
    self.regular = nnx.jit(functools.partial(regular_update, loss_fn, has_aux=has_aux))
    self.topology = nnx.jit(functools.partial(topology_update, loss_fn, has_aux=has_aux))

  def __call__(self, model, optimizer, *args):
    tx = _sparse_tx(optimizer)
    if bool(tx.is_update_step(step_count(optimizer.opt_state))):
      return self.topology(model, optimizer, *args)
    return self.regular(model, optimizer, *args)


# ---------------------------------------------------------------------------------------
# Linen: params + the "sparse_topology" collection.
# ---------------------------------------------------------------------------------------


def linen_topologies(collection: Mapping[str, Any]) -> dict[str, CSRTopology]:
  """``{values path: CSRTopology}`` from a Linen ``"sparse_topology"`` collection."""
  out = {}
  flat, _ = jax.tree_util.tree_flatten_with_path(collection)
  groups: dict[str, dict[str, Any]] = {}
  for path, leaf in flat:
    p = tree.path_to_str(path)
    layer, name = p.rsplit("/", 1)
    groups.setdefault(layer, {})[name] = leaf
  for layer, arrays in groups.items():
    shape = (arrays["csc_ptr"].shape[0] - 1, arrays["row_ptr"].shape[0] - 1)
    out[f"{layer}/values"] = CSRTopology(**arrays, kernel_shape=shape)
  return out


def _linen_collection(topologies: Mapping[str, CSRTopology]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, t in topologies.items():
    node = out
    parts = path.split("/")[:-1]
    for key in parts[:-1]:
      node = node.setdefault(key, {})
    node[parts[-1]] = {
      "col": t.col,
      "row_ptr": t.row_ptr,
      "csc_ptr": t.csc_ptr,
      "csc_row": t.csc_row,
      "csc_slot": t.csc_slot,
    }
  return out


def linen_update(
  loss_fn: Callable,
  tx: sparse_dst.SparseDST,
  params,
  topology,
  opt_state,
  *args,
  topology_step: bool = False,
):
  """One step of a Linen model with :class:`SparseDenseLinen` layers (traceable).

  Args:
    loss_fn: ``loss_fn(params, topology, *args) -> loss``; it applies the model with
      ``{"params": params, "sparse_topology": topology}``.
    tx: the :class:`SparseDST`.
    params: the ``params`` collection.
    topology: the ``"sparse_topology"`` collection.
    opt_state: ``tx``'s state.
    *args: the batch.
    topology_step: run the mask update (call it when ``tx.is_update_step(count)``; a
      static Python bool: compile the two variants separately).

  Returns:
    ``(params, topology, opt_state, loss)``.
  """
  if not topology_step:
    loss, grads = jax.value_and_grad(loss_fn)(params, topology, *args)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), topology, opt_state, loss
  topologies = linen_topologies(topology)
  probes = {p: jnp.zeros((t.n_in, t.n_out), jnp.float32) for p, t in topologies.items()}

  def probed(params, probes):
    with sparse_layers.probing(probes):
      return loss_fn(params, topology, *args)

  loss, (grads, dense) = jax.value_and_grad(probed, argnums=(0, 1))(params, probes)
  new_params, new_opt, new_topos = _apply_topology(tx, opt_state, params, grads, topologies, dense)
  return new_params, _linen_collection(new_topos), new_opt, loss
