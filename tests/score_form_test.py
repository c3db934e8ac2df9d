"""Score forms: the native kernels read |w|, |g| and SET's hash in place, with the masks of
the materialised scores; SRigL's native ablation rule and the native leaf keys equal their
XLA programs and JAX's threefry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax._src import base
from sparsejax._src.criteria import scores as criteria
from sparsejax._src.primitives import (
  ablation,
  drop_grow,
  native_select,
  score_form,
  selection,
)
from sparsejax._src.transforms import step


@pytest.fixture
def native():
  if not native_select.usable():
    pytest.skip(f"native selection unavailable: {native_select.unavailable_reason()}")


def _fmix(x):
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x85EBCA6B)
  x = x ^ (x >> np.uint32(13))
  x = x * np.uint32(0xC2B2AE35)
  return x ^ (x >> np.uint32(16))


def _hash_reference(words, shape):
  """SET's hash in NumPy, written from its definition (flat index, two fmix rounds)."""
  w0, w1 = (np.uint32(w) for w in np.asarray(words, np.uint32))
  index = np.arange(int(np.prod(shape)), dtype=np.uint32)
  with np.errstate(over="ignore"):
    x = _fmix(_fmix(index * np.uint32(0x9E3779B9) ^ w0) ^ w1)
  return ((x >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)).reshape(shape)


def _awkward(rng, shape):
  """float32 with ties, signed zeros and infinities (every key-mapping edge but NaN)."""
  x = rng.integers(-3, 4, shape).astype(np.float32)
  x[rng.random(shape) < 0.05] = -0.0
  x[rng.random(shape) < 0.01] = np.inf
  x[rng.random(shape) < 0.01] = -np.inf
  return jnp.asarray(x)


def _ctx(param, grad, key):
  return base.ScoreContext(
    param=param,
    grad=grad,
    mask=jnp.ones(param.shape, bool),
    key=key,
    step=jnp.int32(0),
    path="w",
    inner_moments=(),
    sparsity=0.9,
    layer=None,
  )


def test_builtin_criteria_forms_materialise_to_the_criteria():
  rng = np.random.default_rng(0)
  param, grad = _awkward(rng, (6, 5)), _awkward(rng, (6, 5))
  for key in (jax.random.PRNGKey(3), jax.random.key(3)):  # raw (keyed hash) and typed
    ctx = _ctx(param, grad, key)
    for fn, mode in (
      (criteria.magnitude, score_form.MAGNITUDE),
      (criteria.gradient_magnitude, score_form.MAGNITUDE),
      (criteria.random_scores, None),
      (criteria.snip, score_form.VALUES),
    ):
      form = criteria.scores_of(fn, ctx)
      if mode is not None:
        assert form.mode == mode, fn
      assert form.shape == param.shape
      np.testing.assert_array_equal(score_form.as_array(form), fn(ctx))
  raw = criteria.scores_of(criteria.random_scores, _ctx(param, grad, jax.random.PRNGKey(3)))
  typed = criteria.scores_of(criteria.random_scores, _ctx(param, grad, jax.random.key(3)))
  assert raw.mode == score_form.KEYED_HASH and typed.mode == score_form.HASH
  words = jax.random.bits(jax.random.PRNGKey(3), (2,), jnp.uint32)
  np.testing.assert_array_equal(score_form.as_array(raw), _hash_reference(words, (6, 5)))
  # Non-float32 magnitudes are materialised (the kernels read float32 buffers).
  half = criteria.scores_of(criteria.magnitude, _ctx(param.astype(jnp.bfloat16), grad, None))
  assert half.mode == score_form.VALUES and half.operand.dtype == jnp.bfloat16


def test_forms_reshape_like_their_arrays():
  rng = np.random.default_rng(1)
  x = _awkward(rng, (3, 4, 10))
  words = jnp.asarray([7, 9], jnp.uint32)
  for form in (score_form.magnitude(x), score_form.hashed(words, x.shape), score_form.values(x)):
    for shape in ((12, 10), (-1, 10), (120,)):
      got = score_form.as_array(score_form.reshape(form, shape))
      np.testing.assert_array_equal(got, score_form.as_array(form).reshape(shape))
  assert score_form.isfinite(score_form.hashed(words, (2, 2))) is None
  np.testing.assert_array_equal(score_form.isfinite(score_form.magnitude(x)), jnp.isfinite(x))


def _forms(rng, shape):
  """(drop, grow) form pairs covering every mode."""
  w, g = _awkward(rng, shape), _awkward(rng, shape)
  k1, k2 = jax.random.split(jax.random.PRNGKey(int(rng.integers(1 << 30))))
  words = jnp.asarray(rng.integers(0, 2**32, 2, dtype=np.uint64).astype(np.uint32))
  return [
    (score_form.magnitude(w), score_form.magnitude(g)),  # RigL
    (score_form.magnitude(w), score_form.keyed_hash(k2, shape)),  # SET
    (score_form.keyed_hash(k1, shape), score_form.hashed(words, shape)),
    (score_form.values(w), score_form.magnitude(g)),
  ]


@pytest.mark.parametrize("shape", [(50, 40), (300, 257), (3, 3, 8, 16)])
def test_native_drop_and_grow_reads_forms_as_their_arrays(shape, native):
  """Forms through the native kernel, their arrays through it, and the XLA program: one
  result (ties, signed zeros and infinities included; 300x257 runs multithreaded)."""
  rng = np.random.default_rng(sum(shape))
  mask = jnp.asarray(rng.random(shape) < 0.3)
  nnz = int(mask.sum())
  for drop, grow in _forms(rng, shape):
    arrays = (score_form.as_array(drop), score_form.as_array(grow))
    for n_drop, n_grow in ((nnz // 3, None), (nnz, 5), (0, None), (10**6, -1)):
      got = jax.jit(
        lambda d=drop, g=grow, n=n_drop, m=n_grow: native_select.drop_and_grow(
          mask, d, g, jnp.int32(n), None if m is None else jnp.int32(m)
        )
      )()
      given = jax.jit(
        lambda n=n_drop, m=n_grow: native_select.drop_and_grow(
          mask, *arrays, jnp.int32(n), None if m is None else jnp.int32(m)
        )
      )()
      want = drop_grow._drop_and_grow_xla(mask, drop, grow, n_drop, n_grow)
      for a, b, c in zip(got, given, want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"modes {drop.mode}/{grow.mode}")
        np.testing.assert_array_equal(a, c, err_msg=f"modes {drop.mode}/{grow.mode}")


@pytest.mark.parametrize("shape", [(40, 9), (300, 257)])
def test_native_grouped_drop_and_grow_reads_forms_as_their_arrays(shape, native):
  rng = np.random.default_rng(shape[1])
  mask = jnp.asarray(rng.random(shape) < 0.3)
  eligible = jnp.asarray(rng.random((1, shape[1])) < 0.8)
  per_group = jnp.asarray(rng.integers(0, shape[0], (1, shape[1])), jnp.int32)
  for drop, grow in _forms(rng, shape):
    for cap, elig in ((False, None), (True, eligible)):
      kw = dict(axis=0, cap=cap, eligible=elig)
      args = (mask, drop, grow, int(mask.sum()) // 3, per_group)
      got = jax.jit(lambda a=args, kw=kw: drop_grow.grouped_drop_and_grow(*a, **kw))()
      want = drop_grow._grouped_drop_and_grow_xla(*args, 0, cap, elig)
      for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"modes {drop.mode}/{grow.mode} cap={cap}")


def test_whole_array_topk_of_a_form_is_the_topk_of_its_array(native):
  rng = np.random.default_rng(5)
  x = _awkward(rng, (64, 33))
  for form in _forms(rng, (64, 33))[1]:
    for k in (0, 17, 1000, 10**5):
      got = jax.jit(lambda f=form, k=k: selection.topk_mask(f, k))()
      np.testing.assert_array_equal(got, selection.topk_mask(score_form.as_array(form), k))
  np.testing.assert_array_equal(  # a 1-D form is materialised (no native 2-D view)
    selection.topk_mask(score_form.magnitude(x[0]), 5), selection.topk_mask(jnp.abs(x[0]), 5)
  )


@pytest.mark.parametrize("shape", [(12, 8), (300, 257)])
def test_native_ablation_rule_equals_the_xla_program(shape, native, monkeypatch):
  rng = np.random.default_rng(shape[0])
  w = _awkward(rng, shape) * (rng.random(shape) < 0.2)
  g = _awkward(rng, shape)
  n = shape[0] * shape[1]
  cases = [(n // 10, n // 50, 0.9, 0.3), (0, 0, 0.5, 1.0), (n, n, 0.9, 0.0), (n // 3, 7, 0.99, 1.0)]
  for n_keep, n_drop, sparsity, gamma in cases:
    for relative_to in ("sparse", "dense"):

      def rule(n_keep=n_keep, n_drop=n_drop, sparsity=sparsity, gamma=gamma, rel=relative_to):
        return jax.jit(
          lambda: ablation.neurons_to_ablate(
            w, g, jnp.int32(n_keep), jnp.int32(n_drop), sparsity, gamma, rel
          )
        )

      got = rule()()
      assert "sparsejax_ablate" in rule().lower().as_text()
      monkeypatch.setattr(selection, "_NATIVE", False)
      want = rule()()
      monkeypatch.setattr(selection, "_NATIVE", True)
      np.testing.assert_array_equal(got, want, err_msg=f"{n_keep} {n_drop} {gamma}")


@pytest.mark.parametrize("shape", [(12, 8), (300, 257)])
def test_native_ablating_update_equals_the_xla_program(shape, native, monkeypatch):
  """SRigL's update of an ablating layer as one native call: the XLA composition's (new,
  kept) for every rule setting, drop counts at the edges and every score form."""
  rng = np.random.default_rng(shape[1])
  mask = jnp.asarray(rng.random(shape) < 0.2)
  w, g = _awkward(rng, shape) * mask, _awkward(rng, shape)
  nnz = int(mask.sum())
  key = jax.random.PRNGKey(shape[0])
  forms = [
    (score_form.magnitude(w), score_form.magnitude(g)),
    (score_form.values(w), score_form.keyed_hash(key, shape)),
  ]
  cases = [(nnz // 3, 0.9, 0.3, "sparse"), (0, 0.8, 1.0, "dense"), (nnz, 0.95, 0.9, "sparse")]
  for drop, grow in forms:
    for n_drop, sparsity, gamma, relative_to in cases:

      def update(d=drop, gr=grow, n=n_drop, s=sparsity, gm=gamma, rel=relative_to):
        return jax.jit(
          lambda: ablation.ablated_drop_and_grow(mask, d, gr, jnp.int32(n), w, g, s, gm, rel)
        )

      got = update()()
      assert "sparsejax_ablated_drop_grow" in update().lower().as_text()
      monkeypatch.setattr(selection, "_NATIVE", False)
      want = update()()
      monkeypatch.setattr(selection, "_NATIVE", True)
      for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"{n_drop} {gamma} {relative_to}")


def test_native_leaf_keys_are_jax_threefry(native):
  key = jax.random.PRNGKey(11)
  indices = [0, 3, 7, 2**31 + 1]
  for count in (0, 5, 2**31 - 1, -3):
    got = jax.jit(lambda c: step._derive_keys(indices, c, key))(jnp.int32(count))
    want = jnp.stack(
      [
        jax.random.split(jax.random.fold_in(jax.random.fold_in(key, jnp.int32(count)), i))
        for i in indices
      ]
    )
    np.testing.assert_array_equal(got, want, err_msg=f"count={count}")
    assert (
      "sparsejax_leaf_keys"
      in jax.jit(lambda c: step._derive_keys(indices, c, key)).lower(jnp.int32(count)).as_text()
    )


@pytest.mark.parametrize("method", ["set_", "rigl", "srigl"])
def test_native_mask_update_holds_no_score_copies(method, native, update_temp_bytes):
  """On the native path the update branch reads |w|, |g| and SET's hash in place: its
  temporaries stay a small fraction of one layer (a float32 score copy is a whole layer,
  and each was part of every step's XLA temp buffer)."""
  assert update_temp_bytes(method) <= 2048 * 1024 * 4 / 16  # a 16th of a float32 layer copy
