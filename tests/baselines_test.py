"""The pruning baselines: gradual magnitude pruning, GraNet, global selection, SNIP, blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj


def _params(shapes=((12, 16), (16, 8)), key=0):
  k = jax.random.PRNGKey(key)
  out = {}
  for i, shape in enumerate(shapes):
    k, sub = jax.random.split(k)
    out[f"layers_{i}"] = {"kernel": jax.random.normal(sub, shape), "bias": jnp.zeros(shape[-1])}
  return out


def _grads(params, t):
  return jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(100 + t), x.shape), params)


def _leaves(masks):
  return [(p, m) for p, m in sj.metrics.sparse_leaves(masks)]


def _run(tx, params, steps, check=None):
  state = tx.init(params)
  params = sj.apply_masks(params, state)
  update = jax.jit(tx.update)
  for t in range(steps):
    old = state
    updates, state = update(_grads(params, t), state, params)
    params = optax.apply_updates(params, updates)
    if check is not None:
      check(t, old, state, params)
  return params, state


# --- gradual magnitude pruning --------------------------------------------------------


def test_gmp_sparsity_follows_the_cubic_formula_at_every_pruning_step():
  # Hand-worked: t0 = 0, t_end = 40, ΔT = 10, s_f = 0.9, s_i = 0, power 3:
  # s_t = 0.9 - 0.9 (1 - t/40)^3 = 0, 0.5203125, 0.7875, 0.8859375, 0.9 at t = 0..40.
  expected = {0: 0.0, 10: 0.5203125, 20: 0.7875, 30: 0.8859375, 40: 0.9}
  for t, s in expected.items():
    assert sj.gradual_sparsity(t, sparsity=0.9, end_step=40) == pytest.approx(s, abs=1e-12)
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (20, 10))}  # 200 weights
  tx = sj.gmp(optax.sgd(0.01), sparsity=0.9, end_step=40, update_every=10, distribution="uniform")
  nnz = {}

  def check(t, old, new, p):
    o, n = np.asarray(old.masks["w"]), np.asarray(new.masks["w"])
    assert not np.any(n & ~o), "masks only shrink"
    assert not np.any(np.asarray(p["w"])[~n]), "pruned weights are exactly 0"
    nnz[t] = int(n.sum())

  _run(tx, params, 50, check)
  for t, s in expected.items():
    assert nnz[t] == 200 - int(np.floor(s * 200 + 1e-9)), (t, nnz[t])
  assert nnz[49] == 20 and len(set(nnz[t] for t in range(41, 50))) == 1  # then holds
  assert all(nnz[t] == nnz[t - 1] for t in range(1, 41) if t % 10)  # only at pruning steps
  assert sj.get_masks(tx.init(params))["w"].all()  # all-True before the first pruning step


def test_gmp_prunes_by_magnitude_and_zeroes_optimizer_state():
  params = _params()
  tx = sj.gmp(optax.sgd(0.01, momentum=0.9), sparsity=0.8, end_step=6, update_every=3)
  state = tx.init(params)
  params = sj.apply_masks(params, state)
  update = jax.jit(tx.update)
  pruned_at = set()
  for t in range(8):
    before = {k: np.abs(np.asarray(v["kernel"])) for k, v in params.items()}
    old = state
    updates, state = update(_grads(params, t), state, params)
    params = optax.apply_updates(params, updates)
    for path in ("layers_0", "layers_1"):
      o = np.asarray(old.masks[path]["kernel"])
      n = np.asarray(state.masks[path]["kernel"])
      trace = np.asarray(state.inner_state[0].trace[path]["kernel"])
      assert not trace[~n].any(), "the momentum of pruned weights is 0"
      assert not np.asarray(params[path]["kernel"])[~n].any()
      dropped = o & ~n
      if dropped.any():
        pruned_at.add(t)
        # By magnitude of the weights the step started from.
        assert before[path][dropped].max() <= before[path][n].min()
  assert pruned_at == {3, 6}
  for leaf in tx.plan(params).leaves:
    if leaf.sparsity is not None:
      m = np.asarray(state.masks[leaf.path.split("/")[0]]["kernel"])
      assert m.sum() == sj.Unstructured().target_nnz(leaf.shape, leaf.sparsity)


@pytest.mark.parametrize("structure", [sj.ConstantFanIn(), sj.Block(4, 2)], ids=["fan_in", "block"])
def test_gmp_with_structures_ends_exactly_at_target(structure):
  params = _params(((3, 3, 8, 16), (16, 8)))
  params = {
    "conv": {"kernel": params["layers_0"]["kernel"]},
    "out": {"kernel": params["layers_1"]["kernel"]},
  }
  tx = sj.gmp(
    optax.adam(1e-2),
    sparsity=0.75,
    end_step=5,
    update_every=2,
    distribution="uniform",
    structure=structure,
  )

  def check(t, old, new, p):
    for name in ("conv", "out"):
      m = np.asarray(new.masks[name]["kernel"])
      assert not np.any(m & ~np.asarray(old.masks[name]["kernel"]))
      flat = m.reshape(-1, m.shape[-1])
      if isinstance(structure, sj.ConstantFanIn):
        assert len(set(flat.sum(0).tolist())) == 1, "constant fan-in at every step"
      else:
        blocks = flat.reshape(flat.shape[0] // 4, 4, flat.shape[1] // 2, 2)
        assert np.all(blocks.all((1, 3)) | ~blocks.any((1, 3))), "whole blocks only"

  _, state = _run(tx, params, 7, check)
  for name, shape in (("conv", (3, 3, 8, 16)), ("out", (16, 8))):
    m = np.asarray(state.masks[name]["kernel"])
    assert m.sum() == structure.target_nnz(shape, 0.75)


def test_sparsity_schedule_bad_input():
  inner = optax.sgd(0.1)
  with pytest.raises(ValueError, match=r"`power`"):
    sj.gmp(inner, sparsity=0.9, end_step=10, power=0)
  with pytest.raises(ValueError, match=r"`initial_sparsity`=0.95 is above"):
    sj.gmp(inner, sparsity=0.9, end_step=10, initial_sparsity=0.95)
  with pytest.raises(ValueError, match=r"NM\(2, 4\) has a fixed sparsity"):
    sj.gmp(inner, sparsity=0.5, end_step=10, structure="nm:2:4")
  with pytest.raises(ValueError, match=r"`end_step` must be >"):
    sj.gmp(inner, sparsity=0.5, start_step=10, end_step=10)
  with pytest.raises(TypeError, match="gmp does not take"):
    sj.gmp(inner, sparsity=0.5, end_step=10, grow="gradient")
  with pytest.raises(ValueError, match="block shape does not divide"):
    sj.gmp(inner, sparsity=0.5, end_step=10, structure=sj.Block(5, 2)).init(_params())


# --- GraNet ---------------------------------------------------------------------------


def test_granet_nnz_follows_the_schedule_while_regrowing():
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (20, 10))}
  tx = sj.granet(
    optax.sgd(0.01),
    sparsity=0.9,
    end_step=40,
    update_every=10,
    distribution="uniform",
    drop_fraction=0.3,
    regrow_end_step=60,
  )
  grown_total = 0

  def check(t, old, new, p):
    nonlocal grown_total
    o, n = np.asarray(old.masks["w"]), np.asarray(new.masks["w"])
    s = sj.gradual_sparsity(min(t, 40), sparsity=0.9, end_step=40)
    if t % 10 == 0 and t <= 60:
      assert n.sum() == 200 - int(np.floor(s * 200 + 1e-9)), t
      grown = n & ~o
      grown_total += int(grown.sum())
      assert not np.asarray(p["w"])[grown].any(), "grown weights start at 0"
      # kept ∩ grown = ∅ and kept ⊆ old by construction; dropped scores ≤ kept scores.
    else:
      np.testing.assert_array_equal(o, n)

  _run(tx, params, 70, check)
  assert grown_total > 0, "GraNet regrows while pruning"


# --- global selection -----------------------------------------------------------------


def test_global_threshold_differs_from_erk_on_a_hand_worked_case():
  # Two layers: a (4x4) with |w| = 1..16, b (4x4) with |w| = 0.1 .. 1.6. At 50% global
  # magnitude keeps the 16 largest of all 32: every weight of `a` (all >= 1 except the
  # ties at 1.0..1.6, which rank by layer then index) and none-to-few of `b`.
  a = jnp.arange(1.0, 17.0).reshape(4, 4)
  b = jnp.arange(1.0, 17.0).reshape(4, 4) / 10.0
  params = {"a": a, "b": b}
  masks = sj.prune(params, sparsity=0.5, criterion="magnitude", distribution="global")
  # Global: one threshold. The 16 largest of {1..16} ∪ {0.1..1.6} are 1..16 of `a`,
  # except that the floor of one weight per layer keeps b's largest (1.6) instead of a's 1.
  assert int(masks["a"].sum()) == 15 and int(masks["b"].sum()) == 1
  assert bool(masks["b"][3, 3]) and not bool(masks["a"][0, 0])
  erk = sj.prune(params, sparsity=0.5, criterion="magnitude", distribution="erk")
  assert int(erk["a"].sum()) == 8 and int(erk["b"].sum()) == 8  # same shapes: same density
  with pytest.raises(ValueError, match="global' ranks single weights"):
    sj.prune(params, sparsity=0.5, distribution="global", structure="fan_in")


def test_gmp_with_global_distribution_reaches_the_global_budget():
  params = _params(((12, 16), (16, 8)))
  tx = sj.gmp(optax.sgd(0.01), sparsity=0.8, end_step=4, update_every=2, distribution="global")
  _, state = _run(tx, params, 6)
  counts = [int(m.sum()) for _, m in _leaves(sj.get_masks(state))]
  total = 12 * 16 + 16 * 8
  assert sum(counts) == total - int(np.floor(0.8 * total + 1e-9))
  assert counts[0] / (12 * 16) != pytest.approx(counts[1] / (16 * 8))  # per-layer differs


# --- SNIP and init_masks --------------------------------------------------------------


def test_snip_masks_are_the_hand_computed_top_k_of_grad_times_weight():
  w = jnp.array([[1.0, -2.0, 0.5], [3.0, 0.1, -1.0]])
  g = jnp.array([[0.1, 0.1, 4.0], [0.5, 20.0, -0.2]])
  # |g w| = [[0.1, 0.2, 2.0], [1.5, 2.0, 0.2]]; keep 3 of 6 (50%): 2.0, 2.0, 1.5.
  masks = sj.prune({"w": w}, sparsity=0.5, criterion="snip", grads={"w": g}, distribution="uniform")
  np.testing.assert_array_equal(masks["w"], [[False, False, True], [True, True, False]])
  with pytest.raises(ValueError, match="pass `grads`"):
    sj.prune({"w": w}, sparsity=0.5, criterion="snip")


@pytest.mark.parametrize("method", ["static_sparse", "rigl", "set_", "srigl", "gmp", "granet"])
def test_every_method_starts_from_given_masks(method):
  params = _params(((12, 16), (16, 8)))
  grads = _grads(params, 0)
  structure = "fan_in" if method == "srigl" else None
  masks = sj.prune(
    params,
    sparsity=0.75,
    criterion="snip",
    grads=grads,
    distribution="uniform",
    structure=structure,
  )
  kwargs = dict(sparsity=0.75, distribution="uniform", init_masks=masks)
  if method in ("rigl", "set_", "srigl"):
    kwargs.update(update_every=2, end_step=10)
  if method in ("gmp", "granet"):
    kwargs.update(end_step=10, update_every=5, initial_sparsity=0.75)
  if method == "srigl":
    kwargs.update(last_layer="layers_1")
  tx = getattr(sj, method)(optax.sgd(0.1), **kwargs)
  state = tx.init(params)
  for (_, given), (_, got) in zip(_leaves(masks), _leaves(sj.get_masks(state)), strict=True):
    np.testing.assert_array_equal(given, got)
  # Step 0 is no update for the DST methods: masks unchanged after it.
  if method != "gmp" and method != "granet":
    _, state = tx.update(grads, state, sj.apply_masks(params, state))
    for (_, given), (_, got) in zip(_leaves(masks), _leaves(sj.get_masks(state)), strict=True):
      np.testing.assert_array_equal(given, got)


def test_init_masks_are_validated():
  params = _params()
  masks = sj.prune(params, sparsity=0.5, distribution="uniform")
  bad = jax.tree.map(lambda m: m, masks)
  bad["layers_0"]["kernel"] = bad["layers_0"]["kernel"].astype(jnp.int32)
  with pytest.raises(TypeError, match="`init_masks` at 'layers_0/kernel' must be a bool"):
    sj.static_sparse(optax.sgd(0.1), sparsity=0.5, init_masks=bad).init(params)
  with pytest.raises(ValueError, match="does not satisfy structure"):
    sj.static_sparse(optax.sgd(0.1), sparsity=0.5, structure="fan_in", init_masks=masks).init(
      params
    )
  with pytest.raises(ValueError, match="`init_masks` must be 'random', 'dense'"):
    sj.static_sparse(optax.sgd(0.1), sparsity=0.5, init_masks="snip")


# --- block structure in every method --------------------------------------------------


@pytest.mark.parametrize("method", ["static_sparse", "set_", "rigl", "gmp", "granet"])
def test_block_masks_stay_whole_blocks_with_exact_nnz(method):
  params = {"a": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (16, 8))}}
  kwargs = dict(sparsity=0.75, distribution="uniform", structure="block:4x2")
  if method in ("set_", "rigl"):
    kwargs.update(update_every=1, end_step=20, drop_fraction=0.5, drop_fraction_decay="constant")
  if method in ("gmp", "granet"):
    kwargs.update(end_step=6, update_every=2)
  tx = getattr(sj, method)(optax.sgd(0.1), **kwargs)
  changed = []

  def check(t, old, new, p):
    m = np.asarray(new.masks["a"]["kernel"])
    blocks = m.reshape(4, 4, 4, 2)
    assert np.all(blocks.all((1, 3)) | ~blocks.any((1, 3))), f"partial block at step {t}"
    if method not in ("gmp", "granet") or t >= 6:
      assert m.sum() == 8 * 4  # 16 blocks at 75%: 4 blocks of 8 weights
    changed.append(not np.array_equal(m, np.asarray(old.masks["a"]["kernel"])))

  _run(tx, params, 8, check)
  assert any(changed) == (method != "static_sparse")


def test_block_layouts_not_constant_fan_in_are_refused_by_condense():
  mask = np.zeros((8, 4), bool)
  mask[:4, :2] = True  # one 4x2 block: neurons 0, 1 active with fan-in 4, others empty
  c = sj.condense(jnp.ones((8, 4)), mask)  # constant fan-in among active neurons: fine
  assert c.values.shape[1] == 4
  mask[4:8, 2:4] = True
  mask[:4, 2:4] = True  # neurons 2, 3 now have fan-in 8
  with pytest.raises(sj.condensed.NotConstantFanInError, match="not constant fan-in"):
    sj.condense(jnp.ones((8, 4)), mask)
