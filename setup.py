"""Install sparsejax: dynamic sparse training for JAX, as Optax transformations."""

import importlib.util
import os
import re
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

_HERE = Path(__file__).parent
_VERSION = re.search(
  r'__version__ = "([^"]+)"', (_HERE / "sparsejax" / "__init__.py").read_text()
).group(1)

_EXPERIMENTS = ["mnist1d>=0.0.2", "scikit-learn>=1.3", "matplotlib>=3.7"]
_NOTEBOOKS = ["jupyter-client>=8", "ipykernel>=6", "matplotlib>=3.7", "nbformat>=5"]
# Published setups at scale (experiments/input_pipeline.py): grain reads tfds TFRecord /
# ArrayRecord shards (it brings array-record), Pillow decodes the images.
_SCALE = ["grain>=0.2.18", "pillow>=10"]
_TEST = ["pytest>=8", "pytest-xdist>=3", "nbmake>=1.5", "ruff>=0.6", "hypothesis>=6.100"]


# Native CPU kernels (condensed inference, sparse training), called through the XLA FFI. It needs
# the FFI headers shipped in jaxlib (pyproject.toml lists jaxlib in the build
# requirements). The build is optional: if it fails, sparsejax still installs and uses
# the XLA path (with a logged notice). Set SPARSEJAX_REQUIRE_NATIVE=1 to make a failed
# build an error instead (CI, packaging checks).
def _jaxlib_include_dir() -> str:
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("jaxlib is not installed in the build environment")
  include = Path(list(spec.submodule_search_locations)[0]) / "include"
  if not (include / "xla" / "ffi" / "api" / "ffi.h").is_file():
    raise RuntimeError(f"XLA FFI headers not found under {include}")
  return str(include)


class _BuildExtWithXlaFfi(build_ext):
  """build_ext that adds jaxlib's XLA FFI headers and C++17 flags."""

  def build_extensions(self):
    if self.compiler.compiler_type == "msvc":
      flags = ["/O2", "/std:c++17"]
    else:
      flags = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fno-math-errno"]
    try:
      include = ["-isystem", _jaxlib_include_dir()]
    except RuntimeError as e:
      if _REQUIRE_NATIVE:
        raise
      self.warn(f"skipping the native kernels: {e}")
      self.extensions = [ext for ext in self.extensions if ext not in _NATIVE_EXTENSIONS]
      include = []
    for ext in self.extensions:
      ext.extra_compile_args = flags + include + list(ext.extra_compile_args or [])
    super().build_extensions()


_REQUIRE_NATIVE = os.environ.get("SPARSEJAX_REQUIRE_NATIVE", "").strip() not in ("", "0")
_FFI_COMMON = "sparsejax/_src/kernels/csrc/ffi_common.h"  # shared by the three sources


def _native(module: str, source: str) -> Extension:
  """One native XLA FFI extension (optional unless SPARSEJAX_REQUIRE_NATIVE is set)."""
  return Extension(
    module,
    sources=[f"sparsejax/_src/kernels/csrc/{source}"],
    depends=[_FFI_COMMON],
    language="c++",
    optional=not _REQUIRE_NATIVE,
  )


_NATIVE_EXTENSIONS = [
  _native("sparsejax._src.kernels._condensed_native", "condensed_ffi.cc"),
  # Training kernels for fixed-capacity CSR sparse layers (sparsejax.sparse).
  _native("sparsejax._src.kernels._sparse_train_native", "sparse_train_ffi.cc"),
  # Exact top-k selection of DST mask updates (sparsejax/_src/primitives/native_select.py).
  _native("sparsejax._src.primitives._select_native", "select_ffi.cc"),
]

setup(
  name="sparsejax",
  version=_VERSION,
  description="Dynamic sparse training (SET, RigL, SRigL, N:M) as composable Optax transformations.",
  long_description=(_HERE / "README.md").read_text(),
  long_description_content_type="text/markdown",
  license="Apache-2.0",
  python_requires=">=3.11",
  packages=find_packages(include=("sparsejax", "sparsejax.*")),
  ext_modules=_NATIVE_EXTENSIONS,
  cmdclass={"build_ext": _BuildExtWithXlaFfi},
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
    "scale": _EXPERIMENTS + _SCALE,
    "notebooks": _NOTEBOOKS,
    "tensorboard": ["tensorboardX>=2.6"],
    "test": sorted(set(_TEST + _EXPERIMENTS + _NOTEBOOKS + _SCALE)),
    "all": sorted(set(_EXPERIMENTS + _NOTEBOOKS + _TEST + _SCALE + ["tensorboardX>=2.6"])),
  },
  classifiers=[
    "Programming Language :: Python :: 3.11",
    "Intended Audience :: Science/Research",
    "Topic :: Scientific/Engineering :: Artificial Intelligence",
  ],
)
