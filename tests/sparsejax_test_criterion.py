"""A user module that registers a custom grow criterion (used by experiments_test.py).

The experiments import it by name through ``config.extra_imports``, exactly as a user's own
module would be imported from the command line. Not a test file itself.
"""

import jax.numpy as jnp

import sparsejax as sj

NAME = "tests_gradient_plus_momentum"
CALLS = {"traced": 0}


def gradient_plus_momentum(ctx: sj.ScoreContext) -> jnp.ndarray:
  """Grows where |grad| + |momentum| is largest."""
  CALLS["traced"] += 1
  score = jnp.abs(ctx.grad)
  for moment in ctx.inner_moments[:1]:
    score = score + jnp.abs(moment)
  return score


sj.register_criterion(NAME, gradient_plus_momentum, overwrite=True)
