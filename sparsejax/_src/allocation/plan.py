"""Allocation: which leaves are sparse, and how sparse (static: runs on shapes only).

One frozen record, :class:`Allocation`, holds the allocation keywords every method shares
(``sparsity``, ``distribution``, ``structure``, ``include``, ``exclude``,
``keep_first_dense``, ``keep_last_dense``, ``first_layer``, ``last_layer``, ``overrides``,
``erk_power_scale``). Its :meth:`Allocation.plan` turns a params pytree (arrays or
``jax.ShapeDtypeStruct``) into a :class:`Plan`: one :class:`LeafPlan` per leaf with its
sparsity (``None`` = dense), its position in the model and why it is dense or sparse.

Candidates are floating leaves with ``ndim > 1`` (kernels), or those matching ``include``;
``exclude`` removes matches; ``keep_first_dense`` / ``keep_last_dense`` keep the model's
first / last layer dense, in the layer order of :mod:`~sparsejax._src.allocation.order`
(explicit ``first_layer``/``last_layer`` patterns, else the natural order of the paths;
never a guess from names). Paths look like ``"layer1/kernel"``; patterns use
``re.search``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from sparsejax._src import base, tree
from sparsejax._src.allocation import distributions, order
from sparsejax._src.primitives import structures

Include = str | Callable[[str, Any], bool] | None


class LeafPlan(NamedTuple):
  """The allocation of one leaf.

  Attributes:
    path: the leaf's path.
    shape: the leaf's shape.
    sparsity: the leaf's target sparsity, or ``None`` for a dense leaf (no mask).
    layer: the leaf's position among the sparse candidates, or ``None`` if not a candidate.
    role: a short human-readable reason, e.g. ``"sparse"``, ``"dense: last layer
      (keep_last_dense)"``, ``"dense: not a candidate"``.
  """

  path: str
  shape: tuple[int, ...]
  sparsity: float | None
  layer: base.LayerInfo | None
  role: str


class Plan(NamedTuple):
  """The allocation of every leaf of a params pytree, in flattening order."""

  leaves: tuple[LeafPlan, ...]

  def sparsities(self) -> dict[str, float | None]:
    """``{path: sparsity or None}`` in flattening order."""
    return {leaf.path: leaf.sparsity for leaf in self.leaves}

  @property
  def sparse_indices(self) -> tuple[int, ...]:
    """Flat indices of the sparse leaves."""
    return tuple(i for i, leaf in enumerate(self.leaves) if leaf.sparsity is not None)


def _compile(name: str, pattern: str | None) -> re.Pattern | None:
  if pattern is None:
    return None
  try:
    return re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ValueError(f"`{name}` must be a valid regular expression, got {pattern!r}: {e}") from e


def flatten_params(params: base.Params) -> tuple[list[str], list[Any], Any]:
  """Flattens params into (paths, leaves, treedef), rejecting bad trees clearly.

  Raises:
    ValueError: an empty tree, or two leaves with the same path (e.g. a key ``"a/b"``
      next to a nested ``"a" -> "b"``), which masks and summaries could not tell apart.
    TypeError: a leaf that is not an array or ``jax.ShapeDtypeStruct``.
  """
  try:
    paths, leaves, treedef = tree.flatten_with_paths(params)
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"`params` cannot be flattened as a pytree ({e}); dict keys must be sortable, e.g. "
      "all strings."
    ) from None
  if not leaves:
    raise ValueError("`params` is an empty pytree: there is nothing to sparsify.")
  for path, leaf in zip(paths, leaves, strict=True):
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise TypeError(
        f"`params` leaves must be arrays or jax.ShapeDtypeStruct; {path!r} is a "
        f"{type(leaf).__name__}."
      )
  seen: dict[str, int] = {}
  for path in paths:
    seen[path] = seen.get(path, 0) + 1
  dupes = [p for p, n in seen.items() if n > 1]
  if dupes:
    raise ValueError(
      f"`params` has several leaves with the same path {dupes[:5]} (e.g. a key 'a/b' next to "
      "a nested 'a' -> 'b'); rename them so that every leaf has a unique path."
    )
  return paths, leaves, treedef


@dataclasses.dataclass(frozen=True, eq=False)
class Allocation:
  """The allocation keywords of every sparsejax method (see the module docstring).

  Attributes:
    sparsity: target fraction of zeros over the sparse leaves, in [0, 1); ``None`` only
      with an N:M structure (whose sparsity is ``1 - n/m``).
    distribution: ``"uniform"``, ``"erdos_renyi"`` (``"er"``), ``"erk"``, or a function
      ``(shapes, sparsity, *, overrides) -> {path: sparsity}``.
    structure: a structure object or name (:func:`sparsejax.get_structure`).
    include: regex (or ``(path, leaf) -> bool``) selecting the candidate leaves (default:
      every floating leaf with ``ndim > 1``).
    exclude: regex of candidates kept dense.
    keep_first_dense: keep the model's first layer dense.
    keep_last_dense: keep the model's last layer dense.
    first_layer: regex matching the model's first layer (one candidate).
    last_layer: regex matching the model's last (output) layer (one candidate).
    overrides: ``{regex: sparsity}``; matching leaves get that sparsity (outside the
      distribution's budget); 0 makes a leaf dense. Every regex must match a candidate.
    erk_power_scale: exponent of the ERK raw densities (``distribution="erk"`` only).
  """

  sparsity: float | None = None
  distribution: str | distributions.Distribution = "erk"
  structure: Any = None
  include: Include = None
  exclude: str | None = None
  keep_first_dense: bool = False
  keep_last_dense: bool = False
  first_layer: str | None = None
  last_layer: str | None = None
  overrides: Mapping[str, float] | None = None
  erk_power_scale: float = 1.0
  _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def __post_init__(self):
    object.__setattr__(self, "structure", structures.get_structure(self.structure))
    base.check_sparsity("sparsity", self.sparsity, allow_none=True)
    if isinstance(self.distribution, str):
      distributions.get_distribution(self.distribution)
    elif not callable(self.distribution):
      raise TypeError(f"`distribution` must be a name or a function, got {self.distribution!r}.")
    if self.include is not None and not callable(self.include):
      _compile("include", self.include)
    _compile("exclude", self.exclude)
    _compile("first_layer", self.first_layer)
    _compile("last_layer", self.last_layer)
    base.check_bool("keep_first_dense", self.keep_first_dense)
    base.check_bool("keep_last_dense", self.keep_last_dense)
    if self.overrides is not None:
      if not isinstance(self.overrides, Mapping):
        raise TypeError(
          f"`overrides` must be a mapping {{regex: sparsity}}, got {self.overrides!r}."
        )
      for pattern, value in self.overrides.items():
        base.check_sparsity(f"overrides[{pattern!r}]", value)
        _compile(f"overrides key {pattern!r}", pattern)
    scale = self.erk_power_scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
      raise TypeError(f"`erk_power_scale` must be a finite float, got {scale!r}.")
    if scale != 1.0 and self.distribution not in ("erk", distributions.erk):
      raise ValueError(
        f"`erk_power_scale`={scale} applies only to distribution='erk', not {self.distribution!r}."
      )
    if self.is_global and not isinstance(self.structure, structures.Unstructured):
      raise ValueError(
        f"distribution='global' ranks single weights across layers; it needs an unstructured "
        f"mask, not structure={self.structure!r}. Use a per-layer distribution ('erk', "
        "'uniform') with structured sparsity."
      )
    if isinstance(self.structure, structures.NM):
      nm_sparsity = self.structure.sparsity
      if self.sparsity is not None and abs(self.sparsity - nm_sparsity) > 1e-9:
        raise ValueError(
          f"`sparsity`={self.sparsity} conflicts with structure=NM({self.structure.n}, "
          f"{self.structure.m}), whose sparsity is 1 - n/m = {nm_sparsity}: set sparsity to "
          f"{nm_sparsity} (or None)."
        )
    elif self.sparsity is None:
      raise ValueError("`sparsity` is required (a float in [0, 1)) unless structure is NM(n, m).")

  @property
  def is_global(self) -> bool:
    """Whether budgets come from one ranking across layers (``distribution="global"``)."""
    return self.distribution == "global" or self.distribution is distributions.global_

  # ------------------------------------------------------------------------------------

  def plan(self, params: base.Params) -> Plan:
    """The :class:`Plan` of ``params`` (cached per tree structure and shapes).

    Raises:
      ValueError / TypeError: on any invalid argument or tree, naming it.
    """
    paths, leaves, treedef = flatten_params(params)
    signature = (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))
    plan = self._cache.get(signature)
    if plan is None:
      plan = self._plan(paths, leaves)
      self._cache[signature] = plan
    return plan

  def _candidates(self, paths: list[str], leaves: list[Any]) -> list[str]:
    include_re = None if callable(self.include) else _compile("include", self.include)
    exclude_re = _compile("exclude", self.exclude)
    out = []
    for path, leaf in zip(paths, leaves, strict=True):
      if not base.is_floating(leaf) or base.shape_size(leaf.shape) == 0:
        continue  # integer leaves, and zero-size leaves (nothing to prune), stay dense
      if callable(self.include):
        if not self.include(path, leaf):
          continue
      elif include_re is not None:
        if not include_re.search(path):
          continue
      elif len(leaf.shape) < 2:
        continue
      if exclude_re is not None and exclude_re.search(path):
        continue
      out.append(path)
    if not out:
      floats = [p for p, leaf in zip(paths, leaves, strict=True) if base.is_floating(leaf)]
      raise ValueError(
        "No parameter leaf is eligible for sparsity (candidates are floating leaves with "
        f"ndim > 1, or those matching `include`). Floating leaves found: {floats[:20]}; "
        f"include={self.include!r}, exclude={self.exclude!r}."
      )
    return out

  def _kept_dense(self, infos: dict[str, base.LayerInfo]) -> dict[str, str]:
    """``{path: role}`` of the candidates kept dense by keep_first/last_dense."""
    out = {}
    for flag, attr, name in (
      (self.keep_first_dense, "is_first", "first"),
      (self.keep_last_dense, "is_last", "last"),
    ):
      if not flag:
        continue
      found = [p for p, info in infos.items() if getattr(info, attr)]
      if any(getattr(info, attr) is None for info in infos.values()) and not found:
        raise ValueError(
          f"`keep_{name}_dense=True` but the model's {name} layer cannot be told from the "
          f"parameter paths: among {list(infos)[:8]} the order is decided by names only "
          "(JAX and NNX sort dict keys, so 'head' sorts before 'hidden'). Pass "
          f"`{name}_layer=` (a regex matching that kernel), or `exclude=` it."
        )
      for p in found:
        out[p] = f"dense: {name} layer (keep_{name}_dense)"
    return out

  def _overrides(self, candidates: list[str]) -> dict[str, float]:
    resolved: dict[str, float] = {}
    for pattern, value in (self.overrides or {}).items():
      regex = _compile(f"overrides key {pattern!r}", pattern)
      matched = [p for p in candidates if regex.search(p)]
      if not matched:
        raise ValueError(
          f"`overrides` pattern {pattern!r} matches no sparse parameter. Sparse candidates: "
          f"{candidates[:20]}{' ...' if len(candidates) > 20 else ''}"
        )
      for p in matched:
        resolved[p] = float(value)
    return resolved

  def _distribute(self, shapes, candidates, overrides) -> dict[str, float]:
    if isinstance(self.structure, structures.NM):
      return {p: overrides.get(p, self.structure.sparsity) for p in candidates}
    dist = distributions.get_distribution(self.distribution)
    cand_shapes = {p: shapes[p] for p in candidates}
    if dist is distributions.erk:
      per_layer = dist(
        cand_shapes, self.sparsity, overrides=overrides, power_scale=self.erk_power_scale
      )
    else:
      per_layer = dist(cand_shapes, self.sparsity, overrides=overrides)
    for path in candidates:
      value = per_layer.get(path) if isinstance(per_layer, Mapping) else None
      if value is None or not (0.0 <= float(value) < 1.0):
        raise ValueError(
          f"`distribution` {self.distribution!r} cannot reach sparsity={self.sparsity}: it "
          f"gave layer {path!r} the sparsity {value!r}; every layer needs a value in [0, 1)."
        )
    return {p: float(per_layer[p]) for p in candidates}

  def _plan(self, paths: list[str], leaves: list[Any]) -> Plan:
    shapes = {p: tuple(leaf.shape) for p, leaf in zip(paths, leaves, strict=True)}
    all_candidates = self._candidates(paths, leaves)
    infos = order.layer_infos(
      all_candidates, shapes, first_layer=self.first_layer, last_layer=self.last_layer
    )
    kept_dense = self._kept_dense(infos)
    candidates = [p for p in all_candidates if p not in kept_dense]
    if not candidates:
      raise ValueError(
        f"Every sparse candidate ({all_candidates}) is kept dense by keep_first_dense / "
        "keep_last_dense: there is nothing to sparsify."
      )
    overrides = self._overrides(candidates)
    per_layer = self._distribute(shapes, candidates, overrides)
    out = []
    for path in paths:
      info = infos.get(path)
      s = per_layer.get(path)
      if info is None:
        out.append(LeafPlan(path, shapes[path], None, None, "dense: not a candidate"))
      elif path in kept_dense:
        out.append(LeafPlan(path, shapes[path], None, info, kept_dense[path]))
      elif s is None or s <= 0.0:
        why = "override" if path in overrides else "distribution"
        out.append(LeafPlan(path, shapes[path], None, info, f"dense: sparsity 0 ({why})"))
      else:
        s = self.structure.layer_sparsity(info, s)
        role = "sparse (global budget)" if self.is_global and path not in overrides else "sparse"
        if (
          isinstance(self.structure, structures.ConstantFanIn)
          and self.structure.gamma_sal is not None
          and not self.structure.ablates(path, info)
        ):
          role = (
            "sparse, never ablated (no_ablation)"
            if self.structure.no_ablation
            else "sparse, never ablated (output layer)"
          )
        out.append(LeafPlan(path, shapes[path], float(s), info, role))
    return Plan(tuple(out))


def plan_sparsity(params: base.Params, **kwargs: Any) -> dict[str, float | None]:
  """``{path: sparsity or None}`` for every leaf of ``params`` (``None`` = dense).

  Takes the keywords of :class:`Allocation`; see the module docstring.
  """
  return Allocation(**kwargs).plan(params).sparsities()
