#!/usr/bin/env bash
# Mutation testing of the mask-update core with mutmut 3 (tests/README.md, "Mutation testing").
#
#   tools/mutation/run.sh                                    # every mutant
#   tools/mutation/run.sh 'sparsejax._src.primitives.selection.*'   # one module
#   tools/mutation/run.sh --report                           # only print the report
#   MUTATION_SAMPLE=25 tools/mutation/run.sh                 # 25 random mutants per module
#
# Runs in a scratch export of the committed tree (MUTATION_REV, default HEAD) under
# MUTATION_DIR (default /tmp/sparsejax-mutation/<commit>), so edits to the working tree
# during a run change nothing. Rerunning with the same commit resumes: mutants that already
# have a result are not run again (a mutant named on the command line always is). The
# configuration is tools/mutation/setup.cfg; the report (per module: killed / survived /
# timeout / no tests, and every survivor's diff) is written to <dir>/report.md.
#
# Environment: MUTATION_CHILDREN (parallel workers, default 2), MUTATION_NICE (default 19),
# MUTATION_SAMPLE / MUTATION_SEED (a stratified random sample: tools/mutation/sample.py;
# the report then covers the sampled mutants only).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(git -C "$here" rev-parse --show-toplevel)
rev=$(git -C "$repo" rev-parse --short=12 "${MUTATION_REV:-HEAD}")
dir=${MUTATION_DIR:-/tmp/sparsejax-mutation/$rev}
mutmut=$(command -v mutmut || true)
if [ -z "$mutmut" ]; then
  echo "mutmut not found: pip install 'mutmut>=3.8' (in the environment that has sparsejax)" >&2
  exit 1
fi

if [ ! -f "$dir/setup.cfg" ]; then
  mkdir -p "$dir"
  git -C "$repo" archive "$rev" | tar -x -C "$dir"
  # The optional native kernel is a build product, not in git.
  cp "$repo"/sparsejax/_src/kernels/*.so "$dir/sparsejax/_src/kernels/" 2>/dev/null || true
  mkdir -p "$dir/tools/mutation"
  cp "$here"/{__init__.py,jax_isolation.py,preload.txt,report.py,sample.py,setup.cfg} \
    "$dir/tools/mutation/"
  cp "$here/setup.cfg" "$dir/setup.cfg"
fi

cd "$dir"
# Persistent XLA cache: keyed by the compiled program, so it is shared safely by mutants.
export JAX_PLATFORMS=cpu
export JAX_COMPILATION_CACHE_DIR="$dir/.jax-cache"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
export PYTHONDONTWRITEBYTECODE=1

run() {
  nice -n "${MUTATION_NICE:-19}" "$mutmut" run --max-children "${MUTATION_CHILDREN:-2}" "$@"
}
report_args=(--rev "$rev")
if [ "${1:-}" != "--report" ]; then
  echo "mutmut $(python -c "import importlib.metadata as m; print(m.version('mutmut'))") on $rev in $dir"
  if [ -n "${MUTATION_SAMPLE:-}" ]; then
    # Generate the mutants and the test stats first (a pattern that names no mutant).
    ls mutants/sparsejax/_src/*/*.meta > /dev/null 2>&1 || run 'none.*' || true
    python tools/mutation/sample.py --per-module "$MUTATION_SAMPLE" \
      --seed "${MUTATION_SEED:-0}" > sample.txt
    mapfile -t names < sample.txt
    run "${names[@]}" || true
  else
    run "$@" || true
  fi
fi
if [ -n "${MUTATION_SAMPLE:-}" ]; then
  report_args+=(--only sample.txt)
fi
python tools/mutation/report.py "${report_args[@]}" > report.md
cat report.md
