"""Pytree helpers shared by every layer: paths, masked leaves, NNX variable unwrapping.

Paths are ``"a/b/kernel"`` strings built from JAX key paths (dict keys, attribute names,
sequence indices); an NNX ``Variable``'s trailing ``.value`` is dropped, so the same model
gives the same paths as a plain params dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def path_to_str(path: Sequence[Any]) -> str:
  """Turns a JAX key path into ``"a/b/kernel"``, dropping NNX ``.value`` attributes."""
  names = [_key_name(entry) for entry in path]
  if names and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names = names[:-1]
  return "/".join(names)


def is_masked_node(x: Any) -> bool:
  """Whether ``x`` marks a dense leaf in a masks pytree (``optax.MaskedNode``)."""
  return isinstance(x, optax.MaskedNode)


def is_dense_marker(x: Any) -> bool:
  """Whether ``x`` marks a dense leaf: ``None`` or ``optax.MaskedNode()``."""
  return x is None or isinstance(x, optax.MaskedNode)


def is_leafless_node(tree: Any) -> bool:
  """Whether ``tree`` is a custom pytree node with no leaves.

  ``optax.tree_utils.tree_map_params`` passes such a placeholder to ``init`` to find where
  the param-shaped trees of a state are; plain empty containers (``{}``, ``[]``, ``()``,
  ``None``) are not placeholders but empty params.
  """
  if tree is None or isinstance(tree, dict | list | tuple):
    return False
  return not jax.tree.leaves(tree)


def flatten_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
  """Flattens ``tree`` into (paths, leaves, treedef); MaskedNode counts as a leaf."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked_node)
  return [path_to_str(p) for p, _ in flat], [leaf for _, leaf in flat], treedef


def is_variable(x: Any) -> bool:
  """Whether ``x`` is an NNX ``Variable``-like box (has ``get_value``/``value``, not an array).

  Duck-typed so that layers below the Flax integration never import Flax.
  """
  if x is None or isinstance(x, jax.Array | np.ndarray | np.generic):
    return False
  return callable(getattr(x, "get_value", None)) or (hasattr(x, "value") and hasattr(x, "replace"))


def unwrap(x: Any) -> Any:
  """The array inside an NNX ``Variable``-like box; anything else is returned unchanged."""
  if not is_variable(x):
    return x
  get = getattr(x, "get_value", None)
  return get() if callable(get) else x.value


def strip_variables(tree: Any) -> Any:
  """Replaces NNX ``Variable`` boxes in ``tree`` by their content."""
  return jax.tree.map(unwrap, tree, is_leaf=lambda x: is_variable(x) or is_masked_node(x))


def flatten_masks(masks: Any) -> tuple[list[str], list[Any], Any]:
  """Flattens a masks pytree to (paths, leaves, treedef): arrays, or None for dense leaves.

  Accepts ``optax.MaskedNode()`` or ``None`` at dense leaves and NNX ``Variable`` boxes
  around arrays (an ``nnx.Optimizer``'s state). The treedef has one leaf per param leaf.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(
    masks, is_leaf=lambda x: is_dense_marker(x) or is_variable(x)
  )
  paths, leaves = [], []
  for path, leaf in flat:
    leaf = unwrap(leaf)
    paths.append(path_to_str(path))
    leaves.append(None if is_dense_marker(leaf) else leaf)
  return paths, leaves, treedef


def sparse_leaves(masks: Any) -> list[tuple[str, Any]]:
  """The ``(path, mask)`` pairs of the sparse leaves of a masks pytree, in tree order.

  Args:
    masks: a params-structured pytree with a mask array per sparse leaf and ``None`` or
      ``optax.MaskedNode()`` for dense leaves (NNX ``State``, dicts, lists all work).

  Returns:
    A list of ``(path, mask)`` with paths like ``"layer1/kernel"``; dense leaves skipped.
  """
  paths, leaves, _ = flatten_masks(masks)
  return [(p, m) for p, m in zip(paths, leaves, strict=True) if m is not None]
