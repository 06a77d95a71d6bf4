#!/usr/bin/env bash
# Mutation testing of methods/ against the formula tests with mutmut 3 (tests/README.md records the last score).
# Not part of CI: about 20-30 minutes on two cores. Needs `pip install mutmut` in the venv.
#   tests/mutation/run_mutmut.sh [scratch dir, default /tmp/lorsbench-mutmut]
# mutmut names a mutant by its file path and the trampoline compares that with the function's runtime
# __module__; methods/ is imported as lorsbench.methods (package-dir), so the committed tree is laid out as
# src/lorsbench/methods/ in a scratch folder (mutmut strips the "src." prefix) and mutated there.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
scratch="${1:-/tmp/lorsbench-mutmut}"
rm -rf "$scratch"
mkdir -p "$scratch/src"
git -C "$repo" archive HEAD lorsbench methods tests conf pyproject.toml | tar -x -C "$scratch"
cd "$scratch"
mv lorsbench src/
mv methods src/lorsbench/methods
files=(_lors lors lors_exact lora spp sqft slope full_sparse_ft _adapter)
only=$(printf '"src/lorsbench/methods/%s.py", ' "${files[@]}")
cat >> pyproject.toml <<EOF

[tool.mutmut]
source_paths = ["src/lorsbench/methods"]
only_mutate = [${only%, }]
also_copy = ["src/lorsbench", "conf"]
pytest_add_cli_args_test_selection = ["tests/test_methods_formulas.py"]
pytest_add_cli_args = ["-p", "no:cacheprovider"]
process_isolation = "forkserver"
use_git_change_detection = false
EOF
OMP_NUM_THREADS=1 "$repo/.venv/bin/mutmut" run --max-children "${MUTMUT_CHILDREN:-2}"
"$repo/.venv/bin/mutmut" results --all true > results.txt || true
echo "mutants and results in $scratch (results.txt; mutmut show <name> prints a diff)"
