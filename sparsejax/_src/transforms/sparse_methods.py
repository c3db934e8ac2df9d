"""Truly sparse versions of the DST methods: ``sj.sparse.rigl(...)`` = ``truly_sparse(sj.rigl(...))``.

Each takes exactly the keywords of the masked method (see its docstring) and returns a
:class:`~sparsejax.sparse.SparseDST` over a model with sparse layers
(:func:`sparsejax.sparse.sparsify`). References: RigL (Evci et al. 2020,
arXiv:1911.11134), SET (Mocanu et al. 2018, arXiv:1707.04780), SRigL (Lasby et al. 2024,
arXiv:2305.02299).
"""

from __future__ import annotations

from typing import Any

import optax

from sparsejax._src.transforms import dynamic_sparse as dynamic_sparse_lib
from sparsejax._src.transforms import methods
from sparsejax._src.transforms.sparse_dst import SparseDST, truly_sparse

__all__ = ["dynamic_sparse", "rigl", "set_", "srigl", "static_sparse"]


def dynamic_sparse(inner: optax.GradientTransformation, **kwargs: Any) -> SparseDST:
  """Truly sparse :func:`sparsejax.dynamic_sparse` (same keywords; constant nnz only)."""
  return truly_sparse(dynamic_sparse_lib.dynamic_sparse(inner, **kwargs))


def static_sparse(inner: optax.GradientTransformation, **kwargs: Any) -> SparseDST:
  """Truly sparse :func:`sparsejax.static_sparse` (fixed topology)."""
  return truly_sparse(methods.static_sparse(inner, **kwargs))


def set_(inner: optax.GradientTransformation, **kwargs: Any) -> SparseDST:
  """Truly sparse :func:`sparsejax.set_` (magnitude drop, random growth)."""
  return truly_sparse(methods.set_(inner, **kwargs))


def rigl(inner: optax.GradientTransformation, **kwargs: Any) -> SparseDST:
  """Truly sparse :func:`sparsejax.rigl` (magnitude drop, dense-gradient growth)."""
  return truly_sparse(methods.rigl(inner, **kwargs))


def srigl(inner: optax.GradientTransformation, **kwargs: Any) -> SparseDST:
  """Truly sparse :func:`sparsejax.srigl` (constant fan-in, neuron ablation)."""
  return truly_sparse(methods.srigl(inner, **kwargs))
