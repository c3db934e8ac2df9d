"""Image datasets on disk (tfds TFRecord / ArrayRecord) through grain, split by process.

``config.dataset`` ``"cifar10"`` or ``"imagenet2012"`` reads the tfds-prepared dataset in
``config.data.dir`` (the ``<name>/<version>`` directory: shards of ``tf.train.Example`` with
an encoded ``image`` and an int ``label``, see :mod:`experiments.records`). Nothing is
downloaded: prepare the data once with ``tfds.builder(name).download_and_prepare()`` (either
``file_format``), or write your own arrays with :func:`experiments.records.write_split`.

Order and augmentation depend only on the seed and the global position, never on the number
of processes or devices, so a run on 2 processes × 4 devices sees the same global batches as
one on 1 × 8:

* epoch ``e`` visits the training records in ``np.random.default_rng([seed, e]).permutation``
  order, in global batches of ``config.batch_size`` (the remainder of an epoch is dropped);
* each process decodes only the rows of every global batch that its devices hold
  (``rows``, from the batch sharding), so the data are split by process;
* the random crop/flip of an example is drawn from ``default_rng([seed, e, position])``.

grain runs the decoding: ``config.data.num_workers`` worker processes
(``IterDataset.mp_prefetch``; 0 = threads in this process, ``config.data.num_threads``). The
iterator's position (``{"epoch", "batch"}``) is checkpointed like the in-memory datasets'.

Preprocessing (images end as float32 ``[size, size, 3]``, normalised per channel):

* ``cifar10``: train: 4-pixel zero padding, random 32×32 crop, random horizontal flip;
  eval: none (the SRigL / kuangliu recipe);
* ``imagenet2012``: train: Inception-style random resized crop (area 8-100%, aspect 3/4-4/3)
  to ``config.data.image_size``, random flip; eval: resize the shorter side to
  ``image_size / 0.875`` and take the central crop (the TF / TPU ResNet recipe).
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from experiments import records

#: dataset -> (train split, eval split, classes, channel mean, channel std) (0-255 scale).
DATASETS: dict[str, tuple[str, str, int, tuple[float, ...], tuple[float, ...]]] = {
  "cifar10": ("train", "test", 10, (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
  "imagenet2012": ("train", "validation", 1000, (123.7, 116.3, 103.5), (58.4, 57.1, 57.4)),
}
DATASET_NAMES = tuple(DATASETS)


def _decode(record: bytes) -> tuple[np.ndarray, int]:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  ex = records.parse_example(record)
  if "image" not in ex or "label" not in ex:
    raise ValueError(f"A record has features {sorted(ex)}; expected 'image' and 'label'.")
  with Image.open(io.BytesIO(ex["image"][0])) as img:
    return np.asarray(img.convert("RGB")), int(ex["label"][0])


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if img.shape[:2] == (h, w):
    return img
  return np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))


def _random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """Inception crop: area 8-100% and aspect 3/4-4/3 (10 tries), else the central crop."""
  h, w = img.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(0.08, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      return _resize(img[top : top + ch, left : left + cw], size, size)
  return _center_crop(img, size)


def _center_crop(img: np.ndarray, size: int) -> np.ndarray:
  """Resize the shorter side to ``size / 0.875``, then the central ``size × size`` crop."""
  h, w = img.shape[:2]
  short = round(size / 0.875)
  nh, nw = (
    (short, max(size, round(w * short / h))) if h <= w else (max(size, round(h * short / w)), short)
  )
  img = _resize(img, nh, nw)
  top, left = (nh - size) // 2, (nw - size) // 2
  return img[top : top + size, left : left + size]


def _cifar_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  img = _resize(img, size, size)
  padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
  top, left = rng.integers(0, 9), rng.integers(0, 9)
  return padded[top : top + size, left : left + size]


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Decoding and augmentation of one record (picklable, for grain's worker processes)."""

  dataset: str
  size: int
  train: bool
  seed: int

  def __call__(self, record: bytes, epoch: int, position: int) -> tuple[np.ndarray, int]:
    img, label = _decode(record)
    rng = np.random.default_rng([self.seed, epoch, position])
    if self.dataset == "cifar10":
      img = _cifar_crop(img, self.size, rng) if self.train else _resize(img, self.size, self.size)
    elif self.train:
      img = _random_resized_crop(img, self.size, rng)
    else:
      img = _center_crop(img, self.size)
    if self.train and rng.random() < 0.5:
      img = img[:, ::-1]
    _, _, _, mean, std = DATASETS[self.dataset]
    x = (img.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x, label


class _TrainExamples:
  """This process's examples of global batches ``start, start+1, …`` (a grain source).

  Element ``k`` is row ``rows[k % local]`` of global batch ``start + k // local``.
  """

  def __init__(self, source, preprocess, batch_size, rows, start, num_steps):
    self.source, self.preprocess = source, preprocess
    self.batch_size, self.rows = batch_size, list(rows)
    self.start, self.num_steps = start, num_steps
    self.steps_per_epoch = len(source) // batch_size
    self._perm: tuple[int, np.ndarray] | None = None

  def __len__(self) -> int:
    return (self.num_steps - self.start) * len(self.rows)

  def __getitem__(self, k: int) -> tuple[np.ndarray, int]:
    step = self.start + k // len(self.rows)
    epoch, batch = divmod(step, self.steps_per_epoch)
    if self._perm is None or self._perm[0] != epoch:
      self._perm = (
        epoch,
        np.random.default_rng([self.preprocess.seed, epoch]).permutation(len(self.source)),
      )
    position = batch * self.batch_size + self.rows[k % len(self.rows)]
    return self.preprocess(self.source[int(self._perm[1][position])], epoch, position)


def _stack(examples) -> tuple[np.ndarray, np.ndarray]:
  return np.stack([x for x, _ in examples]), np.asarray([y for _, y in examples], np.int32)


class RecordIterator:
  """Checkpointable iterator over this process's rows of the global training batches.

  Args:
    source: random-access records (:func:`experiments.records.open_source`).
    preprocess: the training :class:`Preprocess`.
    batch_size: the global batch size.
    rows: the rows of each global batch this process loads (its devices' rows).
    num_steps: the run's number of steps (the iterator ends there).
    num_workers: grain worker processes (0: threads only).
    num_threads: grain reader threads per process.
  """

  def __init__(self, source, preprocess, batch_size, rows, num_steps, num_workers=0, num_threads=8):
    if len(source) < batch_size:
      raise ValueError(
        f"config.batch_size={batch_size} is larger than the {len(source)} training records."
      )
    self.source, self.preprocess, self.batch_size = source, preprocess, batch_size
    self.rows, self.num_steps = list(rows), int(num_steps)
    self.num_workers, self.num_threads = int(num_workers), int(num_threads)
    self.steps_per_epoch = len(source) // batch_size
    self.step = 0
    self._it: Iterator | None = None

  def _start(self) -> Iterator:
    import grain  # pylint: disable=g-import-not-at-top

    examples = _TrainExamples(
      self.source, self.preprocess, self.batch_size, self.rows, self.step, self.num_steps
    )
    ds = grain.MapDataset.source(examples).batch(len(self.rows), batch_fn=_stack)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=2))
    if self.num_workers:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
    return iter(ds)

  def get_state(self) -> dict[str, int]:
    """The position of the next batch, ``{"epoch": e, "batch": b}``."""
    epoch, batch = divmod(self.step, self.steps_per_epoch)
    return {"epoch": int(epoch), "batch": int(batch)}

  def set_state(self, state: dict[str, int]) -> None:
    """Moves to a position produced by :meth:`get_state`."""
    self.step = int(state["epoch"]) * self.steps_per_epoch + int(state["batch"])
    self._it = None

  def __iter__(self) -> RecordIterator:
    return self

  def __next__(self) -> tuple[np.ndarray, np.ndarray]:
    if self._it is None:
      self._it = self._start()
    batch = next(self._it)
    self.step += 1
    return batch


@dataclasses.dataclass(frozen=True)
class RecordDataset:
  """A tfds image dataset on disk: what the driver needs before training starts."""

  name: str
  input_shape: tuple[int, int, int]
  num_classes: int
  train_size: int
  eval_source: Any
  eval_preprocess: Preprocess
  num_threads: int = 8

  @property
  def eval_size(self) -> int:
    """Number of evaluation examples."""
    return len(self.eval_source)

  def eval_batches(self, batch_size: int, rows) -> Iterator[tuple[np.ndarray, ...]]:
    """This process's rows of every global eval batch: ``(x, y, weight)``; padding weighs 0.

    Args:
      batch_size: the global eval batch (0: the whole eval split in one batch).
      rows: the rows of each global batch this process loads.
    """
    import grain  # pylint: disable=g-import-not-at-top

    examples = _EvalExamples(self, batch_size or len(self.eval_source), list(rows))
    ds = grain.MapDataset.source(examples).batch(len(examples.rows), batch_fn=_stack3)
    yield from ds.to_iter_dataset(
      grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=2)
    )


class _EvalExamples:
  """Row ``rows[k % local]`` of global eval batch ``k // local`` (zeros past the end)."""

  def __init__(self, ds: RecordDataset, batch_size: int, rows: list[int]):
    self.ds, self.batch_size, self.rows = ds, batch_size, rows
    self.num_batches = -(-len(ds.eval_source) // batch_size)

  def __len__(self) -> int:
    return self.num_batches * len(self.rows)

  def __getitem__(self, k: int) -> tuple[np.ndarray, int, float]:
    pos = (k // len(self.rows)) * self.batch_size + self.rows[k % len(self.rows)]
    if pos >= len(self.ds.eval_source):
      return np.zeros(self.ds.input_shape, np.float32), 0, 0.0
    x, y = self.ds.eval_preprocess(self.ds.eval_source[pos], 0, pos)
    return x, y, 1.0


def _stack3(examples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  x, y, w = zip(*examples, strict=True)
  return np.stack(x), np.asarray(y, np.int32), np.asarray(w, np.float32)


def load(config, rows) -> tuple[RecordDataset, RecordIterator]:
  """The dataset of ``config.dataset`` in ``config.data.dir`` and its training iterator."""
  train_split, eval_split, classes, _, _ = DATASETS[config.dataset]
  d = config.data
  size = int(d.image_size)
  train = records.open_source(records.find_shards(d.dir, train_split))
  eval_source = records.open_source(records.find_shards(d.dir, eval_split))
  if len(train) == 0 or len(eval_source) == 0:
    raise ValueError(
      f"config.data.dir={d.dir!r}: the {train_split}/{eval_split} shards hold no records."
    )
  seed = int(config.seed)
  ds = RecordDataset(
    name=config.dataset,
    input_shape=(size, size, 3),
    num_classes=classes,
    train_size=len(train),
    eval_source=eval_source,
    eval_preprocess=Preprocess(config.dataset, size, train=False, seed=seed),
    num_threads=int(d.num_threads),
  )
  it = RecordIterator(
    train,
    Preprocess(config.dataset, size, train=True, seed=seed),
    int(config.batch_size),
    rows,
    int(config.num_train_steps),
    num_workers=int(d.num_workers),
    num_threads=int(d.num_threads),
  )
  return ds, it
