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


# --------------------------------------------------------------------------------------
# Batches split by process.
# --------------------------------------------------------------------------------------


def process_rows(mesh: Mesh | None, batch_size: int) -> list[int]:
  """The rows of a global batch that this process's devices hold (all rows without a mesh).

  Each process loads only these rows (:class:`BatchPlacer` assembles the global batch).
  """
  batch_size = int(batch_size)
  if mesh is None:
    return list(range(batch_size))
  rows: set[int] = set()
  for index in batch_sharding(mesh).addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(*index[0].indices(batch_size)))
  return sorted(rows)


class BatchPlacer:
  """Turns this process's rows of a global batch into one global array per input.

  Without a mesh the NumPy arrays pass through (``jit`` places them). On a mesh each local
  device gets its slice of the batch's leading axis (``batch_sharding``), and
  ``jax.make_array_from_single_device_arrays`` joins the slices of every process into the
  global batch.

  Args:
    mesh: the run's mesh, or None.
    batch_size: the global batch size.
  """

  def __init__(self, mesh: Mesh | None, batch_size: int):
    self.mesh, self.batch_size = mesh, int(batch_size)
    self.rows = process_rows(mesh, self.batch_size)
    if mesh is not None:
      self.sharding = batch_sharding(mesh)
      position = {r: i for i, r in enumerate(self.rows)}
      self.slices = []  # (device, first row in this process's rows, number of rows)
      for device, index in self.sharding.addressable_devices_indices_map(
        (self.batch_size,)
      ).items():
        rows = range(*index[0].indices(self.batch_size))
        self.slices.append((device, position[rows[0]], len(rows)))

  def __call__(self, arrays: Sequence[Any]) -> tuple[Any, ...]:
    if self.mesh is None:
      return tuple(arrays)
    out = []
    for a in arrays:
      pieces = [jax.device_put(a[i : i + n], d) for d, i, n in self.slices]
      shape = (self.batch_size, *a.shape[1:])
      out.append(jax.make_array_from_single_device_arrays(shape, self.sharding, pieces))
    return tuple(out)


def eval_batch_size(config: ml_collections.ConfigDict, eval_size: int, mesh: Mesh | None) -> int:
  """``config.eval_batch_size`` (0: the whole eval set) rounded up to the batch shards."""
  size = int(config.get("eval_batch_size", 0)) or int(eval_size)
  if mesh is None:
    return size
  shards = int(mesh.shape["data"] * mesh.shape["fsdp"])
  return -(-size // shards) * shards


def check_processes(config: ml_collections.ConfigDict, sizes: Mapping[str, int]) -> None:
  """Multi-process runs: the mesh spans every device and the batch splits evenly.

  Raises:
    ValueError: naming ``config.mesh`` or ``config.batch_size``.
  """
  processes = jax.process_count()
  if processes == 1:
    return
  devices, local = jax.device_count(), jax.local_device_count()
  if math.prod(sizes.values()) != devices:
    raise ValueError(
      f"config.mesh {dict(sizes)} uses {math.prod(sizes.values())} of the {devices} devices "
      f"of the {processes} processes; a multi-process run needs a mesh over all of them "
      "(e.g. --config.mesh.data=-1)."
    )
  if int(config.batch_size) % (processes * local):
    raise ValueError(
      f"config.batch_size={config.batch_size} must be divisible by the number of processes "
      f"× devices per process = {processes} × {local} = {processes * local} (every device "
      "gets the same number of examples)."
    )
