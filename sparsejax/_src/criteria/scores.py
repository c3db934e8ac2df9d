"""Drop and grow criteria, and the registry that lets configs name them.

A criterion is a pure function ``ctx: ScoreContext -> scores`` returning an array shaped
like ``ctx.param``; higher scores are kept (drop criteria) or grown (grow criteria).

Example, a custom regrowth rule that adds the inner optimizer's momentum to RigL's score::

  def grow_by_gradient_and_momentum(ctx):
    return jnp.abs(ctx.grad) + jnp.abs(ctx.inner_moments[0])   # Adam's mu, SGD's trace
  sparsejax.register_criterion("gradient_plus_momentum", grow_by_gradient_and_momentum)
  tx = sparsejax.dynamic_sparse(optax.adam(1e-3), sparsity=0.9, end_step=1000,
                                grow="gradient_plus_momentum")

Note: gradients are masked before the inner optimizer, so its moments are exactly 0 at
positions that have been pruned for a while; a momentum-only grow score mostly regrows the
weights dropped in the same update. Combine it with the dense gradient, as above.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sparsejax._src import base
from sparsejax._src.primitives import score_form

Criterion = Callable[[base.ScoreContext], jax.Array]


def magnitude(ctx: base.ScoreContext) -> jax.Array:
  """``|w|``: the magnitude drop criterion of SET and RigL."""
  return jnp.abs(ctx.param)


def gradient_magnitude(ctx: base.ScoreContext) -> jax.Array:
  """``|dL/dw|`` of the dense gradient: the RigL grow criterion (Evci et al. 2020)."""
  return jnp.abs(ctx.grad)


def random_scores(ctx: base.ScoreContext) -> jax.Array:
  """Uniform random scores in [0, 1) from ``ctx.key``: SET's grow criterion (Mocanu 2018).

  A counter-based hash of each entry's flat index and two words drawn from ``ctx.key``
  (two rounds of the MurmurHash3 finalizer, 24 bits kept), not a threefry draw per weight:
  elementwise, so it fuses into the selection and costs a few integer operations per
  weight instead of threefry's 20 rounds and its temporaries; independent of sharding
  and device count like any function of the index. Ties (two equal 24-bit values) are
  broken by index, as every selection's.
  """
  return hashed_uniform(ctx.key, ctx.param.shape)


def hashed_uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform float32 in [0, 1) per entry of ``shape``: a keyed hash of the flat index
  (``score_form.hash_uniform`` with the words ``jax.random.bits(key, (2,))``)."""
  return score_form.as_array(score_form.keyed_hash(key, shape))


def snip(ctx: base.ScoreContext) -> jax.Array:
  """``|g ⊙ w|``: SNIP's connection sensitivity (Lee et al. 2019, arXiv:1810.02340).

  With one batch's gradient at initialization it is the score of pruning at init
  (:func:`sparsejax.prune` with ``criterion="snip"``); normalising by the sum over all
  layers (as the official code does) does not change the ranking, so it is not done.
  """
  return jnp.abs(ctx.grad * ctx.param)


def momentum_magnitude(ctx: base.ScoreContext) -> jax.Array:
  """``|m|`` of the inner optimizer's first param-shaped state (Adam ``mu``, SGD trace).

  The moments are 0 at long-pruned positions (gradients are masked before the inner
  optimizer), so as a grow criterion this mostly regrows weights dropped in the same
  update; useful as a drop criterion or combined with the gradient.

  Raises:
    ValueError: at trace time if the inner optimizer keeps no param-shaped state.
  """
  if not ctx.inner_moments:
    raise ValueError(
      f"criterion 'momentum_magnitude' needs an inner optimizer with a param-shaped state "
      f"(momentum, Adam); leaf {ctx.path!r} has none."
    )
  return jnp.abs(ctx.inner_moments[0]).astype(jnp.float32)


_REGISTRY: dict[str, Criterion] = {
  "magnitude": magnitude,
  "gradient": gradient_magnitude,
  "gradient_magnitude": gradient_magnitude,
  "random": random_scores,
  "snip": snip,
  "momentum": momentum_magnitude,
  "momentum_magnitude": momentum_magnitude,
}


# The built-in criteria whose scores the native kernels read in place (score_form.py):
# the same scores as the functions return, without a float32 copy per weight.
_FORMS: dict[Criterion, Callable[[base.ScoreContext], score_form.ScoreForm]] = {
  magnitude: lambda ctx: score_form.magnitude(ctx.param),
  gradient_magnitude: lambda ctx: score_form.magnitude(ctx.grad),
  random_scores: lambda ctx: score_form.keyed_hash(ctx.key, ctx.param.shape),
}


def scores_of(criterion: Criterion, ctx: base.ScoreContext) -> score_form.ScoreForm:
  """``criterion(ctx)`` as a ``score_form.ScoreForm``: the built-in magnitude, gradient
  and random criteria as forms the native kernels compute in place, any other criterion
  as the array it returns."""
  form = _FORMS.get(criterion)
  return form(ctx) if form is not None else score_form.values(criterion(ctx))


def register_criterion(name: str, fn: Criterion, *, overwrite: bool = False) -> Criterion:
  """Registers ``fn`` under ``name`` so that configs and ``drop=``/``grow=`` can name it.

  Args:
    name: the registry name.
    fn: a function ``ctx -> scores`` of one positional argument.
    overwrite: allow replacing an existing name.

  Returns:
    ``fn`` (so this can be used as a decorator via ``functools.partial``).

  Raises:
    ValueError: if ``name`` is taken and ``overwrite`` is False.
    TypeError: if ``fn`` is not a function of one positional argument.
  """
  if not isinstance(name, str) or not name:
    raise TypeError(f"`name` must be a non-empty string, got {name!r}.")
  base.check_callable("fn", fn, 1)
  if name in _REGISTRY and _REGISTRY[name] is not fn and not overwrite:
    raise ValueError(
      f"criterion name {name!r} is already registered; pass overwrite=True to replace it."
    )
  _REGISTRY[name] = fn
  return fn


def get_criterion(criterion: str | Criterion, *, argname: str = "criterion") -> Criterion:
  """Resolves a criterion given by registered name or by value."""
  if isinstance(criterion, str):
    if criterion not in _REGISTRY:
      raise ValueError(
        f"Unknown `{argname}` criterion {criterion!r}; registered: {sorted(_REGISTRY)}. "
        "Register your own with sparsejax.register_criterion(name, fn)."
      )
    return _REGISTRY[criterion]
  return base.check_callable(argname, criterion, 1)


def registered_criteria() -> list[str]:
  """Names currently in the criteria registry."""
  return sorted(_REGISTRY)
