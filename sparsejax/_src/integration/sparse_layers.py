"""Trainable truly sparse layers (Flax NNX and Linen) on the fixed-capacity CSR format.

A sparse layer stores only its active weights: ``values [C]`` (``nnx.Param`` / Linen
``params``, the trainable leaf, so the optimizer state is per active weight) and the
integer :class:`~sparsejax.sparse.CSRTopology` (``SparseTopologyVar`` / Linen collection
``"sparse_topology"``, never trained). The forward pass and both gradients run on the
native CSR kernels (:func:`sparsejax.sparse.sparse_matmul`).

* :class:`SparseLinear` (NNX): ``y = x @ W + b`` with ``W`` sparse ``[in, out]``.
* :class:`SparseConv` (NNX): N-d convolution through im2col patches (in the kernel's
  ``(*window, in)`` order) and the same matmul; ``feature_group_count`` and
  ``input_dilation`` other than 1 are not supported (a clear error).
* :class:`SparseDenseLinen` (Linen): the Dense layer.
* :func:`sparsify`: a dense NNX model + a masked DST method → the same model with every
  masked ``nnx.Linear`` / ``nnx.Conv`` replaced by its sparse layer, with the method's
  initial masks (so the truly sparse model starts where its masked twin starts).

On DST topology steps the trainer asks each layer for the dense weight gradient through a
``probe`` (:func:`probing`): a zeros ``[n_in, n_out]`` input whose gradient is ``xᵀ·dy``.

References: SparseProp (arXiv:2302.04852), Nerva (arXiv:2407.17437), RigL
(arXiv:1911.11134), SRigL (arXiv:2305.02299).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from sparsejax._src import base, tree
from sparsejax._src.formats import sparse_csr
from sparsejax._src.kernels.sparse_train import Method, sparse_matmul
from sparsejax._src.transforms import sparse_dst
from sparsejax._src.transforms.sparse_topology import CSRTopology, gather_slots, topology_from_mask

__all__ = [
  "TOPOLOGY_COLLECTION",
  "SparseConv",
  "SparseDenseLinen",
  "SparseLinear",
  "SparseTopologyVar",
  "probing",
  "sparse_modules",
  "sparsify",
]

TOPOLOGY_COLLECTION = "sparse_topology"
"""Linen collection of the sparse layers' topologies."""

_TOPOLOGY_FIELDS = ("col", "row_ptr", "csc_ptr", "csc_row", "csc_slot")

_probes = threading.local()
_LECUN = nnx.initializers.lecun_normal()
_ZEROS = nnx.initializers.zeros_init()


@contextlib.contextmanager
def probing(probes: Mapping[Any, jax.Array]) -> Iterator[None]:
  """Within the block, sparse layers add a dense ``probe`` (trace time, thread-local).

  Keys are NNX layer objects' ``id()`` or Linen layers' values paths (``"Dense_0/values"``).
  """
  previous = getattr(_probes, "table", None)
  _probes.table = dict(probes)
  try:
    yield
  finally:
    _probes.table = previous


def _probe_for(key: Any) -> jax.Array | None:
  table = getattr(_probes, "table", None)
  return None if table is None else table.get(key)


def _csr(kernel, mask, capacity: int | None) -> sparse_csr.SparseCSR:
  """The layer's CSR: checked on the host when concrete, traceable under jit/eval_shape."""
  if isinstance(kernel, jax.core.Tracer) or isinstance(mask, jax.core.Tracer):
    if capacity is None:
      raise ValueError("building a sparse layer under jit needs a static `capacity`.")
    return sparse_csr.SparseCSR.from_mask(kernel, jnp.asarray(mask, bool), capacity)
  return sparse_csr.SparseCSR.from_dense(kernel, mask, capacity=capacity)


class SparseTopologyVar(nnx.Variable):
  """Non-trainable integer topology of an NNX sparse layer (``wrt=nnx.Param`` skips it)."""


def _promote(x: jax.Array, values: jax.Array) -> tuple[jax.Array, jax.Array]:
  dtype = jnp.promote_types(x.dtype, values.dtype)
  return x.astype(dtype), values.astype(dtype)


class _SparseNNX(nnx.Module):
  """Shared storage of the NNX sparse layers."""

  def _store(self, csr: sparse_csr.SparseCSR, bias, method: Method) -> None:
    self.values = nnx.Param(csr.values)
    self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
    for name in _TOPOLOGY_FIELDS:
      setattr(self, name, SparseTopologyVar(getattr(csr.topology, name)))
    self.kernel_shape = tuple(int(d) for d in csr.topology.kernel_shape)
    self.method = method

  @property
  def topology(self) -> CSRTopology:
    """The layer's :class:`CSRTopology`."""
    arrays = {name: getattr(self, name)[...] for name in _TOPOLOGY_FIELDS}
    return CSRTopology(**arrays, kernel_shape=self.kernel_shape)

  def set_topology(self, topology: CSRTopology) -> None:
    """Replaces the topology (same shapes; used by the trainer after a mask update)."""
    for name in _TOPOLOGY_FIELDS:
      getattr(self, name)[...] = getattr(topology, name)

  def csr(self) -> sparse_csr.SparseCSR:
    """The layer's weights as a :class:`~sparsejax.sparse.SparseCSR`."""
    return sparse_csr.SparseCSR(self.values[...], self.topology)

  def dense_kernel(self) -> jax.Array:
    """The dense kernel (``kernel_shape``; 0 at inactive positions)."""
    return self.csr().to_dense()

  def mask(self) -> jax.Array:
    """bool kernel-shaped mask of the active weights."""
    return self.csr().mask()

  def _matmul(self, x2: jax.Array) -> jax.Array:
    x2, values = _promote(x2, self.values[...])
    bias = None if self.bias is None else self.bias[...].astype(values.dtype)
    return sparse_matmul(
      x2, values, self.topology, bias, probe=_probe_for(id(self)), method=self.method
    )


class SparseLinear(_SparseNNX):
  """Dense layer whose kernel ``[in, out]`` is stored sparse (values + CSR topology).

  Build it from a mask (:meth:`from_dense`, :meth:`from_linear`, or :func:`sparsify` for a
  whole model) or at random (``SparseLinear(in, out, sparsity=0.9, rngs=...)``).

  Attributes:
    values: ``nnx.Param [C]``.
    bias: ``nnx.Param [out]`` or ``None``.
    col, row_ptr, csc_ptr, csc_row, csc_slot: ``SparseTopologyVar`` arrays.
    kernel_shape: ``(in, out)``.
    method: ``"auto"``, ``"native"`` or ``"xla"`` (:func:`sparsejax.sparse.sparse_matmul`).
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    sparsity: float | None = None,
    rngs: nnx.Rngs | None = None,
    use_bias: bool = True,
    kernel_init: Callable = _LECUN,
    bias_init: Callable = _ZEROS,
    param_dtype: Any = jnp.float32,
    method: Method = "auto",
    csr: sparse_csr.SparseCSR | None = None,
    bias: Any = None,
  ):
    """A random layer (``sparsity`` and ``rngs``), or one given as ``csr`` (+ ``bias``).

    Raises:
      ValueError: neither ``csr`` nor ``sparsity`` and ``rngs``; a ``csr`` of another shape.
    """
    shape = (int(in_features), int(out_features))
    if csr is None:
      if sparsity is None or rngs is None:
        raise ValueError("SparseLinear needs `sparsity` and `rngs` (or a `csr`).")
      kernel = kernel_init(rngs.params(), shape, param_dtype)
      mask = sparse_csr.random_mask(rngs.params(), shape, sparsity)
      bias = bias_init(rngs.params(), (shape[1],), param_dtype) if use_bias else None
      csr = sparse_csr.SparseCSR.from_dense(kernel, mask)
    elif tuple(csr.kernel_shape) != shape:
      raise ValueError(f"SparseLinear{shape}: the csr has kernel shape {csr.kernel_shape}.")
    self._store(csr, bias, method)

  @classmethod
  def from_dense(
    cls, kernel, mask, bias=None, *, capacity: int | None = None, method: Method = "auto"
  ) -> SparseLinear:
    """From a dense ``[in, out]`` kernel, its mask and an optional bias (traceable with a
    static ``capacity``)."""
    csr = _csr(kernel, mask, capacity)
    return cls(*csr.kernel_shape, csr=csr, bias=bias, method=method)

  @classmethod
  def from_linear(cls, linear: nnx.Linear, mask, *, capacity: int | None = None, method="auto"):
    """From an ``nnx.Linear`` and its ``[in, out]`` mask."""
    bias = None if linear.bias is None else linear.bias[...]
    return cls.from_dense(linear.kernel[...], mask, bias, capacity=capacity, method=method)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``[..., in] -> [..., out]``."""
    lead = x.shape[:-1]
    y = self._matmul(x.reshape(-1, x.shape[-1]))
    return y.reshape(*lead, y.shape[-1])


def im2col(x, window, strides, padding, dilation) -> jax.Array:
  """``[N, *spatial, in]`` → ``[N, *out_spatial, prod(window)·in]`` in ``(*window, in)`` order.

  One strided slice of the padded input per window offset (pure data movement; its
  gradient is a pad-and-add), stacked in the kernel's flattening order, so the patches
  multiply the sparse kernel's ``[prod(window)·in, out]`` view directly.
  """
  n = len(window)
  dilated = [(k - 1) * d + 1 for k, d in zip(window, dilation, strict=True)]
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(x.shape[1:-1], dilated, strides, padding)
  else:
    pads = [tuple(p) for p in padding]
  xp = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  out = [(xp.shape[1 + i] - dilated[i]) // strides[i] + 1 for i in range(n)]  # output spatial sizes
  slices = []
  for offset in itertools.product(*(range(k) for k in window)):
    start = [0] + [o * d for o, d in zip(offset, dilation, strict=True)] + [0]
    limit = (
      [xp.shape[0]]
      + [start[1 + i] + (out[i] - 1) * strides[i] + 1 for i in range(n)]
      + [xp.shape[-1]]
    )
    slices.append(lax.slice(xp, start, limit, [1, *strides, 1]))
  patches = jnp.stack(slices, axis=-2)  # [N, *out, prod(window), in]
  return patches.reshape(*patches.shape[:-2], -1)


def _tuple(v, n: int, default: int = 1) -> tuple[int, ...]:
  if v is None:
    return (default,) * n
  if isinstance(v, int):
    return (v,) * n
  return tuple(int(a) for a in v)


class SparseConv(_SparseNNX):
  """N-d convolution (channels last) with a sparse ``[*window, in, out]`` kernel.

  Runs as im2col patches + the sparse matmul (the fan-in is ``prod(window)·in``). Build
  it with :meth:`from_conv` or :func:`sparsify`.
  """

  def __init__(
    self,
    csr: sparse_csr.SparseCSR,
    bias: Any = None,
    *,
    strides: Sequence[int] | int | None = None,
    padding: Any = "SAME",
    kernel_dilation: Sequence[int] | int | None = None,
    method: Method = "auto",
  ):
    """A sparse convolution with kernel ``csr`` (``kernel_shape`` ``[*window, in, out]``)."""
    n = len(csr.kernel_shape) - 2
    if n < 1:
      raise ValueError(f"SparseConv needs a [*window, in, out] kernel, got {csr.kernel_shape}.")
    self._store(csr, bias, method)
    self.strides = _tuple(strides, n)
    self.padding = padding
    self.kernel_dilation = _tuple(kernel_dilation, n)

  @classmethod
  def from_conv(cls, conv: nnx.Conv, mask, *, capacity=None, method: Method = "auto"):
    """From an ``nnx.Conv`` and its kernel-shaped mask.

    Raises:
      NotImplementedError: grouped convolutions or input dilation.
    """
    n = len(conv.kernel_size)
    if int(conv.feature_group_count) != 1 or any(d != 1 for d in _tuple(conv.input_dilation, n)):
      raise NotImplementedError(
        "SparseConv supports feature_group_count=1 and input_dilation=1 only (got "
        f"{conv.feature_group_count}, {conv.input_dilation})."
      )
    bias = None if conv.bias is None else conv.bias[...]
    csr = _csr(conv.kernel[...], mask, capacity)
    return cls(
      csr,
      bias,
      strides=conv.strides,
      padding=conv.padding,
      kernel_dilation=conv.kernel_dilation,
      method=method,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """``[N, *spatial, in] -> [N, *out_spatial, out]`` (unbatched input is accepted)."""
    window = self.kernel_shape[:-2]
    unbatched = x.ndim == len(window) + 1
    if unbatched:
      x = x[None]
    padding = self.padding if isinstance(self.padding, str) else tuple(self.padding)
    patches = im2col(x, window, self.strides, padding, self.kernel_dilation)
    lead = patches.shape[:-1]
    y = self._matmul(patches.reshape(-1, patches.shape[-1])).reshape(*lead, -1)
    return y[0] if unbatched else y


def sparse_modules(model: nnx.Module) -> list[tuple[str, _SparseNNX]]:
  """``(module path, layer)`` of every NNX sparse layer, in graph order."""
  out = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, _SparseNNX):
      out.append(("/".join(str(p) for p in path), node))
  return out


def _replace(model: nnx.Module, path: Sequence[Any], new: nnx.Module) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(parent, nnx.List) else getattr(parent, key)
  if isinstance(parent, nnx.List):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def sparsify(model: nnx.Module, tx: sparse_dst.SparseDST, *, method: Method = "auto"):
  """Replaces the masked layers of a dense NNX model by truly sparse layers.

  The masks are the masked twin's initial masks (``tx.masked.init``: same allocation,
  seed and ``init_masks``) and the values the twin's starting weights (``kernel · mask``),
  so the truly sparse model starts exactly where the masked one does. Traceable (e.g.
  inside ``nnx.jit`` or ``nnx.eval_shape``); eagerly, the masks are checked on the host.

  Args:
    model: an NNX model with ``nnx.Linear`` / ``nnx.Conv`` layers (left unchanged).
    tx: a :class:`~sparsejax.sparse.SparseDST` (:func:`sparsejax.sparse.truly_sparse`).
    method: the sparse layers' matmul path.

  Returns:
    A new model (a clone) with sparse layers.

  Raises:
    TypeError: a masked kernel that does not belong to an ``nnx.Linear``/``nnx.Conv``.
  """
  if not isinstance(tx, sparse_dst.SparseDST):
    raise TypeError(f"`tx` must be a SparseDST (sj.sparse.truly_sparse), got {type(tx).__name__}.")
  model = nnx.clone(model)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  masks = tx.masked.init(params).masks
  paths, mask_leaves, _ = tree.flatten_with_paths(masks)
  by_path = {p: m for p, m in zip(paths, mask_leaves, strict=True) if not tree.is_dense_marker(m)}
  plan = {leaf.path: leaf for leaf in tx.config.allocation.plan(params).leaves}
  modules = {"/".join(str(p) for p in path): (path, node) for path, node in nnx.iter_graph(model)}
  for kpath, mask in by_path.items():
    mpath = kpath.rsplit("/", 1)[0] if "/" in kpath else ""
    path, node = modules.get(mpath, ((), None))
    if not isinstance(node, nnx.Linear | nnx.Conv) or not kpath.endswith("kernel"):
      raise TypeError(
        f"sparsify: the masked leaf {kpath!r} is not the kernel of an nnx.Linear or nnx.Conv "
        f"(found {type(node).__name__}); only those layers have truly sparse versions."
      )
    leaf = plan[kpath]
    capacity = sparse_dst.layer_capacity(
      tx.config.allocation.structure, leaf.shape, leaf.sparsity, kpath, leaf.layer
    )
    if isinstance(node, nnx.Linear):
      new = SparseLinear.from_linear(node, mask, capacity=capacity, method=method)
    else:
      new = SparseConv.from_conv(node, mask, capacity=capacity, method=method)
    _replace(model, path, new)
  return model


class SparseDenseLinen(nn.Module):
  """Linen Dense layer with a sparse ``[in, out]`` kernel (random mask at ``sparsity``).

  Params: ``values [C]`` and ``bias``; collection ``"sparse_topology"``: the topology
  arrays (pass ``mutable=["sparse_topology"]`` only to the trainer's topology step).

  Attributes:
    features: output width.
    sparsity: fraction of zero weights in ``[0, 1)`` (nnz ``= size - floor(size·S)``).
    use_bias: add a bias.
    kernel_init: dense kernel initializer (the active positions are kept).
    bias_init: bias initializer.
    method: the matmul path.
  """

  features: int
  sparsity: float
  use_bias: bool = True
  kernel_init: Callable = _LECUN
  bias_init: Callable = _ZEROS
  method: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (x.shape[-1], self.features)

    nnz = base.nnz_for_sparsity(shape[0] * shape[1], self.sparsity)
    cell = {}

    def init_values(key):  # traceable (Linen shape-checks params with eval_shape)
      mask = sparse_csr.random_mask(jax.random.fold_in(key, 1), shape, self.sparsity)
      kernel = self.kernel_init(jax.random.fold_in(key, 2), shape, jnp.float32)
      cell["topology"], _ = topology_from_mask(mask, nnz, shape)
      return gather_slots(kernel, cell["topology"])

    values = self.param("values", init_values)
    arrays = {
      name: self.variable(TOPOLOGY_COLLECTION, name, lambda n=name: getattr(cell["topology"], n))
      for name in _TOPOLOGY_FIELDS
    }
    topology = CSRTopology(**{k: v.value for k, v in arrays.items()}, kernel_shape=shape)
    x2, v = _promote(x.reshape(-1, shape[0]), values)
    probe = _probe_for("/".join(self.path) + "/values") if self.path else None
    bias = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(v.dtype)
    y = sparse_matmul(x2, v, topology, bias, probe=probe, method=self.method)
    return y.reshape(*x.shape[:-1], self.features)
