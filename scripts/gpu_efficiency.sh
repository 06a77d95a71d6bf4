#!/usr/bin/env bash
# The efficiency benchmark (results/efficiency/, issues 5 and 13) in stages that each fit one 10-minute device call:
#   OUT=$OUT bash scripts/gpu_efficiency.sh core8b        # one stage per call, in this order:
#   headline8b then rest8b (the compact set of two calls), or
#   core8b core8b_graph peers8b cost8b others8b load8b maxbatch8b tiny tiny_graph  (then: unstr8b unstr8b_others)
# Coverage: every method + the two peers (peft LoRA, the LoRS authors' autograd) at Llama-3-8B shapes, 2:4,
# batch 1 x {512, 1024, 2048} in eager and CUDA-graph mode; every method + peers at 4 x 2048 (eager; lora/lors also
# graph) and the largest LoRA batch that fits at 2048; TinyLlama shapes the same at batch 1. Estimates (H200): an 8B
# cell 10-15 s (slope 40 s), a 4 x 2048 cell 25 s, a TinyLlama cell 9 s, plus ~15 s of imports and the GEMM probe per
# invocation: every stage is planned at 4-6 minutes (core8b: 2 methods x 3 lengths x REPEATS=3 processes = 18 cells).
# `lora` and `lors` run REPEATS interleaved processes per cell (the row keeps the median), the rest one process.
# Needs on the device: torch, transformers, peft, pandas, matplotlib, triton (the image has them) and hydra-core,
# omegaconf, antlr4-python3-runtime as wheels in .whl/ (carried; notes/gpu.md says how to fetch them):
#   run(command="OUT=$OUT bash scripts/gpu_efficiency.sh core8b", carry=[".whl"])
# Every stage writes <OUT>/<model>_<pattern>.csv|md (appending within one call), a log, and a .png at the end unless
# PLOT=0: at most 8 files come back per call. Merge the calls afterwards (later calls win per cell):
#   python -m lorsbench.bench.merge results/efficiency/<gpu> call*/*.csv
# CPU smoke test of the plumbing: OUT=/tmp/x DEVICE=cpu MODEL_8B=tiny-llama MODEL_SMALL=tiny-llama SEQS=16 \
#   LOAD_SEQ=16 REPEATS=2 MODES=eager EXTRA="--dtype float32 --warmup 1 --steps 2" bash scripts/gpu_efficiency.sh core8b
set -u -o pipefail
OUT=${OUT:?set OUT}
REPEATS=${REPEATS:-3}
PY=${PYTHON:-python3}
MODEL_8B=${MODEL_8B:-random-llama3-8b}
MODEL_SMALL=${MODEL_SMALL:-random-tinyllama-1.1b}
DEVICE=${DEVICE:-cuda}
SEQS=${SEQS:-512 1024 2048}
LOAD_SEQ=${LOAD_SEQ:-2048}
MODES=${MODES:-eager cuda_graph}
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
. "$(dirname "$0")/device_env.sh" "hydra omegaconf peft"
mkdir -p "$OUT"
CORE="lora lors"
VARIANTS="lors:mask_source=stored lors:kernel=torch lors:kernel=fused,mask_source=stored"
ALL="lora spp sqft lors lors_exact slope losa full_sparse_ft"
PEERS="peft_lora authors_lors"
rc=0
bench() {  # every invocation appends to its table; a failed cell makes the stage's exit code non-zero
  $PY -m lorsbench.bench --device "$DEVICE" --out-dir "$OUT" --append --no-plot ${EXTRA:-} "$@" || rc=1
}
stages() {
for stage in "${@:-core8b}"; do
  echo "[gpu_efficiency] stage $stage ($(date -u +%H:%M:%S))"
  case $stage in
    headline8b) # one call's worth (≈ 8 min): every method + peers in graph mode at 1 × {512, 2048}, the eager rows the
                # targets compare against, and 4 × 2048 for lora / lors / the peers
                bench --model $MODEL_8B --pattern 2of4 --seq-lens 512 2048 --modes cuda_graph \
                      --methods lora lors spp sqft lors_exact slope losa --peers $PEERS
                bench --model $MODEL_8B --pattern 2of4 --seq-lens 512 2048 --modes eager --methods lora lors \
                      --peers authors_lors
                bench --model $MODEL_8B --pattern 2of4 --seq-lens $LOAD_SEQ --batch-size 4 --modes eager cuda_graph \
                      --methods lora lors --peers $PEERS ;;
    rest8b)     # what headline8b leaves: 4 x 2048 (eager and graph) for lora / lors / the peers, 1 x 1024 in graph
                # mode, and eager 1 x 2048 for lors and the peers
                bench --model $MODEL_8B --pattern 2of4 --seq-lens $LOAD_SEQ --batch-size 4 --modes cuda_graph eager \
                      --methods lora lors --peers $PEERS
                bench --model $MODEL_8B --pattern 2of4 --seq-lens 1024 --modes cuda_graph --methods lora lors \
                      --peers $PEERS
                bench --model $MODEL_8B --pattern 2of4 --seq-lens 2048 --modes eager --methods lors --peers $PEERS ;;
    core8b)     bench --model $MODEL_8B --pattern 2of4 --seq-lens $SEQS --modes eager --methods $CORE \
                      --repeats "$REPEATS" ;;
    core8b_graph) bench --model $MODEL_8B --pattern 2of4 --seq-lens $SEQS --modes cuda_graph --methods $CORE \
                      --repeats "$REPEATS" ;;
    peers8b)    bench --model $MODEL_8B --pattern 2of4 --seq-lens $SEQS --modes $MODES --methods --peers $PEERS
                bench --model $MODEL_8B --pattern 2of4 --seq-lens $SEQS --methods $VARIANTS ;;
    cost8b)     bench --model $MODEL_8B --pattern 2of4 --seq-lens $SEQS --modes $MODES --methods spp sqft lors_exact ;;
    others8b)   bench --model $MODEL_8B --pattern 2of4 --seq-lens $SEQS --modes $MODES --methods full_sparse_ft slope ;;
    load8b)     bench --model $MODEL_8B --pattern 2of4 --seq-lens $LOAD_SEQ --batch-size 4 --methods $ALL --peers $PEERS
                bench --model $MODEL_8B --pattern 2of4 --seq-lens $LOAD_SEQ --batch-size 4 --modes cuda_graph \
                      --methods $CORE ;;
    maxbatch8b) bench --model $MODEL_8B --pattern 2of4 --seq-lens $LOAD_SEQ --batch-size 4 --methods lora \
                      --max-batch lora --profiled-steps 0 --steps 10 ;;
    tiny)       bench --model $MODEL_SMALL --pattern 2of4 --seq-lens $SEQS --methods $ALL --peers $PEERS ;;
    tiny_graph) bench --model $MODEL_SMALL --pattern 2of4 --seq-lens $SEQS --modes cuda_graph --methods $ALL \
                      --peers $PEERS ;;
    unstr8b)    bench --model $MODEL_8B --pattern unstructured --sparsity 0.5 --seq-lens $SEQS --modes $MODES \
                      --methods $CORE --repeats $(( REPEATS > 2 ? 2 : REPEATS )) ;;
    unstr8b_others) bench --model $MODEL_8B --pattern unstructured --sparsity 0.5 --seq-lens $SEQS \
                      --methods lors:mask_source=stored spp sqft lors_exact full_sparse_ft --peers $PEERS ;;  # slope: 2:4 only
    *) echo "unknown stage '$stage' (headline8b | rest8b | core8b | core8b_graph | peers8b | cost8b | others8b | load8b | maxbatch8b | tiny | tiny_graph |" \
            "unstr8b | unstr8b_others)" >&2; exit 2 ;;
  esac
done
return $rc
}
stages "$@" 2>&1 | tee -a "$OUT/gpu_efficiency.log"
rc=${PIPESTATUS[0]}
[ "${PLOT:-1}" = 0 ] || $PY -m lorsbench.bench.merge "$OUT" "$OUT"/*.csv || rc=1
exit $rc
