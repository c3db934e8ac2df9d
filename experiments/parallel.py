"""Device mesh and shardings for the experiments (``config.mesh``).

``config.mesh.data``, ``config.mesh.fsdp`` and ``config.mesh.model`` are the sizes of a
``("data", "fsdp", "model")`` mesh of Auto axes over the first ``data·fsdp·model`` devices
(one size may be ``-1``: all remaining devices). The default ``1, 1, 1`` runs on one device
exactly as before. Fake CPU devices work: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
At most two axes may exceed 1 (see :func:`mesh_shape`).

* ``data``: data parallel. The batch is split over ``data`` (and ``fsdp``); params are
  replicated over it.
* ``fsdp``: fully sharded data parallel. The batch is split over it too, and every param of at
  least ``config.mesh.min_shard_size`` elements is sharded along its input-feature axis (the
  largest non-last dimension divisible by the axis size: ``in`` of a Dense kernel, ``in`` of
  a conv kernel). That layout keeps the DST mask update's exact top-k cheap: each device
  holds a contiguous block of the flattened kernel (docs/SHARDING.md).
* ``model``: tensor parallel. Kernels and biases are sharded along their output-feature
  (last) axis when it is divisible by the axis size.

The optimizer state (DST masks, inner moments) is sharded like the params it belongs to;
counters and PRNG keys are replicated (:func:`sparsejax.sharding.opt_state_shardings`
derives the same for plain optax states). Everything else is JAX's own machinery: ``jax.jit`` with
``in_shardings``/``out_shardings`` and the compiler's collectives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sparsejax as sj

AXES = ("data", "fsdp", "model")


def mesh_shape(mesh_config: ml_collections.ConfigDict, device_count: int) -> dict[str, int]:
  """Resolves ``config.mesh`` (one ``-1`` allowed) to axis sizes; checks the device count.

  Raises:
    ValueError: a size that is not a positive integer or -1, more than one -1, or more
      devices asked for than exist (naming the field and the allowed values).
  """
  sizes = {}
  for axis in AXES:
    value = mesh_config[axis]
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
      raise ValueError(
        f"config.mesh.{axis} must be a positive integer or -1 (all remaining devices); "
        f"got {value!r}."
      )
    sizes[axis] = value
  free = [a for a in AXES if sizes[a] == -1]
  if len(free) > 1:
    raise ValueError(f"At most one of config.mesh.{{data,fsdp,model}} may be -1; got {free}.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if device_count % fixed:
      raise ValueError(
        f"config.mesh.{free[0]}=-1: {device_count} devices are not divisible by the other "
        f"axes' product {fixed}."
      )
    sizes[free[0]] = device_count // fixed
  if all(sizes[a] > 1 for a in AXES):
    raise ValueError(
      f"config.mesh {sizes}: at most two of data, fsdp and model may exceed 1. With all three "
      "> 1, XLA's SPMD partitioner (jax 0.10.2, CPU) computes wrong gradients for MLPs of three "
      "or more layers sharded over fsdp and model (reproduced without sparsejax: "
      "tests/_experiments_mesh_child.py, xla_three_axis_grad). Use e.g. data x fsdp or "
      "fsdp x model."
    )
  total = math.prod(sizes.values())
  if total > device_count:
    raise ValueError(
      f"config.mesh asks for {total} devices ({sizes}) but only {device_count} exist. On a "
      "CPU, fake devices come from XLA_FLAGS=--xla_force_host_platform_device_count=N "
      "(set before JAX starts)."
    )
  return sizes


def make_mesh(mesh_config: ml_collections.ConfigDict) -> Mesh | None:
  """The ``("data", "fsdp", "model")`` mesh of Auto axes, or None for a single device."""
  sizes = mesh_shape(mesh_config, jax.device_count())
  n = math.prod(sizes.values())
  if n == 1:
    return None
  return jax.make_mesh(
    tuple(sizes[a] for a in AXES),
    AXES,
    axis_types=(AxisType.Auto,) * len(AXES),
    devices=jax.devices()[:n],
  )


def param_spec(shape: Sequence[int], mesh: Mesh, *, min_shard_size: int) -> P:
  """The ``PartitionSpec`` of one param: ``fsdp`` on its input axis, ``model`` on its last."""
  spec: list[str | None] = [None] * len(shape)
  if not shape or math.prod(shape) < min_shard_size:
    return P(*spec)
  model, fsdp = mesh.shape["model"], mesh.shape["fsdp"]
  if model > 1 and shape[-1] % model == 0:
    spec[-1] = "model"
  if fsdp > 1 and len(shape) >= 2:
    candidates = [d for d in range(len(shape) - 1) if shape[d] % fsdp == 0 and shape[d] >= fsdp]
    if candidates:
      spec[max(candidates, key=lambda d: (shape[d], -d))] = "fsdp"
  return P(*spec)


def state_shardings(
  mesh: Mesh,
  model_state: Any,
  optimizer_state: Any,
  *,
  min_shard_size: int,
) -> tuple[list[NamedSharding], list[NamedSharding], dict[str, NamedSharding]]:
  """Shardings for the flat leaves of ``nnx.state(model)`` and ``nnx.state(optimizer)``.

  Params get :func:`param_spec`. An optimizer-state leaf whose path ends with a param's path
  and has its shape (DST masks, momenta, Adam moments: ``tree_map_params``' param-shaped
  leaves) gets that param's sharding; every other leaf (step counters, PRNG keys) is
  replicated.

  Returns:
    ``(model_leaf_shardings, optimizer_leaf_shardings, by_param_path)``, the first two in
    ``jax.tree.leaves`` order, the last keyed by ``sj.path_to_str`` paths (``"a/0/kernel"``).
  """
  replicated = NamedSharding(mesh, P())
  by_path: dict[str, tuple[NamedSharding, tuple[int, ...]]] = {}
  model_sh = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(model_state)[0]:
    sh = NamedSharding(mesh, param_spec(leaf.shape, mesh, min_shard_size=min_shard_size))
    by_path[sj.path_to_str(path)] = (sh, tuple(leaf.shape))
    model_sh.append(sh)
  opt_sh = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(optimizer_state)[0]:
    parts = sj.path_to_str(path).split("/")
    shape = tuple(getattr(leaf, "shape", ()))
    suffixes = ("/".join(parts[start:]) for start in range(len(parts)))
    match = next((by_path[s] for s in suffixes if by_path.get(s, (None, None))[1] == shape), None)
    opt_sh.append(replicated if match is None else match[0])
  return model_sh, opt_sh, {p: sh for p, (sh, _) in by_path.items()}


def shardings_for_paths(
  paths: Sequence[str], by_path: Mapping[str, NamedSharding], mesh: Mesh
) -> list[NamedSharding]:
  """Shardings for ``"a/0/kernel"``-style param paths (replicated when unknown)."""
  replicated = NamedSharding(mesh, P())
  return [by_path.get(p, replicated) for p in paths]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The batch's leading axis split over ``data`` and ``fsdp``."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def describe(mesh: Mesh | None, model_shardings: Sequence[NamedSharding] = ()) -> dict[str, Any]:
  """A JSON-able summary: mesh axis sizes and how many param leaves are sharded."""
  if mesh is None:
    return {"devices": 1}
  sharded = sum(1 for s in model_shardings if any(a is not None for a in s.spec))
  return {
    "devices": int(mesh.size),
    **{a: int(mesh.shape[a]) for a in AXES},
    "sharded_param_leaves": sharded,
    "param_leaves": len(model_shardings),
  }
