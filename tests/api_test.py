"""The public API's shape: curated top level, namespaces, lazy imports, layered folders."""

import ast
import importlib
import pathlib
import subprocess
import sys
import warnings

import pytest

import sparsejax as sj

ROOT = pathlib.Path(__file__).resolve().parents[1]
SRC = ROOT / "sparsejax" / "_src"

TOP_LEVEL = {
  "dynamic_sparse",
  "static_sparse",
  "set_",
  "rigl",
  "srigl",
  "gmp",
  "granet",
  "nm_sr_ste",
  "prune",
  "SparseTransformation",
  "DynamicSparseState",
  "NMSRSTEState",
  "apply_masks",
  "forward_params",
  "get_masks",
  "find_dst_state",
  "summarize",
  "format_summary",
  "layer_sparsities",
  "is_mask_update_step",
  "drop_fraction_schedule",
  "gradual_sparsity",
  "Structure",
  "Unstructured",
  "ConstantFanIn",
  "NM",
  "Block",
  "get_structure",
  "ScoreContext",
  "LayerInfo",
  "magnitude",
  "gradient_magnitude",
  "random_scores",
  "momentum_magnitude",
  "snip",
  "register_criterion",
  "get_criterion",
  "registered_criteria",
  "uniform",
  "erdos_renyi",
  "erk",
  "nm_compress",
  "nm_decompress",
  "nm_matmul",
  "condense",
  "condensed_matmul",
  "path_to_str",
  "checkpoint",
  "condensed",
  "metrics",
  "nm",
  "plotting",
  "primitives",
  "sharding",
  "sparse",
}

NAMESPACES = {
  "checkpoint": {"CheckpointManager", "CheckpointMismatchError", "CorruptCheckpointError"},
  "sparse": {
    "CSRTopology",
    "NotConstantFanInError",
    "SlotMasks",
    "SparseCSR",
    "SparseConv",
    "SparseDST",
    "SparseDSTState",
    "SparseDenseLinen",
    "SparseLinear",
    "SparseTopologyVar",
    "SparseTrainStep",
    "TOPOLOGY_COLLECTION",
    "TopologyOps",
    "TopologyUpdate",
    "XLA_OPS",
    "dense_kernels",
    "dense_view",
    "dynamic_sparse",
    "layer_capacity",
    "layer_topologies",
    "linen_topologies",
    "linen_update",
    "native_available",
    "native_cpu_isa",
    "native_unavailable_reason",
    "probing",
    "random_mask",
    "regular_update",
    "rigl",
    "select_method",
    "set_",
    "sparse_matmul",
    "sparse_matmul_reference",
    "sparse_modules",
    "sparsify",
    "srigl",
    "static_sparse",
    "step_count",
    "topology_from_mask",
    "topology_ops",
    "topology_update",
    "training_nbytes",
    "tree_nbytes",
    "truly_sparse",
    "update_topology",
  },
  "primitives": {
    "active_neurons",
    "drop_and_grow",
    "fan_in_counts",
    "grouped_drop_and_grow",
    "is_nm_sparse",
    "neurons_to_ablate",
    "nm_mask",
    "topk_mask",
  },
  "sharding": {
    "abstract_opt_state",
    "fsdp_param_specs",
    "named_shardings",
    "opt_state_shardings",
    "param_specs_from_rules",
    "shard_dst_init",
  },
  "plotting": {
    "plot_curves",
    "plot_fan_in_heatmap",
    "plot_layer_sparsity",
    "plot_topology",
    "save_figure",
  },
  "metrics": {
    "JsonlWriter",
    "LoggingWriter",
    "MetricWriter",
    "MultiWriter",
    "ReportProgress",
    "TensorBoardWriter",
    "create_default_writer",
    "estimate_flops",
    "ever_active_fraction",
    "fan_in_stats",
    "init_ever_active",
    "mask_summary",
    "mask_turnover",
    "read_jsonl",
    "sparse_leaves",
    "to_scalars",
    "update_ever_active",
  },
}
# The N:M and condensed namespaces: the names users of 0.1 relied on (more may be added).
NM_NAMES = {
  "NM",
  "NMSparse",
  "NMDense",
  "NMDenseLinen",
  "NMIndices",
  "NM_INDICES_COLLECTION",
  "NMSRSTEState",
  "default_nm_filter",
  "index_bits",
  "is_nm_sparse",
  "make_nm_sparse",
  "mdgf_schedule",
  "nm_compress",
  "nm_decompress",
  "nm_dense_from_kernel",
  "nm_dense_linen_variables",
  "nm_mask",
  "nm_matmul",
  "nm_matmul_dense_grad",
  "nm_matmul_reference",
  "nm_nbytes",
  "nm_project",
  "nm_sr_ste",
  "nm_ste",
  "nm_take",
  "pack_indices",
  "sdgf_patterns",
  "sdgf_schedule",
  "unpack_indices",
}
CONDENSED_NAMES = {
  "Condensed",
  "CondensedBuffer",
  "CondensedDense",
  "NotConstantFanInError",
  "condense",
  "condense_params",
  "condensed_conv",
  "condensed_dense_apply",
  "condensed_matmul",
  "condensed_nbytes",
  "native_available",
  "select_condensed_method",
  "uncondense",
}


def test_top_level_all_is_pinned_and_resolves():
  assert set(sj.__all__) == TOP_LEVEL
  assert len(sj.__all__) == len(set(sj.__all__))
  for name in sj.__all__:
    assert getattr(sj, name) is not None, name


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_namespace_exports_are_pinned(namespace):
  module = getattr(sj, namespace)
  assert set(module.__all__) == NAMESPACES[namespace]
  for name in module.__all__:
    assert getattr(module, name) is not None


def test_nm_and_condensed_namespaces_keep_their_names():
  assert NM_NAMES <= set(sj.nm.__all__)
  assert CONDENSED_NAMES <= set(sj.condensed.__all__)
  for module in (sj.nm, sj.condensed):
    for name in module.__all__:
      assert getattr(module, name) is not None, name


def test_moved_names_still_resolve_with_a_warning_naming_the_new_place():
  with pytest.warns(DeprecationWarning, match=r"sparsejax\.primitives\.topk_mask"):
    fn = sj.topk_mask
  assert fn is sj.primitives.topk_mask
  with pytest.warns(DeprecationWarning, match=r"sparsejax\.condensed\.native_available"):
    assert sj.condensed_native_available is sj.condensed.native_available
  with pytest.warns(DeprecationWarning, match="sparsejax.checkpoint.CheckpointManager"):
    assert sj.CheckpointManager is sj.checkpoint.CheckpointManager
  for name in sorted(sj._MOVED_IN_0_2):  # noqa: SLF001 - the table of old names
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      assert getattr(sj, name) is not None
    assert any(issubclass(w.category, DeprecationWarning) for w in caught), name


def test_unknown_attribute_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no_such_name"):
    sj.no_such_name  # noqa: B018


def _modules_after(code: str) -> set[str]:
  out = subprocess.run(
    [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
  )
  return set(out.stdout.split())


def test_import_sparsejax_is_lazy():
  loaded = _modules_after("import sparsejax")
  for heavy in ("orbax", "orbax.checkpoint", "matplotlib", "jax.experimental.pallas", "flax"):
    assert heavy not in loaded, heavy
  # Namespaces load their dependencies on first use.
  loaded = _modules_after("import sparsejax as sj; sj.checkpoint")
  assert "orbax.checkpoint" in loaded


# Layer of each folder (DESIGN.md §3): imports may only point to the same or lower layers.
LAYERS = {
  "base": 0,
  "tree": 0,
  "primitives": 1,
  "allocation": 2,
  "criteria": 3,
  "transforms": 4,
  "formats": 5,
  "kernels": 5,
  "integration": 6,
  "metrics": 6,
}


def _layer_of(module: str) -> int:
  parts = module.split(".")
  assert parts[:2] == ["sparsejax", "_src"], module
  return LAYERS[parts[2]]


def _imports(path: pathlib.Path) -> list[str]:
  tree = ast.parse(path.read_text())
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.append(node.module)
      out += [f"{node.module}.{alias.name}" for alias in node.names]
  return out


def _src_modules() -> list[pathlib.Path]:
  return sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py")


def test_src_folders_are_the_layers_and_imports_point_down():
  folders = {p.name for p in SRC.iterdir() if p.is_dir() and not p.name.startswith("__")}
  assert folders == {k for k in LAYERS if k not in ("base", "tree")}
  for path in _src_modules():
    rel = path.relative_to(SRC)
    own = LAYERS[rel.parts[0].removesuffix(".py")]
    for name in _imports(path):
      if not name.startswith("sparsejax._src."):
        continue
      target = name.split(".")
      if len(target) < 3 or target[2] not in LAYERS:
        continue
      assert _layer_of(name) <= own, f"{rel} (layer {own}) imports {name}"


def test_layers_one_to_four_import_no_flax():
  core = [p for p in _src_modules() if LAYERS[p.relative_to(SRC).parts[0].removesuffix(".py")] <= 4]
  assert len(core) >= 10
  for path in core:
    for name in _imports(path):
      assert not name.startswith(("flax", "orbax", "matplotlib")), f"{path} imports {name}"
  modules = [
    ".".join(("sparsejax", "_src", *p.relative_to(SRC).with_suffix("").parts)) for p in core
  ]
  loaded = _modules_after("\n".join(f"import {m}" for m in modules))
  assert "flax" not in loaded and "orbax" not in loaded


def test_every_src_module_is_importable():
  for path in _src_modules():
    importlib.import_module(
      ".".join(("sparsejax", "_src", *path.relative_to(SRC).with_suffix("").parts))
    )


# Pallas kernel bodies may be long (DESIGN: kernels are exempt); nothing else is.
_LONG_FUNCTIONS_ALLOWED = {"sparsejax/_src/kernels/nm_pallas.py"}


def test_modules_and_functions_stay_small():
  too_big, too_long = [], []
  for folder in ("sparsejax", "experiments"):
    for path in sorted((ROOT / folder).rglob("*.py")):
      rel = str(path.relative_to(ROOT))
      source = path.read_text()
      if source.count("\n") > 500:
        too_big.append(f"{rel}: {source.count(chr(10))} lines")
      if rel in _LONG_FUNCTIONS_ALLOWED:
        continue
      for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
          length = node.end_lineno - node.lineno + 1
          if length > 120:
            too_long.append(f"{rel}:{node.lineno} {node.name} ({length} lines)")
  assert not too_big, too_big
  assert not too_long, too_long
