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
      gamma_sal=gamma_sal if dynamic_ablation else None, no_ablation=no_ablation
    )
  elif not isinstance(structure, structures.NM):
    raise ValueError(
      f"srigl needs structure=ConstantFanIn() (default) or NM(n, m), got {structure!r}; "
      "for unstructured masks use sparsejax.rigl."
    )
  kwargs.setdefault("drop", "magnitude")
  kwargs.setdefault("grow", "gradient")
  return dynamic_sparse(inner, sparsity=sparsity, structure=structure, **kwargs)
