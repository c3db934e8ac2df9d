"""The layer order of a model, as far as its parameter paths can tell it.

"First layer" and "last layer" (``keep_first_dense``, ``keep_last_dense``, SRigL's protected
output layer) must mean the model's real first and last layers. JAX flattens dicts in
sorted key order and NNX sorts module attributes, so tree order is alphabetical: ``head``
sorts before ``hidden`` and ``Dense_10`` before ``Dense_2``. sparsejax therefore orders
layers by:

1. explicit patterns: ``first_layer=`` / ``last_layer=`` (regexes that must each match
   exactly one candidate leaf);
2. otherwise the *natural* order of the paths: numbers compare as numbers
   (``Dense_2 < Dense_10``, ``layers/2 < layers/10``).

A position is *known* only when it is decided by numbers: ``Dense_0`` is first among
``Dense_0 … Dense_9``, but whether ``head`` or ``hidden/0`` comes first is a guess from
their names. Unknown positions are reported as ``None`` (:class:`~sparsejax.LayerInfo`),
and options that need them raise a ``ValueError`` asking for ``first_layer=`` /
``last_layer=``, never silently guess.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sparsejax._src import base

_DIGITS = re.compile(r"(\d+)")


def natural_key(path: str) -> tuple[tuple[str | int, ...], ...]:
  """Sort key of a path: per ``/`` component, alternating text and integer chunks."""
  return tuple(
    tuple(int(c) if i % 2 else c for i, c in enumerate(_DIGITS.split(comp)))
    for comp in path.split("/")
  )


def _decided_by_number(a: str, b: str) -> bool:
  """Whether the natural order of ``a`` and ``b`` is decided by a numeric chunk."""
  for ca, cb in zip(natural_key(a), natural_key(b), strict=False):
    for i, (x, y) in enumerate(zip(ca, cb, strict=False)):
      if x != y:
        return i % 2 == 1
    if len(ca) != len(cb):
      return False
  return False


def _compile(name: str, pattern: str | None) -> re.Pattern | None:
  if pattern is None:
    return None
  try:
    return re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ValueError(f"`{name}` must be a valid regular expression, got {pattern!r}: {e}") from e


def _explicit(name: str, pattern: str | None, candidates: Sequence[str]) -> str | None:
  regex = _compile(name, pattern)
  if regex is None:
    return None
  matched = [p for p in candidates if regex.search(p)]
  if len(matched) != 1:
    raise ValueError(
      f"`{name}`={pattern!r} must match exactly one sparse candidate leaf; it matches "
      f"{matched or 'none'}. Candidates: {list(candidates)[:20]}"
    )
  return matched[0]


def layer_infos(
  candidates: Sequence[str],
  shapes: dict[str, tuple[int, ...]],
  *,
  first_layer: str | None = None,
  last_layer: str | None = None,
) -> dict[str, base.LayerInfo]:
  """The :class:`~sparsejax.LayerInfo` of each candidate leaf (see the module docstring).

  Args:
    candidates: paths of the leaves that may be sparse (any order).
    shapes: ``{path: shape}``.
    first_layer: regex matching the model's first layer (exactly one candidate), or None.
    last_layer: regex matching the model's last (output) layer, or None.

  Returns:
    ``{path: LayerInfo}`` for every candidate.

  Raises:
    ValueError: an invalid regex, or one that does not match exactly one candidate.
  """
  first = _explicit("first_layer", first_layer, candidates)
  last = _explicit("last_layer", last_layer, candidates)
  if first is not None and first == last and len(candidates) > 1:
    raise ValueError(f"`first_layer` and `last_layer` both match {first!r}.")
  middle = sorted((p for p in candidates if p not in (first, last)), key=natural_key)
  ordered = ([first] if first else []) + middle + ([last] if last else [])
  if first is None and middle:
    first_known = all(_decided_by_number(middle[0], p) for p in middle[1:])
    head = middle[0] if first_known else None
  else:
    head = first
  if last is None and middle:
    last_known = all(_decided_by_number(p, middle[-1]) for p in middle[:-1])
    tail = middle[-1] if last_known else None
  else:
    tail = last
  n = len(ordered)
  out = {}
  for i, p in enumerate(ordered):
    is_first = True if p == head else (None if head is None and p in middle else False)
    is_last = True if p == tail else (None if tail is None and p in middle else False)
    out[p] = base.LayerInfo(p, tuple(shapes[p]), i, n, is_first, is_last)
  return out
