"""Child process of ``tests/sharding_test.py``: sharded-DST checks on 8 fake CPU devices.

Run by the test with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` in the child
environment only, so the rest of the suite keeps one device. Prints one JSON object per line,
``{"check": ..., "method": ..., "ok": bool, ...details}``; the parent asserts on them.

Usage: python tests/_sharding_child.py [method ...]   (default: all methods)

For each method (RigL, SET, SRigL, RigL with NM(2, 4)) on a 64-128-8 MLP and a 2×4
("data", "fsdp") mesh, with FSDP param specs (largest divisible axis, so some kernels are
sharded along ``out`` and some along ``in``) and the batch sharded over both axes:

* ``abstract_init``: ``jax.eval_shape(tx.init)`` on ShapeDtypeStruct params works and
  :func:`abstract_opt_state` gives masks and Adam moments the param sharding and every
  other leaf a replicated sharding;
* ``init``: :func:`shard_dst_init` equals single-device ``tx.init`` bit for bit, with the
  derived shardings;
* ``update_exact``: K steps of the sharded ``tx.update`` fed the same gradients as the
  single-device run: params and the whole state are equal bit for bit at every step, and
  the masks change at the scheduled updates;
* ``shardings``: the sharded update is jitted with ``in_shardings`` only, and its output
  state has the input state's shardings at every step;
* ``traces``: the update traced once over K steps that include several mask updates;
* ``data_parallel``: the full sharded step (gradient computed on the mesh, so the compiler
  all-reduces it): masks equal the single-device run at every step; params within a tight
  tolerance, with the gradient difference at step 0 (identical params) reported;
* ``explicit_mesh`` (argument ``explicit_mesh:<method>``): the same method under a
  ``jax.make_mesh`` default (Explicit axes) mesh and ``jax.set_mesh``: masks typed with their
  params' shardings, state types kept, K updates bit-exact against one device.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sparsejax as sj  # noqa: E402
from sparsejax._src.integration import sharding as shd  # noqa: E402

SIZES = (64, 128, 8)  # kernels [64, 128] (sharded along out) and [128, 8] (along in)
STEPS = 8  # mask updates at counts 2, 4, 6
BATCH = 32
PARAM_ATOL = 1e-6  # data-parallel run only (observed <= 1.4e-7); see the module docstring
METHODS = {
  "rigl": lambda: sj.rigl(optax.adam(1e-2), sparsity=0.9, update_every=2, end_step=100),
  "set": lambda: sj.set_(optax.adam(1e-2), sparsity=0.9, update_every=2, end_step=100),
  "srigl": lambda: sj.srigl(optax.adam(1e-2), sparsity=0.9, update_every=2, end_step=100),
  "rigl_nm24": lambda: sj.rigl(
    optax.adam(1e-2), structure=sj.NM(2, 4), update_every=2, end_step=100
  ),
}


def emit(check: str, ok: bool, **info) -> None:
  print(json.dumps({"check": check, "ok": bool(ok), **info}), flush=True)


def make_params():
  key = jax.random.PRNGKey(0)
  params = {}
  for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    key, sub = jax.random.split(key)
    params[f"layer{i}"] = {
      "kernel": jax.random.normal(sub, (a, b)) / np.sqrt(a),
      "bias": jnp.zeros(b),
    }
  return params


def loss(params, x, y):
  h = x
  n = len(SIZES) - 1
  for i in range(n):
    h = h @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"]
    if i < n - 1:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def data():
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  x = jax.random.normal(kx, (STEPS, BATCH, SIZES[0]))
  y = jax.random.randint(ky, (STEPS, BATCH), 0, SIZES[-1])
  return np.asarray(x), np.asarray(y)


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def leaves(tree):
  return jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, optax.MaskedNode))


def trees_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (
    jax.tree.structure(a) == jax.tree.structure(b)
    and len(la) == len(lb)
    and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb, strict=True))
  )


def max_abs_diff(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def same_shardings(arrays, shardings) -> tuple[bool, list[str]]:
  bad = []
  flat_a = jax.tree_util.tree_flatten_with_path(arrays)[0]
  flat_s = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  for (path, a), s in zip(flat_a, flat_s, strict=True):
    if not a.sharding.is_equivalent_to(s, a.ndim):
      bad.append(f"{jax.tree_util.keystr(path)}: {a.sharding} != {s}")
  return not bad, bad


_GRAD_FNS = {}


def _grad_fns(psh, bsh):
  """Jitted single-device and sharded gradient functions, compiled once for all methods."""
  key = (jax.tree.structure(psh), tuple(jax.tree.leaves(psh)), bsh)
  if key not in _GRAD_FNS:
    _GRAD_FNS[key] = (
      jax.jit(jax.grad(loss)),
      jax.jit(jax.grad(loss), in_shardings=(psh, bsh, bsh), out_shardings=psh),
    )
  return _GRAD_FNS[key]


def check_method(name: str, mesh, x_all, y_all) -> None:
  make_tx = METHODS[name]
  tx = make_tx()
  params0 = make_params()
  specs = shd.fsdp_param_specs(params0, mesh, axis="fsdp", min_size=256, kernel_axis="largest")
  psh = shd.named_shardings(mesh, specs)
  rep = NamedSharding(mesh, P())
  bsh = NamedSharding(mesh, P(("data", "fsdp")))

  # --- abstract init: shardings derived from the params' --------------------------------
  abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params0)
  abstract = shd.abstract_opt_state(tx, abstract_params, psh)
  dst = abstract
  bad = []
  for path in psh:
    ps = psh[path]["kernel"]
    mask = dst.masks[path]["kernel"]
    mu = dst.inner_state[0].mu[path]["kernel"]
    nu = dst.inner_state[0].nu[path]["kernel"]
    for what, a in (("mask", mask), ("mu", mu), ("nu", nu)):
      if a.sharding != ps:
        bad.append(f"{what} {path}: {a.sharding.spec} != {ps.spec}")
    if dst.inner_state[0].mu[path]["bias"].sharding != psh[path]["bias"]:
      bad.append(f"mu bias {path}")
  for what, a in (
    ("count", dst.count),
    ("key", dst.key),
    ("skipped", dst.skipped_updates),
    ("adam count", dst.inner_state[0].count),
  ):
    if a.sharding != rep:
      bad.append(f"{what}: {a.sharding.spec} not replicated")
  masked_nodes = sum(isinstance(m, optax.MaskedNode) for m in leaves(dst.masks))
  emit(
    "abstract_init",
    not bad and masked_nodes == len(psh),
    method=name,
    problems=bad,
    masked_nodes=masked_nodes,
    kernel_specs={k: str(v["kernel"]) for k, v in specs.items()},
  )

  # --- init: sharded == single device ----------------------------------------------------
  t0 = time.perf_counter()
  state_ref = jax.jit(tx.init)(params0)
  params_ref = sj.apply_masks(params0, state_ref)
  params_sh = jax.device_put(params0, psh)
  state_sh = shd.shard_dst_init(tx, params_sh, psh)
  params_sh = sj.apply_masks(params_sh, state_sh)
  ssh = shd.opt_state_shardings(tx, state_sh, psh)
  ok_sh, bad_sh = same_shardings(state_sh, ssh)
  ok_p, bad_p = same_shardings(params_sh, psh)
  emit(
    "init",
    trees_equal(host(state_ref), host(state_sh)) and ok_sh and ok_p,
    method=name,
    state_equal=trees_equal(host(state_ref), host(state_sh)),
    problems=bad_sh + bad_p,
    seconds=round(time.perf_counter() - t0, 2),
  )

  # --- K steps, same gradients ------------------------------------------------------------
  traces = {"ref": 0, "sharded": 0}

  def make_update(kind):
    def update(p, s, g):
      traces[kind] += 1
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    return update

  update_ref = jax.jit(make_update("ref"))
  update_sh = jax.jit(make_update("sharded"), in_shardings=(psh, ssh, psh))  # outputs inferred
  grad_ref, grad_sh = _grad_fns(psh, bsh)

  t0 = time.perf_counter()
  p_ref, s_ref, p_sh, s_sh = params_ref, state_ref, params_sh, state_sh
  exact, sharding_problems, mask_changes = [], [], 0
  ref_traj = []
  for t in range(STEPS):
    g = grad_ref(p_ref, x_all[t], y_all[t])
    old_masks = host(s_ref.masks)
    p_ref, s_ref = update_ref(p_ref, s_ref, g)
    p_sh, s_sh = update_sh(p_sh, s_sh, jax.device_put(g, psh))
    hp_ref, hs_ref = host(p_ref), host(s_ref)
    ref_traj.append((hp_ref, hs_ref.masks))
    exact.append(trees_equal(hp_ref, host(p_sh)) and trees_equal(hs_ref, host(s_sh)))
    mask_changes += not trees_equal(old_masks, hs_ref.masks)
    ok_s, bad_s = same_shardings(s_sh, ssh)
    ok_p, bad_p = same_shardings(p_sh, psh)
    if not (ok_s and ok_p):
      sharding_problems.append({"step": t, "problems": (bad_s + bad_p)[:5]})
  emit(
    "update_exact",
    all(exact) and mask_changes >= 3,
    method=name,
    exact_per_step=exact,
    steps_with_mask_change=mask_changes,
    seconds=round(time.perf_counter() - t0, 2),
  )
  emit("shardings", not sharding_problems, method=name, problems=sharding_problems[:3])
  emit("traces", traces == {"ref": 1, "sharded": 1}, method=name, traces=traces)

  # --- full data-parallel step: gradients computed and all-reduced on the mesh -----------
  t0 = time.perf_counter()
  p_dp, s_dp = params_sh, state_sh
  g0_diff = max_abs_diff(
    host(grad_ref(params_ref, x_all[0], y_all[0])),
    host(grad_sh(params_sh, jax.device_put(x_all[0], bsh), jax.device_put(y_all[0], bsh))),
  )
  masks_equal, param_diffs, params_exact = [], [], []
  for t in range(STEPS):
    g = grad_sh(p_dp, jax.device_put(x_all[t], bsh), jax.device_put(y_all[t], bsh))
    p_dp, s_dp = update_sh(p_dp, s_dp, g)
    hp_ref, hm_ref = ref_traj[t]
    hp = host(p_dp)
    masks_equal.append(trees_equal(hm_ref, host(s_dp.masks)))
    params_exact.append(trees_equal(hp_ref, hp))
    param_diffs.append(max_abs_diff(hp_ref, hp))
  emit(
    "data_parallel",
    all(masks_equal) and max(param_diffs) <= PARAM_ATOL,
    method=name,
    masks_equal_per_step=masks_equal,
    params_exact_per_step=params_exact,
    max_param_diff_per_step=param_diffs,
    grad_diff_step0=g0_diff,
    param_atol=PARAM_ATOL,
    traces=traces,
    seconds=round(time.perf_counter() - t0, 2),
  )


def check_explicit_mesh(name: str) -> None:
  """RigL/SET/SRigL/N:M under an Explicit-axes mesh (``jax.make_mesh``'s default).

  Under ``jax.set_mesh``, jitted ``init`` gives every mask its param's sharding type; K
  jitted ``update`` steps (same gradients as the single-device run, mask updates included)
  keep every state type and equal the single-device run bit for bit.
  """
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))  # default axis types: Explicit
  tx = METHODS[name]()
  problems = []
  host_params = make_params()
  grads = [
    jax.tree.map(
      lambda p, k=k: jax.random.normal(jax.random.PRNGKey(100 + k), p.shape), host_params
    )
    for k in range(STEPS)
  ]
  ref_update = jax.jit(tx.update)
  ref_state = jax.jit(tx.init)(host_params)
  ref_params = host_params
  ref_traj = []
  for g in grads:
    u, ref_state = ref_update(g, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, u)
    ref_traj.append(host((ref_params, ref_state)))
  # One kernel sharded along out, one along in (as the FSDP specs of check_method).
  specs = {
    "layer0": {"kernel": P(None, "fsdp"), "bias": P()},
    "layer1": {"kernel": P("fsdp"), "bias": P()},
  }
  with jax.set_mesh(mesh):
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    params = jax.device_put(host_params, shardings)
    try:
      state = jax.jit(tx.init)(params)
      for layer, leaves in state.masks.items():
        for leaf, m in leaves.items():
          p_type = jax.typeof(params[layer][leaf])
          if hasattr(m, "shape") and jax.typeof(m).sharding.spec != p_type.sharding.spec:
            problems.append(f"init: mask {layer}/{leaf} is {jax.typeof(m)}, param {p_type}")
      types0 = jax.tree.map(jax.typeof, state)
      update = jax.jit(tx.update)
      for k, g in enumerate(grads):
        u, state = update(jax.device_put(g, shardings), state, params)
        params = optax.apply_updates(params, u)
        if jax.tree.map(jax.typeof, state) != types0:
          problems.append(f"step {k}: update changed the state's types")
        if not trees_equal(host((params, state)), ref_traj[k]):
          problems.append(f"step {k}: params/state differ from the single-device run")
      changed = not trees_equal(host(state.masks), host(jax.jit(tx.init)(host_params).masks))
      if not changed:
        problems.append("the masks never changed: no mask update was exercised")
    except Exception as e:  # noqa: BLE001 - reported to the parent
      problems.append(f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
  emit("explicit_mesh", not problems, method=name, problems=problems)


def main(argv) -> int:
  if jax.device_count() != 8:
    emit("devices", False, device_count=jax.device_count(), xla_flags=os.environ.get("XLA_FLAGS"))
    return 1
  emit("devices", True, device_count=8, jax=jax.__version__)
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  x_all, y_all = data()
  names = [a for a in argv if not a.startswith("-")] or list(METHODS)
  for name in names:
    if name.startswith("explicit_mesh:"):
      check_explicit_mesh(name.split(":", 1)[1])
      continue
    t0 = time.perf_counter()
    try:
      check_method(name, mesh, x_all, y_all)
    except Exception:  # noqa: BLE001 - reported to the parent
      emit("crash", False, method=name, error=traceback.format_exc()[-3000:])
    emit("timing", True, method=name, seconds=round(time.perf_counter() - t0, 2))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
