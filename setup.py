"""Install sparsejax: dynamic sparse training for JAX, as Optax transformations."""

import re
from pathlib import Path

from setuptools import find_packages, setup

_HERE = Path(__file__).parent
_VERSION = re.search(
    r'__version__ = "([^"]+)"', (_HERE / "sparsejax" / "__init__.py").read_text()
).group(1)

_EXPERIMENTS = ["mnist1d>=0.0.2", "scikit-learn>=1.3", "matplotlib>=3.7"]
_NOTEBOOKS = ["jupyter-client>=8", "ipykernel>=6", "matplotlib>=3.7", "nbformat>=5"]
_TEST = ["pytest>=8", "pytest-xdist>=3", "nbmake>=1.5", "ruff>=0.6"]

setup(
    name="sparsejax",
    version=_VERSION,
    description="Dynamic sparse training (SET, RigL, SRigL, N:M) as composable Optax transformations.",
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(exclude=("tests", "tests.*", "benchmarks", "notebooks")),
    install_requires=[
        "jax>=0.10",
        "jaxlib>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "chex>=0.1.92",
        "absl-py>=2.0",
        "ml_collections>=1.0",
        "numpy>=1.26",
    ],
    extras_require={
        "experiments": _EXPERIMENTS,
        "notebooks": _NOTEBOOKS,
        "tensorboard": ["tensorboardX>=2.6"],
        "test": _TEST + _EXPERIMENTS,
        "all": sorted(set(_EXPERIMENTS + _NOTEBOOKS + _TEST + ["tensorboardX>=2.6"])),
    },
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
