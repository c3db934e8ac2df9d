"""Silent wrong results that must stay fixed (issue 18), each pinned by a failing-before test."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj


def _kernel(key, shape):
  return jax.random.normal(jax.random.PRNGKey(key), shape)


# --- 1. "first" and "last" layer are the model's, never alphabetical order -------------


def _mlp_params():
  # experiments.models.MLP's layout: `head` sorts before `hidden` (JAX/NNX sort keys).
  return {
    "hidden": {
      "0": {"kernel": _kernel(0, (40, 64)), "bias": jnp.zeros(64)},
      "1": {"kernel": _kernel(1, (64, 32)), "bias": jnp.zeros(32)},
    },
    "head": {"kernel": _kernel(2, (32, 10)), "bias": jnp.zeros(10)},
  }


def test_keep_last_dense_refuses_to_guess_from_names():
  w1, w2 = jnp.ones((8, 16)), jnp.ones((16, 4))
  p = {"hidden": {"kernel": w1}, "head": {"kernel": w2}}
  with pytest.raises(ValueError, match="last_layer"):
    sj.layer_sparsities(p, sparsity=0.9, distribution="uniform", keep_last_dense=True)
  plan = sj.layer_sparsities(
    p, sparsity=0.9, distribution="uniform", keep_last_dense=True, last_layer="head"
  )
  assert plan == {"head/kernel": None, "hidden/kernel": 0.9}
  with pytest.raises(ValueError, match="first_layer"):
    sj.layer_sparsities(p, sparsity=0.9, distribution="uniform", keep_first_dense=True)
  plan = sj.layer_sparsities(
    p, sparsity=0.9, distribution="uniform", keep_first_dense=True, first_layer="hidden"
  )
  assert plan == {"head/kernel": 0.9, "hidden/kernel": None}


def test_numbered_layers_use_natural_order():
  # Flax names layers Dense_0 ... Dense_10: alphabetically Dense_10 < Dense_2.
  p = {f"Dense_{i}": {"kernel": jnp.ones((8, 8))} for i in range(11)}
  plan = sj.layer_sparsities(
    p, sparsity=0.5, distribution="uniform", keep_first_dense=True, keep_last_dense=True
  )
  assert plan["Dense_0/kernel"] is None and plan["Dense_10/kernel"] is None
  assert all(plan[f"Dense_{i}/kernel"] == 0.5 for i in range(1, 10))
  # Lists are ordered by index too.
  plan = sj.layer_sparsities(
    [{"kernel": jnp.ones((8, 8))} for _ in range(12)], sparsity=0.5, keep_last_dense=True
  )
  assert plan["11/kernel"] is None and plan["2/kernel"] == 0.5


def test_first_and_last_layer_patterns_must_match_one_candidate():
  p = _mlp_params()
  with pytest.raises(ValueError, match="exactly one"):
    sj.layer_sparsities(p, sparsity=0.5, keep_last_dense=True, last_layer="kernel")
  with pytest.raises(ValueError, match="exactly one"):
    sj.layer_sparsities(p, sparsity=0.5, keep_last_dense=True, last_layer="^nope$")


def test_srigl_needs_to_know_the_output_layer_and_never_ablates_it():
  params = _mlp_params()
  kwargs = dict(
    sparsity=0.95,
    distribution="uniform",
    update_every=1,
    end_step=100,
    drop_fraction=0.3,
    gamma_sal=0.9,
  )
  with pytest.raises(ValueError, match="last_layer"):
    sj.srigl(optax.sgd(0.1), **kwargs).init(params)
  tx = sj.srigl(optax.sgd(0.1), last_layer="^head/kernel$", **kwargs)
  roles = {leaf.path: leaf.role for leaf in tx.plan(params).leaves}
  assert roles["head/kernel"] == "sparse, never ablated (output layer)"
  assert roles["hidden/0/kernel"] == "sparse"
  summary = sj.summarize(params, tx.init(params), tx=tx)
  assert summary["layers"]["head/kernel"]["role"] == roles["head/kernel"]
  state = tx.init(params)
  params = sj.apply_masks(params, state)
  ablated_hidden = 0
  for t in range(1, 8):
    grads = jax.tree.map(lambda x, t=t: _kernel(100 + t, x.shape) * 1e-3, params)
    updates, state = tx.update(grads, state._replace(count=jnp.int32(t)), params)
    params = optax.apply_updates(params, updates)
    fan_in = np.asarray(sj.primitives.fan_in_counts(state.masks["head"]["kernel"]))
    assert np.all(fan_in > 0), f"an output neuron was ablated at update {t}: {fan_in}"
    hidden = np.asarray(sj.primitives.fan_in_counts(state.masks["hidden"]["1"]["kernel"]))
    ablated_hidden = max(ablated_hidden, int(np.sum(hidden == 0)))
  assert ablated_hidden > 0, "the test should exercise ablation in the hidden layers"


# --- 3. a callable drop fraction outside [0, 1] is refused, not a dense layer ----------


def test_drop_fraction_schedule_returning_a_percentage_is_refused():
  with pytest.raises(ValueError, match="percentage"):
    sj.rigl(
      optax.sgd(0.1), sparsity=0.9, update_every=10, end_step=100, drop_fraction=lambda t: 30.0
    )
  with pytest.raises(ValueError, match="step 20"):
    sj.rigl(
      optax.sgd(0.1),
      sparsity=0.9,
      update_every=10,
      end_step=100,
      drop_fraction=lambda t: jnp.where(t >= 20, -0.1, 0.3),
    )
  tx = sj.rigl(
    optax.sgd(0.1), sparsity=0.9, update_every=10, end_step=100, drop_fraction=lambda t: 0.3
  )
  assert tx.init({"w": jnp.ones((16, 16))}).count == 0


# --- 4. NaN/inf never changes masks, for every criterion -------------------------------


@pytest.mark.parametrize("method", ["set_", "rigl", "srigl"])
@pytest.mark.parametrize("where", ["grad", "param"])
def test_non_finite_input_skips_the_mask_update(method, where):
  params = {"a": {"kernel": _kernel(0, (16, 32))}, "b": {"kernel": _kernel(1, (32, 8))}}
  tx = getattr(sj, method)(
    optax.sgd(0.1), sparsity=0.8, update_every=1, end_step=10, last_layer="^b/"
  )
  state = tx.init(params)
  params = sj.apply_masks(params, state)
  grads = jax.tree.map(lambda x: _kernel(7, x.shape), params)
  if where == "grad":
    grads["a"]["kernel"] = grads["a"]["kernel"].at[3, 3].set(jnp.nan)
  else:
    params["a"]["kernel"] = params["a"]["kernel"].at[0, 0].set(jnp.inf)
  state = state._replace(count=jnp.int32(1))
  _, new_state = tx.update(grads, state, params)
  chex.assert_trees_all_equal(new_state.masks, state.masks)
  assert int(new_state.skipped_updates) == 1
  # The same step with finite inputs does change the masks (so the test can fail).
  clean = jax.tree.map(lambda x: jnp.nan_to_num(x, posinf=0.0), (grads, params))
  _, ok_state = tx.update(clean[0], state, clean[1])
  assert int(ok_state.skipped_updates) == 0
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(ok_state.masks), jax.tree.leaves(state.masks), strict=True)
  )


# --- smaller silent results ----------------------------------------------------------


def test_readers_refuse_params_of_another_model():
  params = {"a": {"kernel": jnp.ones((8, 16))}, "b": {"kernel": jnp.ones((16, 4))}}
  state = sj.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10, update_every=1).init(params)
  other = {"a": {"kernel": jnp.ones((8, 16))}, "c": {"kernel": jnp.ones((16, 4))}}
  reshaped = {"a": {"kernel": jnp.ones((8, 16))}, "b": {"kernel": jnp.ones((16, 5))}}
  for wrong in (other, reshaped):
    with pytest.raises(ValueError, match="different model"):
      sj.get_masks(state, wrong)
    with pytest.raises(ValueError, match="different model"):
      sj.summarize(wrong, state)
    with pytest.raises(ValueError, match="different model"):
      sj.apply_masks(wrong, state)
  assert set(sj.get_masks(state, params)) == {"a", "b"}


def test_update_every_zero_is_an_error_not_every_step():
  with pytest.raises(ValueError, match="update_every"):
    sj.is_mask_update_step(3, update_every=0, end_step=10)


def test_schedule_without_any_update_step_warns():
  with pytest.warns(UserWarning, match="no mask update ever happens"):
    sj.rigl(optax.sgd(0.1), sparsity=0.5, update_every=100, end_step=50)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sj.rigl(optax.sgd(0.1), sparsity=0.5, update_every=10, end_step=50)


def test_drop_and_grow_never_grows_the_layer():
  mask = jnp.array([True, True, False, False, False, True])
  scores = jnp.arange(6.0)
  new, kept = sj.primitives.drop_and_grow(mask, scores, scores, 5)
  assert int(new.sum()) == 3 and not bool(kept.any())
  new, _ = sj.primitives.grouped_drop_and_grow(
    mask.reshape(3, 2), scores.reshape(3, 2), scores.reshape(3, 2), 9, 1, axis=1
  )
  assert int(new.sum()) == 3


def test_fractional_counts_are_refused():
  with pytest.raises(TypeError, match="integer"):
    sj.primitives.topk_mask(jnp.arange(4.0), 2.5)
  with pytest.raises(TypeError, match="integer"):
    sj.primitives.topk_mask(jnp.arange(4.0), jnp.float32(2.0))
  assert int(sj.primitives.topk_mask(jnp.arange(4.0), 2).sum()) == 2


def test_zero_size_leaf_is_dense_not_nan():
  out = sj.erk({"empty": (0, 4), "w": (8, 8), "v": (8, 2)}, 0.8)
  assert out["empty"] == 0.0 and all(np.isfinite(list(out.values())))
  plan = sj.layer_sparsities({"e": jnp.zeros((0, 4)), "w": jnp.zeros((8, 8))}, sparsity=0.5)
  assert plan == {"e": None, "w": 0.5}


def test_duplicate_paths_and_mismatched_gradients_are_explained():
  with pytest.raises(ValueError, match="same path"):
    sj.layer_sparsities({"a/b": jnp.ones((4, 4)), "a": {"b": jnp.ones((4, 4))}}, sparsity=0.5)
  with pytest.raises(ValueError, match="sortable"):
    sj.layer_sparsities({1: jnp.ones((4, 4)), "x": jnp.ones((4, 4))}, sparsity=0.5)
  params = {"a": {"kernel": jnp.ones((8, 16))}, "b": {"kernel": jnp.ones((16, 4))}}
  tx = sj.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10, update_every=1)
  state = tx.init(params)
  grads = {"a": {"kernel": jnp.ones((8, 16))}}
  with pytest.raises(ValueError, match=r"missing from the gradients: \['b/kernel'\]"):
    tx.update(grads, state, params)
