"""Shared pytest configuration: CPU only, float32, deterministic."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
