"""Small Flax NNX models for the sparsejax experiments.

Three models, all small enough to train on a laptop CPU in seconds to minutes:

* :class:`MLP`: a LeNet-300-100-style multilayer perceptron (any input shape, flattened).
* :class:`CNN1D`: the 1-D convolutional network of the MNIST-1D paper (Greydanus, 2020),
  with configurable width, for ``(length,)`` or ``(length, channels)`` inputs.
* :class:`CNN2D`: a two-convolution network for 8×8 scikit-learn digits.

Every model exposes ``kernel_positions()``: for each kernel path (``"conv1/kernel"``), the
number of positions at which the kernel is applied per example (the product of the output
spatial dimensions; 1 for a Dense layer). :func:`sparsejax.metrics.estimate_flops` uses it
to turn kernel sizes into forward FLOPs. Its keys are in the order the forward pass applies
the kernels (first layer first, output layer last): the experiments pass the first and last
to sparsejax as ``first_layer`` / ``last_layer``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from experiments import vision_models

MODEL_NAMES = ("mlp", "cnn1d", "cnn2d", *vision_models.MODEL_NAMES)


def _conv_out(length: int, stride: int) -> int:
  """Output length of a 'SAME'-padded convolution."""
  return math.ceil(length / stride)


class MLP(nnx.Module):
  """LeNet-300-100-style MLP: flatten, ``len(features)`` ReLU layers, linear classifier.

  Args:
    input_shape: per-example input shape (flattened internally).
    num_classes: number of output logits.
    features: hidden layer widths, LeNet-300-100 is ``(300, 100)``.
    rngs: NNX random streams for initialization.
  """

  def __init__(
    self,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    features: Sequence[int] = (300, 100),
    rngs: nnx.Rngs,
  ):
    self.input_shape = tuple(int(d) for d in input_shape)
    in_features = math.prod(self.input_shape)
    widths = [in_features, *[int(f) for f in features]]
    self.hidden = nnx.List(
      [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    )
    self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for layer in self.hidden:
      x = nnx.relu(layer(x))
    return self.head(x)

  def kernel_positions(self) -> dict[str, int]:
    """Dense kernels are applied once per example."""
    out = {f"hidden/{i}/kernel": 1 for i in range(len(self.hidden))}
    out["head/kernel"] = 1
    return out


class CNN1D(nnx.Module):
  """1-D CNN for MNIST-1D: three strided convolutions and a linear classifier.

  The MNIST-1D paper's ``ConvBase`` uses 25 channels, kernel sizes 5/3/3 and stride 2; here
  the width is configurable (default 64) so that high sparsity still leaves a useful network,
  and padding is ``'SAME'`` (lengths 40 → 20 → 10 → 5).

  Args:
    input_shape: ``(length,)`` or ``(length, channels)``.
    num_classes: number of output logits.
    channels: width of each convolution.
    kernel_sizes: kernel size of each convolution.
    strides: stride of each convolution.
    rngs: NNX random streams for initialization.
  """

  def __init__(
    self,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    channels: int = 64,
    kernel_sizes: Sequence[int] = (5, 3, 3),
    strides: Sequence[int] = (2, 2, 2),
    rngs: nnx.Rngs,
  ):
    if len(input_shape) not in (1, 2):
      raise ValueError(
        f"CNN1D expects input_shape (length,) or (length, channels); got {tuple(input_shape)}."
      )
    if len(kernel_sizes) != len(strides):
      raise ValueError(
        f"kernel_sizes {tuple(kernel_sizes)} and strides {tuple(strides)} must have the "
        "same length."
      )
    self.input_shape = tuple(int(d) for d in input_shape)
    in_ch = self.input_shape[1] if len(self.input_shape) == 2 else 1
    self.strides = tuple(int(s) for s in strides)
    convs = []
    for k, s in zip(kernel_sizes, self.strides, strict=True):
      convs.append(nnx.Conv(in_ch, channels, (int(k),), (s,), padding="SAME", rngs=rngs))
      in_ch = channels
    self.convs = nnx.List(convs)
    length = self.input_shape[0]
    self.lengths = []
    for s in self.strides:
      length = _conv_out(length, s)
      self.lengths.append(length)
    self.head = nnx.Linear(length * channels, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim == 2:
      x = x[..., None]
    for conv in self.convs:
      x = nnx.relu(conv(x))
    return self.head(x.reshape((x.shape[0], -1)))

  def kernel_positions(self) -> dict[str, int]:
    """Each convolution is applied at every output position; the head once."""
    out = {f"convs/{i}/kernel": int(n) for i, n in enumerate(self.lengths)}
    out["head/kernel"] = 1
    return out


class CNN2D(nnx.Module):
  """Small 2-D CNN for 8×8 digits: conv 3×3, strided conv 3×3, Dense, classifier.

  Args:
    input_shape: ``(height, width)`` or ``(height, width, channels)``.
    num_classes: number of output logits.
    channels: widths of the two convolutions.
    hidden: width of the Dense layer before the classifier.
    rngs: NNX random streams for initialization.
  """

  def __init__(
    self,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    channels: Sequence[int] = (32, 64),
    hidden: int = 128,
    rngs: nnx.Rngs,
  ):
    if len(input_shape) not in (2, 3):
      raise ValueError(
        f"CNN2D expects input_shape (height, width[, channels]); got {tuple(input_shape)}."
      )
    if len(channels) != 2:
      raise ValueError(f"CNN2D takes exactly two conv widths; got channels={tuple(channels)}.")
    self.input_shape = tuple(int(d) for d in input_shape)
    in_ch = self.input_shape[2] if len(self.input_shape) == 3 else 1
    c1, c2 = (int(c) for c in channels)
    self.conv1 = nnx.Conv(in_ch, c1, (3, 3), (1, 1), padding="SAME", rngs=rngs)
    self.conv2 = nnx.Conv(c1, c2, (3, 3), (2, 2), padding="SAME", rngs=rngs)
    h, w = self.input_shape[:2]
    self.out_hw = (_conv_out(h, 2), _conv_out(w, 2))
    self.dense = nnx.Linear(self.out_hw[0] * self.out_hw[1] * c2, int(hidden), rngs=rngs)
    self.head = nnx.Linear(int(hidden), num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim == 3:
      x = x[..., None]
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.relu(self.dense(x.reshape((x.shape[0], -1))))
    return self.head(x)

  def kernel_positions(self) -> dict[str, int]:
    """Conv kernels are applied at every output pixel; Dense kernels once."""
    h, w = self.input_shape[:2]
    return {
      "conv1/kernel": h * w,
      "conv2/kernel": self.out_hw[0] * self.out_hw[1],
      "dense/kernel": 1,
      "head/kernel": 1,
    }


def create_model(
  name: str,
  input_shape: Sequence[int],
  num_classes: int,
  *,
  seed: int,
  mlp_features: Sequence[int] = (300, 100),
  cnn_channels: int = 64,
  cnn2d_channels: Sequence[int] = (32, 64),
  cnn2d_hidden: int = 128,
) -> nnx.Module:
  """Builds a model by name.

  Args:
    name: one of ``"mlp"``, ``"cnn1d"``, ``"cnn2d"`` or a published setup's model
      (:mod:`experiments.vision_models`: ``"resnet18_cifar"``, ``"resnet50"``, ``"vit_s16"``).
    input_shape: per-example input shape.
    num_classes: number of output logits.
    seed: initialization seed (``nnx.Rngs(seed)``).
    mlp_features: hidden widths of the MLP.
    cnn_channels: width of the 1-D CNN.
    cnn2d_channels: widths of the 2-D CNN's convolutions.
    cnn2d_hidden: width of the 2-D CNN's Dense layer.

  Returns:
    The NNX model.

  Raises:
    ValueError: ``name`` is not a known model.
  """
  rngs = nnx.Rngs(int(seed))
  if name == "mlp":
    return MLP(input_shape, num_classes, features=tuple(mlp_features), rngs=rngs)
  if name == "cnn1d":
    return CNN1D(input_shape, num_classes, channels=int(cnn_channels), rngs=rngs)
  if name == "cnn2d":
    return CNN2D(
      input_shape, num_classes, channels=tuple(cnn2d_channels), hidden=cnn2d_hidden, rngs=rngs
    )
  if name in vision_models.MODEL_NAMES:
    return vision_models.create(name, input_shape, num_classes, rngs=rngs)
  raise ValueError(f"Unknown config.model={name!r}; allowed values: {', '.join(MODEL_NAMES)}.")


def count_params(model: nnx.Module) -> int:
  """Total number of ``nnx.Param`` elements of ``model``."""
  return int(sum(jnp.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
