"""The ready-made methods: one-line choices of criteria, schedule and structure.

Every method is :func:`~sparsejax.dynamic_sparse` with some defaults (as optax's
``alias.py`` is ``chain`` with some transformations), so every method has the same
allocation, state and readers.
"""

from __future__ import annotations

from typing import Any

import optax

from sparsejax._src import base
from sparsejax._src.primitives import structures
from sparsejax._src.transforms.dynamic_sparse import SparseTransformation, dynamic_sparse


def static_sparse(inner: optax.GradientTransformation, **kwargs: Any) -> SparseTransformation:
  """Static sparse training: a random (structured) mask fixed for the whole run.

  The "Static" baseline of Evci et al. 2020 (https://arxiv.org/abs/1911.11134). Accepts the
  allocation keywords of :func:`dynamic_sparse` (``sparsity``, ``distribution``,
  ``structure``, ``include``, ``exclude``, ``keep_first_dense``, ``keep_last_dense``,
  ``first_layer``, ``last_layer``, ``overrides``, ``erk_power_scale``, ``seed``). Schedule
  and criteria keywords are rejected: a static mask never changes.

  Raises:
    TypeError: a keyword that only applies to a changing mask (``update_every``,
      ``end_step``, ``drop_fraction``, ``drop``, ``grow``, ...).
  """
  dynamic_only = {
    "update_every",
    "start_step",
    "end_step",
    "drop_fraction",
    "drop_fraction_decay",
    "drop",
    "grow",
    "grow_init",
  }
  given = sorted(dynamic_only & set(kwargs))
  if given:
    raise TypeError(
      f"static_sparse does not take {given}: a static mask never changes. Use "
      "sparsejax.rigl / set_ / dynamic_sparse for a mask that updates."
    )
  return dynamic_sparse(inner, update_every=None, **kwargs)


def set_(inner: optax.GradientTransformation, **kwargs: Any) -> SparseTransformation:
  """SET: magnitude drop, uniform random regrowth (Mocanu et al. 2018).

  Reference: https://arxiv.org/abs/1707.04780. Same keywords as :func:`dynamic_sparse`
  (defaults: ``drop="magnitude"``, ``grow="random"``). The drop fraction decays with a
  cosine by default, as in google-research/rigl's SET; pass
  ``drop_fraction_decay="constant"`` for the paper's constant ζ.
  """
  kwargs.setdefault("drop", "magnitude")
  kwargs.setdefault("grow", "random")
  return dynamic_sparse(inner, **kwargs)


def rigl(inner: optax.GradientTransformation, **kwargs: Any) -> SparseTransformation:
  """RigL: magnitude drop, dense-gradient-magnitude regrowth (Evci et al. 2020).

  Reference: "Rigging the Lottery: Making All Tickets Winners",
  https://arxiv.org/abs/1911.11134. Same keywords as :func:`dynamic_sparse` (defaults:
  ``drop="magnitude"``, ``grow="gradient"``, ΔT=100, α=0.3 cosine-decayed).
  """
  kwargs.setdefault("drop", "magnitude")
  kwargs.setdefault("grow", "gradient")
  return dynamic_sparse(inner, **kwargs)


def srigl(
  inner: optax.GradientTransformation,
  *,
  sparsity: float | None = None,
  gamma_sal: float = 0.3,
  dynamic_ablation: bool = True,
  no_ablation: str | None = None,
  ablation_fan_in: str = "sparse",
  structure: Any = None,
  **kwargs: Any,
) -> SparseTransformation:
  """SRigL: constant fan-in RigL with neuron ablation (Lasby et al., ICLR 2024).

  Reference: "Dynamic Sparse Training with Structured Sparsity",
  https://arxiv.org/abs/2305.02299. RigL whose structure is
  ``ConstantFanIn(gamma_sal=…, no_ablation=…)``: drop is layer-wise by magnitude,
  regrowth per neuron by |dense gradient| back to exactly ``k = floor(numel·(1-S)) //
  n_active`` incoming weights; neurons with fewer than ``max(1, int(γ_sal·k0))`` salient
  weights are ablated at each update and the freed budget redistributed (ALGORITHMS.md
  §4.2–4.3; see :class:`sparsejax.ConstantFanIn`).

  Args:
    inner: the optimizer to wrap.
    sparsity: target fraction of zeros, in [0, 1).
    gamma_sal: γ_sal in [0, 1] (default 0.3, the paper's CNN setting; 0.95 for ViTs).
    dynamic_ablation: enable neuron ablation (False gives "SRigL w/o ablation").
    no_ablation: regex of layers never ablated; default ``None`` protects the model's
      output layer (pass ``last_layer=`` when the paths cannot tell which it is). Pass
      ``"$^"`` to protect nothing.
    ablation_fan_in: ``"sparse"`` (default: γ_sal times the sparse fan-in, the reference
      code's default) or ``"dense"`` (γ_sal times the dense fan-in).
    structure: ``ConstantFanIn()`` (default) or ``NM(n, m)`` (N:M groups are constant
      fan-in per group; ablation does not apply to N:M and is disabled).
    **kwargs: the keywords of :func:`sparsejax.dynamic_sparse`.

  Returns:
    A :class:`SparseTransformation` with a :class:`DynamicSparseState`.

  Raises:
    ValueError: ``gamma_sal`` outside [0, 1]; a layer whose constant fan-in would be < 1;
      an invalid ``no_ablation`` regex; an output layer that cannot be identified; and
      the errors of :func:`dynamic_sparse`.
  """
  gamma_sal = base.check_fraction("gamma_sal", gamma_sal)
  base.check_bool("dynamic_ablation", dynamic_ablation)
  structure = structures.get_structure(structure if structure is not None else "fan_in")
  if isinstance(structure, structures.ConstantFanIn):
    structure = structures.ConstantFanIn(
      gamma_sal=gamma_sal if dynamic_ablation else None,
      no_ablation=no_ablation,
      ablation_fan_in=ablation_fan_in,
    )
  elif not isinstance(structure, structures.NM):
    raise ValueError(
      f"srigl needs structure=ConstantFanIn() (default) or NM(n, m), got {structure!r}; "
      "for unstructured masks use sparsejax.rigl."
    )
  kwargs.setdefault("drop", "magnitude")
  kwargs.setdefault("grow", "gradient")
  return dynamic_sparse(inner, sparsity=sparsity, structure=structure, **kwargs)


def gmp(
  inner: optax.GradientTransformation,
  *,
  sparsity: float,
  start_step: int = 0,
  end_step: int,
  update_every: int = 100,
  initial_sparsity: float = 0.0,
  power: float = 3.0,
  distribution: Any = "erk",
  structure: Any = None,
  **kwargs: Any,
) -> SparseTransformation:
  """Gradual magnitude pruning (Zhu & Gupta 2017, https://arxiv.org/abs/1710.01878).

  Starts dense (all-True masks; or at ``initial_sparsity``, reached by magnitude at
  ``start_step``) and prunes every ``update_every`` steps from ``start_step`` to
  ``end_step`` (and at ``end_step``) by ``|w|`` so that each layer's sparsity follows
  ``s_t = s_f + (s_i − s_f)·(1 − (t − t0)/(t_end − t0))^power`` (see
  :func:`sparsejax.gradual_sparsity`), then holds. Pruned weights are exactly 0 and their
  inner-optimizer state is never updated again; masks only shrink; each layer ends exactly
  at its target nnz. Same transformation, state and readers as every other method
  (``dynamic_sparse`` with a sparsity schedule and no regrowth).

  Departures from the reference implementations (ALGORITHMS_BASELINES.md §1): exact top-k
  counts (not a histogram threshold), ``end_step`` is always a pruning step, pruning runs
  before the inner update of that step (jaxpruner's order), and pruned weights stay 0
  (they cannot come back, unlike TF's raw-variable masking).

  Args:
    inner: the optimizer to wrap.
    sparsity: final sparsity ``s_f`` over the sparse layers (per layer by ``distribution``).
    start_step: ``t0``, the first pruning step.
    end_step: ``t_end``, the last pruning step.
    update_every: ΔT between pruning steps.
    initial_sparsity: ``s_i`` (0: dense start).
    power: the schedule's exponent (3), ``> 0``.
    distribution: per-layer final sparsities (``"erk"``, ``"uniform"``, ``"global"``: one
      magnitude threshold across layers at every pruning step, ...).
    structure: unstructured (default), ``ConstantFanIn()`` (k shrinks with the schedule)
      or ``Block(h, w)``; N:M has a fixed sparsity and is refused.
    **kwargs: the other keywords of :func:`dynamic_sparse` (allocation, ``seed``, ...).
  """
  _no_criteria("gmp", kwargs)
  return dynamic_sparse(
    inner,
    sparsity=sparsity,
    start_step=start_step,
    end_step=end_step,
    update_every=update_every,
    initial_sparsity=initial_sparsity,
    power=power,
    distribution=distribution,
    structure=structure,
    drop="magnitude",
    grow="magnitude",  # unused: nothing grows (drop_fraction 0)
    drop_fraction=0.0,
    drop_fraction_decay="constant",
    init_masks=kwargs.pop("init_masks", "dense"),
    **kwargs,
  )


def granet(
  inner: optax.GradientTransformation,
  *,
  sparsity: float,
  start_step: int = 0,
  end_step: int,
  update_every: int = 100,
  initial_sparsity: float = 0.0,
  power: float = 3.0,
  drop_fraction: float | optax.Schedule = 0.3,
  grow: Any = "gradient",
  **kwargs: Any,
) -> SparseTransformation:
  """GraNet: gradual magnitude pruning plus zero-cost neuroregeneration (Liu et al. 2021).

  Reference: "Sparse Training via Boosting Pruning Plasticity with Neuroregeneration",
  https://arxiv.org/abs/2106.10404 (VITA-Group/GraNet ``Masking.pruning`` +
  ``truncate_weights``). At every update the layer is pruned to the schedule's target by
  ``|w|`` and, on top, ``floor(target · drop_fraction)`` more weights are dropped and as
  many regrown by ``|dense gradient|`` (the gradient already computed: "zero cost"), so
  nnz follows :func:`sparsejax.gradual_sparsity` while the topology keeps exploring. The
  drop fraction decays with a cosine to 0 at ``regrow_end_step`` (default ``end_step``;
  GraNet continues regrowth to the end of training: pass ``regrow_end_step=total_steps``).
  Dense start by default (``initial_sparsity=0``); with ``initial_sparsity > 0`` it starts
  from a random mask at that sparsity (GraNet's sparse-to-sparse variant).

  Departures: per-layer drop counts use ``floor`` (GraNet: ``ceil``); the GMP part and the
  regeneration are one drop by ``|w|`` (equivalent: both remove the lowest magnitudes).

  Args:
    inner: the optimizer to wrap.
    sparsity: final sparsity.
    start_step: first pruning step.
    end_step: last pruning step.
    update_every: ΔT.
    initial_sparsity: ``s_i``.
    power: the schedule's exponent.
    drop_fraction: regeneration fraction (GraNet's death rate), or a schedule.
    grow: grow criterion (``"gradient"``: GraNet's gradient regrowth).
    **kwargs: the other keywords of :func:`dynamic_sparse` (``distribution="global"`` for
      GraNet's global pruning, ``regrow_end_step``, ``structure``, ...).
  """
  kwargs.setdefault("drop", "magnitude")
  return dynamic_sparse(
    inner,
    sparsity=sparsity,
    start_step=start_step,
    end_step=end_step,
    update_every=update_every,
    initial_sparsity=initial_sparsity,
    power=power,
    drop_fraction=drop_fraction,
    grow=grow,
    **kwargs,
  )


def _no_criteria(method: str, kwargs: dict[str, Any]) -> None:
  fixed = sorted(
    {"drop", "grow", "drop_fraction", "drop_fraction_decay", "grow_init"} & set(kwargs)
  )
  if fixed:
    raise TypeError(
      f"{method} does not take {fixed}: it prunes by magnitude and grows nothing. Use "
      "sparsejax.granet (pruning plus regrowth) or dynamic_sparse(initial_sparsity=...)."
    )
