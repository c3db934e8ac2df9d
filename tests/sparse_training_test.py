"""Truly sparse training (issue 14): format, kernels, gradients, topology updates, layers.

Kernels are checked against float64 NumPy references built from the dense kernel; the
DST on sparse layers against its masked-dense twin (same masks, params within fp tolerance
over several mask updates) for RigL, SET and SRigL.
"""

import importlib
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.test_util import check_grads

import sparsejax as sj
from sparsejax._src.kernels import sparse_native
from sparsejax._src.transforms import sparse_topology as topo_lib

NATIVE = sj.sparse.native_available()
needs_native = pytest.mark.skipif(not NATIVE, reason="native kernels not built")
ISAS = ["portable", "avx2", "avx512"]


def _layer(rng, n_in, n_out, density, extra=0, dtype=np.float32, rows=None):
  """A random masked kernel, its CSR layer (``extra`` padding slots) and the mask."""
  mask = rng.random((n_in, n_out)) < density
  if rows is not None:  # row patterns: empty, one input, every input
    mask[:, 0] = False
    if n_out > 1:
      mask[:, 1] = False
      mask[rng.integers(n_in), 1] = True
    if n_out > 2:
      mask[:, 2] = True
  kernel = (rng.standard_normal((n_in, n_out)) * mask).astype(dtype)
  nnz = int(mask.sum())
  csr = sj.sparse.SparseCSR.from_dense(kernel, mask, capacity=nnz + extra)
  return kernel, mask, csr


def _tol(terms: np.ndarray) -> float:
  """``c·2⁻²⁴·Σ|terms|``: the float32 rounding bound of a sum."""
  return 64 * 2.0**-24 * float(np.max(terms)) + 1e-30


# ---------------------------------------------------------------------------------------
# Format.
# ---------------------------------------------------------------------------------------


def test_format_round_trip_and_invariants():
  rng = np.random.default_rng(0)
  kernel, mask, csr = _layer(rng, 40, 30, 0.2, extra=5, rows=True)
  np.testing.assert_array_equal(np.asarray(csr.to_dense()), kernel)
  np.testing.assert_array_equal(np.asarray(csr.mask()), mask)
  csr.validate()
  t = csr.topology
  nnz = int(t.nnz)
  assert csr.capacity == nnz + 5 and t.col.dtype == np.int16 and t.csc_row.dtype == np.int16
  row_ptr, col = np.asarray(t.row_ptr), np.asarray(t.col)
  for j in range(30):  # CSR rows ascend in col
    assert np.all(np.diff(col[row_ptr[j] : row_ptr[j + 1]]) > 0)
  slots = np.asarray(t.csc_slot)[:nnz]
  assert sorted(slots.tolist()) == list(range(nnz))  # csc_slot is a bijection
  rows = np.asarray(topo_lib.slot_rows(t))
  for q in range(nnz):  # the CSC view is exactly the transpose
    assert rows[slots[q]] == np.asarray(t.csc_row)[q]
  np.testing.assert_array_equal(np.asarray(csr.values)[nnz:], 0)


def test_conv_kernel_and_int32_indices():
  rng = np.random.default_rng(1)
  kernel = rng.standard_normal((3, 2, 5, 7)).astype(np.float32)
  mask = rng.random(kernel.shape) < 0.5
  csr = sj.sparse.SparseCSR.from_dense(kernel, mask)
  assert csr.topology.n_in == 30 and csr.topology.n_out == 7
  np.testing.assert_array_equal(np.asarray(csr.to_dense()), kernel * mask)
  wide = sj.sparse.SparseCSR.from_dense(np.eye(40000, 2, dtype=np.float32))
  assert wide.topology.col.dtype == np.int32 and wide.topology.csc_row.dtype == np.int16


def test_constant_fan_in_condensed_view_and_export():
  rng = np.random.default_rng(2)
  kernel = rng.standard_normal((16, 6)).astype(np.float32)
  mask = np.zeros((16, 6), bool)
  for j in range(5):  # neuron 5 ablated
    mask[rng.choice(16, 4, replace=False), j] = True
  csr = sj.sparse.SparseCSR.from_dense(kernel, mask, capacity=26, constant_fan_in=True)
  values, col, active = csr.fan_in_view()
  assert values.shape == (5, 4) and col.shape == (5, 4)
  np.testing.assert_array_equal(np.asarray(active), np.arange(5))
  condensed = csr.to_condensed()
  np.testing.assert_array_equal(np.asarray(sj.condensed.uncondense(condensed)), kernel * mask)
  back = sj.sparse.SparseCSR.from_condensed(condensed, capacity=26)
  np.testing.assert_array_equal(np.asarray(back.to_dense()), kernel * mask)


def test_bad_inputs_raise_clear_errors():
  rng = np.random.default_rng(3)
  kernel = rng.standard_normal((8, 4)).astype(np.float32)
  mask = np.zeros((8, 4), bool)
  mask[:2, 0] = mask[:3, 1] = True  # fan-ins 2 and 3
  with pytest.raises(sj.sparse.NotConstantFanInError, match="not constant fan-in"):
    sj.sparse.SparseCSR.from_dense(kernel, mask, constant_fan_in=True)
  with pytest.raises(sj.sparse.NotConstantFanInError):
    sj.sparse.SparseCSR.from_dense(kernel, mask).fan_in_view()
  with pytest.raises(ValueError, match="float32, bfloat16"):
    sj.sparse.SparseCSR.from_dense(np.ones((4, 4), np.int32))
  with pytest.raises(ValueError, match="capacity 1 is below"):
    sj.sparse.SparseCSR.from_dense(kernel, mask, capacity=1)
  with pytest.raises(ValueError, match="does not match"):
    sj.sparse.SparseCSR.from_dense(kernel, mask[:4])
  csr = sj.sparse.SparseCSR.from_dense(kernel, mask)
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match="must be float32, bfloat16"):
    sj.sparse.sparse_matmul(jnp.ones((2, 8), jnp.int32), csr.values, csr.topology)
  with pytest.raises(ValueError, match="last axis must be the fan-in 8"):
    sj.sparse.sparse_matmul(jnp.ones((2, 7)), csr.values, csr.topology)
  with pytest.raises(ValueError, match="method must be one of"):
    sj.sparse.sparse_matmul(x, csr.values, csr.topology, method="fast")
  if NATIVE:
    with pytest.raises(ValueError, match="needs float32"):
      sj.sparse.sparse_matmul(x.astype(jnp.bfloat16), csr.values, csr.topology, method="native")
  bad_topo = topo_lib.CSRTopology(
    col=csr.topology.col.at[0].set(99),
    row_ptr=csr.topology.row_ptr,
    csc_ptr=csr.topology.csc_ptr,
    csc_row=csr.topology.csc_row,
    csc_slot=csr.topology.csc_slot,
    kernel_shape=(8, 4),
  )
  with pytest.raises(ValueError, match=r"col\[0\] = 99 is out of range \[0, 8\)"):
    sj.sparse.SparseCSR(csr.values, bad_topo).validate()
  if NATIVE:
    with pytest.raises(Exception, match=r"col\[0\] = 99 is out of range"):
      jax.block_until_ready(sj.sparse.sparse_matmul(x, csr.values, bad_topo, method="native"))


# ---------------------------------------------------------------------------------------
# Kernels against float64 references.
# ---------------------------------------------------------------------------------------


SHAPES = [
  (1, 1, 1, 1.0),
  (15, 17, 3, 0.3),
  (16, 16, 16, 0.2),
  (17, 15, 17, 0.5),
  (33, 20, 129, 0.1),
]


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n_in,n_out,batch,density", SHAPES)
def test_native_kernels_match_float64_reference(isa, n_in, n_out, batch, density):
  rng = np.random.default_rng(n_in * 100 + batch)
  kernel, _, csr = _layer(rng, n_in, n_out, density, extra=3, rows=n_out > 2)
  x = rng.standard_normal((batch, n_in)).astype(np.float32)
  dy = rng.standard_normal((batch, n_out)).astype(np.float32)
  fwd = jax.jit(lambda x, v, t: sparse_native.native_forward(x, v, t, isa=isa))
  bwd = jax.jit(lambda x, dy, v, t: sparse_native.native_backward(x, dy, v, t, isa=isa))
  y = np.asarray(fwd(x, csr.values, csr.topology))
  dx, dv, db = (np.asarray(a) for a in bwd(x, dy, csr.values, csr.topology))
  np.testing.assert_allclose(db, dy.astype(np.float64).sum(0), atol=_tol(np.abs(dy).sum(0)))
  k64, x64, dy64 = kernel.astype(np.float64), x.astype(np.float64), dy.astype(np.float64)
  np.testing.assert_allclose(y, x64 @ k64, atol=_tol(np.abs(x64) @ np.abs(k64)))
  np.testing.assert_allclose(dx, dy64 @ k64.T, atol=_tol(np.abs(dy64) @ np.abs(k64.T)))
  g = x64.T @ dy64
  ref = np.asarray(topo_lib.gather_slots(jnp.asarray(g, jnp.float32), csr.topology))
  np.testing.assert_allclose(dv, ref, atol=_tol(np.abs(x64).T @ np.abs(dy64)))
  np.testing.assert_array_equal(dv[int(csr.topology.nnz) :], 0)  # padding slots


@needs_native
def test_native_results_do_not_depend_on_threads():
  rng = np.random.default_rng(5)
  _, _, csr = _layer(rng, 300, 200, 0.2)
  x = jnp.asarray(rng.standard_normal((64, 300)).astype(np.float32))
  dy = jnp.asarray(rng.standard_normal((64, 200)).astype(np.float32))

  def run(threads):
    y = sparse_native.native_forward(x, csr.values, csr.topology, threads=threads)
    return (y, *sparse_native.native_backward(x, dy, csr.values, csr.topology, threads=threads))

  for a, b in zip(jax.jit(lambda: run(1))(), jax.jit(lambda: run(0))(), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_native
def test_native_topology_ops_match_xla():
  rng = np.random.default_rng(6)
  _, mask, csr = _layer(rng, 37, 29, 0.3, extra=4)
  t = csr.topology
  v = jnp.asarray(rng.standard_normal(csr.capacity).astype(np.float32))
  ops = sj.sparse.topology_ops()
  np.testing.assert_array_equal(ops.to_dense(v, t), topo_lib.scatter_slots(v, t))
  np.testing.assert_array_equal(ops.mask(t), topo_lib.dense_mask(t))
  new_mask = mask ^ (rng.random(mask.shape) < 0.05)
  new_mask[np.argwhere(new_mask)[: max(0, int(new_mask.sum()) - csr.capacity)].T.tolist()] = False
  a, pa = ops.rebuild(jnp.asarray(new_mask), t)
  b, pb = sj.sparse.XLA_OPS.rebuild(jnp.asarray(new_mask), t)
  for name in ("col", "row_ptr", "csc_ptr", "csc_row", "csc_slot"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize("method", ["xla", pytest.param("native", marks=needs_native)])
def test_sparse_matmul_gradients(method):
  rng = np.random.default_rng(7)
  _, _, csr = _layer(rng, 24, 18, 0.3, extra=2)
  x = jnp.asarray(rng.standard_normal((5, 24)).astype(np.float32))
  b = jnp.asarray(rng.standard_normal(18).astype(np.float32))

  def f(x, v, b):
    return 0.1 * jnp.sum(sj.sparse.sparse_matmul(x, v, csr.topology, b, method=method) ** 2)

  def f_ref(x, v, b):
    return 0.1 * jnp.sum((sj.sparse.sparse_matmul_reference(x, v, csr.topology) + b) ** 2)

  args = (x, csr.values, b)
  check_grads(f, args, order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)
  g = jax.grad(f, argnums=(0, 1, 2))(*args)
  ref = jax.grad(f_ref, argnums=(0, 1, 2))(*args)
  for a, r in zip(g, ref, strict=True):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(g[1][int(csr.topology.nnz) :]))) == 0.0  # padding: no gradient
  # Only values differentiated (the first layer): the native backward skips dX.
  gv = jax.jit(jax.grad(f, argnums=1))(*args)
  np.testing.assert_allclose(gv, ref[1], rtol=1e-5, atol=1e-5)


def test_sparse_matmul_float64_check_grads_and_probe():
  rng = np.random.default_rng(8)
  with jax.enable_x64(True):
    _, _, csr = _layer(rng, 12, 9, 0.4, dtype=np.float64)
    x = jnp.asarray(rng.standard_normal((4, 12)))
    probe = jnp.zeros((12, 9))

    def f(x, v, p):
      return jnp.sum(jnp.tanh(sj.sparse.sparse_matmul(x, v, csr.topology, probe=p)) ** 2)

    check_grads(f, (x, csr.values, probe), order=1, modes=("rev",))
    dense = jax.grad(f, argnums=2)(x, csr.values, probe)
    dv = jax.grad(f, argnums=1)(x, csr.values, probe)
    np.testing.assert_allclose(topo_lib.gather_slots(dense, csr.topology), dv, rtol=1e-12)


@needs_native
def test_native_probe_gradient_is_the_dense_gradient():
  rng = np.random.default_rng(9)
  _, _, csr = _layer(rng, 20, 11, 0.3)
  x = jnp.asarray(rng.standard_normal((6, 20)).astype(np.float32))
  probe = jnp.zeros((20, 11))

  def f(v, p, method):
    y = sj.sparse.sparse_matmul(x, v, csr.topology, probe=p, method=method)
    return jnp.sum(jnp.sin(y))

  a = jax.grad(f, argnums=(0, 1))(csr.values, probe, "native")
  b = jax.grad(f, argnums=(0, 1))(csr.values, probe, "xla")
  for u, w in zip(a, b, strict=True):
    np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# DST on sparse layers == its masked-dense twin.
# ---------------------------------------------------------------------------------------


class _MLP(nnx.Module):
  def __init__(self, rngs, dtype):
    self.l1 = nnx.Linear(20, 32, rngs=rngs, param_dtype=dtype)
    self.l2 = nnx.Linear(32, 24, rngs=rngs, param_dtype=dtype)
    self.head = nnx.Linear(24, 5, rngs=rngs, param_dtype=dtype)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))


class _CNN(nnx.Module):
  def __init__(self, rngs, dtype):
    self.conv = nnx.Conv(2, 8, (3,), (2,), padding="SAME", rngs=rngs, param_dtype=dtype)
    self.head = nnx.Linear(5 * 8, 5, rngs=rngs, param_dtype=dtype)

  def __call__(self, x):
    h = jax.nn.relu(self.conv(x.reshape(x.shape[0], 10, 2)))
    return self.head(h.reshape(h.shape[0], -1))


def _method(name: str, **extra):
  kw = dict(sparsity=0.8, update_every=3, end_step=100, drop_fraction=0.3, seed=0)
  kw.update(distribution="uniform", last_layer="head")
  kw.update(extra)
  return {"rigl": sj.rigl, "set": sj.set_, "srigl": sj.srigl}[name](optax.adam(1e-2), **kw)


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _masked_step(model, optimizer, x, y):
  optimizer.update(model, nnx.grad(_loss)(model, x, y))


def _adam_mu(opt_state):
  leaves = [
    x for x in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(x, "mu")
  ]
  return (
    nnx.to_pure_dict(nnx.as_pure(leaves[0].mu)) if hasattr(leaves[0].mu, "items") else leaves[0].mu
  )


def _run_twins(model_cls, name, dtype, steps, n_in, method="auto", **extra):
  """Trains the masked twin and the truly sparse model side by side; yields per step."""
  dense = model_cls(nnx.Rngs(0), dtype)
  twin = nnx.clone(dense)
  opt_m = nnx.Optimizer(twin, _method(name, **extra), wrt=nnx.Param)
  nnx.update(twin, sj.apply_masks(nnx.state(twin, nnx.Param), opt_m.opt_state))
  tx = sj.sparse.truly_sparse(_method(name, **extra))
  model = sj.sparse.sparsify(dense, tx, method=method)
  opt_s = nnx.Optimizer(model, tx, wrt=nnx.Param)
  train_step = sj.sparse.SparseTrainStep(_loss)
  masked_step = nnx.jit(_masked_step)
  rng = np.random.default_rng(1)
  for t in range(steps):
    x = jnp.asarray(rng.standard_normal((16, n_in)), dtype)
    y = jnp.asarray(rng.integers(0, 5, 16))
    masked_step(twin, opt_m, x, y)
    train_step(model, opt_s, x, y)
    yield t, twin, opt_m, model, opt_s, tx


def _compare(twin, opt_m, model, opt_s, rtol, atol):
  masks = nnx.to_pure_dict(nnx.as_pure(sj.get_masks(opt_m.opt_state)))
  mu_m, mu_s = _adam_mu(nnx.as_pure(opt_m.opt_state)), _adam_mu(nnx.as_pure(opt_s.opt_state))
  for kpath, (kernel, mask) in sj.sparse.dense_kernels(model).items():
    keys = [int(k) if k.isdigit() else k for k in kpath.split("/")[:-1]]
    node_m, twin_layer, mu_twin, mu_sp = masks, twin, mu_m, mu_s
    for k in keys:
      node_m, twin_layer, mu_twin, mu_sp = node_m[k], getattr(twin_layer, k), mu_twin[k], mu_sp[k]
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(node_m["kernel"]), err_msg=kpath)
    np.testing.assert_allclose(kernel, twin_layer.kernel[...], rtol=rtol, atol=atol, err_msg=kpath)
    layer = dict(sj.sparse.sparse_modules(model))["/".join(str(k) for k in keys)]
    mu_dense = topo_lib.dense_kernel(jnp.asarray(mu_sp["values"]), layer.topology)
    np.testing.assert_allclose(mu_dense, mu_twin["kernel"], rtol=rtol, atol=atol, err_msg=kpath)


# The XLA path computes the same dense products as the twin, so float32 trajectories agree
# to rounding and the masks exactly; float64 (x64 mode) separates indexing from rounding.
TWIN_CASES = [
  pytest.param("rigl", jnp.float32, id="rigl-f32"),
  pytest.param("set", jnp.float32, id="set-f32"),
  pytest.param("srigl", jnp.float32, id="srigl-f32"),
  pytest.param("rigl", jnp.float64, id="rigl-f64"),
  pytest.param("srigl", jnp.float64, id="srigl-f64", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,dtype", TWIN_CASES)
def test_truly_sparse_equals_masked_twin(name, dtype):
  extra = {"gamma_sal": 0.9} if name == "srigl" else {}  # forces neuron ablation
  tol = dict(rtol=1e-10, atol=1e-12) if dtype == jnp.float64 else dict(rtol=1e-5, atol=1e-6)
  changed, active = 0, set()
  with jax.enable_x64(dtype == jnp.float64):
    prev = None
    twins = _run_twins(_MLP, name, dtype, 13, 20, method="xla", **extra)
    for _, twin, opt_m, model, opt_s, _ in twins:
      _compare(twin, opt_m, model, opt_s, **tol)
      masks = {k: np.asarray(m) for k, (_, m) in sj.sparse.dense_kernels(model).items()}
      if prev is not None:
        changed += sum(int(np.sum(masks[k] != prev[k])) for k in masks)
      active.add(tuple(int(np.any(m, axis=0).sum()) for m in masks.values()))
      prev = masks
    assert sj.sparse.step_count(opt_s.opt_state) == 13
    state = jax.tree.leaves(
      nnx.as_pure(opt_s.opt_state), is_leaf=lambda s: hasattr(s, "skipped_updates")
    )
    assert int([s for s in state if hasattr(s, "skipped_updates")][0].skipped_updates) == 0
  assert changed > 0  # four mask updates happened (steps 3, 6, 9, 12)
  if name == "srigl":
    assert len(active) > 1  # neurons were ablated or revived, and the twin agreed


def test_truly_sparse_conv_equals_masked_twin():
  for _, twin, opt_m, model, opt_s, _ in _run_twins(_CNN, "rigl", jnp.float32, 7, 20, "xla"):
    _compare(twin, opt_m, model, opt_s, rtol=1e-5, atol=1e-6)
  assert isinstance(model.conv, sj.sparse.SparseConv)


@needs_native
def test_truly_sparse_native_float32_follows_masked_twin():
  for _, twin, opt_m, model, opt_s, _ in _run_twins(_MLP, "rigl", jnp.float32, 7, 20):
    _compare(twin, opt_m, model, opt_s, rtol=2e-4, atol=2e-5)


def test_regular_step_on_an_update_step_is_counted_as_skipped():
  dense = _MLP(nnx.Rngs(0), jnp.float32)
  tx = sj.sparse.truly_sparse(_method("rigl"))
  model = sj.sparse.sparsify(dense, tx)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = jnp.ones((4, 20)), jnp.zeros((4,), jnp.int32)
  for _ in range(4):  # step 3 is an update step, but only regular steps run
    sj.sparse.regular_update(_loss, model, opt, x, y)
  state = [
    s
    for s in jax.tree.leaves(
      nnx.as_pure(opt.opt_state), is_leaf=lambda s: hasattr(s, "skipped_updates")
    )
    if hasattr(s, "skipped_updates")
  ]
  assert int(state[0].skipped_updates) == 1


def test_non_finite_inputs_skip_the_topology_update():
  rng = np.random.default_rng(10)
  params = {"l": {"kernel": jnp.asarray(rng.standard_normal((12, 8)), jnp.float32)}}
  tx = sj.sparse.truly_sparse(
    sj.rigl(optax.sgd(0.1), sparsity=0.5, distribution="uniform", update_every=1, end_step=10)
  )
  mask = tx.masked.init(params).masks["l"]["kernel"]
  csr = sj.sparse.SparseCSR.from_dense(params["l"]["kernel"], mask)
  sparams, topos = {"l": {"values": csr.values}}, {"l/values": csr.topology}
  state = tx.init(sparams)
  state = state._replace(count=jnp.int32(1))
  grads = {"l": {"values": jnp.ones_like(csr.values)}}
  dense = {"l/values": jnp.full((12, 8), jnp.nan)}
  out = sj.sparse.update_topology(tx, state, sparams, grads, topos, dense)
  np.testing.assert_array_equal(out.topologies["l/values"].col, csr.topology.col)
  assert int(out.opt_state.skipped_updates) == 1
  good = sj.sparse.update_topology(
    tx, state, sparams, grads, topos, {"l/values": jnp.ones((12, 8))}
  )
  assert int(good.opt_state.skipped_updates) == 0
  assert int(good.topologies["l/values"].nnz) == int(csr.topology.nnz)  # nnz conserved
  sj.sparse.SparseCSR(good.params["l"]["values"], good.topologies["l/values"]).validate()


def test_transformation_errors():
  with pytest.raises(ValueError, match="sparsity schedule"):
    sj.sparse.truly_sparse(sj.gmp(optax.sgd(0.1), sparsity=0.9, end_step=10, update_every=2))
  with pytest.raises(TypeError, match="masked DST transformation"):
    sj.sparse.truly_sparse(optax.sgd(0.1))
  with pytest.raises(TypeError, match="SparseDST"):
    sj.sparse.sparsify(_MLP(nnx.Rngs(0), jnp.float32), _method("rigl"))
  tx = sj.sparse.rigl(optax.sgd(0.1), sparsity=0.5, update_every=2, end_step=10)
  params = {"l1": {"values": jnp.zeros((10,))}}
  topo = sj.sparse.SparseCSR.from_dense(np.eye(20, 32, dtype=np.float32)).topology
  with pytest.raises(ValueError, match="slots but the method's allocation"):
    sj.sparse.update_topology(
      tx, tx.init(params), params, params, {"l1/values": topo}, {"l1/values": jnp.zeros((20, 32))}
    )


def test_memory_of_weights_and_adam_state_at_90_percent():
  rng = np.random.default_rng(11)
  kernel = rng.standard_normal((1024, 1024)).astype(np.float32)
  csr = sj.sparse.SparseCSR.from_dense(kernel, rng.random(kernel.shape) < 0.1)
  tx = optax.adam(1e-3)
  dense = sj.sparse.training_nbytes(kernel, tx.init(jnp.asarray(kernel)))
  sparse = sj.sparse.training_nbytes(csr.values, tx.init(csr.values), csr.topology)
  assert sparse <= 0.25 * dense  # about 0.17: 12 B/slot of topology + 12 B of values and moments


# ---------------------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------------------


def test_sparse_linear_and_conv_layers_match_dense():
  rng = np.random.default_rng(12)
  layer = sj.sparse.SparseLinear(16, 8, sparsity=0.75, rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((2, 3, 16)).astype(np.float32))
  ref = x @ layer.dense_kernel() + layer.bias[...]
  np.testing.assert_allclose(layer(x), ref, rtol=1e-5, atol=1e-5)
  assert int(np.asarray(layer.mask()).sum()) == 32
  conv = nnx.Conv(3, 4, (3, 3), (2, 1), padding="SAME", kernel_dilation=(1, 2), rngs=nnx.Rngs(1))
  mask = rng.random(conv.kernel.shape) < 0.5
  sconv = sj.sparse.SparseConv.from_conv(conv, mask)
  conv.kernel[...] = conv.kernel[...] * mask
  xi = jnp.asarray(rng.standard_normal((2, 7, 6, 3)).astype(np.float32))
  np.testing.assert_allclose(sconv(xi), conv(xi), rtol=1e-4, atol=1e-5)
  grouped = nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=nnx.Rngs(2))
  with pytest.raises(NotImplementedError, match="feature_group_count"):
    sj.sparse.SparseConv.from_conv(grouped, np.ones(grouped.kernel.shape, bool))


def test_linen_sparse_dense_trains_and_updates_topology():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = jax.nn.relu(sj.sparse.SparseDenseLinen(32, sparsity=0.8, name="hidden")(x))
      return nn.Dense(5, name="head")(x)

  net = Net()
  x, y = jnp.ones((8, 12)), jnp.arange(8) % 5
  variables = net.init(jax.random.PRNGKey(0), x)
  params, topology = variables["params"], variables[sj.sparse.TOPOLOGY_COLLECTION]
  assert params["hidden"]["values"].shape == (12 * 32 - int(0.8 * 12 * 32),)
  tx = sj.sparse.truly_sparse(
    sj.rigl(
      optax.adam(1e-2),
      sparsity=0.8,
      distribution="uniform",
      exclude="head",
      update_every=2,
      end_step=50,
    )
  )
  opt_state = tx.init(params)

  def loss_fn(p, topo, x, y):
    logits = net.apply({"params": p, sj.sparse.TOPOLOGY_COLLECTION: topo}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  step = jax.jit(sj.sparse.linen_update, static_argnums=(0, 1), static_argnames="topology_step")
  before = np.asarray(topology["hidden"]["col"])
  for t in range(5):
    params, topology, opt_state, loss = step(
      loss_fn, tx, params, topology, opt_state, x, y, topology_step=bool(tx.is_update_step(t))
    )
    assert np.isfinite(float(loss))
  topo = sj.sparse.linen_topologies(topology)["hidden/values"]
  sj.sparse.SparseCSR(params["hidden"]["values"], topo).validate()
  assert not np.array_equal(before, np.asarray(topology["hidden"]["col"]))  # it moved


# ---------------------------------------------------------------------------------------
# Benchmark smoke test.
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_smoke_prints_table_and_headline():
  script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "sparse_training.py"
  out = subprocess.run(
    [sys.executable, str(script), "--smoke"],
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  lines = out.stdout.strip().splitlines()
  assert any(line.startswith("jax ") for line in lines)
  assert re.fullmatch(
    r"headline: 256 MLP B=32 90% sparse/dense \d+\.\d\dx; 99% sparse/masked \d+\.\d\dx", lines[-1]
  )


# ---------------------------------------------------------------------------------------
# experiments: config.sparse_compute.
# ---------------------------------------------------------------------------------------


def _smoke_config(module: str):
  return importlib.import_module(f"experiments.configs.{module}").get_config("smoke")


def _experiment(module: str, workdir, sparse_compute: bool, steps: int):
  from experiments import train  # pylint: disable=g-import-not-at-top

  config = _smoke_config(module)
  config.num_train_steps, config.eval_every_steps = steps, steps
  config.sparse_compute = sparse_compute
  result = train.train_and_evaluate(config, str(workdir))
  records = [
    {k: v for k, v in r.items() if not k.startswith("perf/")}
    for r in sj.metrics.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")
  ]
  return result, [r for r in records if set(r) != {"step"}]


@pytest.mark.parametrize(
  "module",
  [
    "rigl",
    pytest.param("srigl", marks=pytest.mark.slow),
    pytest.param("set", marks=pytest.mark.slow),
  ],
)
def test_experiments_sparse_compute_follows_the_masked_run(module, tmp_path):
  steps = 110  # two mask updates (steps 50 and 100 of the smoke schedule)
  masked, m_records = _experiment(module, tmp_path / "masked", False, steps)
  sparse, s_records = _experiment(module, tmp_path / "sparse", True, steps)
  assert sparse["train_step_compiles"] == 1 and sparse["step"] == steps
  assert [sorted(r) for r in s_records] == [sorted(r) for r in m_records]  # the same records
  for a, b in zip(s_records, m_records, strict=True):
    for key in a:
      if key.startswith(("sparsity/", "nnz/", "dst/", "fan_in/", "active_neurons/")):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key  # the same masks at every update
  assert sparse["test_accuracy"] == pytest.approx(masked["test_accuracy"], abs=0.01)
  assert sparse["test_loss"] == pytest.approx(masked["test_loss"], rel=1e-3)


def test_experiments_sparse_compute_errors(tmp_path):
  from experiments import train  # pylint: disable=g-import-not-at-top

  config = _smoke_config("default")
  config.sparse_compute = True
  with pytest.raises(ValueError, match="needs a sparse config.dst.method"):
    train.train_and_evaluate(config, str(tmp_path / "dense"))
  config = _smoke_config("gmp")
  config.sparse_compute = True
  with pytest.raises(ValueError, match="sparsity schedule"):
    train.train_and_evaluate(config, str(tmp_path / "gmp"))
