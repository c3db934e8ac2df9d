#!/usr/bin/env bash
# Re-checks mutants outside mutmut's harness (tests/README.md, "Mutation testing").
#
#   tools/mutation/recheck.sh DIR < names.txt
#
# DIR is a run's scratch directory (/tmp/sparsejax-mutation/<commit>, see run.sh); names.txt
# holds one mutant name per line (e.g. the ones mutmut reported as timeouts). Each mutant
# runs the default-suite core tests of setup.cfg with `pytest -x` in DIR/mutants and prints
# "<pytest exit code> <seconds> <name> <first failing test>": exit 1 or 2 = killed (a test
# failed or a test module failed to import), 0 = survived, 124 = a real timeout (600 s).
set -uo pipefail
dir=${1:?usage: recheck.sh DIR < names.txt}
here=$(cd "$(dirname "$0")" && pwd)
mapfile -t tests < <(sed -n '/^pytest_add_cli_args_test_selection =/,/^#/p' "$here/setup.cfg" \
  | grep -o 'tests/[a-z_]*\.py')
cd "$dir/mutants"
export JAX_PLATFORMS=cpu
while read -r name; do
  [ -z "$name" ] && continue
  start=$(date +%s)
  log=$(MUTANT_UNDER_TEST="$name" timeout 600 python -m pytest -x -q -p no:cacheprovider \
    -m "not slow" "${tests[@]}" 2>&1)
  rc=$?
  first=$(grep -m1 -E '^(FAILED|ERROR) ' <<< "$log" | cut -c1-120)
  echo "$rc $(( $(date +%s) - start ))s $name $first"
done
