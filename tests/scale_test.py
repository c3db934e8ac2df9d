"""The pieces of the published setups, fast: record formats, the grain pipeline, the models,
the configs and the dry FLOP count (the 3-step runs are in ``scale_configs_test.py``).
"""

from __future__ import annotations

import functools
import pickle
import struct

import numpy as np
import pytest

from experiments import input_pipeline, records, throughput, vision_models
from experiments.configs import resnet18_cifar10, resnet50_imagenet, vit_s16_imagenet

# --------------------------------------------------------------------------------------
# tf.train.Example and TFRecord, checked against protobuf itself.
# --------------------------------------------------------------------------------------


def _example_class():
  """``tensorflow.Example`` built from its .proto definition with protobuf (no TensorFlow)."""
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

  f = descriptor_pb2.FileDescriptorProto(name="ex.proto", package="tensorflow", syntax="proto3")
  fd = descriptor_pb2.FieldDescriptorProto
  rep, opt = fd.LABEL_REPEATED, fd.LABEL_OPTIONAL

  def message(name, fields, nested=()):
    m = f.message_type.add(name=name)
    for fname, number, label, ftype, type_name in fields:
      field = m.field.add(name=fname, number=number, label=label, type=ftype)
      if type_name:
        field.type_name = type_name
    for n in nested:
      m.nested_type.add().CopyFrom(n)
    return m

  message("BytesList", [("value", 1, rep, fd.TYPE_BYTES, None)])
  message("FloatList", [("value", 1, rep, fd.TYPE_FLOAT, None)])
  message("Int64List", [("value", 1, rep, fd.TYPE_INT64, None)])
  feature = message(
    "Feature",
    [
      ("bytes_list", 1, opt, fd.TYPE_MESSAGE, ".tensorflow.BytesList"),
      ("float_list", 2, opt, fd.TYPE_MESSAGE, ".tensorflow.FloatList"),
      ("int64_list", 3, opt, fd.TYPE_MESSAGE, ".tensorflow.Int64List"),
    ],
  )
  feature.oneof_decl.add(name="kind")
  for field in feature.field:
    field.oneof_index = 0
  entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
  entry.field.add(name="key", number=1, label=opt, type=fd.TYPE_STRING)
  entry.field.add(
    name="value", number=2, label=opt, type=fd.TYPE_MESSAGE, type_name=".tensorflow.Feature"
  )
  entry.options.map_entry = True
  message(
    "Features",
    [("feature", 1, rep, fd.TYPE_MESSAGE, ".tensorflow.Features.FeatureEntry")],
    nested=[entry],
  )
  message("Example", [("features", 1, opt, fd.TYPE_MESSAGE, ".tensorflow.Features")])
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def test_example_codec_agrees_with_protobuf():
  example_cls = _example_class()
  ex = example_cls()
  ex.features.feature["image"].bytes_list.value.append(b"\x89PNG...")
  ex.features.feature["label"].int64_list.value.extend([7, -3, 2**40])
  ex.features.feature["score"].float_list.value.extend([0.5, -1.25])
  parsed = records.parse_example(ex.SerializeToString())
  assert parsed["image"] == [b"\x89PNG..."]
  np.testing.assert_array_equal(parsed["label"], [7, -3, 2**40])
  np.testing.assert_array_equal(parsed["score"], np.float32([0.5, -1.25]))
  ours = records.encode_example({"image": b"abc", "label": 5, "score": [0.25]})
  back = example_cls.FromString(ours)
  assert list(back.features.feature["image"].bytes_list.value) == [b"abc"]
  assert list(back.features.feature["label"].int64_list.value) == [5]
  assert list(back.features.feature["score"].float_list.value) == [0.25]


def test_tfrecord_framing_and_random_access(tmp_path):
  crc = 0xFFFFFFFF
  for b in b"123456789":
    crc = records._CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  assert crc ^ 0xFFFFFFFF == 0xE3069283  # the CRC-32C check value
  path = str(tmp_path / "x.tfrecord-00000-of-00001")
  data = [b"", b"a", b"record number three" * 50]
  records.write_tfrecord(path, data)
  raw = open(path, "rb").read()
  (length,) = struct.unpack("<Q", raw[:8])
  assert length == 0 and struct.unpack("<I", raw[8:12])[0] == records._masked_crc(raw[:8])
  source = records.TFRecordSource([path, path])
  assert len(source) == 6 and [source[i] for i in (0, 2, 5)] == [b"", data[2], data[2]]
  clone = pickle.loads(pickle.dumps(source))  # grain workers get a copy
  assert clone[4] == b"a"


def test_find_shards_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match=r"config.data.dir=.* is not a directory"):
    records.find_shards(str(tmp_path / "missing"), "train")
  with pytest.raises(ValueError, match=r"config.data.dir=.* has no records for split 'train'"):
    records.find_shards(str(tmp_path), "train")
  records.write_split(str(tmp_path), "toy", "train", [{"label": 1}] * 3, num_shards=3)
  (tmp_path / "toy-train.tfrecord-00001-of-00003").unlink()
  with pytest.raises(ValueError, match=r"has 2 of its 3 shards"):
    records.find_shards(str(tmp_path), "train")


# --------------------------------------------------------------------------------------
# The grain pipeline.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", name="cifar_dirs")
def fixture_cifar_dirs(tmp_path_factory):
  out = {}
  for fmt in records.FORMATS:
    d = str(tmp_path_factory.mktemp(f"cifar_{fmt}"))
    records.write_synthetic(
      d, "cifar10", splits={"train": 20, "test": 7}, num_classes=10, file_format=fmt
    )
    out[fmt] = d
  return out


def _iterator(directory, rows, steps=4):
  config = resnet18_cifar10.get_config("smoke")
  config.data.dir = directory
  config.num_train_steps = 10
  ds, it = input_pipeline.load(config, rows)
  return ds, it, [next(it) for _ in range(steps)]


def test_batches_are_the_same_whatever_the_split_by_process(cifar_dirs):
  _, _, whole = _iterator(cifar_dirs["tfrecord"], range(8))
  _, _, first = _iterator(cifar_dirs["tfrecord"], range(4))
  _, _, second = _iterator(cifar_dirs["tfrecord"], range(4, 8))
  for (x, y), (x0, y0), (x1, y1) in zip(whole, first, second, strict=True):
    assert x.shape == (8, 32, 32, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x, np.concatenate([x0, x1]))
    np.testing.assert_array_equal(y, np.concatenate([y0, y1]))
  # 20 records, batch 8: 2 steps per epoch; epoch 1 is another permutation.
  assert not np.array_equal(whole[0][1], whole[2][1]) or not np.array_equal(
    whole[0][0], whole[2][0]
  )
  _, _, array_record = _iterator(cifar_dirs["array_record"], range(8))
  for (x, y), (xa, ya) in zip(whole, array_record, strict=True):  # same data, other format
    np.testing.assert_array_equal(x, xa)
    np.testing.assert_array_equal(y, ya)


def test_record_iterator_resumes_exactly(cifar_dirs):
  _, it, batches = _iterator(cifar_dirs["tfrecord"], range(8), steps=2)
  state = it.get_state()
  assert state == {"epoch": 1, "batch": 0}
  third = next(it)
  _, fresh, _ = _iterator(cifar_dirs["tfrecord"], range(8), steps=0)
  fresh.set_state(state)
  again = next(fresh)
  np.testing.assert_array_equal(third[0], again[0])
  np.testing.assert_array_equal(third[1], again[1])
  assert not np.array_equal(batches[0][0], third[0])


def test_eval_batches_cover_the_split_once_with_padding(cifar_dirs):
  ds, _, _ = _iterator(cifar_dirs["tfrecord"], range(8), steps=0)
  assert ds.eval_size == 7
  batches = list(ds.eval_batches(4, range(4)))
  assert [b[0].shape[0] for b in batches] == [4, 4]
  np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), [1] * 7 + [0])
  halves = [list(ds.eval_batches(4, rows)) for rows in (range(2), range(2, 4))]
  for b, h0, h1 in zip(batches, *halves, strict=True):
    np.testing.assert_array_equal(b[0], np.concatenate([h0[0], h1[0]]))


def test_imagenet_preprocessing_shapes(tmp_path):
  records.write_synthetic(
    str(tmp_path),
    "imagenet2012",
    splits={"train": 4, "validation": 3},
    num_classes=1000,
    image_shape=(37, 53),
    image_format="JPEG",
  )
  config = resnet50_imagenet.get_config("smoke")
  config.data.dir = str(tmp_path)
  config.batch_size = 4
  ds, it = input_pipeline.load(config, range(4))
  x, y = next(it)
  assert x.shape[1:] == (32, 32, 3) and y.dtype == np.int32 and np.all(y < 1000)
  assert abs(float(x.mean())) < 3 and ds.num_classes == 1000


# --------------------------------------------------------------------------------------
# Models and the dry FLOP count.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("name", "shape", "classes", "params", "gflops"),
  [
    ("resnet50", (224, 224, 3), 1000, 25_557_032, 8.178),  # RigL: 8.2e9 FLOPs
    ("resnet18_cifar", (32, 32, 3), 10, 11_173_962, 1.111),
    ("vit_s16", (224, 224, 3), 1000, 22_050_664, 9.198),
  ],
)
def test_models_have_the_published_sizes(name, shape, classes, params, gflops):
  from flax import nnx

  import sparsejax as sj

  model = nnx.eval_shape(lambda: vision_models.create(name, shape, classes, rngs=nnx.Rngs(0)))
  assert vision_models.param_count(model) == params
  leaves = dict(sj.metrics.sparse_leaves(nnx.state(model, nnx.Param)))
  positions = model.kernel_positions()
  assert set(positions) == {p for p, x in leaves.items() if x.ndim > 1}
  flops = sum(2 * n * np.prod(leaves[p].shape) for p, n in positions.items())
  assert (flops + model.extra_flops()) / 1e9 == pytest.approx(gflops, abs=1e-3)


def test_batch_norm_models_train_and_evaluate():
  import jax
  import jax.numpy as jnp
  from flax import nnx

  create = functools.partial(
    vision_models.ResNet,
    (8, 8, 3),
    10,
    stages=(1, 1),
    bottleneck=True,
    cifar_stem=False,
    zero_init_residual=True,
    head_std=0.01,
  )
  model = nnx.jit(lambda: create(rngs=nnx.Rngs(0)))()  # one compiled init, not one per op
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  forward = nnx.jit(lambda m, x: m(x))
  before = jnp.array(model.stem_norm.mean[...])
  assert forward(model, x).shape == (4, 10)
  assert not np.allclose(model.stem_norm.mean[...], before)  # train mode: statistics move
  model.eval()
  after = jnp.array(model.stem_norm.mean[...])
  forward(model, x)
  np.testing.assert_array_equal(model.stem_norm.mean[...], after)


def test_dry_flop_count_reproduces_rigl_resnet50_numbers():
  config = resnet50_imagenet.get_config()
  count = throughput.flop_count(config)
  assert count["forward_dense"] / 1e9 == pytest.approx(8.2, abs=0.05)  # RigL: 8.2e9
  # RigL's README: ERK at 90% costs 0.24x the dense FLOPs.
  assert count["forward_sparse"] / count["forward_dense"] == pytest.approx(0.24, abs=0.005)
  assert count["step_dense"] == pytest.approx(3 * count["forward_dense"] * 4096)
  t = throughput.expected_step_time(count["step_dense"], 64, throughput.ACCELERATORS["tpu_v4"])
  assert t == pytest.approx(count["step_dense"] / (64 * 275e12 * 0.4))
  text = throughput.report(config, 64, "tpu_v4", 0.4)
  assert "ms/step" in text and "examples/s" in text
  with pytest.raises(ValueError, match="--accelerator"):
    throughput.report(config, 8, "abacus", 0.4)


# --------------------------------------------------------------------------------------
# The configs.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("module", "numbers"),
  [
    (resnet50_imagenet, ("73.07", "72.71")),
    (resnet18_cifar10, ("95.11", "95.06")),
    (vit_s16_imagenet, ("none published", "76.0")),
  ],
)
def test_configs_state_their_targets_and_validate(module, numbers):
  from experiments import config_lib

  for n in numbers:
    assert n in module.__doc__, (module.__name__, n)
  for target in module.TARGETS.values():
    assert f"{target:.2f}" in module.__doc__
  config_lib.validate_config(module.get_config())
  config_lib.validate_config(module.get_config("smoke"))


def test_resnet50_schedule_is_rigls():
  from experiments import builders

  config = resnet50_imagenet.get_config()
  lr = builders.learning_rate_schedule(config, config.num_train_steps)
  epoch = resnet50_imagenet.EPOCH
  assert float(lr(0)) == 0.0 and float(lr(round(5 * epoch))) == pytest.approx(1.6)
  for e, value in ((29, 1.6), (31, 0.16), (69, 0.16), (71, 0.016), (91, 0.0016)):
    assert float(lr(round(e * epoch))) == pytest.approx(value, rel=1e-5), e
  assert builders.dst_end_step(config, config.num_train_steps) == 25_000
