"""Steps of a truly sparse run (``config.sparse_compute=True``, issue 14).

The model's masked layers are ``sparsejax.sparse`` layers (values + CSR topology, native
kernels); the optimizer is the method's :class:`sparsejax.sparse.SparseDST`. Two jitted
steps replace the masked run's one: :func:`train_step` (sparse forward/backward and the
optimizer on the active weights) and :func:`topology_step`, which the driver calls on the
method's scheduled mask updates (the library's ``update_topology``: the masked method's
drop-and-grow rule on the dense view, with the dense gradient of these steps only).

The readers give the records exactly the masked run's view (``sparsejax.sparse.dense_view``:
kernel paths, dense kernels and masks), so ``metrics.jsonl`` has the same keys.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sparsejax as sj


def build(create, tx: optax.GradientTransformation):
  """Model (masked layers made sparse with the method's initial masks), optimizer, ever."""
  model = sj.sparse.sparsify(create(), tx)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return model, optimizer, [m | False for _, m in layers(model)]


def layers(model: nnx.Module) -> list[tuple[str, jax.Array]]:
  """``(kernel path, mask)`` of the sparse layers, in the masked run's order."""
  return sj.metrics.sparse_leaves(sj.sparse.dense_view(model)[1])


def weights(model: nnx.Module) -> list[tuple[str, jax.Array]]:
  """``(path, array)`` of the weights in the masked run's layout (dense kernels)."""
  return sj.metrics.sparse_leaves(sj.sparse.dense_view(model)[0])


def _nnz(model: nnx.Module, paths) -> list[jax.Array]:
  by_kernel = {f"{p}/kernel": layer.topology.nnz for p, layer in sj.sparse.sparse_modules(model)}
  return [by_kernel[p] for p in paths]


def _metrics(loss, logits, y, grown_nnz) -> dict[str, Any]:
  return {
    "loss": loss,
    "correct": jnp.sum(jnp.argmax(logits, -1) == y, dtype=jnp.int32),
    "grown_nnz": grown_nnz,
  }


def _loss(defs):
  from experiments import steps  # pylint: disable=g-import-not-at-top

  return lambda m, x, y: steps._loss_and_logits(m, None, x, y, False, defs.label_smoothing)  # noqa: SLF001


def _flat(model, optimizer):
  return jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(optimizer))


def train_step(defs, mstate, ostate, ever, x, y):
  """A regular step (no mask update: nothing grows; ``ever`` is unchanged)."""
  model, optimizer = defs.merge(mstate, ostate)
  loss, logits = sj.sparse.regular_update(_loss(defs), model, optimizer, x, y, has_aux=True)
  paths = [p for p, _ in layers(model)]  # trace-time only (the dense view is not computed)
  counts = [jnp.stack([jnp.int32(0), n]) for n in _nnz(model, paths)]
  grown_nnz = jnp.stack(counts) if counts else jnp.zeros((0, 2), jnp.int32)
  return *_flat(model, optimizer), ever, _metrics(loss, logits, y, grown_nnz)


def topology_step(defs, mstate, ostate, ever, x, y):
  """A scheduled mask update, then the optimizer step of the kept weights."""
  model, optimizer = defs.merge(mstate, ostate)
  old = [m for _, m in layers(model)]
  loss, logits = sj.sparse.topology_update(_loss(defs), model, optimizer, x, y, has_aux=True)
  new = [m for _, m in layers(model)]
  counts = [
    jnp.stack([jnp.sum(n & ~o, dtype=jnp.int32), jnp.sum(o, dtype=jnp.int32)])
    for o, n in zip(old, new, strict=True)
  ]
  ever = [e | n for e, n in zip(ever, new, strict=True)]
  grown_nnz = jnp.stack(counts) if counts else jnp.zeros((0, 2), jnp.int32)
  return *_flat(model, optimizer), ever, _metrics(loss, logits, y, grown_nnz)


def paths(model: nnx.Module) -> tuple[list[str], tuple[str, ...]]:
  """``(mask paths, weight paths)`` in the masked run's layout, from paths only (works on
  the abstract model of ``nnx.eval_shape``): each sparse layer's ``values`` is its
  ``kernel`` (``bias`` < ``kernel`` < ``values``, so the order is the masked run's)."""
  names = [p for p, _ in sj.metrics.sparse_leaves(nnx.state(model, nnx.Param))]
  sparse = {f"{p}/values" for p, _ in sj.sparse.sparse_modules(model)}
  renamed = [p[: -len("values")] + "kernel" if p in sparse else p for p in names]
  masks = [r for r, p in zip(renamed, names, strict=True) if p in sparse]
  return masks, tuple(renamed)
