"""Import time of ``sparsejax`` next to ``optax`` (fresh interpreters, interleaved).

Each round starts one fresh Python process per target (order shuffled per round) and
measures the wall time of the import statement inside it (``time.perf_counter`` around the
import, so interpreter start-up is not counted). ``jax`` is imported first in every
target, so the figures are the time each library adds on top of JAX, plus ``jax`` itself
for scale. Also lists which heavy modules each import loads (``flax``, ``orbax``,
``matplotlib``, Pallas).

Run:  python benchmarks/import_time.py            (about 1 minute)
      python benchmarks/import_time.py --quick    (smoke run)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("flax", "orbax.checkpoint", "matplotlib", "jax.experimental.pallas")

_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import jax
t1 = time.perf_counter()
{stmt}
t2 = time.perf_counter()
print(json.dumps({{"jax": t1 - t0, "lib": t2 - t1,
                   "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""

TARGETS = {
  "jax": "pass",
  "optax": "import optax",
  "sparsejax": "import sparsejax",
  "sparsejax + sj.nm": "import sparsejax as sj; sj.nm",
}


def measure(stmt: str) -> dict:
  out = subprocess.run(
    [sys.executable, "-c", _PROBE.format(stmt=stmt, heavy=HEAVY)],
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="1 round instead of 15")
  args = parser.parse_args()
  rounds = 1 if args.quick else 15
  times: dict[str, list[float]] = {name: [] for name in TARGETS}
  jax_times: list[float] = []
  heavy: dict[str, list[str]] = {}
  rng = random.Random(0)
  names = list(TARGETS)
  measure("pass")  # warm the file-system caches
  for _ in range(rounds):
    rng.shuffle(names)
    for name in names:
      result = measure(TARGETS[name])
      times[name].append(result["lib"])
      jax_times.append(result["jax"])
      heavy[name] = result["heavy"]
  print(f"python {sys.version.split()[0]}, {rounds} rounds, fresh process per import")
  print(f"{'import':<22} {'median s':>9} {'min s':>7} {'max s':>7}  heavy modules loaded")
  print(
    f"{'jax (first)':<22} {statistics.median(jax_times):>9.3f} {min(jax_times):>7.3f} "
    f"{max(jax_times):>7.3f}"
  )
  for name in TARGETS:
    if name == "jax":
      continue
    ts = times[name]
    print(
      f"{name + ' (after jax)':<22} {statistics.median(ts):>9.3f} {min(ts):>7.3f} "
      f"{max(ts):>7.3f}  {', '.join(heavy[name]) or '-'}"
    )
  sj, ox = statistics.median(times["sparsejax"]), statistics.median(times["optax"])
  print(f"headline: import sparsejax {sj:.2f} s vs import optax {ox:.2f} s on top of jax")


if __name__ == "__main__":
  main()
