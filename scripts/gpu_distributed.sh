#!/usr/bin/env bash
# Issue 17 on a several-GPU machine (nvidia-h200-x2 / x4): the efficiency benchmark at Llama-2-13B and Llama-3-70B
# shapes at 1..N GPUs, the pipeline with distributed=fsdp at N GPUs against one GPU, and the tables (docs/distributed.md).
#   OUT=$OUT bash scripts/gpu_distributed.sh bench13b        # one stage per device call (each < 10 min), in order:
#   bench13b pipeline bench70b scaling                       # (bench13b: NPROCS="1 2" then NPROCS="4" on an x4)
# Cells: lora lors spp sqft, 2:4 masks, bf16, the batch-1 protocol (1 x SEQ) and 4 x SEQ per GPU; 1 GPU is one process
# (no FSDP), N > 1 GPUs are torchrun + FSDP2 per decoder layer (python -m lorsbench.bench --nproc N). Estimates are not
# measured yet: a 13B cell loads ~26 GB of random weights per GPU; split NPROCS / METHODS across calls if one stage
# runs long (every stage appends to its tables, so a cut-short call keeps its cells).
# 70B: every rank builds the whole random model on its GPU before sharding (132 GiB in bf16 plus the masks), which
# does not fit an H200: the bench70b rows are expected to say oom at load (docs/distributed.md "Not yet").
# Needs on the device: torch (with torchrun), transformers, pandas, matplotlib, triton (the image has them) and
# hydra-core, omegaconf, antlr4-python3-runtime as wheels in .whl/ (carried; notes/gpu.md says how to fetch them):
#   run(command="OUT=$OUT bash scripts/gpu_distributed.sh bench13b", carry=[".whl"], kind="nvidia-h200-x2")
# Writes under OUT (default results/distributed): bench/<model>_2of4[_<N>gpu].csv|md, pipeline/ (run folders + the
# report), scaling.md, gpu_distributed.log. Copy OUT's files into results/distributed/ afterwards.
# CPU smoke test of the plumbing (gloo; the bench refuses --nproc > 1 without GPUs, so only the pipeline stage):
#   OUT=/tmp/x DEVICE=cpu NGPU=2 PIPELINE_EXTRA="model=tiny-llama dtype=float32 eval=none data=local \
#     data.path=<a JSONL of {instruction, input, output}>" bash scripts/gpu_distributed.sh pipeline
set -u -o pipefail
OUT=${OUT:-results/distributed}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
NGPU=${NGPU:-$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)}
NPROCS=${NPROCS:-$(seq -s ' ' 1 "$NGPU")}
METHODS=${METHODS:-lora lors spp sqft}
SEQ=${SEQ:-2048}
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
. "$(dirname "$0")/device_env.sh" "hydra omegaconf"
mkdir -p "$OUT/bench" "$OUT/pipeline"
rc=0
bench() {  # one table per model and world size; a failed cell makes the stage's exit code non-zero
  $PY -m lorsbench.bench --device "$DEVICE" --out-dir "$OUT/bench" --append --no-plot --pattern 2of4 \
      --methods $METHODS ${EXTRA:-} "$@" || rc=1
}
cells() {  # $1 = model, $2 = GPUs: the batch-1 protocol and 4 x SEQ per GPU
  bench --model "$1" --nproc "$2" --seq-lens "$SEQ" --batch-size 1
  bench --model "$1" --nproc "$2" --seq-lens "$SEQ" --batch-size 4
}
lorsbench_run() {  # $1 = processes; the rest: overrides
  local n=$1; shift
  if [ "$n" -gt 1 ]; then
    $PY -m torch.distributed.run --standalone --nproc_per_node "$n" -m lorsbench distributed=fsdp "$@" || rc=1
  else
    $PY -m lorsbench "$@" || rc=1
  fi
}
stages() {
for stage in "${@:-bench13b}"; do
  echo "[gpu_distributed] stage $stage ($(date -u +%H:%M:%S), $NGPU GPU(s))"
  case $stage in
    bench13b) for n in $NPROCS; do cells random-llama2-13b "$n"; done ;;
    bench70b) cells random-llama3-70b "$NGPU" ;;
    pipeline) # the same smoke run (SmolLM2-135M, bundled) at NGPU ranks and at one process; the report of both
              for n in "$NGPU" 1; do
                lorsbench_run "$n" experiment=smoke method=lors device="$DEVICE" save_merged=true \
                  paths.output_root="$OUT/pipeline" run_name="lors-smoke-${n}proc" ${PIPELINE_EXTRA:-}
              done
              $PY -m lorsbench.report "$OUT/pipeline/runs" --name report --out "$OUT/pipeline" || rc=1 ;;
    scaling)  $PY -m lorsbench.bench.scaling "$OUT"/scaling.md "$OUT"/bench/*.csv || rc=1 ;;
    *) echo "unknown stage '$stage' (bench13b | bench70b | pipeline | scaling)" >&2; return 2 ;;
  esac
done
return $rc
}
stages "$@" 2>&1 | tee -a "$OUT/gpu_distributed.log"
exit "${PIPESTATUS[0]}"
