"""Shared pytest configuration: CPU only, float32, deterministic."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


import jax  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def update_temp_bytes():
  """``method -> bytes``: the XLA temp buffer of ``sj.<method>``'s compiled update (SGD
  momentum, 90%, ΔT=10) of a 2048x1024 + 1024x10 model (a float32 layer copy is 8 MiB)."""
  import sparsejax as sj

  def measure(method: str) -> int:
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {
      "layers_0": {"kernel": jax.random.normal(k1, (2048, 1024))},
      "layers_1": {"kernel": jax.random.normal(k2, (1024, 10))},
    }
    tx = getattr(sj, method)(
      optax.sgd(0.1, momentum=0.9), sparsity=0.9, update_every=10, end_step=100
    )
    state = tx.init(params)
    compiled = jax.jit(tx.update).lower(params, state, params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  return measure
