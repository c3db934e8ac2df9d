"""The catalogue of bad inputs across the public API: each raises a clear error.

Every case names the argument in the message (and usually the value and what is allowed),
and its pattern is specific enough to fail on a wrong message. Every new validation adds a
case here; this table is the single place to see them.
"""

import os
import tempfile

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj

PARAMS = {
  "a": {"kernel": jnp.ones((8, 16)), "bias": jnp.zeros(16)},
  "b": {"kernel": jnp.ones((16, 4)), "bias": jnp.zeros(4)},
}


def _dst(**kw):
  kw.setdefault("end_step", 100)
  return lambda: sj.dynamic_sparse(optax.sgd(0.1), **kw).init(PARAMS)


def _update_with(params):
  tx = sj.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10)
  state = tx.init(PARAMS)
  return lambda: tx.update(params, state, params)


def _update_with_grads(grads):
  tx = sj.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10)
  state = tx.init(PARAMS)
  return lambda: tx.update(grads, state, PARAMS)


def _a_file() -> str:
  handle, path = tempfile.mkstemp(prefix="sparsejax_not_a_dir_")
  os.close(handle)
  return path


def _constant_fan_in_mask():
  mask = np.zeros((8, 4), bool)
  mask[:2] = True
  mask[5, 1] = True  # neuron 1 has fan-in 3, the others 2
  return mask


CASES = {
  # sparsities and fractions
  "sparsity_one": (_dst(sparsity=1.0), ValueError, r"`sparsity` must be in \[0, 1\) .* got 1.0"),
  "sparsity_negative": (
    _dst(sparsity=-0.5),
    ValueError,
    r"`sparsity` must be in \[0, 1\) .* got -0.5",
  ),
  "sparsity_nan": (
    _dst(sparsity=float("nan")),
    ValueError,
    r"`sparsity` must be in \[0, 1\) .* got nan",
  ),
  "sparsity_string": (
    _dst(sparsity="0.9"),
    TypeError,
    r"`sparsity` must be a float in \[0, 1\), got '0.9'",
  ),
  "sparsity_missing": (_dst(), ValueError, r"`sparsity` is required"),
  "drop_fraction_above_one": (
    _dst(sparsity=0.5, drop_fraction=1.2),
    ValueError,
    r"`drop_fraction` must be in \[0, 1\], got 1.2",
  ),
  "drop_fraction_bool": (
    _dst(sparsity=0.5, drop_fraction=True),
    TypeError,
    r"`drop_fraction` must be a float in \[0, 1\], got True",
  ),
  "override_sparsity_out_of_range": (
    _dst(sparsity=0.5, overrides={"a/kernel": 1.0}),
    ValueError,
    r"`overrides\['a/kernel'\]` must be in \[0, 1\)",
  ),
  # schedules
  "end_before_start": (
    _dst(sparsity=0.5, start_step=50, end_step=20),
    ValueError,
    r"`end_step` must be > `start_step`=50, got 20",
  ),
  "end_step_missing": (
    lambda: sj.rigl(optax.sgd(0.1), sparsity=0.5),
    ValueError,
    r"`end_step` is required",
  ),
  "update_every_zero": (
    _dst(sparsity=0.5, update_every=0),
    ValueError,
    r"`update_every` must be >= 1, got 0",
  ),
  "update_every_float": (
    _dst(sparsity=0.5, update_every=2.5),
    TypeError,
    r"`update_every` must be an int, got 2.5",
  ),
  "start_step_negative": (
    _dst(sparsity=0.5, start_step=-1),
    ValueError,
    r"`start_step` must be >= 0, got -1",
  ),
  "unknown_decay": (
    _dst(sparsity=0.5, drop_fraction_decay="step"),
    ValueError,
    r"`drop_fraction_decay` must be 'cosine' or 'constant', got 'step'",
  ),
  # criteria
  "unknown_grow_name": (
    _dst(sparsity=0.5, grow="hebbian?"),
    ValueError,
    r"Unknown `grow` criterion 'hebbian\?'; registered",
  ),
  "unknown_drop_name": (
    _dst(sparsity=0.5, drop="smallest"),
    ValueError,
    r"Unknown `drop` criterion 'smallest'; registered: .*'magnitude'",
  ),
  "criterion_two_args": (
    _dst(sparsity=0.5, grow=lambda ctx, extra: ctx.grad),
    TypeError,
    r"`grow` must accept exactly 1 positional",
  ),
  "criterion_not_callable": (_dst(sparsity=0.5, grow=3), TypeError, r"`grow` must be callable"),
  "register_existing_name": (
    lambda: sj.register_criterion("gradient", lambda ctx: ctx.grad),
    ValueError,
    r"'gradient' is already registered",
  ),
  "register_empty_name": (
    lambda: sj.register_criterion("", lambda ctx: ctx.grad),
    TypeError,
    r"`name` must be a non-empty string",
  ),
  # distributions, filters, overrides
  "unknown_distribution": (
    _dst(sparsity=0.5, distribution="gaussian"),
    ValueError,
    r"Unknown `distribution` 'gaussian'; allowed: .*'erk'",
  ),
  "distribution_bad_output": (
    _dst(sparsity=0.5, distribution=lambda shapes, s, overrides: {p: 1.5 for p in shapes}),
    ValueError,
    r"`distribution` .* cannot reach sparsity=0.5",
  ),
  "override_matches_nothing": (
    _dst(sparsity=0.5, overrides={"conv": 0.5}),
    ValueError,
    r"`overrides` pattern 'conv' matches no sparse parameter",
  ),
  "override_not_a_mapping": (
    _dst(sparsity=0.5, overrides=[("a", 0.5)]),
    TypeError,
    r"`overrides` must be a mapping",
  ),
  "invalid_exclude_regex": (
    _dst(sparsity=0.5, exclude="[a-"),
    ValueError,
    r"`exclude` must be a valid regular expression",
  ),
  "include_matches_nothing": (
    _dst(sparsity=0.5, include="^conv"),
    ValueError,
    r"No parameter leaf is eligible .* include='\^conv'",
  ),
  "keep_first_dense_not_bool": (
    _dst(sparsity=0.5, keep_first_dense="yes"),
    TypeError,
    r"`keep_first_dense` must be a bool",
  ),
  # structures
  "nm_n_greater_than_m": (lambda: sj.NM(5, 4), ValueError, r"needs 1 <= n <= m, got n=5 > m=4"),
  "nm_n_zero": (lambda: sj.NM(0, 4), ValueError, r"`n` must be >= 1, got 0"),
  "nm_string_n_gt_m": (
    _dst(sparsity=None, structure="nm:3:2"),
    ValueError,
    r"needs 1 <= n <= m, got n=3 > m=2",
  ),
  "unknown_structure": (
    _dst(sparsity=0.5, structure="block"),
    ValueError,
    r"Unknown `structure` 'block'; allowed",
  ),
  "nm_dim_not_divisible": (
    _dst(structure=sj.NM(1, 3)),
    ValueError,
    r"NM\(1, 3\): the contraction size of 'a/kernel'",
  ),
  "nm_sparsity_conflict": (
    _dst(sparsity=0.9, structure=sj.NM(2, 4)),
    ValueError,
    r"`sparsity`=0.9 conflicts with structure=NM\(2, 4\)",
  ),
  "fan_in_below_one": (
    _dst(sparsity=0.99, structure=sj.ConstantFanIn()),
    ValueError,
    r"ConstantFanIn\(\) cannot reach sparsity=.* fan-in",
  ),
  "srigl_gamma_above_one": (
    lambda: sj.srigl(optax.sgd(0.1), sparsity=0.5, end_step=10, gamma_sal=1.5),
    ValueError,
    r"`gamma_sal` must be in \[0, 1\], got 1.5",
  ),
  "srigl_unstructured": (
    lambda: sj.srigl(optax.sgd(0.1), sparsity=0.5, end_step=10, structure="unstructured"),
    ValueError,
    r"srigl needs structure=ConstantFanIn\(\)",
  ),
  # params and trees
  "empty_params": (
    lambda: sj.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10).init({}),
    ValueError,
    r"`params` is an empty pytree",
  ),
  "integer_params_only": (
    lambda: sj.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10).init(
      {"w": jnp.ones((4, 4), jnp.int32)}
    ),
    ValueError,
    r"No parameter leaf is eligible .* Floating leaves found: \[\]",
  ),
  "params_not_arrays": (
    lambda: sj.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10).init({"w": "weights"}),
    TypeError,
    r"`params` leaves must be arrays .* 'w' is a str",
  ),
  "inner_not_a_transformation": (
    lambda: sj.rigl("adam", sparsity=0.5, end_step=10),
    TypeError,
    r"`inner` must be an optax.GradientTransformation",
  ),
  "update_without_params": (
    lambda: sj.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10).update(
      PARAMS, sj.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10).init(PARAMS)
    ),
    ValueError,
    r"need `params` in update\(grads, state, params\)",
  ),
  "mismatched_params_and_masks": (
    _update_with({"a": {"kernel": jnp.ones((8, 17)), "bias": jnp.zeros(17)}, "b": PARAMS["b"]}),
    ValueError,
    r"masks do not match the params at 'a/kernel'",
  ),
  "apply_masks_other_model": (
    lambda: sj.apply_masks(
      {"x": jnp.ones(3)}, sj.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10).init(PARAMS)
    ),
    ValueError,
    r"different model: `params` has 1 leaves",
  ),
  "opt_state_without_dst": (
    lambda: sj.get_masks(optax.sgd(0.1).init(PARAMS)),
    ValueError,
    r"`opt_state` holds no sparsejax DynamicSparseState",
  ),
  # N:M format
  "nm_compress_dim_not_divisible": (
    lambda: sj.nm_compress(jnp.ones((6, 4)), 2, 4),
    ValueError,
    r"must be divisible by m; got w.shape=\(6, 4\)",
  ),
  "nm_compress_integer_values": (
    lambda: sj.nm_compress(jnp.ones((8, 4), jnp.int32), 2, 4),
    TypeError,
    r"w must have a floating dtype",
  ),
  "nm_indices_out_of_range": (
    lambda: sj.nm.make_nm_sparse(jnp.ones((4, 4)), jnp.full((4, 4), 7, jnp.int8), 2, 4, (8, 4)),
    ValueError,
    r"indices must lie in \[0, m\) = \[0, 4\)",
  ),
  "nm_indices_float_dtype": (
    lambda: sj.nm.make_nm_sparse(jnp.ones((4, 4)), jnp.zeros((4, 4)), 2, 4, (8, 4)),
    TypeError,
    r"indices must have an integer dtype",
  ),
  # condensed format
  "condense_not_constant_fan_in": (
    lambda: sj.condense(jnp.ones((8, 4)), _constant_fan_in_mask()),
    sj.condensed.NotConstantFanInError,
    r"mask is not constant fan-in",
  ),
  "condense_shape_mismatch": (
    lambda: sj.condense(jnp.ones((8, 4)), np.ones((8, 5), bool)),
    ValueError,
    r"mask shape \(8, 5\) does not match kernel shape",
  ),
  "condense_empty_mask": (
    lambda: sj.condense(jnp.ones((8, 4)), np.zeros((8, 4), bool)),
    ValueError,
    r"mask keeps no entry",
  ),
  # layer order (issue 18): never guessed from names
  "keep_last_dense_names_only": (
    lambda: sj.layer_sparsities(
      {"hidden": {"kernel": jnp.ones((8, 8))}, "head": {"kernel": jnp.ones((8, 2))}},
      sparsity=0.5,
      keep_last_dense=True,
    ),
    ValueError,
    r"`keep_last_dense=True` but the model's last layer cannot be told .* `last_layer=`",
  ),
  "srigl_output_layer_unknown": (
    lambda: sj.srigl(optax.sgd(0.1), sparsity=0.5, end_step=10).init(PARAMS),
    ValueError,
    r"protects the model's output layer .* `last_layer=`",
  ),
  "last_layer_matches_nothing": (
    _dst(sparsity=0.5, last_layer="^zzz"),
    ValueError,
    r"`last_layer`='\^zzz' must match exactly one sparse candidate",
  ),
  "first_layer_invalid_regex": (
    _dst(sparsity=0.5, first_layer="[a-"),
    ValueError,
    r"`first_layer` must be a valid regular expression",
  ),
  # schedules (issue 18)
  "drop_fraction_schedule_percentage": (
    _dst(sparsity=0.5, update_every=10, drop_fraction=lambda t: 30.0),
    ValueError,
    r"`drop_fraction` schedule returns 30.0 at update step 10; .* not a percentage",
  ),
  "is_mask_update_step_every_zero": (
    lambda: sj.is_mask_update_step(1, update_every=0, end_step=10),
    ValueError,
    r"`update_every` must be >= 1, got 0",
  ),
  "static_sparse_schedule_keywords": (
    lambda: sj.static_sparse(optax.sgd(0.1), sparsity=0.5, update_every=10),
    TypeError,
    r"static_sparse does not take \['update_every'\]",
  ),
  "erk_power_scale_with_uniform": (
    _dst(sparsity=0.5, distribution="uniform", erk_power_scale=0.5),
    ValueError,
    r"`erk_power_scale`=0.5 applies only to distribution='erk'",
  ),
  # primitives
  "topk_fractional_k": (
    lambda: sj.primitives.topk_mask(jnp.arange(4.0), 2.5),
    TypeError,
    r"`k` must be an integer count, got 2.5",
  ),
  "drop_and_grow_float_n_drop": (
    lambda: sj.primitives.drop_and_grow(jnp.ones(4, bool), jnp.ones(4), jnp.ones(4), 1.5),
    TypeError,
    r"`n_drop` must be an integer count",
  ),
  # trees (issue 18)
  "duplicate_paths": (
    lambda: sj.layer_sparsities(
      {"a/b": jnp.ones((4, 4)), "a": {"b": jnp.ones((4, 4))}}, sparsity=0.5
    ),
    ValueError,
    r"several leaves with the same path \['a/b'\]",
  ),
  "unsortable_dict_keys": (
    lambda: sj.layer_sparsities({1: jnp.ones((4, 4)), "x": jnp.ones((4, 4))}, sparsity=0.5),
    ValueError,
    r"`params` cannot be flattened .* keys must be sortable",
  ),
  "gradients_miss_a_leaf": (
    _update_with_grads({"a": PARAMS["a"]}),
    ValueError,
    r"missing from the gradients: \['b/bias', 'b/kernel'\]",
  ),
  "state_of_another_optimizer": (
    lambda: sj.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10).update(
      PARAMS, optax.sgd(0.1).init(PARAMS), PARAMS
    ),
    TypeError,
    r"`state` must be the DynamicSparseState",
  ),
  "get_masks_other_model": (
    lambda: sj.get_masks(
      sj.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10).init(PARAMS), {"x": jnp.ones(3)}
    ),
    ValueError,
    r"belong to a different model",
  ),
  "summarize_other_model": (
    lambda: sj.summarize(
      {"x": jnp.ones(3)}, sj.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10).init(PARAMS)
    ),
    ValueError,
    r"belong to a different model",
  ),
  # SR-STE and SRigL options
  "nm_sr_ste_filter_and_include": (
    lambda: sj.nm_sr_ste(optax.sgd(0.1), 2, 4, filter=lambda p, x: True, include="a"),
    ValueError,
    r"pass `include=` or the deprecated `filter=`, not both",
  ),
  "nm_sr_ste_not_nm": (
    lambda: sj.nm_sr_ste(optax.sgd(0.1), structure="fan_in"),
    ValueError,
    r"nm_sr_ste needs an N:M structure",
  ),
  "no_ablation_invalid_regex": (
    lambda: sj.ConstantFanIn(gamma_sal=0.3, no_ablation="[a-"),
    ValueError,
    r"`no_ablation` must be a valid regex",
  ),
  # formats and checkpoints (issue 18)
  "nm_matmul_raw_out_of_range_indices": (
    lambda: sj.nm_matmul(
      jnp.ones((2, 8)),
      sj.nm.NMSparse(jnp.ones((4, 4)), jnp.full((4, 4), 4, jnp.int8), 2, 4, (8, 4)),
    ),
    ValueError,
    r"indices must lie in \[0, m\) = \[0, 4\)",
  ),
  "checkpoint_directory_is_a_file": (
    lambda: sj.checkpoint.CheckpointManager(_a_file()),
    NotADirectoryError,
    r"`directory` .* is a file, not a directory",
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_clear_error(name):
  fn, error, pattern = CASES[name]
  with pytest.raises(error, match=pattern) as info:
    fn()
  assert type(info.value) is error, (
    f"{name}: {type(info.value).__name__}, expected {error.__name__}"
  )


def test_every_pattern_is_specific():
  # A pattern like "n" or "mask" matches almost any message: each one must say what was
  # wrong (the argument in backticks, a value, or the allowed range), not just a word.
  weak = [name for name, (_, _, pattern) in CASES.items() if len(pattern.replace("\\", "")) < 16]
  assert not weak, weak
