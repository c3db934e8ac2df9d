"""pytest plugin for mutation runs (``-p tools.mutation.jax_isolation``).

mutmut 3 learns which tests reach which function from trampolines that run when the
function is *called*. Under ``jax.jit`` Python code runs only while tracing, so a test
that reuses a function compiled by an earlier test would not be recorded as reaching it,
and the mutants of that function would not be run against it. During the stats run
(``MUTANT_UNDER_TEST=stats``) every test therefore starts with empty JAX caches. Mutants
run in fresh processes (``process_isolation = forkserver``) whose caches start empty too;
the persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``, set by run.sh) is keyed
by the compiled program itself, so it never returns code traced from another mutant.

In a mutant's run, tests run fastest first (durations from the stats run), as mutmut's
plain fork runner does, so that ``-x`` stops a killed mutant early.
"""

import json
import os


def _mutant() -> str:
  try:
    from mutmut.mutation.trampoline import get_mutant_under_test
  except ImportError:  # older mutmut 3
    return os.environ.get("MUTANT_UNDER_TEST", "")
  return get_mutant_under_test()


def pytest_runtest_setup(item):
  del item
  if _mutant() == "stats":
    import jax

    jax.clear_caches()


def pytest_collection_modifyitems(session, config, items):
  del session, config
  if "__mutmut_" not in _mutant():
    return
  try:  # the worker runs in the mutants/ directory
    with open("mutmut-stats.json") as f:
      durations = json.load(f)["duration_by_test"]
  except (OSError, ValueError, KeyError):
    return
  items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
