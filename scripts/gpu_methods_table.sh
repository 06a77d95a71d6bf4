#!/usr/bin/env bash
# Run experiment=methods_table (results/methods/) and the bf16 GPU headline run on one GPU machine, many jobs at
# once (the default model is 135M parameters: a dozen runs share one H100). One `python -m lorsbench` process per
# job; every job's folder lands under $LORSBENCH_OUTPUT. Used on the lent GPU machine (see notes/gpu.md):
#   LORSBENCH_OUTPUT=/tmp/out JOBS=12 bash scripts/gpu_methods_table.sh
#   (SEEDS="1 2" REFERENCE=0 HEADLINE=0: only those seeds' trained jobs; DEADLINE_S: stop launching after that long)
# GPU step times of these runs are taken with JOBS processes sharing the GPU: use them for nothing. 12 jobs fit an
# 80 GB H100 (22 did not: six runs ran out of memory). CPU step time
# and peak RSS come from separate CPU runs (see conf/experiment/methods_table.yaml).
set -u
JOBS=${JOBS:-12}
OUTPUT=${LORSBENCH_OUTPUT:?set LORSBENCH_OUTPUT}
DEADLINE_S=${DEADLINE_S:-520}
SEEDS=${SEEDS:-0 1 2}
REFERENCE=${REFERENCE:-1}   # 0: skip the pruned-only and dense rows (already run)
PY=${PYTHON:-python3}
MODEL=${MODEL:-smollm2-135m}   # the bundled model the grid uses (conf/model/<name>.yaml, the default config's)
export OMP_NUM_THREADS=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
start=$(date +%s)
mkdir -p "$OUTPUT/logs"

# The model's one-time GGUF conversion, before any job races for it.
MODEL=$MODEL $PY - <<'EOF' || exit 1
import os, torch
from pathlib import Path
from lorsbench.models import load_model
from lorsbench.config import ModelConfig
cache = Path(os.path.expanduser(os.environ.get("LORSBENCH_CACHE", "~/.cache/lorsbench")))
load_model(ModelConfig(name=os.environ["MODEL"], source="bundled"), torch.float32, torch.device("cpu"), cache)
print("model ready")
EOF

# The README's headline run on the GPU: default config, dtype auto = bf16.
[ "${HEADLINE:-1}" = 1 ] && ( $PY -m lorsbench method=lors sparsity=0.5 device=cuda > "$OUTPUT/headline_gpu.log" 2>&1; echo "headline rc $?" ) &

job() {  # one job of the grid: the sweep overrides as arguments
  name=$(echo "$*" | tr ' =' '_-')
  $PY -m lorsbench experiment=methods_table "$@" "hydra.sweep.dir=$OUTPUT/methods_table_gpu/$name" \
      > "$OUTPUT/logs/$name.log" 2>&1
  rc=$?
  echo "[$(( $(date +%s) - start )) s] rc $rc $*"
}
export -f job; export start OUTPUT PY

# Pruned-only rows first (they also fill the pruning cache for every seed x pattern), and the dense row.
[ "$REFERENCE" = 1 ] && {
  for seed in $SEEDS; do for pattern in unstructured 2of4; do
    echo "method=none pattern=$pattern seed=$seed"; done; done
  echo "pruning=none method=none pattern=unstructured seed=0"
} | timeout $DEADLINE_S xargs -P "$JOBS" -L 1 bash -c 'job $0 "$@"'

# Every trained job, seed-major so a cut-short run still has whole seeds.
{
  for seed in $SEEDS; do
    for pattern in unstructured 2of4; do for method in lora spp sqft lors lors_exact; do
      echo "method=$method pattern=$pattern seed=$seed"; done; done
    echo "method=slope pattern=2of4 seed=$seed"
  done
} | timeout $(( DEADLINE_S - ($(date +%s) - start) )) xargs -P "$JOBS" -L 1 bash -c 'job $0 "$@"'
wait
echo "done in $(( $(date +%s) - start )) s"
