"""Sparsity distributions: ERK reproduces the worked numbers of ALGORITHMS.md §1.2."""

import numpy as np
import pytest

import sparsejax as sj

# Flax layout [in, out]; sum/prod of the shape do not depend on the axis order.
LENET = {"l1": (784, 300), "l2": (300, 100), "l3": (100, 10)}
MNIST_CNN = {"c1": (3, 3, 1, 32), "c2": (3, 3, 32, 64), "f1": (9216, 128), "f2": (128, 10)}


@pytest.mark.parametrize(
  "shapes,sparsity,expected",
  [
    (LENET, 0.80, [0.8378, 0.5306, 0.0]),
    (LENET, 0.90, [0.9204, 0.7698, 0.0]),
    (LENET, 0.95, [0.9615, 0.8887, 0.0815]),
    (LENET, 0.98, [0.9846, 0.9555, 0.6326]),
    (MNIST_CNN, 0.90, [0.0, 0.9306, 0.9007, 0.0]),
  ],
)
def test_erk_reproduces_reference_numbers(shapes, sparsity, expected):
  got = sj.erk(shapes, sparsity)
  np.testing.assert_allclose([got[k] for k in shapes], expected, atol=5e-5)


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.98])
def test_erk_budget_matches_target_with_dense_layers_counted(sparsity):
  got = sj.erk(LENET, sparsity)
  total = sum(np.prod(s) for s in LENET.values())
  nnz = sum(np.prod(s) * (1 - got[k]) for k, s in LENET.items())
  target = sum(np.prod(s) - np.floor(sparsity * np.prod(s)) for s in LENET.values())
  assert abs(nnz - target) < 1e-6 * total


def test_overrides_are_outside_the_budget_and_uniform_is_uniform():
  got = sj.erk(LENET, 0.9, overrides={"l1": 0.5})
  assert got["l1"] == 0.5
  rest = sum(np.prod(LENET[k]) * (1 - got[k]) for k in ("l2", "l3"))
  target = sum(np.prod(LENET[k]) - np.floor(0.9 * np.prod(LENET[k])) for k in ("l2", "l3"))
  assert rest == pytest.approx(target)
  assert sj.uniform(LENET, 0.7) == {k: 0.7 for k in LENET}


def test_tied_largest_layers_become_dense_together():
  shapes = {"a": (4, 4), "b": (4, 4), "big": (512, 512)}
  got = sj.erk(shapes, 0.9)
  assert got["a"] == got["b"] == 0.0
  assert 0.9 < got["big"] < 1.0


def test_erdos_renyi_ignores_kernel_dims_and_power_scale_zero_is_uniform():
  er = sj.erdos_renyi({"c": (3, 3, 16, 32), "d": (16, 32)}, 0.8)
  assert er["c"] == er["d"]  # same (in, out): same density, kernel dims ignored
  uni = sj.erk(LENET, 0.8, power_scale=0.0)
  np.testing.assert_allclose(list(uni.values()), [0.8] * 3, atol=1e-3)
