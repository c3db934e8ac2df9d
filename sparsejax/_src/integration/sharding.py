"""Sharding helpers: optimizer-state shardings from param shardings, and param-spec rules.

A DST state is param-shaped where it matters: each sparse leaf's mask is a bool array shaped
like its param, and the inner optimizer's moments are param-shaped trees. So the state's
shardings follow from the params' shardings alone: masks and moments take their param's
sharding, and everything else (step counts, the PRNG key, skip counters, schedule state)
is replicated. :func:`opt_state_shardings` derives that tree with
``optax.tree_utils.tree_map_params``, so it works for any inner optimizer and for chains
that contain a DST transformation, with no ``isinstance`` ladder.

The recipe (see ``docs/SHARDING.md``)::

  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  param_specs = sj.fsdp_param_specs(params, mesh, axis="fsdp")
  param_sh = sj.named_shardings(mesh, param_specs)
  params = jax.device_put(params, param_sh)
  opt_state = sj.shard_dst_init(tx, params, param_sh)          # masks sharded like params
  state_sh = sj.opt_state_shardings(tx, opt_state, param_sh)
  batch_sh = NamedSharding(mesh, P(("data", "fsdp")))
  step = jax.jit(train_step, in_shardings=(param_sh, state_sh, batch_sh),
                 out_shardings=(param_sh, state_sh), donate_argnums=(0, 1))

Scores from gradients are computed after the compiler's cross-device gradient reduction
(the gradient is a global array inside ``jax.jit``), and random growth keys are
``fold_in(fold_in(key, count), leaf_index)`` with JAX's partitionable threefry, so every
device computes the same masks as a single-device run.

Mesh axis types: both work. Under ``Explicit`` axes (``jax.make_mesh``'s default, with
``jax.set_mesh``) ``tx.init`` types each mask with its param's sharding and the mask
selection runs under ``jax.sharding.auto_axes``; see ``docs/SHARDING.md``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from sparsejax._src import base
from sparsejax._src import tree as tree_lib

ShardingOrSpec = Sharding | PartitionSpec


def _is_spec_leaf(x: Any) -> bool:
  return isinstance(x, Sharding | PartitionSpec)


def named_shardings(mesh: jax.sharding.Mesh, specs: Any) -> Any:
  """Turns a pytree of ``PartitionSpec`` into the same tree of ``NamedSharding`` on ``mesh``.

  ``optax.MaskedNode`` leaves are kept (they hold no array). Leaves that already are
  ``Sharding`` objects are returned unchanged.

  Args:
    mesh: the mesh the shardings live on.
    specs: a pytree of ``PartitionSpec`` (or ``Sharding``/``MaskedNode``) leaves.

  Returns:
    The same tree with ``NamedSharding(mesh, spec)`` for every ``PartitionSpec``.

  Raises:
    TypeError: a leaf of another kind (e.g. ``None``: use ``PartitionSpec()``).

  Example:
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> sj.named_shardings(mesh, {"w": P("fsdp", None)})["w"].spec
    PartitionSpec('fsdp', None)
  """

  def convert(x):
    if tree_lib.is_masked_node(x) or isinstance(x, Sharding):
      return x
    if isinstance(x, PartitionSpec):
      return NamedSharding(mesh, x)
    raise TypeError(
      f"Expected a PartitionSpec, a Sharding or optax.MaskedNode leaf, got {x!r} "
      f"({type(x).__name__}). Use PartitionSpec() (not None) for a replicated leaf."
    )

  return jax.tree.map(
    convert, specs, is_leaf=lambda x: tree_lib.is_masked_node(x) or _is_spec_leaf(x)
  )


def _replicated_like(leaves: Sequence[Any], mesh: jax.sharding.Mesh | None) -> ShardingOrSpec:
  """The replicated counterpart of the given param shardings (same kind, same mesh)."""
  if mesh is not None:
    return NamedSharding(mesh, PartitionSpec())
  named = [x for x in leaves if isinstance(x, NamedSharding)]
  if named:
    meshes = {x.mesh for x in named}
    if len(meshes) > 1:
      raise ValueError(
        "`param_shardings` use more than one mesh; pass `mesh=` to say which one the "
        "replicated optimizer-state entries (counts, PRNG key) should live on."
      )
    return NamedSharding(named[0].mesh, PartitionSpec())
  if leaves and all(isinstance(x, PartitionSpec) for x in leaves):
    return PartitionSpec()
  for x in leaves:
    if isinstance(x, jax.sharding.SingleDeviceSharding):
      return x
  raise TypeError(
    "`param_shardings` leaves must be NamedSharding, PartitionSpec or SingleDeviceSharding "
    f"(got {sorted({type(x).__name__ for x in leaves})}); pass `mesh=` or `replicated=`."
  )


def opt_state_shardings(
  tx: optax.GradientTransformation,
  opt_state: Any,
  param_shardings: Any,
  *,
  mesh: jax.sharding.Mesh | None = None,
  replicated: ShardingOrSpec | None = None,
) -> Any:
  """Shardings for an optimizer state, derived from the params' shardings.

  Every param-shaped subtree of the state (DST masks, Adam ``mu``/``nu``, SGD ``trace``,
  ...) gets the params' shardings; every other leaf (counts, PRNG key, skip counter,
  injected hyperparameters) is replicated. ``optax.MaskedNode`` entries (dense leaves'
  masks, leaves excluded by ``optax.masked``) are kept as they are, so the result has
  exactly the structure of ``opt_state`` and can be passed to ``jax.jit(...,
  in_shardings=..., out_shardings=...)``.

  Args:
    tx: the optimizer (a DST transformation, or any chain/wrapper containing one; any
      optax transformation works).
    opt_state: the optimizer state, concrete or abstract (``jax.eval_shape(tx.init,
      params)``); only its structure is used.
    param_shardings: a pytree with the params' structure whose leaves are
      ``NamedSharding`` or ``PartitionSpec`` (``PartitionSpec()`` for replicated leaves,
      never ``None``), or a single sharding/spec used for every param.
    mesh: optional; when given, ``PartitionSpec`` leaves become ``NamedSharding`` on it.
    replicated: the sharding for non-param leaves. Default: ``NamedSharding(mesh, P())``
      on the params' mesh, or ``P()`` when the params are given as specs.

  Returns:
    A pytree with the structure of ``opt_state``: shardings (or specs) for every array
    leaf, ``MaskedNode`` where the state has one.

  Raises:
    TypeError: if the param shardings are of an unsupported kind.
    ValueError: if they span several meshes and no ``mesh`` is given.

  Example:
    >>> tx = sj.rigl(optax.adam(1e-3), sparsity=0.9, update_every=100, end_step=1000)
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> specs = {"w": P(None, "model"), "b": P()}
    >>> sh = sj.opt_state_shardings(tx, jax.eval_shape(tx.init, params), specs)
    >>> sh.masks["w"], sh.inner_state[0].mu["w"], sh.count
    (PartitionSpec(None, 'model'), PartitionSpec(None, 'model'), PartitionSpec())
  """
  if mesh is not None:
    param_shardings = named_shardings(mesh, param_shardings)
  spec_leaves = jax.tree.leaves(param_shardings, is_leaf=_is_spec_leaf)
  if replicated is None:
    replicated = _replicated_like(spec_leaves, mesh)
  elif mesh is not None and isinstance(replicated, PartitionSpec):
    replicated = NamedSharding(mesh, replicated)

  def non_param(value):
    return jax.tree.map(lambda _: replicated, value, is_leaf=tree_lib.is_masked_node)

  if _is_spec_leaf(param_shardings):  # one sharding for every param
    single = param_shardings
    param_fn, param_trees = (lambda v: v if tree_lib.is_masked_node(v) else single), ()
  else:
    param_fn, param_trees = (
      (lambda v, s: v if tree_lib.is_masked_node(v) else s),
      (param_shardings,),
    )
  return optax.tree_utils.tree_map_params(
    tx,
    param_fn,
    opt_state,
    *param_trees,
    transform_non_params=non_param,
    is_leaf=tree_lib.is_masked_node,
  )


def abstract_opt_state(
  tx: optax.GradientTransformation,
  params: Any,
  param_shardings: Any,
  *,
  mesh: jax.sharding.Mesh | None = None,
) -> Any:
  """``jax.eval_shape(tx.init, params)`` with the shardings of :func:`opt_state_shardings`.

  The result is a tree of ``jax.ShapeDtypeStruct`` carrying ``sharding=``: a restore
  target for orbax (``ocp.args.StandardRestore(abstract)`` restores each array directly
  into its shards, masks included) or an argument for ``jit(...).lower``.

  Args:
    tx: the optimizer.
    params: params or ``jax.ShapeDtypeStruct`` leaves.
    param_shardings: the params' ``NamedSharding`` tree (or specs with ``mesh=``).
    mesh: optional, see :func:`opt_state_shardings`.

  Returns:
    The abstract optimizer state; ``MaskedNode`` entries kept.
  """
  abstract = jax.eval_shape(tx.init, params)
  shardings = opt_state_shardings(tx, abstract, param_shardings, mesh=mesh)
  return jax.tree.map(
    lambda a, s: (
      a if tree_lib.is_masked_node(a) else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    ),
    abstract,
    shardings,
    is_leaf=tree_lib.is_masked_node,
  )


def shard_dst_init(
  tx: optax.GradientTransformation,
  params: Any,
  param_shardings: Any,
  *,
  mesh: jax.sharding.Mesh | None = None,
) -> Any:
  """Initializes the optimizer state directly into its shardings.

  ``jax.jit(tx.init, out_shardings=opt_state_shardings(...))(params)``: each device builds
  only its shards of the masks and moments (the initial masks are the same as a
  single-device ``tx.init``, because mask ``i`` is drawn from ``fold_in(key, i)`` with
  JAX's partitionable threefry).

  Args:
    tx: the optimizer.
    params: the params (ideally already placed with ``param_shardings``).
    param_shardings: ``NamedSharding`` tree for the params (or specs with ``mesh=``).
    mesh: optional, see :func:`opt_state_shardings`.

  Returns:
    The optimizer state, each leaf a ``jax.Array`` with its derived sharding.

  Example:
    >>> state = sj.shard_dst_init(tx, params, param_sh)
    >>> params = sj.apply_masks(params, state)   # start sparse (keeps the shardings)
  """
  if mesh is not None:
    param_shardings = named_shardings(mesh, param_shardings)
  abstract = jax.eval_shape(tx.init, params)
  shardings = opt_state_shardings(tx, abstract, param_shardings)
  if any(isinstance(s, PartitionSpec) for s in jax.tree.leaves(shardings, is_leaf=_is_spec_leaf)):
    raise TypeError(
      "shard_dst_init needs concrete shardings: pass NamedSharding leaves or `mesh=`."
    )
  return jax.jit(tx.init, out_shardings=shardings)(params)


# --------------------------------------------------------------------------------------
# Param-spec rules.
# --------------------------------------------------------------------------------------


def _axis_size(mesh: Any, axis: str | Sequence[str]) -> int:
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  shape = dict(mesh.shape)
  missing = [n for n in names if n not in shape]
  if missing:
    raise ValueError(f"Mesh axes {missing} not in the mesh {tuple(shape)}.")
  return int(np.prod([shape[n] for n in names]))


_KERNEL_AXES = ("first", "last", "largest")


def fsdp_param_specs(
  params: Any,
  mesh: Any,
  *,
  axis: str | Sequence[str] = "fsdp",
  min_size: int = 2**14,
  kernel_axis: str = "first",
) -> Any:
  """FSDP ``PartitionSpec``s: shard one dimension of each large param along ``axis``.

  Leaves with fewer than ``min_size`` elements, or with no dimension divisible by the size
  of ``axis``, are replicated (``P()``). Otherwise one dimension is sharded (big_vision's
  ``fsdp`` tactic), chosen by ``kernel_axis``:

  * ``"first"`` (default): the leading dimension (``in`` of a Dense ``[in, out]`` kernel).
    This is the cheapest layout for the mask update: each device's shard is a contiguous
    block of the flattened kernel, so a layer-wise exact top-k costs one all-reduce of a
    fixed-size count histogram per selection pass, and N:M groups along ``in`` stay on one
    device when ``shape[0] / size(axis)`` is a multiple of ``m``;
  * ``"last"``: the trailing (neuron / ``out``) dimension. Keeps each neuron's fan-in on one
    device, but the layer-wise selection must then gather the layer (measured in
    ``benchmarks/RESULTS.md``);
  * ``"largest"``: the largest divisible dimension, ties to the earlier one.

  When the preferred dimension is not divisible, the largest divisible one is used (so
  big params are still sharded). 1-D leaves use their only dimension. With
  ``axis=("data", "fsdp")`` params are sharded over both mesh axes (ZeRO-3 over all devices).
  See ``docs/SHARDING.md`` for the communication cost of each layout.

  Args:
    params: pytree of arrays or ``jax.ShapeDtypeStruct``.
    mesh: a ``jax.sharding.Mesh`` or ``AbstractMesh`` (only axis sizes are read).
    axis: the mesh axis name (or a tuple of names) to shard over.
    min_size: leaves with fewer elements are replicated.
    kernel_axis: ``"first"``, ``"last"`` or ``"largest"``; see above.

  Returns:
    A pytree of ``PartitionSpec`` with the params' structure.

  Raises:
    ValueError: an unknown ``kernel_axis`` or a mesh axis that is not in ``mesh``.

  Example:
    >>> mesh = jax.make_mesh((1, 1), ("data", "fsdp"))
    >>> sj.fsdp_param_specs({"k": jnp.zeros((256, 128)), "b": jnp.zeros(128)}, mesh)
    {'b': PartitionSpec(), 'k': PartitionSpec('fsdp', None)}
  """
  if kernel_axis not in _KERNEL_AXES:
    raise ValueError(f"`kernel_axis` must be one of {_KERNEL_AXES}, got {kernel_axis!r}.")
  min_size = base.check_int("min_size", min_size, minimum=0)
  size = _axis_size(mesh, axis)
  spec_axis = axis if isinstance(axis, str) else tuple(axis)

  def rule(leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    if not shape or base.shape_size(shape) < min_size:
      return PartitionSpec()
    dims = [d for d in range(len(shape)) if shape[d] % size == 0]
    if not dims:
      return PartitionSpec()
    preferred = {"first": 0, "last": len(shape) - 1}.get(kernel_axis)
    if preferred in dims:
      dim = preferred
    else:
      dim = max(dims, key=lambda d: (shape[d], -d))
    parts = [None] * len(shape)
    parts[dim] = spec_axis
    return PartitionSpec(*parts)

  return jax.tree.map(rule, params)


def param_specs_from_rules(
  params: Any,
  rules: Sequence[tuple[str, PartitionSpec]],
  *,
  mesh: Any | None = None,
) -> Any:
  """``PartitionSpec``s from ``(regex, spec)`` rules on param paths (big_vision style).

  Paths are ``"layer1/kernel"`` (as in the DST ``include``/``exclude`` filters); the first
  rule whose regex ``re.search``-es the path wins; unmatched leaves are replicated. A
  tensor-parallel Megatron MLP, for example, is ``[(r"up/kernel", P(None, "model")),
  (r"down/kernel", P("model", None))]``.

  Args:
    params: pytree of arrays or ``jax.ShapeDtypeStruct``.
    rules: sequence of ``(regex, PartitionSpec)``.
    mesh: optional; when given, each sharded dimension is checked to be divisible by
      its mesh axes' size.

  Returns:
    A pytree of ``PartitionSpec`` with the params' structure.

  Raises:
    ValueError: an invalid regex, a spec longer than the leaf's rank, or (with ``mesh``)
      a dimension not divisible by its mesh axes' size.
  """
  compiled = []
  for pattern, spec in rules:
    try:
      compiled.append((re.compile(pattern), spec))
    except (re.error, TypeError) as e:
      raise ValueError(f"Invalid rule regex {pattern!r}: {e}") from e
    if not isinstance(spec, PartitionSpec):
      raise TypeError(f"Rule {pattern!r} must map to a PartitionSpec, got {spec!r}.")
  paths, leaves, treedef = tree_lib.flatten_with_paths(params)
  out = []
  for path, leaf in zip(paths, leaves, strict=True):
    spec = next((s for r, s in compiled if r.search(path)), PartitionSpec())
    shape = tuple(getattr(leaf, "shape", ()))
    if len(spec) > len(shape):
      raise ValueError(f"Spec {spec} for {path!r} has more entries than its shape {shape}.")
    if mesh is not None:
      for dim, names in enumerate(spec):
        if names is None:
          continue
        n = _axis_size(mesh, names)
        if shape[dim] % n:
          raise ValueError(
            f"{path!r} (shape {shape}): dimension {dim} of size {shape[dim]} is not "
            f"divisible by mesh axes {names!r} of size {n}."
          )
    out.append(spec)
  return jax.tree.unflatten(treedef, out)
