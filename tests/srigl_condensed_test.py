"""End to end: models trained with SRigL, exported condensed, give the masked model's outputs."""

import jax
import numpy as np
import optax
from flax import nnx

import sparsejax as sj


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(64, 128, rngs=rngs)
    self.l2 = nnx.Linear(128, 64, rngs=rngs)
    self.out = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))


class CNN(nnx.Module):
  def __init__(self, rngs):
    self.c1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.c2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
    self.out = nnx.Linear(4 * 4 * 32, 10, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.c2(jax.nn.relu(self.c1(x))))
    return self.out(h.reshape(h.shape[0], -1))


def _train_srigl(model, x, y, steps=12, **kwargs):
  tx = sj.srigl(
    optax.adam(3e-3),
    sparsity=0.9,
    distribution="uniform",
    update_every=3,
    end_step=100,
    gamma_sal=0.9,
    last_layer="^out/",  # the output layer is never ablated
    **kwargs,
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx.update(model, sj.apply_masks(nnx.state(model, nnx.Param), optimizer.opt_state))

  @nnx.jit
  def step(model, optimizer):
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    optimizer.update(model, nnx.grad(loss)(model))

  for _ in range(steps):
    step(model, optimizer)
  return sj.get_masks(optimizer, nnx.state(model, nnx.Param))


def _data(shape):
  kx, ky = jax.random.split(jax.random.PRNGKey(0))
  return jax.random.normal(kx, shape), jax.random.randint(ky, (shape[0],), 0, 10)


def test_mlp_trained_with_srigl_condensed_outputs_match():
  x, y = _data((32, 64))
  model = MLP(nnx.Rngs(0))
  masks = _train_srigl(model, x, y)
  h = x
  for name in ("l1", "l2", "out"):
    layer = getattr(model, name)
    c = sj.condense(layer.kernel[...], masks[name]["kernel"], layer.bias[...])
    np.testing.assert_array_equal(
      sj.condensed.uncondense(c), layer.kernel[...] * masks[name]["kernel"]
    )
    h = sj.condensed_matmul(h, c)
    if name != "out":
      h = jax.nn.relu(h)
  np.testing.assert_allclose(h, model(x), rtol=1e-5, atol=1e-5)


def test_cnn_trained_with_srigl_condensed_outputs_match():
  x, y = _data((8, 8, 8, 1))
  model = CNN(nnx.Rngs(1))
  masks = _train_srigl(model, x, y, overrides={"c1": 0.6})  # fan-in 9: k = 57 // 16 = 3
  h = x
  for name, stride in (("c1", (1, 1)), ("c2", (2, 2))):
    layer = getattr(model, name)
    c = sj.condense(layer.kernel[...], masks[name]["kernel"], layer.bias[...])
    h = jax.nn.relu(sj.condensed.condensed_conv(h, c, strides=stride, padding="SAME"))
  c = sj.condense(model.out.kernel[...], masks["out"]["kernel"], model.out.bias[...])
  h = sj.condensed_matmul(h.reshape(h.shape[0], -1), c)
  np.testing.assert_allclose(h, model(x), rtol=1e-5, atol=1e-5)
