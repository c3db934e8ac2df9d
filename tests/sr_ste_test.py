"""Tests for SR-STE and progressive gradient flow (sparsejax/_src/sr_ste.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax._src.formats.nm_format import is_nm_sparse, nm_mask
from sparsejax._src.transforms.sr_ste import (
  NMSRSTEState,
  default_nm_filter,
  mdgf_schedule,
  nm_project,
  nm_sr_ste,
  nm_ste,
  sdgf_patterns,
  sdgf_schedule,
)

# One 2:4 column per group, hand-worked: group 0 = [1, -4, 3, 0.5] keeps -4 and 3;
# group 1 = [2, 0, -0.25, 8] keeps 2 and 8. Column 1 is -column 0 (same mask).
W = jnp.array(
  [
    [1.0, -1.0],
    [-4.0, 4.0],
    [3.0, -3.0],
    [0.5, -0.5],
    [2.0, -2.0],
    [0.0, 0.0],
    [-0.25, 0.25],
    [8.0, -8.0],
  ]
)
MASK = np.array([0, 1, 1, 0, 1, 0, 0, 1], bool)[:, None].repeat(2, axis=1)
PROJECTED = np.where(MASK, np.asarray(W), 0.0)


def test_hand_worked_mask():
  np.testing.assert_array_equal(np.asarray(nm_mask(W, 2, 4)), MASK)


def test_sr_ste_gradient_is_g_plus_lambda_one_minus_mask_w_exactly():
  params = {"dense": {"kernel": W, "bias": jnp.array([1.0, 2.0])}}
  grads = {"dense": {"kernel": jnp.full((8, 2), 0.5), "bias": jnp.array([0.25, -0.25])}}
  tx = nm_sr_ste(optax.identity(), 2, 4, lambda_w=0.5)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  # g + 0.5 * (1 - M) * W, pruned rows are 0, 3, 5, 6 with W = 1, 0.5, 0, -0.25.
  expected_col0 = np.array([0.5 + 0.5, 0.5, 0.5, 0.5 + 0.25, 0.5, 0.5 + 0.0, 0.5 - 0.125, 0.5])
  expected = np.stack([expected_col0, 1.0 - expected_col0], axis=1)
  np.testing.assert_array_equal(np.asarray(updates["dense"]["kernel"]), expected)
  # 1-D bias is not N:M: gradient unchanged.
  np.testing.assert_array_equal(np.asarray(updates["dense"]["bias"]), [0.25, -0.25])
  assert isinstance(state, NMSRSTEState) and int(state.count) == 1


def test_sr_ste_feeds_the_inner_optimizer():
  params = {"k": W}
  grads = {"k": jnp.ones((8, 2))}
  tx = nm_sr_ste(optax.sgd(0.1), 2, 4, lambda_w=2e-4)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  expected = -0.1 * (1.0 + 2e-4 * np.where(MASK, 0.0, np.asarray(W)))
  np.testing.assert_allclose(np.asarray(updates["k"]), expected, rtol=1e-6)


def test_sr_ste_jit_equals_eager_and_lambda_zero_is_plain_ste():
  params = {"k": jax.random.normal(jax.random.key(0), (16, 4))}
  grads = {"k": jax.random.normal(jax.random.key(1), (16, 4))}
  tx = nm_sr_ste(optax.adam(1e-3), 1, 4)
  state = tx.init(params)
  eager, _ = tx.update(grads, state, params)
  jitted, _ = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_array_equal(np.asarray(eager["k"]), np.asarray(jitted["k"]))
  plain = nm_sr_ste(optax.identity(), 1, 4, lambda_w=0.0)
  out, _ = plain.update(grads, plain.init(params), params)
  np.testing.assert_array_equal(np.asarray(out["k"]), np.asarray(grads["k"]))


def test_ste_forward_equals_projection_and_backward_is_identity():
  params = {"kernel": W, "bias": jnp.array([3.0, -1.0])}
  fwd = nm_ste(params, 2, 4)
  np.testing.assert_array_equal(np.asarray(fwd["kernel"]), PROJECTED)
  np.testing.assert_array_equal(np.asarray(nm_project(params, 2, 4)["kernel"]), PROJECTED)
  np.testing.assert_array_equal(np.asarray(fwd["bias"]), [3.0, -1.0])
  c = jnp.arange(16.0).reshape(8, 2)
  g = jax.grad(lambda p: jnp.sum(c * nm_ste(p, 2, 4)["kernel"]))(params)
  np.testing.assert_array_equal(np.asarray(g["kernel"]), np.asarray(c))  # also at pruned entries


def test_ste_mdgf_forward_hand_worked():
  fwd = nm_ste({"k": W}, 2, 4, beta=0.25)["k"]
  expected = np.where(MASK, np.asarray(W), 0.25 * np.asarray(W))
  np.testing.assert_array_equal(np.asarray(fwd), expected)
  dense = nm_ste({"k": W}, 2, 4, beta=1.0)["k"]
  np.testing.assert_array_equal(np.asarray(dense), np.asarray(W))


def test_ste_with_traced_n():
  fwd = jax.jit(lambda p, n: nm_ste(p, n, 4))({"k": W}, jnp.int32(3))["k"]
  # 3:4 keeps all but the smallest |w| of each group: rows 3 (0.5) and 5 (0.0) pruned.
  keep = np.array([1, 1, 1, 0, 1, 0, 1, 1], bool)[:, None]
  np.testing.assert_array_equal(np.asarray(fwd), np.where(keep, np.asarray(W), 0.0))


def test_default_filter_and_conv_kernels():
  params = {
    "conv": jax.random.normal(jax.random.key(0), (3, 3, 8, 4)),
    "odd": jnp.ones((6, 4)),  # fan-in 6 not divisible by 4: left dense
    "bias": jnp.ones((4,)),
  }
  out = nm_project(params, 2, 4)
  np.testing.assert_array_equal(np.asarray(out["odd"]), np.asarray(params["odd"]))
  np.testing.assert_array_equal(np.asarray(out["bias"]), np.asarray(params["bias"]))
  assert bool(is_nm_sparse(out["conv"], 2, 4))
  f = default_nm_filter(4)
  assert f(("a",), jnp.ones((8, 3))) and not f(("a",), jnp.ones((6, 3)))
  assert not f(("b",), jnp.ones((8,)))


def test_custom_filter_and_errors():
  params = {"keep_dense": {"kernel": W}, "sparse": {"kernel": W}}
  only_sparse = lambda path, leaf: path[0] == "sparse"
  out = nm_project(params, 2, 4, filter=only_sparse)
  np.testing.assert_array_equal(np.asarray(out["keep_dense"]["kernel"]), np.asarray(W))
  np.testing.assert_array_equal(np.asarray(out["sparse"]["kernel"]), PROJECTED)
  with pytest.raises(ValueError, match=r"filter selected leaf 'b'.*\(6, 2\).*m=4"):
    nm_project({"b": jnp.ones((6, 2))}, 2, 4, filter=lambda p, x: True)
  tx = nm_sr_ste(optax.identity(), 2, 4)
  with pytest.raises(
    ValueError, match=r"needs the current params.*tx.update\(grads, state, params\)"
  ):
    tx.update({"k": W}, tx.init({"k": W}))
  with pytest.raises(ValueError, match=r"lambda_w must be >= 0.*-1"):
    nm_sr_ste(optax.identity(), 2, 4, lambda_w=-1.0)
  with pytest.raises(ValueError, match=r"n must be <= m.*n=5, m=4"):
    nm_sr_ste(optax.identity(), 5, 4)
  with pytest.raises(ValueError, match=r"kind must be 'linear' or 'exponential'.*'cosine'"):
    mdgf_schedule("cosine", 0.1)
  with pytest.raises(
    ValueError, match=r"end_step must be >= start_step.*start_step=10, end_step=5"
  ):
    sdgf_schedule(1, 4, 10, 5)


# ---------------------------------------------------------------------------
# Progressive gradient flow schedules (hand-worked steps)
# ---------------------------------------------------------------------------


def test_mdgf_linear_and_exponential():
  lin = mdgf_schedule("linear", 0.1)
  assert [float(lin(t)) for t in (0, 5, 10, 20)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
  exp = mdgf_schedule("exponential", 0.5)
  assert float(exp(2)) == pytest.approx(math.exp(-1.0), rel=1e-6)
  assert float(exp(0)) == 1.0
  delayed = mdgf_schedule("linear", 0.25, start_step=10)
  assert [float(delayed(t)) for t in (5, 10, 12, 14)] == pytest.approx([1.0, 1.0, 0.5, 0.0])


def test_sdgf_patterns_and_schedule():
  assert sdgf_patterns(1, 16) == [15, 8, 4, 2, 1]
  assert sdgf_patterns(2, 4) == [3, 2]
  assert sdgf_patterns(2, 8) == [7, 4, 2]
  assert sdgf_patterns(1, 4) == [3, 2, 1]
  s = sdgf_schedule(1, 16, 100, 500)  # 4 frames of 100 steps
  steps = [0, 99, 100, 199, 200, 300, 399, 400, 499, 500, 10_000]
  assert [int(s(t)) for t in steps] == [16, 16, 15, 15, 8, 4, 4, 2, 2, 1, 1]
  s28 = sdgf_schedule(2, 8, 0, 10)  # 2 frames: [0, 5) 7:8, [5, 10) 4:8, then 2:8
  assert [int(s28(t)) for t in (0, 4, 5, 9, 10)] == [7, 7, 4, 4, 2]
  assert int(jax.jit(s28)(jnp.int32(6))) == 4


def test_sr_ste_state_tracks_schedules_and_structure_decay_mask():
  params = {"k": W}
  grads = {"k": jnp.zeros((8, 2))}
  tx = nm_sr_ste(
    optax.identity(),
    2,
    4,
    lambda_w=1.0,
    decay=mdgf_schedule("linear", 0.5),
    structure_decay=sdgf_schedule(2, 4, 1, 2),  # 4 (dense) at t=0, 3:4 at t=1, 2:4 from t=2
  )
  state = tx.init(params)
  assert (int(state.count), float(state.beta), int(state.n_active)) == (0, 1.0, 4)
  update = jax.jit(tx.update)
  u0, state = update(grads, state, params)
  np.testing.assert_array_equal(np.asarray(u0["k"]), 0.0)  # dense phase: no pruned weights
  assert (int(state.count), float(state.beta), int(state.n_active)) == (1, 0.5, 3)
  u1, state = update(grads, state, params)  # 3:4: rows 3 (0.5) and 5 (0.0) are pruned
  keep3 = np.array([1, 1, 1, 0, 1, 0, 1, 1], bool)[:, None]
  np.testing.assert_array_equal(np.asarray(u1["k"]), np.where(keep3, 0.0, np.asarray(W)))
  assert (int(state.count), float(state.beta), int(state.n_active)) == (2, 0.0, 2)
  u2, state = update(grads, state, params)
  np.testing.assert_array_equal(np.asarray(u2["k"]), np.where(MASK, 0.0, np.asarray(W)))


def test_sr_ste_trains_a_digits_classifier():
  datasets = pytest.importorskip("sklearn.datasets")
  data = datasets.load_digits()
  x = jnp.asarray(data.data / 16.0, jnp.float32)
  y = jnp.asarray(data.target)
  params = {"kernel": jax.random.normal(jax.random.key(0), (64, 10)) * 0.1, "bias": jnp.zeros(10)}
  tx = nm_sr_ste(optax.adam(0.05), 2, 4)

  def loss_fn(p):
    q = nm_ste(p, 2, 4)
    logits = x @ q["kernel"] + q["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, state):
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  for _ in range(150):
    params, state, loss = step(params, state)
  final = nm_project(params, 2, 4)
  acc = float(jnp.mean(jnp.argmax(x @ final["kernel"] + final["bias"], -1) == y))
  assert acc > 0.9, acc
  assert bool(is_nm_sparse(final["kernel"], 2, 4))
