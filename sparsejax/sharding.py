"""Sharding helpers: optimizer-state shardings from param shardings, param-spec rules.

See ``docs/SHARDING.md``. Everything runs on JAX's own ``jax.sharding`` meshes.
"""

from sparsejax._src.integration.sharding import abstract_opt_state as abstract_opt_state
from sparsejax._src.integration.sharding import fsdp_param_specs as fsdp_param_specs
from sparsejax._src.integration.sharding import named_shardings as named_shardings
from sparsejax._src.integration.sharding import opt_state_shardings as opt_state_shardings
from sparsejax._src.integration.sharding import param_specs_from_rules as param_specs_from_rules
from sparsejax._src.integration.sharding import shard_dst_init as shard_dst_init

__all__ = (
  "abstract_opt_state",
  "fsdp_param_specs",
  "named_shardings",
  "opt_state_shardings",
  "param_specs_from_rules",
  "shard_dst_init",
)
