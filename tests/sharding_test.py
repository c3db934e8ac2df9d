"""Sharded DST on 8 fake CPU devices: shardings derived from the params, results identical to
one device.

The checks run in child processes (``tests/_sharding_child.py``) started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` in the child's environment only, so
this file does not change the device count of the rest of the suite. Two children run
concurrently (RigL + SET, and SRigL + RigL with N:M 2:4) to fit two cores; each prints one
JSON line per check, and the tests below assert on them. The spec-rule helpers, which need
no devices, are tested in-process.

What "identical" means here (see the child's docstring and docs/SHARDING.md):

* given the same gradients, the sharded ``tx.update`` gives params and the whole optimizer
  state equal to the single-device run bit for bit, at every step, mask updates included;
* in the full data-parallel step the gradient itself is computed on the mesh, and the
  compiler sums partial gradients across devices in a different order than one device does:
  the step-0 gradients of identical params differ in the last bits (reported as
  ``grad_diff_step0``). The masks are still identical at every step, and the params agree
  to ``PARAM_ATOL``; the difference comes only from the gradient (the update itself is
  exact, as the first check shows).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import _multihost as mh
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

import sparsejax as sj
from sparsejax._src.integration import sharding as shd

_CHILD = Path(__file__).with_name("_sharding_child.py")
_ROOT = Path(__file__).resolve().parents[1]
_GROUPS = (
  ("rigl", "set", "explicit_mesh:rigl", "explicit_mesh:set"),
  ("srigl", "rigl_nm24", "explicit_mesh:srigl", "explicit_mesh:rigl_nm24"),
)
_METHODS = ("rigl", "set", "srigl", "rigl_nm24")
_TIMEOUT_S = 900


def _child_env(cache_dir: str) -> dict[str, str]:
  env = mh.child_env(8)
  # Identical programs (RigL's and SET's init) compile once; a warm cache only skips
  # compilation of byte-identical HLO, it changes no result.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
  return env


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  cache_dir = str(tmp_path_factory.mktemp("xla_cache"))
  procs = [
    subprocess.Popen(
      [sys.executable, str(_CHILD), *group],
      env=_child_env(cache_dir + f"/{i}"),
      cwd=str(_ROOT),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i, group in enumerate(_GROUPS)
  ]
  records, failures = [], []
  for proc, group in zip(procs, _GROUPS, strict=True):
    try:
      out, err = proc.communicate(timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      out, err = proc.communicate()
      failures.append(f"child {group} timed out after {_TIMEOUT_S}s")
    if proc.returncode:
      failures.append(f"child {group} exited with {proc.returncode}:\n{err[-3000:]}")
    for line in out.splitlines():
      if line.startswith("{"):
        records.append(json.loads(line))
  return {"records": records, "failures": failures}


def _get(results, check, method=None):
  assert not results["failures"], "\n".join(results["failures"])
  crashes = [r for r in results["records"] if r["check"] == "crash"]
  assert not crashes, crashes[0]["error"]
  found = [
    r
    for r in results["records"]
    if r["check"] == check and (method is None or r.get("method") == method)
  ]
  assert len(found) == 1, f"no single {check!r} record for {method!r}: {results['records']}"
  return found[0]


def test_children_have_8_devices(results):
  assert not results["failures"], "\n".join(results["failures"])
  found = [r for r in results["records"] if r["check"] == "devices"]
  assert len(found) == len(_GROUPS) and all(r["ok"] for r in found), found


@pytest.mark.parametrize("method", _METHODS)
def test_abstract_init_shardings_follow_params(results, method):
  """Masks and Adam moments get the param sharding; counters and the key are replicated."""
  r = _get(results, "abstract_init", method)
  assert r["ok"], r


@pytest.mark.parametrize("method", _METHODS)
def test_sharded_init_equals_single_device(results, method):
  r = _get(results, "init", method)
  assert r["state_equal"], r
  assert r["ok"], r


@pytest.mark.parametrize("method", _METHODS)
def test_sharded_update_bit_exact(results, method):
  """Same gradients in: params and the whole state equal one device's, bit for bit."""
  r = _get(results, "update_exact", method)
  assert all(r["exact_per_step"]), r
  assert r["steps_with_mask_change"] >= 3, r


@pytest.mark.parametrize("method", _METHODS)
def test_state_shardings_unchanged_by_update(results, method):
  """Jitted with in_shardings only, the update's output state keeps the input shardings."""
  r = _get(results, "shardings", method)
  assert r["ok"], r


@pytest.mark.parametrize("method", _METHODS)
def test_no_recompilation_across_mask_updates(results, method):
  r = _get(results, "traces", method)
  assert r["traces"] == {"ref": 1, "sharded": 1}, r


@pytest.mark.parametrize("method", _METHODS)
def test_data_parallel_masks_identical(results, method):
  """Full sharded step: identical masks; params differ only through the gradient's sums."""
  r = _get(results, "data_parallel", method)
  assert all(r["masks_equal_per_step"]), r
  if r["grad_diff_step0"] == 0.0:
    # The mesh computed the step-0 gradient bit-identically: then nothing may differ.
    assert all(r["params_exact_per_step"]), r
  else:
    # The step-0 gradients of bit-identical params differ (order of the cross-device sums);
    # the update itself is exact (test_sharded_update_bit_exact), so the params may differ
    # only by what the gradient carries in.
    assert max(r["max_param_diff_per_step"]) <= r["param_atol"], r
  assert r["traces"] == {"ref": 1, "sharded": 1}, r


@pytest.mark.parametrize("method", _METHODS)
def test_explicit_axes_mesh_bit_exact(results, method):
  """jax.make_mesh's default (Explicit axes) under jax.set_mesh: typed masks, exact updates."""
  r = _get(results, "explicit_mesh", method)
  assert r["ok"], r


# ------------------------------------------------------------------------------------------
# In-process (one device is enough): spec rules and state-sharding derivation on specs.
# ------------------------------------------------------------------------------------------


def _abstract_mesh(**axes):
  return jax.sharding.AbstractMesh(tuple(axes.values()), tuple(axes))


def test_fsdp_param_specs_rules():
  mesh = _abstract_mesh(data=2, fsdp=4)
  params = {
    "a": jnp.zeros((64, 128)),
    "b": jnp.zeros((128, 6)),
    "c": jnp.zeros((6, 10)),
    "sq": jnp.zeros((16, 16)),
    "bias": jnp.zeros(128),
    "small": jnp.zeros((4, 4)),
  }
  specs = shd.fsdp_param_specs(params, mesh, axis="fsdp", min_size=32)
  assert specs == {
    "a": P("fsdp", None),
    "b": P("fsdp", None),
    "c": P(),  # no divisible dimension
    "sq": P("fsdp", None),
    "bias": P("fsdp"),
    "small": P(),  # below min_size
  }, specs
  last = shd.fsdp_param_specs(params, mesh, axis="fsdp", min_size=32, kernel_axis="last")
  assert last["a"] == P(None, "fsdp") and last["sq"] == P(None, "fsdp")
  assert last["b"] == P("fsdp", None)  # 6 is not divisible: falls back to the largest
  largest = shd.fsdp_param_specs(params, mesh, axis="fsdp", min_size=32, kernel_axis="largest")
  assert largest["a"] == P(None, "fsdp") and largest["sq"] == P("fsdp", None)
  both = shd.fsdp_param_specs(params, mesh, axis=("data", "fsdp"), min_size=32)
  assert both["a"] == P(("data", "fsdp"), None) and both["bias"] == P(("data", "fsdp"))
  assert shd.fsdp_param_specs(params, mesh, min_size=10**6) == jax.tree.map(lambda _: P(), params)
  with pytest.raises(ValueError, match="kernel_axis"):
    shd.fsdp_param_specs(params, mesh, kernel_axis="rows")
  with pytest.raises(ValueError, match="not in the mesh"):
    shd.fsdp_param_specs(params, mesh, axis="model")


def test_param_specs_from_rules():
  mesh = _abstract_mesh(model=4)
  params = {
    "up": {"kernel": jnp.zeros((8, 16)), "bias": jnp.zeros(16)},
    "down": {"kernel": jnp.zeros((16, 8))},
  }
  rules = [(r"up/kernel", P(None, "model")), (r"down/kernel", P("model", None))]
  specs = shd.param_specs_from_rules(params, rules, mesh=mesh)
  assert specs == {
    "up": {"kernel": P(None, "model"), "bias": P()},
    "down": {"kernel": P("model", None)},
  }
  with pytest.raises(ValueError, match="not divisible"):
    shd.param_specs_from_rules({"w": jnp.zeros((6, 8))}, [("w", P("model"))], mesh=mesh)
  with pytest.raises(ValueError, match="more entries"):
    shd.param_specs_from_rules({"w": jnp.zeros(8)}, [("w", P(None, "model"))])
  with pytest.raises(ValueError, match="Invalid rule regex"):
    shd.param_specs_from_rules(params, [("(", P())])


def test_opt_state_specs_through_a_chain():
  """Specs in, specs out: a DST transform inside a chain, masks and moments param-shaped."""
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    sj.rigl(optax.adam(1e-3), sparsity=0.9, update_every=10, end_step=100),
  )
  params = {"w": jnp.ones((16, 32)), "b": jnp.zeros(32)}
  specs = {"w": P(None, "model"), "b": P()}
  state = jax.eval_shape(tx.init, params)
  out = shd.opt_state_shardings(tx, state, specs)
  assert jax.tree.structure(out, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(
    jax.tree.map(lambda _: 0, state)
  )
  dst = out[1]
  assert dst.masks["w"] == P(None, "model")
  assert isinstance(dst.masks["b"], optax.MaskedNode)
  assert dst.inner_state[0].mu == specs and dst.inner_state[0].nu == specs
  assert dst.count == P() and dst.key == P() and dst.skipped_updates == P()
  single = shd.opt_state_shardings(tx, state, P("model"))
  assert single[1].masks["w"] == P("model") and single[1].count == P()


def test_shard_dst_init_single_device():
  """The helpers also work on a trivial 1-device mesh (what a laptop run uses)."""
  mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  tx = sj.rigl(optax.sgd(0.1, momentum=0.9), sparsity=0.8, update_every=10, end_step=100)
  params = {"w": jnp.ones((8, 16)), "b": jnp.zeros(16)}
  specs = shd.fsdp_param_specs(params, mesh, min_size=0)
  state = shd.shard_dst_init(tx, params, specs, mesh=mesh)
  ref = tx.init(params)
  assert jnp.array_equal(state.masks["w"], ref.masks["w"])
  assert state.masks["w"].sharding.spec == specs["w"]
  abstract = shd.abstract_opt_state(tx, params, shd.named_shardings(mesh, specs))
  assert abstract.masks["w"].sharding == state.masks["w"].sharding
  assert isinstance(abstract.masks["b"], optax.MaskedNode)
  with pytest.raises(TypeError, match="concrete shardings"):
    shd.shard_dst_init(tx, params, specs)
