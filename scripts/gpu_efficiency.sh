#!/usr/bin/env bash
# The efficiency benchmark (results/efficiency/, issue 5) in stages that each fit one 10-minute device call:
#   OUT=/tmp/eff bash scripts/gpu_efficiency.sh core8b variants8b cost8b   # then: others8b unstr8b unstr8b_others,
#   then: tiny (about 8 + 8 + 8 minutes of an H200; an 8B cell costs 10-15 s, a slope cell 40 s, a TinyLlama cell 9 s)
# (CPU smoke test: OUT=/tmp/x DEVICE=cpu MODEL_8B=tiny-llama MODEL_SMALL=tiny-llama SEQS=16 REPEATS=2 ... + EXTRA
#  ="--dtype float32 --warmup 1 --steps 2")
# Every stage appends to <OUT>/<model>_<pattern>.csv|md (and .png at the end unless PLOT=0); merge the calls' CSVs
# into results/efficiency/<gpu>/ afterwards: python -m lorsbench.bench.merge results/efficiency/<gpu> call*/*.csv
# The reference and LoRS rows run REPEATS processes per cell (interleaved; the row keeps the median one), the
# rest one process. Nothing here needs hydra or lm-eval.
set -u
OUT=${OUT:?set OUT}
REPEATS=${REPEATS:-3}
PY=${PYTHON:-python3}
MODEL_8B=${MODEL_8B:-random-llama3-8b}
MODEL_SMALL=${MODEL_SMALL:-random-tinyllama-1.1b}
DEVICE=${DEVICE:-cuda}
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
CORE="lora lors"
VARIANTS="lors:mask_source=stored lors:kernel=torch lors:kernel=fused,mask_source=stored"
SEQS=${SEQS:-512 1024 2048}
bench() { $PY -m lorsbench.bench --device "$DEVICE" --seq-lens $SEQS --out-dir "$OUT" --append --no-plot ${EXTRA:-} "$@"; }
plot() { $PY -m lorsbench.bench.merge "$OUT" "$OUT"/*.csv; }
for stage in "${@:-core8b}"; do
  case $stage in
    core8b)   bench --model $MODEL_8B --pattern 2of4 --methods $CORE --repeats "$REPEATS" ;;
    variants8b) bench --model $MODEL_8B --pattern 2of4 --methods $VARIANTS ;;
    cost8b)   bench --model $MODEL_8B --pattern 2of4 --methods spp sqft ;;
    others8b) bench --model $MODEL_8B --pattern 2of4 --methods lors_exact full_sparse_ft slope ;;
    unstr8b)  bench --model $MODEL_8B --pattern unstructured --sparsity 0.5 --methods $CORE \
                    --repeats $(( REPEATS > 2 ? 2 : REPEATS ))
              bench --model $MODEL_8B --pattern unstructured --sparsity 0.5 --methods lors:mask_source=stored ;;
    unstr8b_others) bench --model $MODEL_8B --pattern unstructured --sparsity 0.5 \
                    --methods spp sqft lors_exact full_sparse_ft ;;
    tiny)     bench --model $MODEL_SMALL --pattern 2of4 --methods $CORE lors:mask_source=stored spp sqft lors_exact \
                    slope full_sparse_ft
              bench --model $MODEL_SMALL --pattern unstructured --sparsity 0.5 \
                    --methods $CORE lors:mask_source=stored spp sqft lors_exact full_sparse_ft ;;  # slope is 2:4 only
    *) echo "unknown stage '$stage' (core8b | variants8b | cost8b | others8b | unstr8b | unstr8b_others | tiny)" >&2; exit 2 ;;
  esac
done
[ "${PLOT:-1}" = 0 ] || plot
