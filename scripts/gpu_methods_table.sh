#!/usr/bin/env bash
# The accuracy comparison of results/methods/ on one GPU machine: the lr sweep (experiment=lr_sweep), each method's
# chosen lr (python -m lorsbench.lr_choice), then the methods table (experiment=methods_table: every method at its
# chosen lr, Wanda 50 % unstructured and 2:4, 3 seeds, the full zero-shot suite, the dense / dense + LoRA /
# pruned-only rows). One `python -m lorsbench` process per job, JOBS at once (the default model is 135M
# parameters); every run folder lands under $LORSBENCH_OUTPUT. Stages, each sized to one 10-minute device call:
#   STAGE=lr LORSBENCH_OUTPUT=/tmp/out bash scripts/gpu_methods_table.sh       # lr sweep (what is missing) + choice
#   STAGE=methods LORSBENCH_OUTPUT=/tmp/out bash scripts/gpu_methods_table.sh  # every row, seed-major, by priority
# (SEEDS="1 2": only those seeds; DONE: folders of earlier methods-table records whose rows are not run again; DEADLINE_S: start no job after that long (started ones finish); SWEPT: folders of earlier lr-sweep
# records that count, so their cells are not run again; EXTRA: overrides for every job, e.g. "trainer.cuda_graph=true
# matmul_precision=high" on a GPU — every record carries them.) GPU step times of these runs
# are taken with JOBS processes sharing the GPU: use them for nothing. How the lent machine gets the model, the
# data and the wheels: notes/gpu.md.
set -u
JOBS=${JOBS:-12}            # training-only jobs (the lr sweep) at once
EVAL_JOBS=${EVAL_JOBS:-4}  # full-suite lm-eval at batch 32 peaks near 20 GiB a process: 7 at once ran out of memory (results/methods/README.md)
OUTPUT=${LORSBENCH_OUTPUT:?set LORSBENCH_OUTPUT}
STAGE=${STAGE:?set STAGE=lr or STAGE=methods}
DEADLINE_S=${DEADLINE_S:-480}
SEEDS=${SEEDS:-0 1 2}
LR_CHOICE=${LR_CHOICE:-results/methods/lr_choice.json}
SWEPT=${SWEPT:-}
EXTRA=${EXTRA:-}
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
start=$(date +%s)
mkdir -p "$OUTPUT/logs"

# The model's one-time GGUF conversion and the suite's task files, before any job races for them.
$PY - <<'EOF' || exit 1
import os, torch
from pathlib import Path
from lorsbench.models import load_model
from lorsbench.config import ModelConfig
from lorsbench.evaluation.zeroshot_tasks import convert_suite
cache = Path(os.path.expanduser(os.environ.get("LORSBENCH_CACHE", "~/.cache/lorsbench")))
load_model(ModelConfig(name="smollm2-135m", source="bundled"), torch.float32, torch.device("cpu"), cache)
convert_suite(("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"), cache, None)
print("model and tasks ready")
EOF

job() {  # one job: a preset and the overrides that pin every swept key; none starts after DEADLINE_S
  preset=$1; shift
  name=$(echo "$*" | tr ' =/' '_-_')
  if [ $(( $(date +%s) - start )) -ge "$DEADLINE_S" ]; then echo "[deadline] not started: $preset $*"; return; fi
  $PY -m lorsbench "experiment=$preset" "$@" $EXTRA "hydra.sweep.dir=$OUTPUT/$preset/$name" \
    > "$OUTPUT/logs/$preset-$name.log" 2>&1
  echo "[$(( $(date +%s) - start )) s] rc $? $preset $*"
}
export -f job; export start OUTPUT PY EXTRA DEADLINE_S
run_jobs() { xargs -P "$JOBS" -L 1 bash -c 'job "$@"' _; }  # started jobs run to the end (no kill at the deadline)

if [ "$STAGE" = lr ]; then
  # Every (pattern, method, lr) cell of conf/experiment/lr_sweep.yaml's grid (+ slope, dense + LoRA) that $SWEPT
  # does not already hold a successful record of.
  $PY - "$SWEPT" <<'EOF' | run_jobs
import json, sys
from pathlib import Path
from omegaconf import OmegaConf
grid = OmegaConf.load("conf/experiment/lr_sweep.yaml").hydra.sweeper.params
done = set()
for folder in sys.argv[1].split():
    for path in Path(folder).rglob("run.json"):
        r = json.loads(path.read_text())
        if r.get("status") == "success" and not r.get("smoke"):
            done.add((r["pruner"], r["pattern"], r["method"], float(r["lr"])))
cells = [("wanda", p, m) for p in str(grid.pattern).split(",") for m in str(grid.method).split(",")]
cells += [("wanda", "2of4", "slope"), ("none", "unstructured", "lora")]
for lr in str(grid["trainer.lr"]).split(","):
    for pruner, pattern, method in cells:
        if (pruner, pattern, method, float(lr)) not in done:
            print(f"lr_sweep pruning={pruner} method={method} pattern={pattern} trainer.lr={lr}")
EOF
  $PY -m lorsbench.lr_choice $SWEPT "$OUTPUT/lr_sweep" --out "$LR_CHOICE" --force || exit 1
  cp "$LR_CHOICE" "$OUTPUT/"
else
  # Seed-major, so a call that ends early leaves whole seeds; within a seed the rows a reader needs first. A row
  # that $DONE (folders of earlier records) holds a successful record of, at the lr chosen now, is not run again.
  $PY - "$LR_CHOICE" "$SEEDS" "${DONE:-}" <<'EOF' | JOBS=$EVAL_JOBS run_jobs
import json, sys
from pathlib import Path
from lorsbench.composition import compose_config
from lorsbench.errors import ConfigError
from lorsbench.lr_choice import chosen_lr
lr_file, seeds, done_folders = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
preset = compose_config(["experiment=methods_table"])  # the model and sparsity every row trains
done = {}
for folder in done_folders:
    for path in Path(folder).rglob("run.json"):
        r = json.loads(path.read_text())
        if r.get("status") == "success" and r.get("eval_suite") == "zeroshot7" and r.get("eval_limit") is None:
            done[(r["pruner"], r["pattern"], r["method"], int(r["seed"]))] = float(r["lr"])
rows = []
for seed in seeds:
    rows += [("wanda", p, "none", seed) for p in ("unstructured", "2of4")]
    rows += [("wanda", p, m, seed) for m in ("lora", "lors", "sqft", "spp", "losa") for p in ("unstructured", "2of4")]
    rows += [("wanda", "2of4", "slope", seed), ("none", "unstructured", "lora", seed)]
    rows += [("none", "unstructured", "none", seed)] if seed == "0" else []
    rows += [("wanda", p, "lors_exact", seed) for p in ("unstructured", "2of4")]
for pruner, pattern, method, seed in rows:
    trained = method != "none"
    sparsity = preset["sparsity"] if pruner != "none" else 0.0
    try:
        lr = chosen_lr(lr_file, preset["model"]["name"], pruner, pattern, sparsity, method)[0] if trained else None
    except ConfigError as exc:  # e.g. its lr-sweep runs failed: the other rows still run
        print(f"[skipped] {pruner} {pattern} {method} seed {seed}: {exc}", file=sys.stderr)
        continue
    key = (pruner, pattern, method, int(seed))
    if key in done and (not trained or done[key] == lr):
        continue
    extra = f" trainer.lr_from={lr_file}" if trained else ""
    print(f"methods_table pruning={pruner} method={method} pattern={pattern} seed={seed}{extra}")
EOF
fi
wait
echo "stage $STAGE done in $(( $(date +%s) - start )) s"
