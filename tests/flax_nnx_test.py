"""DST through flax.nnx.Optimizer: an NNX MLP trained a few steps stays exactly sparse."""

import jax
import numpy as np
import optax
from flax import nnx

import sparsejax as sj


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(20, 32, rngs=rngs)
    self.out = nnx.Linear(32, 5, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def test_nnx_optimizer_keeps_pruned_weights_zero_through_mask_updates():
  model = MLP(nnx.Rngs(0))
  tx = sj.rigl(optax.adam(1e-2), sparsity=0.8, update_every=2, end_step=20)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, sj.apply_masks(params, optimizer.opt_state))
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 20))
  y = jax.random.randint(jax.random.PRNGKey(1), (64,), 0, 5)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses, changes = [], 0
  for _ in range(8):
    old = np.asarray(sj.get_masks(optimizer)["hidden"]["kernel"])
    losses.append(float(step(model, optimizer)))
    masks = sj.get_masks(optimizer, nnx.state(model, nnx.Param))
    new = np.asarray(masks["hidden"]["kernel"])
    changes += int((old != new).sum())
    assert new.sum() == old.sum()
    for layer in ("hidden", "out"):
      kernel = np.asarray(getattr(model, layer).kernel[...])
      mask = np.asarray(masks[layer]["kernel"])
      assert not kernel[~mask].any()
    assert masks["hidden"]["bias"] is None
  assert changes > 0
  assert losses[-1] < losses[0]
  summary = sj.summarize(nnx.state(model, nnx.Param), optimizer.opt_state)
  assert summary["layers"]["hidden/kernel"]["sparse"]
