"""Structural guarantees of the DST step (not timings): cheap non-update path, small state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj

EXPENSIVE = {"sort", "top_k", "while", "cumsum", "argsort", "scan", "approx_top_k", "scatter-add"}


def _primitives(jaxpr):
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for param in eqn.params.values():
      for p in param if isinstance(param, tuple | list) else (param,):
        inner = getattr(p, "jaxpr", None)
        if inner is not None:
          names |= _primitives(inner if hasattr(inner, "eqns") else inner.jaxpr)
  return names


def _params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {
    "a": {"kernel": jax.random.normal(k1, (32, 64)), "bias": jnp.zeros(64)},
    "b": {"kernel": jax.random.normal(k2, (64, 8)), "bias": jnp.zeros(8)},
  }


@pytest.mark.parametrize("method", ["set_", "rigl", "srigl"])
def test_non_update_branch_has_no_selection_work(method):
  kwargs = dict(last_layer="b") if method == "srigl" else {}
  tx = getattr(sj, method)(optax.adam(1e-3), sparsity=0.9, update_every=10, end_step=100, **kwargs)
  params = _params()
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)(params, state, params).jaxpr
  conds = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
  assert len(conds) == 3, "expected the keys' lax.cond, then one per sparse leaf"
  # First every leaf's (drop, grow) keys, one vectorised threefry on update steps only:
  # nothing weight-sized in or out.
  keys_cond, conds = conds[0], conds[1:]
  assert [(v.aval.shape, v.aval.dtype) for v in keys_cond.outvars] == [((2, 2, 2), jnp.uint32)]
  for branch in keys_cond.params["branches"]:
    sizes = [v.aval.size for e in branch.jaxpr.eqns for v in e.outvars if hasattr(v.aval, "size")]
    assert max(sizes) <= 8, sizes
  for cond, shape in zip(conds, [(32, 64), (64, 8)], strict=True):
    regular, mask_update = cond.params["branches"]  # index 0 = predicate False
    # The regular branch only materialises "no flips": no selection, no arithmetic.
    assert _primitives(regular.jaxpr) <= {"broadcast_in_dim"}, _primitives(regular.jaxpr)
    assert _primitives(mask_update.jaxpr) & {"while", "scan", "scatter-add"}, (
      "the update branch should hold the selection"
    )
    # Only the leaf's flips, packed 32 per uint32 word along the last axis (one device),
    # and a finite flag leave the cond: no params, no optimizer state, nothing float
    # (copies of those through a cond cost 1.5x per step on CPU), no bool per weight.
    outs = [(v.aval.shape, v.aval.dtype) for v in cond.outvars]
    packed = (shape[0], -(-shape[1] // 32))
    assert outs == [(packed, jnp.uint32), ((), jnp.bool_)], outs
  # Outside the conds only elementwise work, the schedule predicate and counters remain.
  outside = {e.primitive.name for e in jaxpr.eqns} - {"cond"}
  assert not (outside & EXPENSIVE)


def test_state_holds_only_masks_and_inner_state():
  params = _params()
  inner = optax.adam(1e-3)
  tx = sj.rigl(inner, sparsity=0.9, end_step=100)
  state = tx.init(params)
  assert isinstance(state, sj.DynamicSparseState)
  inner_bytes = sum(x.nbytes for x in jax.tree.leaves(inner.init(params)))
  assert sum(x.nbytes for x in jax.tree.leaves(state.inner_state)) == inner_bytes
  mask_leaves = jax.tree.leaves(state.masks)
  assert [m.shape for m in mask_leaves] == [(32, 64), (64, 8)]  # sparse leaves only
  assert all(m.dtype == jnp.bool_ for m in mask_leaves)
  for field in (state.count, state.key, state.skipped_updates):
    assert np.asarray(field).size <= 2
  wrapper_bytes = sum(
    x.nbytes for x in jax.tree.leaves((state.count, state.key, state.masks, state.skipped_updates))
  )
  assert wrapper_bytes == 32 * 64 + 64 * 8 + 4 + 8 + 4  # one byte per sparse weight


def test_tree_map_params_sees_masks_and_inner_state_as_param_shaped():
  params = _params()
  tx = optax.chain(optax.clip(1.0), sj.rigl(optax.adam(1e-3), sparsity=0.5, end_step=10))
  state = tx.init(params)
  marked = optax.tree_utils.tree_map_params(
    tx,
    lambda v: v if isinstance(v, optax.MaskedNode) else "param",
    state,
    transform_non_params=lambda v: "other",
    is_leaf=lambda v: isinstance(v, optax.MaskedNode),
  )
  dst_state = marked[1]
  assert dst_state.masks["a"]["kernel"] == "param"
  assert isinstance(dst_state.masks["a"]["bias"], optax.MaskedNode)
  assert dst_state.inner_state[0].mu["b"]["kernel"] == "param"
  assert dst_state.count == "other" and dst_state.key == "other"


@pytest.mark.parametrize("method", ["set_", "rigl", "srigl"])
def test_mask_update_temporaries_stay_below_one_layer(method, update_temp_bytes):
  """The update branch's temporaries (part of every step's XLA temp buffer) stay small.

  Selections run in column chunks of about 256K entries and never materialise a full
  keys/bins/cumsum copy, SET's random scores are an elementwise hash, finiteness is one
  reduction: for a 2048x1024 layer (8 MiB of f32) the whole update uses about 5 MiB. The
  chunk-free version used 4-8x the layer; on CPU a temp buffer above 32 MiB is
  page-faulted on every normal step.
  """
  assert update_temp_bytes(method) <= 0.75 * 2048 * 1024 * 4  # a float32 copy of the layer


def test_set_random_scores_are_elementwise_not_a_threefry_per_weight():
  params = {
    "layers_0": {"kernel": jnp.ones((256, 256))},
    "layers_1": {"kernel": jnp.ones((256, 8))},
  }
  tx = sj.set_(optax.sgd(0.1), sparsity=0.9, update_every=10, end_step=100)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)(params, state, params).jaxpr
  sizes = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("threefry2x32", "random_bits"):
        sizes.append(max(int(np.prod(v.aval.shape)) for v in eqn.outvars))
      for param in eqn.params.values():
        for p in param if isinstance(param, tuple | list) else (param,):
          inner = getattr(p, "jaxpr", None)
          if inner is not None:
            visit(inner if hasattr(inner, "eqns") else inner.jaxpr)

  visit(jaxpr)
  assert max(sizes, default=0) <= 4, sizes  # key words at most, never one draw per weight
  sizes.clear()  # the visitor does see a per-weight draw
  visit(jax.make_jaxpr(lambda k: jax.random.uniform(k, (256, 256)))(state.key).jaxpr)
  assert max(sizes) == 256 * 256


def test_eager_update_calls_reuse_one_compiled_program():
  traces = []

  def grow(ctx):  # the Python body runs only when the update is traced
    traces.append(ctx.path)
    return jnp.abs(ctx.grad)

  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (16, 16))}
  tx = sj.dynamic_sparse(optax.adam(1e-3), sparsity=0.5, update_every=2, end_step=100, grow=grow)
  state = tx.init(params)
  for _ in range(4):  # eager calls, normal and mask-update steps
    updates, state = tx.update({"w": jnp.ones((16, 16))}, state, params)
    params = optax.apply_updates(params, updates)
  assert traces == ["w"], traces
  assert int(state.count) == 4


@pytest.mark.parametrize(
  ("method", "fused_target"),
  [
    ("rigl", "sparsejax_drop_grow"),
    ("set_", "sparsejax_drop_grow"),
    ("srigl", "sparsejax_grouped_drop_grow"),
  ],
)
def test_one_device_cpu_update_selects_with_the_native_kernel(method, fused_target, monkeypatch):
  """On a one-device CPU process every selection of the update is a native call (one fused
  drop-and-grow per leaf, SRigL's ablating layer included; SET's leaf keys one call): the compiled step holds none of the XLA selection program
  (its radix loops and their kernels), which keeps its compile time and memory small."""
  from sparsejax._src.primitives import native_select, selection

  if not native_select.usable():
    pytest.skip(f"native selection not usable here: {native_select.unavailable_reason()}")
  kwargs = dict(last_layer="b") if method == "srigl" else {}
  params = _params()

  def compiled_text(native):
    monkeypatch.setattr(selection, "_NATIVE", native)
    tx = getattr(sj, method)(
      optax.adam(1e-3), sparsity=0.9, update_every=10, end_step=100, **kwargs
    )
    state = tx.init(params)
    return jax.jit(tx.update).lower(params, state, params).compile().as_text()

  native, xla = compiled_text(True), compiled_text(False)
  fused = native.count(f'custom_call_target="{fused_target}"')
  ablating = native.count('custom_call_target="sparsejax_ablated_drop_grow"')
  assert ablating == (1 if method == "srigl" else 0), ablating  # SRigL's ablating layer
  assert fused + ablating == 2, fused  # one for each of the two sparse leaves
  assert native.count('custom_call_target="sparsejax_select"') == 0
  assert native.count('custom_call_target="sparsejax_ablate"') == 0
  keys = native.count('custom_call_target="sparsejax_leaf_keys"')
  assert keys == (1 if method == "set_" else 0), keys  # only SET's criteria read a key
  assert 'custom_call_target="sparsejax_' not in xla
  assert native.count(" while(") < xla.count(" while("), "radix loops left in the program"
  assert native.count(" fusion(") <= 0.75 * xla.count(" fusion("), "selection kernels left"


def test_leaf_keys_are_the_per_leaf_derivation():
  """One vectorised threefry gives every leaf split(fold_in(fold_in(key, count), index))."""
  from sparsejax._src.transforms import step

  key, count, indices = jax.random.PRNGKey(7), jnp.int32(300), [1, 3, 4, 9]
  keys = step.leaf_keys(indices, jnp.bool_(True), count, key)
  for index, got in zip(indices, keys, strict=True):
    want = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, count), index))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  off = step.leaf_keys(indices, jnp.bool_(False), count, key)
  assert all(not np.asarray(k).any() for k in off)  # other steps: no derivation


def test_key_derivation_and_random_scores_compile_to_no_loop():
  """SET's random regrowth: the keys of all leaves (fold_in, fold_in, split) and the hash
  words of each leaf's scores (bits) are unrolled elementwise threefry: no while loop
  (jax.random's CPU lowering makes each call a loop of several kernels). RigL reads no
  key: nothing is derived at all."""
  params = _params()

  def loops(tx):
    state = tx.init(params)
    hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
    return [line for line in hlo.splitlines() if " while(" in line]

  kw = dict(sparsity=0.9, update_every=10, end_step=100)
  assert loops(sj.set_(optax.sgd(0.1), **kw)) == []
  assert loops(sj.rigl(optax.sgd(0.1), **kw)) == []


@pytest.mark.parametrize("shape", [(5,), (3, 33), (64, 32), (3, 3, 8, 17)])
def test_packed_flips_round_trip(shape):
  """The flips leave each conditional packed 32 per word and unpack to the same bools."""
  from sparsejax._src.transforms import step

  bits = jnp.asarray(np.random.default_rng(len(shape)).random(shape) < 0.5)
  words = step.pack_bits(bits)
  cols = shape[-1] if len(shape) >= 2 else shape[0]
  assert words.dtype == jnp.uint32 and words.shape[-1] == -(-cols // 32)
  np.testing.assert_array_equal(step.unpack_bits(words, shape), bits)
  np.testing.assert_array_equal(jax.jit(step.unpack_bits, static_argnums=1)(words, shape), bits)
