"""Summarises a mutmut 3 run of the mask-update core (run from the mutmut directory).

Reads ``mutants/**/*.meta`` (mutmut's per-file results) and prints Markdown: per module,
the mutants killed, timed out, survived, without tests, judged equivalent
(``tools/mutation/equivalent.txt``: ``<mutant name>  # why``) and not yet checked; the
kill rate over checked non-equivalent mutants ((killed + timeout) / (checked -
equivalent)); with ``--only`` (a sample), also the module-size-weighted estimate for the
whole core; then the diff of every checked mutant that was not killed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
from collections import Counter
from pathlib import Path

# mutmut 3 exit codes (mutmut.stats.status_by_exit_code).
_STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests"}
_STATUS.update({-24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", 36: "timeout"})
_STATUS.update({None: "not checked", 34: "skipped", 2: "interrupted", -11: "segfault"})
_COLUMNS = ("killed", "timeout", "survived", "no tests", "equivalent", "not checked", "other")


def _equivalent(path: Path) -> dict[str, str]:
  out = {}
  if path.exists():
    for line in path.read_text().splitlines():
      name, _, why = line.partition("#")
      if name.strip():
        out[name.strip()] = why.strip()
  return out


def _rate(c: Counter) -> float | None:
  relevant = sum(c.values()) - c["equivalent"] - c["not checked"]
  return (c["killed"] + c["timeout"]) / relevant if relevant else None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--rev", default="?")
  parser.add_argument("--equivalent", default="tools/mutation/equivalent.txt")
  parser.add_argument("--only", help="a file of mutant names (a sample): report only those")
  args = parser.parse_args()
  equivalent = _equivalent(Path(args.equivalent))
  only = set(Path(args.only).read_text().split()) if args.only else None
  rows, sizes, not_killed = {}, {}, []
  for meta in sorted(Path("mutants").rglob("*.py.meta")):
    module = str(meta.relative_to("mutants"))[: -len(".meta")]
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    counts = Counter()
    for name, code in sorted(codes.items()):
      if only is not None and name not in only:
        continue
      status = _STATUS.get(code, "other")
      if status in ("survived", "no tests") and name in equivalent:
        status = "equivalent"
      counts[status if status in _COLUMNS else "other"] += 1
      if status not in ("killed", "timeout", "not checked"):
        not_killed.append((module, name, status, code))
    if counts:
      rows[module] = counts
      sizes[module] = len(codes)
  total = sum(rows.values(), Counter())
  print(f"# Mutation testing report: sparsejax {args.rev}\n")
  print(f"mutmut {importlib.metadata.version('mutmut')}, {datetime.date.today().isoformat()}\n")
  head = "| module | mutants | " + ("sampled | " if only else "") + " | ".join(_COLUMNS)
  print(head + " | kill rate |")
  print("|---" * (len(_COLUMNS) + (4 if only else 3)) + "|")
  for module, c in [*rows.items(), ("**total**", total)]:
    n = sizes.get(module, sum(sizes.values()))
    rate = _rate(c)
    cells = " | ".join(str(c[k]) for k in _COLUMNS)
    sampled = f"{sum(c.values())} | " if only else ""
    shown = "-" if rate is None else f"{100 * rate:.1f}%"
    print(f"| {module.removeprefix('sparsejax/_src/')} | {n} | {sampled}{cells} | {shown} |")
  if only:
    rated = {m: _rate(c) for m, c in rows.items() if _rate(c) is not None}
    weight = sum(sizes[m] for m in rated)
    if weight:
      estimate = sum(sizes[m] * r for m, r in rated.items()) / weight
      print(f"\nModule-size-weighted estimate over the core: {100 * estimate:.1f}%")
  if not not_killed:
    return
  print("\n## Checked mutants not killed\n")
  from mutmut.mutation.diff_apply import get_diff_for_mutant

  for module, name, status, code in not_killed:
    why = equivalent.get(name, "")
    print(f"### {name}: {status} (exit {code}){f': {why}' if why else ''}\n")
    try:
      diff = get_diff_for_mutant(name, path=module)
    except Exception as e:  # noqa: BLE001 - a report line, not a failure
      diff = f"(diff unavailable: {e!r})"
    print(f"```diff\n{diff}\n```\n")


if __name__ == "__main__":
  main()
