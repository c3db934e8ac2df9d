"""Small contracts of the mask-update core that mutation testing found untested.

Each test names what it pins; see tests/README.md ("Mutation testing") for the survivors
they kill.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj

# --- drop-fraction schedules ------------------------------------------------------------


def _rigl(drop_fraction, **kw):
  kw = dict(sparsity=0.5, update_every=2, end_step=9, drop_fraction=drop_fraction, **kw)
  return sj.rigl(optax.sgd(0.1), **kw)


def test_a_failing_drop_fraction_schedule_is_reported_with_its_error():
  def schedule(t):
    raise ZeroDivisionError("boom")

  with pytest.raises(ValueError, match=r"failed when evaluated at the update steps: .*boom"):
    _rigl(schedule)


def test_a_vector_valued_drop_fraction_schedule_is_refused_with_its_shape():
  with pytest.raises(ValueError, match=r"a scalar per step, got shape \(3,\)"):
    _rigl(lambda t: jnp.full((3,), 0.1))


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_drop_fraction_schedule_bounds_are_inclusive(value):
  _rigl(lambda t: jnp.full((), value))  # no error
  with pytest.raises(ValueError, match="a fraction, not a percentage"):
    _rigl(lambda t: jnp.full((), value + (0.5 if value else -0.5)))


# --- distributions ------------------------------------------------------------------------


def test_an_unreachable_erk_target_names_the_distribution():
  # A negative ERK exponent gives the huge layer the largest raw density; at 0.9999 the
  # small layer would have to keep less than nothing.
  shapes = {"l0": (280, 256, 65, 258), "l1": (1, 2)}
  with pytest.raises(ValueError, match="distribution='erk' cannot reach sparsity=0.9999"):
    sj.erk(shapes, 0.9999, power_scale=-2.0)


@pytest.mark.parametrize("name", ["erk", "erdos_renyi"])
def test_a_sparsity_that_prunes_nothing_gives_dense_layers(name):
  # Bug fixed with this test: floor(18 * 0.05) = 0 weights to prune, so the answer is
  # "dense", but float rounding pushed the single layer's density to 1 + 1 ulp and the
  # distribution raised "cannot reach sparsity=0.05 ... Lower `sparsity`".
  assert getattr(sj, name)({"w": (2, 9)}, 0.05) == {"w": 0.0}
  assert getattr(sj, name)({"b": (2,), "w": (1, 1, 2, 9)}, 0.045) == {"b": 0.0, "w": 0.0}


def test_erdos_renyi_gives_a_1d_leaf_the_raw_density_one():
  # ER's raw density of a 1-D leaf is 1 (n_in + n_out has no meaning there); with a 2-D
  # (4, 4) leaf (raw 8/16 = 0.5) the densities are in the ratio 2:1.
  out = sj.erdos_renyi({"bias": (8,), "kernel": (4, 4)}, 0.5)
  assert (1 - out["bias"]) == pytest.approx(2 * (1 - out["kernel"]))


# --- the context a drop criterion sees inside a global ranking -------------------------


def test_global_ranking_gives_the_drop_criterion_the_full_context():
  params = {
    "layers_0": {"kernel": jnp.linspace(-1.0, 1.0, 48).reshape(8, 6)},
    "layers_1": {"kernel": jnp.linspace(-2.0, 2.0, 24).reshape(6, 4)},
  }
  seen = []

  def criterion(ctx):
    # Runs at trace time: every field must be the leaf's own.
    assert isinstance(ctx.path, str) and ctx.path.endswith("/kernel")
    assert ctx.layer is not None and ctx.layer.path == ctx.path
    assert ctx.sparsity == pytest.approx(0.75)
    assert ctx.grad.shape == ctx.param.shape and ctx.mask.dtype == jnp.bool_
    assert ctx.mask.shape == ctx.param.shape and ctx.step.dtype == jnp.int32
    assert len(ctx.inner_moments) == 2  # adam's mu and nu
    jax.random.uniform(ctx.key)  # a valid key
    seen.append(ctx.path)
    # |w| + tiny multiples of everything else: the ranking is by |w|.
    extra = jnp.sum(ctx.grad) + ctx.step + jnp.sum(ctx.mask) + jnp.sum(ctx.inner_moments[0])
    return jnp.abs(ctx.param) + 0.0 * extra

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    tx = sj.dynamic_sparse(
      optax.adam(1e-3),
      sparsity=0.75,
      initial_sparsity=0.0,
      distribution="global",
      drop=criterion,
      grow="magnitude",
      drop_fraction=0.0,
      drop_fraction_decay="constant",
      update_every=1,
      end_step=2,
      init_masks="dense",
    )
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  masks = sj.get_masks(state)
  assert sorted(set(seen)) == ["layers_0/kernel", "layers_1/kernel"]
  total = 48 + 24
  assert sum(int(m["kernel"].sum()) for m in masks.values()) == total - int(0.75 * total)
  # One global |w| ranking keeps the larger-magnitude layer's weights preferentially.
  np.testing.assert_array_less(int(masks["layers_0"]["kernel"].sum()), 48 * 0.25 + 1)


# --- grouped drop-and-grow ----------------------------------------------------------------


def test_grouped_drop_and_grow_caps_over_full_groups_by_default():
  # Column 0 holds 3 kept entries but may hold 2: the default (cap=True) cuts it to the 2
  # highest drop scores; column 1 (1 entry) grows its best non-kept entry.
  mask = jnp.array([[1, 1], [1, 0], [1, 0], [0, 0]], bool)
  drop = jnp.array([[3.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
  grow = jnp.array([[0.0, 0.0], [0.0, 5.0], [0.0, 1.0], [9.0, 2.0]])
  new, kept = sj.primitives.grouped_drop_and_grow(mask, drop, grow, 0, 2, axis=0)
  np.testing.assert_array_equal(kept, [[1, 1], [0, 0], [1, 0], [0, 0]])
  np.testing.assert_array_equal(new, [[1, 1], [0, 1], [1, 0], [0, 0]])


def test_grouped_drop_and_grow_rejects_a_fractional_n_drop():
  mask = jnp.ones((4, 2), bool)
  with pytest.raises(TypeError, match="`n_drop` must be an integer count"):
    sj.primitives.grouped_drop_and_grow(mask, mask * 1.0, mask * 1.0, 2.5, 2, axis=0)


# --- argument checks whose names only reach the error message ---------------------------


@pytest.mark.parametrize(
  "keyword",
  [
    "update_every",
    "start_step",
    "end_step",
    "drop_fraction",
    "drop_fraction_decay",
    "drop",
    "grow",
    "grow_init",
  ],
)
def test_static_sparse_refuses_every_keyword_of_a_changing_mask(keyword):
  with pytest.raises(TypeError, match=rf"static_sparse does not take \['{keyword}'\]"):
    sj.static_sparse(optax.sgd(0.1), sparsity=0.5, **{keyword: 1})


def test_block_and_criterion_arguments_are_named_in_their_errors():
  with pytest.raises(ValueError, match="`h` must be >= 1"):
    sj.Block(0, 2)
  with pytest.raises(ValueError, match="`w` must be >= 1"):
    sj.Block(2, 0)
  with pytest.raises(TypeError, match="`fn` must be callable"):
    sj.register_criterion("not_a_function", 3)


def test_gmp_refuses_update_every_zero():
  with pytest.raises(ValueError, match="`update_every` must be >= 1"):
    sj.gmp(optax.sgd(0.1), sparsity=0.5, end_step=100, update_every=0)


# --- GraNet's defaults and pass-through keywords ------------------------------------------


def _granet_nnz_after_update(count, **kwargs):
  params = {"layers_0": {"kernel": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)}}
  tx = sj.granet(optax.sgd(0.0), sparsity=0.5, end_step=1000, distribution="uniform", **kwargs)
  state = tx.init(params)._replace(count=jnp.int32(count))
  _, state = tx.update(params, state, params)  # grads = params: any finite values
  return int(sj.get_masks(state)["layers_0"]["kernel"].sum())


@pytest.mark.parametrize(
  "count,power,want_sparsity",
  [(100, 3.0, sj.gradual_sparsity(100, sparsity=0.5, end_step=1000)), (101, 3.0, 0.0)]
  + [(500, 1.0, 0.25)],
)
def test_granet_prunes_every_100_steps_along_its_power_schedule(count, power, want_sparsity):
  # Dense start; the default update_every is 100, so step 100 prunes and step 101 does not.
  nnz = _granet_nnz_after_update(count, power=power)
  assert nnz == 64 - int(np.floor(64 * want_sparsity + 1e-9))


def test_granet_grows_with_the_given_criterion():
  called = []

  def grow(ctx):
    called.append(ctx.path)
    return jnp.abs(ctx.grad)

  _granet_nnz_after_update(100, grow=grow)
  assert called == ["layers_0/kernel"]


# --- round two (mutation sample of 7bbf17b, tests/README.md) ------------------------------


def test_exclude_keeps_the_matching_layers_dense():
  params = {
    "a": {"kernel": jnp.ones((16, 8))},
    "b": {"kernel": jnp.ones((8, 8))},
    "c": {"kernel": jnp.ones((8, 4))},
  }
  tx = sj.static_sparse(optax.sgd(0.1), sparsity=0.5, distribution="uniform", exclude="^b/")
  masks = sj.get_masks(tx.init(params))
  assert masks["b"]["kernel"] is None
  assert int(masks["a"]["kernel"].sum()) == 64 and int(masks["c"]["kernel"].sum()) == 16


def test_hashed_uniform_scores_are_uniform_on_0_1_and_keyed_by_flat_index():
  from sparsejax._src.criteria.scores import hashed_uniform

  key = jax.random.PRNGKey(3)
  flat = np.asarray(hashed_uniform(key, (4096,)))
  assert flat.dtype == np.float32 and flat.min() >= 0.0 and flat.max() < 1.0
  assert flat.min() < 0.01 and flat.max() > 0.99 and abs(flat.mean() - 0.5) < 0.02
  # Entry i of any shape hashes its flat (row-major) index i: a 4-D kernel's scores are
  # the flat draw reshaped, so no two entries share a hash input.
  np.testing.assert_array_equal(
    np.asarray(hashed_uniform(key, (4, 4, 16, 16))), flat.reshape(4, 4, 16, 16)
  )
  np.testing.assert_array_equal(np.asarray(hashed_uniform(key, (64, 64))), flat.reshape(64, 64))


def test_no_neuron_is_ablated_in_a_layer_that_keeps_every_weight():
  w = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
  ablated = sj.primitives.neurons_to_ablate(w, w, 24, 0, 0.0, 0.9)
  assert ablated.shape == (4,) and not bool(ablated.any())


def test_drop_and_grow_names_n_grow_when_it_is_not_an_integer():
  mask = jnp.array([True, True, False, False])
  s = jnp.arange(4.0)
  with pytest.raises(TypeError, match=r"`n_grow`"):
    sj.primitives.drop_and_grow(mask, s, s, 1, n_grow=1.5)


def test_nm_names_m_when_it_is_invalid():
  with pytest.raises(ValueError, match=r"^`m` must be >= 1"):
    sj.NM(1, 0)
  with pytest.raises(TypeError, match=r"^`m` must be an int"):
    sj.NM(1, 2.0)


def test_a_schedule_target_equal_to_nnz_with_no_swap_leaves_the_mask_unchanged():
  """Under a sparsity schedule, nnz == target and n_drop == 0 must change nothing."""
  mask = jnp.array([[True, False, True], [False, True, False]])
  w = jnp.array([[0.1, 0.0, 2.0], [0.0, 3.0, 0.0]])
  g = jnp.array([[1.0, 9.0, 1.0], [8.0, 1.0, 7.0]])
  ctx = sj.ScoreContext(w, g, mask, jax.random.PRNGKey(0), 0, "w", (), 0.5, target_nnz=3)
  new = sj.Unstructured().drop_and_grow(ctx, jnp.abs(w), jnp.abs(g), 0)
  np.testing.assert_array_equal(np.asarray(new), np.asarray(mask))
