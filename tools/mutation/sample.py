"""Prints a seeded random sample of mutant names, the same number from every module.

Run from the mutmut directory after mutants were generated (``mutants/**/*.meta``). A
stratified sample estimates each module's kill rate with the same precision, and the
overall rate as the size-weighted mean (report.py); mutant sampling is the standard way
to make mutation analysis affordable (Acree 1980; Wong & Mathur 1995).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--per-module", type=int, required=True)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  for meta in sorted(Path("mutants").rglob("*.py.meta")):
    names = sorted(json.loads(meta.read_text())["exit_code_by_key"])
    rng = random.Random(f"{args.seed}:{meta}")
    for name in sorted(rng.sample(names, min(args.per_module, len(names)))):
      print(name)


if __name__ == "__main__":
  main()
