"""Orbax checkpointing for sparse training runs (orbax is imported with this module).

``sj.checkpoint.CheckpointManager(directory)``: keep-N, atomic saves, a refusal (never a
silent fresh start) for corrupt checkpoints or checkpoints of another model.
"""

from sparsejax._src.integration.checkpointing import CheckpointManager as CheckpointManager
from sparsejax._src.integration.checkpointing import (
  CheckpointMismatchError as CheckpointMismatchError,
)
from sparsejax._src.integration.checkpointing import (
  CorruptCheckpointError as CorruptCheckpointError,
)

__all__ = ("CheckpointManager", "CheckpointMismatchError", "CorruptCheckpointError")
