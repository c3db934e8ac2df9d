"""Flax NNX models of the published setups: ResNet-18 (CIFAR), ResNet-50 (ImageNet), ViT-S/16.

* :class:`ResNet` ``"resnet50"``: ResNet-50 v1.5 as in the Cloud TPU / TF reference the
  RigL ImageNet code builds on: 7×7/2 stem, 3×3/2 max-pool, bottleneck blocks ``[3, 4, 6,
  3]`` with the stride on the 3×3 convolution, batch norm (decay 0.9, ε 1e-5) with the last
  scale of every block initialised to zero, a Dense head initialised with N(0, 0.01²); the
  convolutions are initialised He-normal (truncated, fan-in) in both ResNets.
* :class:`ResNet` ``"resnet18_cifar"``: the CIFAR ResNet-18 of the SRigL code
  (kuangliu/pytorch-cifar, ``rigl_torch/models/resnet.py``): a 3×3/1 stem without max-pool,
  basic blocks ``[2, 2, 2, 2]``, widths 64-512, global average pool, Dense head.
* :class:`ViT` ``"vit_s16"``: ViT-S/16 (width 384, depth 12, 6 heads, MLP 1536, a class
  token, learned position embeddings, pre-norm blocks). The attention projections are plain
  ``[in, out]`` kernels (``qkv`` ``[384, 1152]`` and ``proj``), so sparsejax's structures
  see their contraction axis first, as for any Dense layer. The class token and the
  position embeddings are stored flat (1-D), so the DST allocation, which treats
  ``ndim > 1`` params as kernels, keeps them dense.

Padding is explicit and symmetric (``(k - 1) // 2`` before, the rest after), as in the TF
reference's ``fixed_padding``, so outputs do not depend on XLA's "SAME" rule.

Every model has ``kernel_positions()`` (the output positions each kernel is applied at, in
the order the forward pass applies them: stem first, head last) and ``extra_flops()`` (the
forward FLOPs per example that no kernel accounts for: the attention products of a ViT).
BatchNorm models switch to their running averages with ``model.eval()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

MODEL_NAMES = ("resnet18_cifar", "resnet50", "vit_s16")

_HE = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


def _pad(k: int) -> tuple[int, int]:
  return ((k - 1) // 2, k - 1 - (k - 1) // 2)


def _out(size: int, k: int, stride: int) -> int:
  """Output size of a convolution with :func:`_pad` padding."""
  return (size + k - 1 - k) // stride + 1


def _conv(cin: int, cout: int, k: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(
    cin,
    cout,
    (k, k),
    strides=(stride, stride),
    padding=(_pad(k), _pad(k)),
    use_bias=False,
    kernel_init=_HE,
    rngs=rngs,
  )


def _bn(features: int, rngs: nnx.Rngs, *, zero: bool = False) -> nnx.BatchNorm:
  init = nnx.initializers.zeros_init() if zero else nnx.initializers.ones_init()
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, scale_init=init, rngs=rngs)


class Block(nnx.Module):
  """A residual block: basic (two 3×3) or bottleneck (1×1, 3×3 strided, 1×1 ×4).

  Args:
    cin: input channels.
    width: the block's width (output channels: ``width``, or ``4 · width`` for a bottleneck).
    stride: the block's stride.
    bottleneck: bottleneck or basic block.
    zero_init: initialise the last batch-norm scale to 0 (the block starts as the identity).
    rngs: NNX random streams.
  """

  def __init__(self, cin, width, stride, *, bottleneck, zero_init, rngs):
    cout = 4 * width if bottleneck else width
    if bottleneck:
      specs = [(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)]
    else:
      specs = [(cin, width, 3, stride), (width, cout, 3, 1)]
    self.convs = nnx.List([_conv(a, b, k, s, rngs) for a, b, k, s in specs])
    last = len(specs) - 1
    self.norms = nnx.List(
      [_bn(b, rngs, zero=zero_init and i == last) for i, (_, b, _, _) in enumerate(specs)]
    )
    self.kernel_sizes = tuple(k for _, _, k, _ in specs)
    self.strides = tuple(s for _, _, _, s in specs)
    self.has_shortcut = stride != 1 or cin != cout
    if self.has_shortcut:
      self.shortcut = _conv(cin, cout, 1, stride, rngs)
      self.shortcut_norm = _bn(cout, rngs)
    self.cout = cout

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
      h = norm(conv(h))
      if i < len(self.convs) - 1:
        h = nnx.relu(h)
    skip = self.shortcut_norm(self.shortcut(x)) if self.has_shortcut else x
    return nnx.relu(h + skip)

  def positions(self, prefix: str, hw: tuple[int, int]) -> tuple[dict[str, int], tuple[int, int]]:
    """``kernel_positions`` entries of this block and its output size."""
    out, (h, w) = {}, hw
    for i, (k, s) in enumerate(zip(self.kernel_sizes, self.strides, strict=True)):
      h, w = _out(h, k, s), _out(w, k, s)
      out[f"{prefix}/convs/{i}/kernel"] = h * w
    if self.has_shortcut:
      out[f"{prefix}/shortcut/kernel"] = h * w
    return out, (h, w)


class ResNet(nnx.Module):
  """ResNet with an ImageNet (7×7/2 + max-pool) or a CIFAR (3×3/1) stem.

  Args:
    input_shape: ``(height, width, channels)``.
    num_classes: number of logits.
    stages: blocks per stage (``[3, 4, 6, 3]`` for ResNet-50, ``[2, 2, 2, 2]`` for -18).
    bottleneck: bottleneck blocks (ResNet-50) or basic blocks (ResNet-18).
    cifar_stem: 3×3/1 stem without max-pool.
    zero_init_residual: zero the last batch-norm scale of every block.
    head_std: std of the head's normal init (None: Flax's default Dense init).
    rngs: NNX random streams.
  """

  def __init__(
    self,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    stages: Sequence[int],
    bottleneck: bool,
    cifar_stem: bool,
    zero_init_residual: bool,
    head_std: float | None,
    rngs: nnx.Rngs,
  ):
    if len(input_shape) != 3:
      raise ValueError(f"ResNet expects input_shape (height, width, channels); got {input_shape}.")
    self.input_shape = tuple(int(d) for d in input_shape)
    self.cifar_stem = cifar_stem
    k, s = (3, 1) if cifar_stem else (7, 2)
    self.stem = _conv(self.input_shape[2], 64, k, s, rngs)
    self.stem_norm = _bn(64, rngs)
    blocks, cin = [], 64
    for i, n in enumerate(stages):
      stage = []
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        block = Block(
          cin, 64 * 2**i, stride, bottleneck=bottleneck, zero_init=zero_init_residual, rngs=rngs
        )
        stage.append(block)
        cin = block.cout
      blocks.append(nnx.List(stage))
    self.stages = nnx.List(blocks)
    init = nnx.initializers.normal(head_std) if head_std else nnx.initializers.lecun_normal()
    self.head = nnx.Linear(cin, num_classes, kernel_init=init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem_norm(self.stem(x)))
    if not self.cifar_stem:
      x = jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
      )
    for stage in self.stages:
      for block in stage:
        x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))

  def kernel_positions(self) -> dict[str, int]:
    """Output positions per kernel, stem first, head last."""
    h, w = self.input_shape[:2]
    k, s = (3, 1) if self.cifar_stem else (7, 2)
    h, w = _out(h, k, s), _out(w, k, s)
    out = {"stem/kernel": h * w}
    if not self.cifar_stem:
      h, w = _out(h, 3, 2), _out(w, 3, 2)
    for i, stage in enumerate(self.stages):
      for j, block in enumerate(stage):
        entries, (h, w) = block.positions(f"stages/{i}/{j}", (h, w))
        out.update(entries)
    out["head/kernel"] = 1
    return out

  def extra_flops(self) -> int:
    """No FLOPs beyond the kernels' worth counting (norms, pooling are O(activations))."""
    return 0


class EncoderBlock(nnx.Module):
  """A pre-norm transformer block: LN, multi-head self-attention, LN, GELU MLP."""

  def __init__(self, dim: int, heads: int, mlp_dim: int, rngs: nnx.Rngs):
    xavier = nnx.initializers.xavier_uniform()
    small = nnx.initializers.normal(1e-6)
    self.heads = heads
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, kernel_init=xavier, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, kernel_init=xavier, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp_dim, kernel_init=xavier, bias_init=small, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, dim, kernel_init=xavier, bias_init=small, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    shape = (b, n, self.heads, d // self.heads)
    attn = jax.nn.dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape))
    x = x + self.proj(attn.reshape(b, n, d))
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x)), approximate=False))


class ViT(nnx.Module):
  """Vision Transformer with a class token (ViT-S/16: width 384, depth 12, 6 heads).

  Args:
    input_shape: ``(height, width, channels)``; height and width divisible by ``patch``.
    num_classes: number of logits.
    patch: patch size.
    dim: width.
    depth: number of blocks.
    heads: attention heads.
    mlp_dim: MLP width.
    rngs: NNX random streams.
  """

  def __init__(self, input_shape, num_classes, *, patch, dim, depth, heads, mlp_dim, rngs):
    h, w, c = (int(d) for d in input_shape)
    if h % patch or w % patch:
      raise ValueError(f"ViT: image size {(h, w)} is not divisible by the patch size {patch}.")
    self.input_shape, self.patch, self.dim = (h, w, c), patch, dim
    self.tokens = (h // patch) * (w // patch) + 1
    self.patch_embed = nnx.Conv(
      c, dim, (patch, patch), strides=(patch, patch), padding="VALID", rngs=rngs
    )
    # Flat (1-D): the DST allocation keeps them dense (it sparsifies ndim > 1 params).
    self.cls_token = nnx.Param(jnp.zeros((dim,)))
    self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (self.tokens * dim,)))
    self.blocks = nnx.List([EncoderBlock(dim, heads, mlp_dim, rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
    self.mlp_dim, self.depth = mlp_dim, depth

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.patch_embed(x)
    b = x.shape[0]
    x = x.reshape(b, -1, self.dim)
    cls = jnp.broadcast_to(self.cls_token[...].reshape(1, 1, self.dim), (b, 1, self.dim))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].reshape(1, self.tokens, self.dim)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)[:, 0])

  def kernel_positions(self) -> dict[str, int]:
    """Patch embedding at every patch; block kernels at every token; the head once."""
    out = {"patch_embed/kernel": self.tokens - 1}
    for i in range(self.depth):
      for name in ("qkv", "proj", "fc1", "fc2"):
        out[f"blocks/{i}/{name}/kernel"] = self.tokens
    out["head/kernel"] = 1
    return out

  def extra_flops(self) -> int:
    """Attention products per example: ``QKᵀ`` and ``AV``, 2·n²·d FLOPs each, per block."""
    return self.depth * 2 * 2 * self.tokens**2 * self.dim


def create(name: str, input_shape: Sequence[int], num_classes: int, *, rngs: nnx.Rngs):
  """Builds ``"resnet18_cifar"``, ``"resnet50"`` or ``"vit_s16"``."""
  if name == "resnet50":
    return ResNet(
      input_shape,
      num_classes,
      stages=(3, 4, 6, 3),
      bottleneck=True,
      cifar_stem=False,
      zero_init_residual=True,
      head_std=0.01,
      rngs=rngs,
    )
  if name == "resnet18_cifar":
    return ResNet(
      input_shape,
      num_classes,
      stages=(2, 2, 2, 2),
      bottleneck=False,
      cifar_stem=True,
      zero_init_residual=False,
      head_std=None,
      rngs=rngs,
    )
  if name == "vit_s16":
    return ViT(
      input_shape, num_classes, patch=16, dim=384, depth=12, heads=6, mlp_dim=1536, rngs=rngs
    )
  raise ValueError(f"Unknown vision model {name!r}; allowed: {', '.join(MODEL_NAMES)}.")


def param_count(model: nnx.Module) -> int:
  """Number of ``nnx.Param`` elements."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
