"""Offline datasets and a deterministic, checkpointable batch iterator.

Datasets (nothing is downloaded):

* ``"mnist1d"``: MNIST-1D generated locally with
  ``mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())`` (never ``get_dataset``, which
  downloads) and cached as ``.npz``. Default 5000 samples: 4000 train, 1000 test, length 40.
* ``"digits"``: scikit-learn's bundled 8×8 digits (1797 images), split 80/20 with a fixed
  permutation.
* ``"teacher_student"``: Gaussian inputs labelled by a fixed random sparse teacher MLP.

Batches come from :class:`BatchIterator`: a permutation keyed by ``(seed, epoch)``, fixed-size
batches with the remainder dropped (static shapes, so the train step compiles once), and a
position ``{"epoch", "batch"}`` that is saved in checkpoints and restored exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
from absl import logging

DATASET_NAMES = ("mnist1d", "digits", "teacher_student")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Arrays of one classification dataset (NumPy, float32 inputs, int32 labels)."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Per-example input shape."""
    return tuple(self.x_train.shape[1:])

  @property
  def eval_size(self) -> int:
    """Number of test examples."""
    return len(self.x_test)

  def eval_batches(self, batch_size: int, rows: Sequence[int]) -> Iterator[tuple[np.ndarray, ...]]:
    """This process's ``rows`` of every global test batch: ``(x, y, weight)``.

    Rows past the end of the test set repeat example 0 with weight 0 (padding).
    """
    n, rows = len(self.x_test), np.asarray(rows, np.int64)
    for start in range(0, n, batch_size or n):
      pos = start + rows
      idx = np.where(pos < n, pos, 0)
      yield self.x_test[idx], self.y_test[idx], (pos < n).astype(np.float32)


def _atomic_savez(path: str, **arrays: np.ndarray) -> None:
  """Writes an ``.npz`` atomically (temporary file + rename), so readers never see half."""
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _load_cached(path: str) -> dict[str, np.ndarray] | None:
  """Reads a cached ``.npz``; returns None (and logs) if it is missing or unreadable."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as z:
      out = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
  except Exception as e:  # noqa: BLE001 - a cache: regenerate on any read problem.
    logging.warning("Ignoring unreadable dataset cache %s (%s); regenerating.", path, e)
    return None
  return out


def make_mnist1d(cache_dir: str | None, *, num_samples: int = 5000, seed: int = 42) -> Dataset:
  """Generates MNIST-1D locally (cached as ``.npz`` in ``cache_dir``).

  ``mnist1d.data.make_dataset`` seeds NumPy's and Python's global RNGs; their states are
  saved and restored around the call so that generating the data has no side effects.

  Args:
    cache_dir: directory for the ``.npz`` cache; None disables caching.
    num_samples: total number of samples (80% train, 20% test).
    seed: MNIST-1D generation seed (the benchmark's default is 42).

  Returns:
    The dataset, inputs shaped ``[n, 40]``.
  """
  if num_samples < 100:
    raise ValueError(f"config.data.num_samples must be >= 100; got {num_samples}.")
  path = None
  arrays = None
  if cache_dir:
    path = os.path.join(cache_dir, f"mnist1d_n{num_samples}_seed{seed}.npz")
    arrays = _load_cached(path)
  if arrays is None:
    try:
      import mnist1d.data as mnist1d_data  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
        "The 'mnist1d' dataset needs the mnist1d package: pip install 'sparsejax[experiments]'."
      ) from e
    args = mnist1d_data.get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
      raw = mnist1d_data.make_dataset(args)
    finally:
      np.random.set_state(np_state)  # noqa: NPY002 (mnist1d seeds the global RNG)
      random.setstate(py_state)
    arrays = {k: np.asarray(raw[k]) for k in ("x", "y", "x_test", "y_test")}
    if path is not None:
      _atomic_savez(path, **arrays)
      logging.info("Cached MNIST-1D (%d samples) at %s", num_samples, path)
  return Dataset(
    name="mnist1d",
    x_train=arrays["x"].astype(np.float32),
    y_train=arrays["y"].astype(np.int32),
    x_test=arrays["x_test"].astype(np.float32),
    y_test=arrays["y_test"].astype(np.int32),
    num_classes=10,
  )


def make_digits(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
  """scikit-learn's bundled 8×8 digits, scaled to [0, 1], split by a fixed permutation.

  Args:
    seed: seed of the train/test permutation.
    test_fraction: fraction of the 1797 images held out for testing.

  Returns:
    The dataset, inputs shaped ``[n, 8, 8]``.
  """
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      "The 'digits' dataset needs scikit-learn: pip install 'sparsejax[experiments]'."
    ) from e
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}.")
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(y))
  n_test = int(round(len(y) * test_fraction))
  test, train = perm[:n_test], perm[n_test:]
  return Dataset("digits", x[train], y[train], x[test], y[test], num_classes=10)


def make_teacher_student(
  *,
  seed: int = 0,
  num_train: int = 4000,
  num_test: int = 1000,
  input_dim: int = 32,
  hidden: int = 64,
  num_classes: int = 10,
  teacher_sparsity: float = 0.9,
) -> Dataset:
  """Synthetic data labelled by a fixed, sparse, random two-layer ReLU teacher.

  Args:
    seed: seed of the teacher and of the inputs.
    num_train: number of training examples.
    num_test: number of test examples.
    input_dim: input dimension.
    hidden: teacher hidden width.
    num_classes: number of classes (argmax of the teacher's logits).
    teacher_sparsity: fraction of zero teacher weights.

  Returns:
    The dataset, inputs shaped ``[n, input_dim]``.
  """
  if not 0.0 <= teacher_sparsity < 1.0:
    raise ValueError(f"teacher_sparsity must be in [0, 1); got {teacher_sparsity}.")
  rng = np.random.default_rng(seed)
  w1 = rng.normal(size=(input_dim, hidden)) * (rng.random((input_dim, hidden)) >= teacher_sparsity)
  w2 = rng.normal(size=(hidden, num_classes)) * (
    rng.random((hidden, num_classes)) >= teacher_sparsity
  )
  x = rng.normal(size=(num_train + num_test, input_dim)).astype(np.float32)
  logits = np.maximum(x @ w1, 0.0) @ w2
  y = np.argmax(logits, axis=-1).astype(np.int32)
  return Dataset(
    "teacher_student",
    x[:num_train],
    y[:num_train],
    x[num_train:],
    y[num_train:],
    num_classes=num_classes,
  )


def load_dataset(name: str, *, cache_dir: str | None, seed: int = 0, **kwargs) -> Dataset:
  """Builds a dataset by name.

  Args:
    name: one of ``"mnist1d"``, ``"digits"``, ``"teacher_student"``.
    cache_dir: where generated datasets are cached (MNIST-1D only).
    seed: seed for splits/synthetic data (``digits``, ``teacher_student``); MNIST-1D uses
      ``mnist1d_seed`` from ``kwargs`` so the benchmark's data stays the same across runs.
    **kwargs: dataset-specific options (``num_samples``, ``mnist1d_seed``).

  Returns:
    The dataset.

  Raises:
    ValueError: ``name`` is not a known dataset.
  """
  if name == "mnist1d":
    return make_mnist1d(
      cache_dir,
      num_samples=int(kwargs.get("num_samples", 5000)),
      seed=int(kwargs.get("mnist1d_seed", 42)),
    )
  if name == "digits":
    return make_digits(seed=seed)
  if name == "teacher_student":
    return make_teacher_student(seed=seed)
  raise ValueError(f"Unknown config.dataset={name!r}; allowed values: {', '.join(DATASET_NAMES)}.")


class BatchIterator:
  """Deterministic, checkpointable mini-batch iterator over NumPy arrays.

  The order of epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(n)``, so it
  depends only on ``(seed, epoch)``. Batches have exactly ``batch_size`` examples (the
  remainder of each epoch is dropped), so the jitted step sees one shape.

  The position is ``{"epoch": e, "batch": b}``: the next batch to produce. Save it with
  :meth:`get_state` and restore it with :meth:`set_state` to continue exactly.

  Args:
    x: inputs, first axis = examples.
    y: labels.
    batch_size: examples per batch; must be <= the number of examples.
    seed: shuffling seed.
    rows: the rows of each batch to produce (this process's rows of the global batch on a
      multi-process mesh); default all.
  """

  def __init__(
    self,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int,
    rows: Sequence[int] | None = None,
  ):
    if len(x) != len(y):
      raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}.")
    if not 0 < batch_size <= len(x):
      raise ValueError(
        f"config.batch_size must be in [1, {len(x)}] (the training set size); got {batch_size}."
      )
    self.x, self.y = x, y
    self.batch_size = int(batch_size)
    self.rows = None if rows is None else np.asarray(rows, np.int64)
    self.seed = int(seed)
    self.steps_per_epoch = len(x) // self.batch_size
    self.epoch = 0
    self.batch = 0
    self._perm = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.x))

  def get_state(self) -> dict[str, int]:
    """The position of the next batch, ``{"epoch": e, "batch": b}``."""
    return {"epoch": int(self.epoch), "batch": int(self.batch)}

  def set_state(self, state: dict[str, int]) -> None:
    """Moves to a position produced by :meth:`get_state`."""
    epoch, batch = int(state["epoch"]), int(state["batch"])
    if epoch < 0 or not 0 <= batch < self.steps_per_epoch:
      raise ValueError(
        f"Invalid data position {state}: batch must be in [0, {self.steps_per_epoch})."
      )
    if epoch != self.epoch:
      self._perm = self._permutation(epoch)
    self.epoch, self.batch = epoch, batch

  def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    return self

  def __next__(self) -> tuple[np.ndarray, np.ndarray]:
    idx = self._perm[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
    if self.rows is not None:
      idx = idx[self.rows]
    self.batch += 1
    if self.batch == self.steps_per_epoch:
      self.epoch += 1
      self.batch = 0
      self._perm = self._permutation(self.epoch)
    return self.x[idx], self.y[idx]


def fingerprint(ds: Dataset) -> str:
  """A short hash of the training data (logged and stored with checkpoints)."""
  h = hashlib.sha1()
  for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:12]
