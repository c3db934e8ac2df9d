"""Child of ``tests/multiprocess_test.py``: read a checkpoint, report a digest of every array.

``python tests/_restore_child.py CHECKPOINT_STATE_DIR OUT_JSON [--distributed ADDRESS N ID]``

Every array is restored directly into a sharding over all devices (the leading axis split
over every device when it divides, else replicated), gathered back through a replicated copy,
and process 0 writes the digests of the run's state arrays. Without ``--distributed``: one
process, one device. With it, the process joins JAX's distributed runtime first and the
devices are every process's (each process reads only its shards). The parent compares.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np

COMPARED = ("model/", "optimizer/", "ever_active/")  # the arrays of the run's state


def digests(flat: dict) -> dict[str, str]:
  return {
    k: f"{np.asarray(v).dtype}{np.asarray(v).shape}:"
    + hashlib.sha1(np.ascontiguousarray(np.asarray(v)).tobytes()).hexdigest()
    for k, v in sorted(flat.items())
    if k.startswith(COMPARED)
  }


def main(argv: list[str]) -> int:
  state_dir, out = argv[1], argv[2]
  if "--distributed" in argv:
    from experiments import distributed  # noqa: PLC0415

    address, n, pid = argv[argv.index("--distributed") + 1 :][:3]
    distributed.initialize(distributed.resolve(address, n, pid, initialization_timeout=120))
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from jax.sharding import NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  checkpointer = ocp.StandardCheckpointer()
  mesh = jax.make_mesh((jax.device_count(),), ("all",))
  metadata = checkpointer.metadata(state_dir).item_metadata

  def target(meta):
    shape = tuple(meta.shape)
    spec = P("all") if shape and shape[0] % jax.device_count() == 0 else P()
    return jax.ShapeDtypeStruct(shape, meta.dtype, sharding=NamedSharding(mesh, spec))

  abstract = jax.tree.map(target, metadata, is_leaf=lambda x: hasattr(x, "shape"))
  restored = checkpointer.restore(state_dir, abstract)
  sharded = sum(
    1 for x in jax.tree.leaves(restored) if isinstance(x, jax.Array) and not x.is_fully_replicated
  )
  gather = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))
  arrays = {k: v for k, v in ocp.tree.to_flat_dict(restored, sep="/").items()}
  host = {
    k: (np.asarray(jax.device_get(gather(v))) if isinstance(v, jax.Array) else v)
    for k, v in arrays.items()
  }
  if jax.process_index() == 0:
    with open(out, "w") as f:
      json.dump(
        {"processes": jax.process_count(), "sharded_arrays": sharded, "digests": digests(host)},
        f,
      )
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
