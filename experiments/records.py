"""On-disk record formats of tfds-prepared datasets: TFRecord and ArrayRecord of tf.train.Example.

``tensorflow_datasets`` writes a prepared dataset as shards named
``<name>-<split>.<format>-<shard>-of-<count>`` (e.g. ``imagenet2012-train.tfrecord-00000-of-01024``
or ``cifar10-test.array_record-00000-of-00001``) in ``<data_dir>/<name>/<version>/``. Each
record is a serialized ``tf.train.Example`` whose ``image`` feature holds the encoded (PNG or
JPEG) image and ``label`` the class index. This module reads those files without TensorFlow:

* :func:`find_shards` lists a split's shards in a directory (and checks that none is missing);
* :class:`TFRecordSource` gives random access to TFRecord shards (an offset index is built by
  reading the 12-byte record headers once); :func:`open_source` picks it or grain's
  ``ArrayRecordDataSource`` from the shard names;
* :func:`parse_example` / :func:`encode_example` decode and encode ``tf.train.Example``
  (protobuf wire format, the three feature kinds);
* :func:`write_split` writes a split in the same layout (tests write tiny synthetic datasets
  with it; it is also the way to turn your own arrays into a dataset the configs can read).
"""

from __future__ import annotations

import glob
import io
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

FORMATS = ("tfrecord", "array_record")
_SHARD = re.compile(
  r"^(?P<name>.+)-(?P<split>[^-.]+)\.(?P<fmt>tfrecord|array_record)-(?P<i>\d+)-of-(?P<n>\d+)$"
)


# --------------------------------------------------------------------------------------
# tf.train.Example (protobuf wire format).
# --------------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if b < 0x80:
      return result, pos
    shift += 7


def _fields(buf: bytes) -> Iterable[tuple[int, int, Any]]:
  """``(field number, wire type, value)``: ints for varints, bytes otherwise."""
  pos, end = 0, len(buf)
  while pos < end:
    key, pos = _varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 2:
      n, pos = _varint(buf, pos)
      value, pos = buf[pos : pos + n], pos + n
    elif wire in (1, 5):
      size = 8 if wire == 1 else 4
      value, pos = buf[pos : pos + size], pos + size
    else:
      raise ValueError(f"Not a tf.train.Example: wire type {wire} at byte {pos}.")
    yield field, wire, value


def _int64(v: int) -> int:
  return v - (1 << 64) if v >= 1 << 63 else v


def _feature(buf: bytes) -> Any:
  """A ``Feature``: a list of bytes, a float32 array or an int64 array."""
  for kind, _, payload in _fields(buf):
    values: list[Any] = []
    for _, wire, v in _fields(payload):
      if kind == 1:
        values.append(bytes(v))
      elif kind == 2:
        values.extend(struct.unpack(f"<{len(v) // 4}f", v))
      elif kind == 3 and wire == 0:
        values.append(_int64(v))
      elif kind == 3:
        p = 0
        while p < len(v):
          x, p = _varint(v, p)
          values.append(_int64(x))
    if kind == 1:
      return values
    return np.asarray(values, np.float32 if kind == 2 else np.int64)
  return []


def parse_example(record: bytes) -> dict[str, Any]:
  """Decodes a serialized ``tf.train.Example`` into ``{name: list[bytes] | np.ndarray}``."""
  out: dict[str, Any] = {}
  for field, _, features in _fields(record):
    if field != 1:
      continue
    for entry_field, _, entry in _fields(features):
      if entry_field != 1:
        continue
      key, value = "", b""
      for f, _, v in _fields(entry):
        if f == 1:
          key = bytes(v).decode("utf-8")
        elif f == 2:
          value = v
      out[key] = _feature(value)
  return out


def _encode_varint(v: int) -> bytes:
  v &= (1 << 64) - 1
  out = bytearray()
  while True:
    b = v & 0x7F
    v >>= 7
    if v:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def encode_example(features: Mapping[str, Any]) -> bytes:
  """Serializes ``{name: bytes | int | float | sequence of them}`` as a ``tf.train.Example``."""
  entries = b""
  for key, value in features.items():
    values = list(value) if isinstance(value, list | tuple | np.ndarray) else [value]
    if all(isinstance(v, bytes) for v in values):
      feature = _field(1, b"".join(_field(1, v) for v in values))
    elif all(isinstance(v, int | np.integer) for v in values):
      feature = _field(3, _field(1, b"".join(_encode_varint(int(v)) for v in values)))
    else:
      feature = _field(2, _field(1, struct.pack(f"<{len(values)}f", *values)))
    entries += _field(1, _field(1, key.encode("utf-8")) + _field(2, feature))
  return _field(1, entries)


# --------------------------------------------------------------------------------------
# TFRecord framing.
# --------------------------------------------------------------------------------------


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def _masked_crc(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_tfrecord(path: str, records: Iterable[bytes]) -> None:
  """Writes a TFRecord file (length, masked CRC32C of the length, data, masked CRC32C)."""
  with open(path, "wb") as f:
    for r in records:
      header = struct.pack("<Q", len(r))
      f.write(header + struct.pack("<I", _masked_crc(header)) + r)
      f.write(struct.pack("<I", _masked_crc(r)))


class TFRecordSource:
  """Random access to the records of TFRecord files (grain ``RandomAccessDataSource``).

  The offsets are found by reading each record's 12-byte header (the data are skipped), once,
  at construction. Reads use ``os.pread`` on descriptors opened lazily per process, so the
  source can be shared by threads and pickled to grain's worker processes.

  Args:
    paths: the TFRecord files, in order.
  """

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)
    self._index: list[tuple[int, int, int]] = []  # (file, data offset, length)
    for i, path in enumerate(self.paths):
      size, pos = os.path.getsize(path), 0
      with open(path, "rb") as f:
        while pos < size:
          header = f.read(12)
          if len(header) < 12:
            raise ValueError(f"{path}: truncated TFRecord header at byte {pos}.")
          (length,) = struct.unpack("<Q", header[:8])
          if pos + 12 + length + 4 > size:
            raise ValueError(f"{path}: truncated TFRecord at byte {pos} (length {length}).")
          self._index.append((i, pos + 12, length))
          pos += 12 + length + 4
          f.seek(pos)
    self._fds: dict[int, int] = {}
    self._pid = os.getpid()

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, index: int) -> bytes:
    file, offset, length = self._index[int(index)]
    if self._pid != os.getpid():  # a forked worker: its own descriptors
      self._fds, self._pid = {}, os.getpid()
    fd = self._fds.get(file)
    if fd is None:
      fd = self._fds[file] = os.open(self.paths[file], os.O_RDONLY)
    return os.pread(fd, length, offset)

  def __getstate__(self) -> dict[str, Any]:
    return {"paths": self.paths, "_index": self._index}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _fds={}, _pid=os.getpid())

  def __repr__(self) -> str:
    return f"TFRecordSource({len(self.paths)} files, {len(self)} records)"


# --------------------------------------------------------------------------------------
# tfds directories.
# --------------------------------------------------------------------------------------


def find_shards(directory: str, split: str, *, field: str = "config.data.dir") -> list[str]:
  """The shard files of ``split`` in ``directory`` (a tfds ``<name>/<version>`` directory).

  Raises:
    ValueError: no such directory, no shard of the split, shards of both formats, or
      missing shards (``-of-N`` with fewer than N files); the message names ``field``.
  """
  if not directory or not os.path.isdir(directory):
    raise ValueError(
      f"{field}={directory!r} is not a directory. Give the tfds directory of the dataset, "
      "e.g. ~/tensorflow_datasets/imagenet2012/5.1.0."
    )
  found: dict[str, list[tuple[int, int, str]]] = {}
  for path in glob.glob(os.path.join(directory, f"*-{split}.*-*-of-*")):
    m = _SHARD.match(os.path.basename(path))
    if m and m["split"] == split:
      found.setdefault(m["fmt"], []).append((int(m["i"]), int(m["n"]), path))
  if not found:
    raise ValueError(
      f"{field}={directory!r} has no records for split {split!r}: expected tfds shards named "
      f"like <name>-{split}.tfrecord-00000-of-00001 or <name>-{split}.array_record-00000-of-"
      "00001 (TFRecord or ArrayRecord of tf.train.Example, as tensorflow_datasets writes)."
    )
  if len(found) > 1:
    raise ValueError(f"{field}={directory!r}: split {split!r} has both {sorted(found)} shards.")
  (shards,) = found.values()
  shards.sort()
  count = shards[0][1]
  if len(shards) != count or [s[0] for s in shards] != list(range(count)):
    raise ValueError(
      f"{field}={directory!r}: split {split!r} has {len(shards)} of its {count} shards "
      "(an incomplete copy?)."
    )
  return [p for _, _, p in shards]


def open_source(paths: Sequence[str]) -> Any:
  """A random-access source of the records: :class:`TFRecordSource` or grain's ArrayRecord."""
  if ".array_record-" in os.path.basename(paths[0]):
    import grain  # pylint: disable=g-import-not-at-top

    return grain.sources.ArrayRecordDataSource(list(paths))
  return TFRecordSource(paths)


def encode_image(image: np.ndarray, fmt: str = "PNG") -> bytes:
  """An ``[h, w, 3]`` uint8 image encoded as PNG or JPEG (as tfds stores images)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format=fmt)
  return buf.getvalue()


def write_split(
  directory: str,
  name: str,
  split: str,
  examples: Iterable[Mapping[str, Any]],
  *,
  file_format: str = "tfrecord",
  num_shards: int = 1,
) -> list[str]:
  """Writes ``examples`` (feature dicts) as tfds shards ``<name>-<split>.<format>-i-of-n``.

  Records are dealt round-robin over the shards. Returns the shard paths.
  """
  if file_format not in FORMATS:
    raise ValueError(f"file_format must be one of {FORMATS}; got {file_format!r}.")
  os.makedirs(directory, exist_ok=True)
  shards: list[list[bytes]] = [[] for _ in range(num_shards)]
  for i, ex in enumerate(examples):
    shards[i % num_shards].append(encode_example(ex))
  paths = []
  for i, records in enumerate(shards):
    path = os.path.join(directory, f"{name}-{split}.{file_format}-{i:05d}-of-{num_shards:05d}")
    if file_format == "tfrecord":
      write_tfrecord(path, records)
    else:
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

      writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
      for r in records:
        writer.write(r)
      writer.close()
    paths.append(path)
  return paths


def write_synthetic(
  directory: str,
  name: str,
  *,
  splits: Mapping[str, int],
  num_classes: int,
  image_shape: tuple[int, int] = (32, 32),
  file_format: str = "tfrecord",
  image_format: str = "PNG",
  num_shards: int = 2,
  seed: int = 0,
) -> None:
  """Writes a tiny random dataset in tfds's layout (tests and smoke runs; no download).

  Args:
    directory: the output directory (a stand-in for ``<data_dir>/<name>/<version>``).
    name: the dataset name in the shard file names (``cifar10``, ``imagenet2012``).
    splits: ``{split: number of examples}``.
    num_classes: labels are drawn from ``[0, num_classes)``.
    image_shape: ``(height, width)`` of the images.
    file_format: ``"tfrecord"`` or ``"array_record"``.
    image_format: ``"PNG"`` (as tfds stores CIFAR) or ``"JPEG"`` (ImageNet).
    num_shards: shards per split.
    seed: the random seed.
  """
  rng = np.random.default_rng(seed)
  for split, n in splits.items():
    examples = [
      {
        "image": encode_image(rng.integers(0, 256, (*image_shape, 3)), image_format),
        "label": int(rng.integers(0, num_classes)),
      }
      for _ in range(n)
    ]
    write_split(directory, name, split, examples, file_format=file_format, num_shards=num_shards)
