"""Differentiable sparse matmul for trainable CSR sparse layers: native CPU and pure XLA.

:func:`sparse_matmul` computes ``y = x @ W`` for a layer stored as ``values [C]`` + a
:class:`~sparsejax._src.transforms.sparse_topology.CSRTopology`, with a ``jax.custom_vjp``
whose backward yields ``dx`` and ``dvalues`` (one value per slot, 0 at padding slots; the
integer topology gets no cotangent). Paths:

* ``"native"``: the C++ XLA FFI kernels (CPU, float32; one forward and one backward call,
  feature-major activations, ``ffi::ThreadPool`` threads). ``dx`` is skipped when ``x`` is
  not differentiated (the first layer of a network: ``symbolic_zeros``).
* ``"xla"``: scatter the values into a dense kernel, then ``jnp.dot`` (every backend and
  dtype, float64 for tests; JAX differentiates the scatter into a gather). Dense compute:
  it saves memory, not time.
* ``"auto"``: native when built, on the CPU backend, for float32 inputs; else xla.

``probe``: on DST topology steps, pass a dense ``[n_in, n_out]`` zeros array; its
cotangent is the dense weight gradient ``xᵀ dy`` at *every* position, RigL's and SRigL's
growth score (one dense product per layer, only on those steps).

References: SparseProp (Nikdan et al. 2023, arXiv:2302.04852); RigL (Evci et al. 2020,
arXiv:1911.11134) for the dense gradient on update steps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from sparsejax._src.kernels import sparse_native
from sparsejax._src.transforms import sparse_dst, sparse_topology
from sparsejax._src.transforms.sparse_topology import CSRTopology

__all__ = [
  "Method",
  "select_method",
  "sparse_matmul",
  "sparse_matmul_reference",
  "update_topology",
]

Method = Literal["auto", "native", "xla"]
_METHODS = ("auto", "native", "xla")
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


@dataclasses.dataclass(frozen=True)
class _Native:
  """Static configuration of a native call (hashable: a ``nondiff_argnum``)."""

  isa: str = "auto"
  threads: int = 0
  tile: int = 0


def select_method(x_dtype, values_dtype, method: Method = "auto") -> str:
  """The path :func:`sparse_matmul` takes: ``"native"`` or ``"xla"``.

  Raises:
    ValueError: unknown ``method``; ``"native"`` with non-float32 inputs or without the
      built kernels.
  """
  if method not in _METHODS:
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
  f32 = jnp.dtype(x_dtype) == jnp.float32 and jnp.dtype(values_dtype) == jnp.float32
  if method == "native":
    if not f32:
      raise ValueError(
        f"method='native' needs float32 activations and values, got {jnp.dtype(x_dtype)} and "
        f"{jnp.dtype(values_dtype)}; use method='xla' (any float dtype) or cast."
      )
    if not sparse_native.native_available():
      raise RuntimeError(
        f"method='native': the kernels are unavailable ({sparse_native.native_unavailable_reason()})"
      )
    return "native"
  if method == "xla":
    return "xla"
  native = f32 and jax.default_backend() == "cpu" and sparse_native.native_available()
  return "native" if native else "xla"


def _check(x: jax.Array, values: jax.Array, topology: CSRTopology, probe) -> None:
  if not isinstance(topology, CSRTopology):
    raise TypeError(f"topology must be a CSRTopology, got {type(topology).__name__}")
  for name, a in (("x", x), ("values", values)):
    if not any(jnp.dtype(a.dtype) == d for d in _FLOATS):
      raise ValueError(
        f"sparse_matmul: {name} must be float32, bfloat16, float16 or float64, got {a.dtype}"
      )
  if values.shape != (topology.capacity,):
    raise ValueError(
      f"sparse_matmul: values has shape {values.shape}, the topology has {topology.capacity} slots"
    )
  if x.ndim < 1 or x.shape[-1] != topology.n_in:
    raise ValueError(
      f"sparse_matmul: x has shape {x.shape}; its last axis must be the fan-in "
      f"{topology.n_in} (kernel shape {topology.kernel_shape})"
    )
  if probe is not None and probe.shape != (topology.n_in, topology.n_out):
    raise ValueError(
      f"sparse_matmul: probe has shape {probe.shape}, expected {(topology.n_in, topology.n_out)}"
    )


def sparse_matmul(
  x: jax.Array,
  values: jax.Array,
  topology: CSRTopology,
  bias: jax.Array | None = None,
  *,
  probe: jax.Array | None = None,
  method: Method = "auto",
  isa: str = "auto",
  threads: int = 0,
  tile: int = 0,
) -> jax.Array:
  """``x @ W (+ bias)`` for a CSR sparse layer, differentiable in ``x``, ``values``,
  ``bias`` and ``probe``.

  Args:
    x: ``[..., n_in]`` activations.
    values: ``[C]`` weights of the slots.
    topology: the layer's topology (``n_in = prod(kernel_shape[:-1])``).
    bias: optional ``[n_out]``; the native backward computes its gradient in the same
      pass over ``dy`` as ``dvalues``.
    probe: optional ``[n_in, n_out]`` (zeros); its gradient is ``xᵀ·dy`` everywhere.
    method: ``"auto"``, ``"native"`` or ``"xla"`` (see the module docstring).
    isa: native only: cap on the SIMD level (``"portable"``, ``"avx2"``, ``"avx512"``).
    threads: native only: at most this many threads (0: XLA's intra-op pool).
    tile: native only: batch lanes per tile (0: 64).

  Returns:
    ``[..., n_out]`` in ``x``'s dtype.

  Raises:
    ValueError / TypeError: bad shapes, dtypes or method.
  """
  _check(x, values, topology, probe)
  if bias is not None and bias.shape != (topology.n_out,):
    raise ValueError(f"sparse_matmul: bias has shape {bias.shape}, expected ({topology.n_out},)")
  path = select_method(x.dtype, values.dtype, method)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, topology.n_in)
  if path == "xla":
    y = _xla(x2, values, topology, probe)
    y = y if bias is None else y + bias.astype(y.dtype)
  else:
    y = _native(x2, values, bias, probe, topology, _Native(isa, threads, tile))
  return y.reshape(*lead, topology.n_out)


def _xla(x, values, topology, probe):
  w = sparse_topology.scatter_slots(values, topology)
  if probe is not None:
    w = w + probe.astype(w.dtype)
  return jnp.dot(x, w.astype(x.dtype), preferred_element_type=x.dtype)


def update_topology(
  tx, opt_state, params, grads, topologies, dense_grads, *, ops=None
) -> sparse_dst.TopologyUpdate:
  """:func:`sparsejax._src.transforms.sparse_dst.update_topology` with the native C++
  topology ops on the CPU (``ops=None``; else the given ``TopologyOps``).

  Args:
    tx: the :class:`~sparsejax.sparse.SparseDST`.
    opt_state: its state.
    params: the params (sparse layers' values at ``".../values"``).
    grads: their gradients at this step.
    topologies: ``{values path: CSRTopology}``.
    dense_grads: ``{values path: [n_in, n_out] dense gradient}`` (the probes' gradients).
    ops: override the topology ops (``sparse_topology.XLA_OPS`` for pure XLA).

  Returns:
    A :class:`~sparsejax.sparse.TopologyUpdate`.
  """
  ops = sparse_native.topology_ops() if ops is None else ops
  return sparse_dst.update_topology(tx, opt_state, params, grads, topologies, dense_grads, ops=ops)


def sparse_matmul_reference(x: jax.Array, values: jax.Array, topology: CSRTopology) -> jax.Array:
  """``x @ W`` through the dense kernel (any dtype; the tests' reference)."""
  w = sparse_topology.dense_kernel(values, topology)
  return x @ w.reshape(topology.n_in, topology.n_out)


# ---------------------------------------------------------------------------------------
# Native path: one forward and one backward FFI call.
# ---------------------------------------------------------------------------------------


def _value(a):
  return a.value if hasattr(a, "perturbed") else a


def _forward(x, values, bias, topology, cfg):
  y = sparse_native.native_forward(
    x, values, topology, isa=cfg.isa, threads=cfg.threads, tile=cfg.tile
  )
  return y if bias is None else y + bias.astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _native(x, values, bias, probe, topology, cfg):
  del probe
  return _forward(x, values, bias, topology, cfg)


def _native_fwd(x, values, bias, probe, topology, cfg):
  xv, vv, bv, pv = _value(x), _value(values), _value(bias), _value(probe)
  tv = jax.tree.map(_value, topology)
  y = _forward(xv, vv, bv, tv, cfg)
  probe_zero = None if pv is None else jnp.zeros((), pv.dtype)
  bias_zero = None if bv is None else jnp.zeros((), bv.dtype)
  need_dx = bool(getattr(x, "perturbed", True))
  return y, (xv, vv, tv, need_dx, bias_zero, probe_zero)


def _native_bwd(cfg, res, dy):
  x, values, topology, need_dx, bias_zero, probe_zero = res
  if isinstance(dy, SymbolicZero):
    dy = jnp.zeros((x.shape[0], topology.n_out), jnp.float32)
  dx, dv, db = sparse_native.native_backward(
    x,
    dy,
    values,
    topology,
    need_dx=need_dx,
    isa=cfg.isa,
    threads=cfg.threads,
    tile=cfg.tile,
  )
  dbias = None if bias_zero is None else db.astype(bias_zero.dtype)
  dprobe = None
  if probe_zero is not None:  # RigL's growth score: the dense gradient, by XLA's dot
    dprobe = jnp.dot(x.T, dy, preferred_element_type=jnp.float32).astype(probe_zero.dtype)
  return dx, dv, dbias, dprobe, None


_native.defvjp(_native_fwd, _native_bwd, symbolic_zeros=True)
