"""Structured sparsity (N:M, constant fan-in) in every DST method, and SRigL's ablation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj


def _params(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {
    "conv": {"kernel": jax.random.normal(k[0], (3, 3, 8, 8)), "bias": jnp.zeros(8)},
    "dense": {"kernel": jax.random.normal(k[1], (72, 16)), "bias": jnp.zeros(16)},
    "out": {"kernel": jax.random.normal(k[2], (16, 4)), "bias": jnp.zeros(4)},
  }


def _grads(params, seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(params)))
  leaves = [jax.random.normal(k, p.shape) for k, p in zip(keys, jax.tree.leaves(params))]
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


def _run_updates(tx, n_updates, params=None, check=None):
  """Drives ``tx.update`` with random gradients; every call is a mask-update step."""
  params = _params() if params is None else params
  state = tx.init(params)
  params = sj.apply_masks(params, state)
  update = jax.jit(tx.update)
  for t in range(1, n_updates + 1):
    state = state._replace(count=jnp.int32(t))
    grads = _grads(params, t)
    updates, new_state = update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    if check is not None:
      check(state, new_state, params, new_params, grads)
    params, state = new_params, new_state
  return params, state


def _nm_counts(mask, m):
  flat = np.asarray(mask).reshape(-1, mask.shape[-1])
  return flat.reshape(flat.shape[0] // m, m, flat.shape[1]).sum(axis=1)


@pytest.mark.parametrize(
  "method,n,m",
  [("static_sparse", 2, 4), ("set_", 2, 4), ("srigl", 2, 4), ("rigl", 2, 4), ("rigl", 1, 4)]
  + [("rigl", 2, 8), ("set_", 1, 8)],
)
def test_nm_groups_keep_exactly_n_after_every_update(method, n, m):
  kwargs = dict(structure=sj.NM(n, m))
  if method != "static_sparse":
    kwargs.update(update_every=1, end_step=100, drop_fraction=0.5, drop_fraction_decay="constant")
  tx = getattr(sj, method)(optax.sgd(0.1, momentum=0.9), **kwargs)
  changed = []

  def check(old, new, params, new_params, grads):
    for name in ("conv", "dense", "out"):
      mask = new.masks[name]["kernel"]
      assert np.all(_nm_counts(mask, m) == n), name
      assert not np.asarray(new_params[name]["kernel"])[~np.asarray(mask)].any()
    changed.append(int(jnp.sum(old.masks["dense"]["kernel"] != new.masks["dense"]["kernel"])))

  _run_updates(tx, 3, check=check)
  assert (sum(changed) > 0) == (method != "static_sparse")


@pytest.mark.parametrize("method", ["static_sparse", "set_", "rigl"])
def test_constant_fan_in_in_every_method(method):
  schedule = dict(update_every=1, end_step=100) if method != "static_sparse" else {}
  tx = getattr(sj, method)(
    optax.adam(1e-2), sparsity=0.8, distribution="uniform", structure="fan_in", **schedule
  )

  def check(old, new, params, new_params, grads):
    for name, shape in (("conv", (3, 3, 8, 8)), ("dense", (72, 16)), ("out", (16, 4))):
      counts = np.asarray(sj.primitives.fan_in_counts(new.masks[name]["kernel"]))
      size = int(np.prod(shape))
      k = int(np.floor(size * 0.2 + 1e-9)) // shape[-1]
      assert np.all(counts == k), (name, counts, k)

  _run_updates(tx, 3, check=check)


def test_initial_constant_fan_in_masks_and_floor_in_k():
  # 64 x 128 (Flax [in, out] = [128, 64]) at S = 0.9: k = int(8192 * 0.1) // 64 = 12,
  # nnz = 768 (90.625% sparse), as in ALGORITHMS.md §4.1.
  params = {"w": jnp.ones((128, 64))}
  tx = sj.srigl(optax.sgd(0.1), sparsity=0.9, distribution="uniform", end_step=10)
  state = tx.init(params)
  counts = np.asarray(sj.primitives.fan_in_counts(state.masks["w"]))
  assert np.all(counts == 12) and counts.sum() == 768


def _srigl_layer_setup(weak, grad_scale=1e-6, weight_scale=1e-6):
  """A 2-layer net whose hidden neuron ``weak`` has tiny weights and gradients."""
  params = _params(3)
  del params["conv"]
  w = params["dense"]["kernel"].at[:, weak].multiply(weight_scale)
  params["dense"]["kernel"] = w
  return params


def test_srigl_ablates_a_planted_weak_neuron_and_revives_it():
  weak = (3, 11)
  params = {
    "dense": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (72, 16))},
    "out": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (16, 4))},
  }
  params["dense"]["kernel"] = params["dense"]["kernel"].at[:, weak].multiply(1e-6)
  tx = sj.srigl(
    optax.sgd(0.1, momentum=0.9),
    sparsity=0.8,
    distribution="uniform",
    update_every=1,
    end_step=100,
    drop_fraction=0.3,
    drop_fraction_decay="constant",
    gamma_sal=0.3,
    last_layer="out",
  )
  state = tx.init(params)
  params = sj.apply_masks(params, state)
  grads = _grads(params, 5)
  grads["dense"]["kernel"] = grads["dense"]["kernel"].at[:, weak].multiply(1e-6)
  state = state._replace(count=jnp.int32(1))
  updates, state = jax.jit(tx.update)(grads, state, params)
  params = optax.apply_updates(params, updates)
  mask = np.asarray(state.masks["dense"]["kernel"])
  counts = mask.sum(axis=0)
  budget = int(np.floor(72 * 16 * 0.2 + 1e-9))
  for neuron in weak:
    assert counts[neuron] == 0, counts
    assert not np.asarray(params["dense"]["kernel"])[:, neuron].any()
  active = counts > 0
  assert active.sum() == 14
  assert np.all(counts[active] == budget // 14)  # budget redistributed: k 14 -> 16
  assert budget // 14 > budget // 16
  min_neurons = budget // 72
  assert active.sum() >= min_neurons + 1
  # The output layer is never ablated by default.
  assert np.all(np.asarray(sj.primitives.fan_in_counts(state.masks["out"]["kernel"])) > 0)
  # Large gradients revive the weak neurons at the next update.
  grads = _grads(params, 6)
  grads["dense"]["kernel"] = grads["dense"]["kernel"].at[:, weak].multiply(100.0)
  state = state._replace(count=jnp.int32(2))
  updates, state = jax.jit(tx.update)(grads, state, params)
  counts = np.asarray(state.masks["dense"]["kernel"]).sum(axis=0)
  assert np.all(counts == budget // 16), counts


def test_srigl_invariants_over_updates_conv_and_dense():
  tx = sj.srigl(
    optax.adam(1e-2),
    sparsity=0.9,
    distribution="uniform",
    update_every=1,
    end_step=100,
    drop_fraction=0.3,
    drop_fraction_decay="constant",
    last_layer="out",
  )

  def check(old, new, params, new_params, grads):
    for name in ("conv", "dense", "out"):
      mask = np.asarray(new.masks[name]["kernel"])
      counts = mask.reshape(-1, mask.shape[-1]).sum(axis=0)
      active = counts > 0
      size = mask.size
      fan_in = size // mask.shape[-1]
      budget = int(np.floor(size * 0.1 + 1e-9))
      assert np.all(counts[active] == budget // active.sum())
      assert active.sum() >= budget // fan_in + 1
      w = np.asarray(new_params[name]["kernel"])
      assert not w[~mask].any()
      grown = mask & ~np.asarray(old.masks[name]["kernel"])
      np.testing.assert_array_equal(w[grown], 0.0)
      for moment in (new.inner_state[0].mu, new.inner_state[0].nu):
        np.testing.assert_array_equal(np.asarray(moment[name]["kernel"])[grown], 0.0)
    out_counts = np.asarray(sj.primitives.fan_in_counts(new.masks["out"]["kernel"]))
    assert np.all(out_counts > 0)

  _run_updates(tx, 4, check=check)


@pytest.mark.parametrize("gamma", [-0.1, 1.5])
def test_srigl_rejects_gamma_outside_unit_interval(gamma):
  with pytest.raises(ValueError, match="gamma_sal"):
    sj.srigl(optax.sgd(0.1), sparsity=0.9, end_step=10, gamma_sal=gamma)


def test_srigl_rejects_unstructured_and_bad_no_ablation():
  with pytest.raises(ValueError, match="structure"):
    sj.srigl(optax.sgd(0.1), sparsity=0.9, end_step=10, structure="unstructured")
  with pytest.raises(ValueError, match="no_ablation"):
    sj.srigl(optax.sgd(0.1), sparsity=0.9, end_step=10, no_ablation="(")


def test_nm_structure_validation():
  with pytest.raises(ValueError, match="n <= m|1 <= n"):
    sj.NM(4, 2)
  with pytest.raises(ValueError, match="n"):
    sj.NM(0, 4)
  with pytest.raises(TypeError, match="n"):
    sj.NM(2.5, 4)
  assert sj.get_structure("nm:2:4") == sj.NM(2, 4)
