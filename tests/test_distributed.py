"""distributed=fsdp on CPU with 2 gloo processes (docs/distributed.md): the sharding helpers, LoRS's per-layer W_eff
under FSDP2's all-gather, and the whole pipeline through `torchrun --nproc_per_node 2` against one process."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorsbench import distributed
from lorsbench.config import MethodSpec
from lorsbench.errors import ConfigError
from lorsbench.registry import build_method
from lorsbench.records import RunRecord, read_record, unknown_fields, validate_record
from tests.conftest import REPO
from lorsbench.modules import target_linears
from tests.methods_helpers import TARGETS, batches, context, random_masks, tiny_llama

# Losses of the 2-rank run against one process on the same global batch: the gradient is the mean of the two
# ranks' mean losses (FSDP averages), equal to the one-process mean when both halves carry as many loss tokens
# (rows filled to seq_len here); only the summation order differs (float32).
LOSS_RTOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# helpers, in one process


def test_rank_rows_of_two_ranks_are_the_global_batch():
    rows = torch.arange(24).reshape(12, 2)

    def make(n):
        for start in range(0, 12, n):
            yield {"input_ids": rows[start:start + n]}

    ranks = [distributed.rank_slices(make, 3, rank, 2) for rank in (0, 1)]
    for step, (a, b) in enumerate(zip(ranks[0](), ranks[1]())):
        assert torch.equal(torch.cat([a["input_ids"], b["input_ids"]]), rows[step * 6:(step + 1) * 6])
    single = distributed.Single(torch.device("cpu")).batches(make, 6)
    assert torch.equal(next(single())["input_ids"], rows[:6])


def test_meta_copy_holds_no_parameter_memory_and_loads_a_full_state_dict():
    model = tiny_llama(torch.float32)
    masks = random_masks(model, "unstructured")
    build_method(MethodSpec("lors", {"init": "lora"})).attach(model, masks, context())
    skeleton = distributed.meta_copy(model)
    assert all(p.is_meta for p in skeleton.parameters())
    shared = dict(model.named_buffers())
    for name, buffer in skeleton.named_buffers():  # the masks: non-persistent, shared (not copied)
        if name.endswith(".mask"):
            assert buffer is shared[name]
    skeleton.load_state_dict(model.state_dict(), strict=True, assign=True)
    for (name, a), (_, b) in zip(model.named_parameters(), skeleton.named_parameters()):
        assert torch.equal(a, b) and a.requires_grad == b.requires_grad, name
    batch = batches(1)[0]
    assert torch.equal(model(**batch).logits, skeleton(**batch).logits)


def test_rank_files_and_records(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert distributed.rank_file("error.log") == "error.rank1.log"
    record = distributed.new_record(tmp_path)
    assert isinstance(record, distributed.RankRecord)
    record.save()
    assert not list(tmp_path.iterdir())  # a rank > 0 writes nothing while it works
    record.update(status="failed", error="RuntimeError: boom", error_type="RuntimeError", phase_failed="attach")
    record.save()
    assert not (tmp_path / "run.json").exists()
    monkeypatch.setenv("RANK", "0")
    assert distributed.rank_file("error.log") == "error.log"
    main = distributed.new_record(tmp_path)
    main.update(status="interrupted", error="interrupted by SIGTERM in phase fine_tune", phase_failed="fine_tune")
    distributed.blame_failed_rank(main)
    assert main["status"] == "failed" and main["phase_failed"] == "attach"
    assert main["error"] == "rank 1: RuntimeError: boom"
    own = distributed.new_record(tmp_path)  # every rank failed alike: rank 0's own error stays
    own.update(status="failed", error="ConfigError: bad", error_type="ConfigError", phase_failed="setup")
    distributed.blame_failed_rank(own)
    assert own["error"] == "ConfigError: bad" and own["phase_failed"] == "setup"
    lost = distributed.new_record(tmp_path)
    lost.update(status="failed", error="DistBackendError: [gloo] Connection closed by peer",
                error_type="DistBackendError", phase_failed="fine_tune")
    distributed.blame_failed_rank(lost)
    assert lost["error"] == "rank 1: RuntimeError: boom"
    ok = RunRecord(tmp_path, status="success")
    distributed.blame_failed_rank(ok)
    assert ok["status"] == "success"


def _no_launcher(monkeypatch) -> None:
    """No launcher variables; whatever a test (or submitit's export) sets is undone afterwards."""
    for key in distributed.LAUNCH_ENV:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


@pytest.mark.parametrize("env, overrides, message", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, [], "add distributed=fsdp"),
    ({}, ["distributed=fsdp"], "python -m torch.distributed.run"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"},
     ["distributed=fsdp", "trainer.cuda_graph=true"], "trainer.cuda_graph=false"),
])
def test_launch_mismatch_is_a_clear_error(compose, monkeypatch, env, overrides, message):
    from lorsbench.config import build_run_config

    _no_launcher(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = build_run_config(compose(["model=tiny-llama", *overrides]))
    with pytest.raises(ConfigError, match=message):
        distributed.check_launch(cfg, scheduled=False)


def test_bad_strategy_names_the_valid_ones(compose):
    from lorsbench.config import build_run_config

    with pytest.raises(ConfigError, match="fsdp"):
        build_run_config(compose(["model=tiny-llama", "distributed.strategy=ddp"]))


# ---------------------------------------------------------------------------------------------------------------
# two gloo processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lors_under_fsdp(rank: int, port: int, out: str) -> None:
    """One rank: LoRS on a tiny LLaMA sharded by `FSDP.shard` against its unsharded copy (same inputs)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = tiny_llama(torch.float32)
    masks = random_masks(model, "unstructured")
    params = build_method(MethodSpec("lors", {"init": "lora"})).attach(model, masks, context())
    with torch.no_grad():
        for p in params:  # a non-zero U: the adapter changes W_eff
            if p.shape[1] == 16:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    reference = copy.deepcopy(model)
    seen = []

    def look(module, args):
        seen.append((type(module.weight).__name__, tuple(module.weight.shape),
                     (module.out_features, module.in_features)))

    for module in model.modules():
        if type(module).__name__ == "LoRSLinear":
            module.register_forward_pre_hook(look)
    ranks = distributed.FSDP(torch.device("cpu"))
    sharded, sharded_params = ranks.shard(model, params)
    assert all(type(p).__name__ == "DTensor" for p in sharded_params)
    batch = batches(1, batch_size=2)[0]
    logits = sharded(**batch).logits
    sharded(**batch).loss.backward()
    reference(**batch).loss.backward()
    ref_grads = [p.grad for p in reference.parameters() if p.requires_grad]
    grads_match = all(torch.allclose(p.grad.full_tensor(), g, rtol=1e-5, atol=1e-7)
                      for p, g in zip(sharded_params, ref_grads))
    full = ranks.full_model(sharded)
    if rank == 0:
        state = {k: v for k, v in full.state_dict().items()}
        same_state = all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
    else:
        same_state = full is None
    Path(out, f"{rank}.json").write_text(json.dumps({
        "logits_match": torch.allclose(logits, reference(**batch).logits, rtol=1e-5, atol=1e-6),
        "grads_match": grads_match, "same_state": same_state, "seen": seen, "peaks": _step_peaks(ranks, batch),
    }))


MEMORY_CASES = {"lora": ("lora", {"rank": 16}), "lors": ("lors", {"rank": 16, "init": "lora"}),
                "lors_stored_mask": ("lors", {"rank": 16, "init": "lora", "mask_source": "stored"})}


def _step_peaks(ranks, batch) -> dict[str, dict[str, int]]:
    """Peak bytes of one sharded training step (forward, backward, AdamW) per category, by PyTorch's
    FSDPMemTracker, for LoRA and LoRS at equal rank: what LoRS's per-layer W_eff adds under FSDP."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    peaks = {}
    for case, (name, options) in MEMORY_CASES.items():
        model = tiny_llama(torch.float32)
        masks = random_masks(model, "unstructured")
        params = build_method(MethodSpec(name, options)).attach(model, masks, context())
        model, params = ranks.shard(model, params)
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        for tracked in (False, True):  # the first step creates AdamW's state
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs((batch,))
            with tracker if tracked else contextlib.nullcontext():
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        peaks[case] = {str(getattr(k, "name", k)): v for k, v in snapshot.items()}
    return peaks


def test_lors_w_eff_composes_with_fsdp_all_gather(tmp_path):
    """In each LoRSLinear forward the weight is the whole gathered d_out x d_in tensor (not a shard), so W_eff is
    built per layer as in one process: logits, adapter gradients and the gathered state equal the unsharded model's."""
    torch.multiprocessing.spawn(_lors_under_fsdp, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result["logits_match"] and result["grads_match"] and result["same_state"], result
        assert result["seen"] and all(kind == "Parameter" and shape == mask for kind, shape, mask in result["seen"])
    # memory: LoRS's W_eff is one d_out x d_in buffer at a time, built after the layer's all-gather and freed in the
    # layer; at equal rank the step's peak stays within that buffer of LoRA's. A stored mask is a buffer, not a
    # parameter: every rank holds all of it (one byte per weight), unsharded.
    model = tiny_llama(torch.float32)
    largest = max(m.weight.numel() for m in target_linears(model, TARGETS).values()) * 4
    mask_bytes = sum(m.weight.numel() for m in target_linears(model, TARGETS).values())
    peaks = json.loads((tmp_path / "0.json").read_text())["peaks"]
    assert peaks["lors"]["Total"] <= peaks["lora"]["Total"] + largest
    assert peaks["lors"]["SHARDED_PARAM"] == peaks["lora"]["SHARDED_PARAM"]  # same adapter sizes at equal rank
    assert peaks["lors_stored_mask"]["BUFFER"] - peaks["lors"]["BUFFER"] == mask_bytes


# The methods the efficiency benchmark runs sharded (item 6), plus the others FSDP accepts. Options: no dropout
# (each rank draws its own dropout masks, as under any data parallelism), the data-free init, and SQFT's elastic
# ranks (drawn per layer on the host every forward) on.
SHARDED_METHODS = {"lora": {"dropout": 0.0}, "spp": {"dropout": 0.0}, "sqft": {"nls": True, "dropout": 0.0},
                   "lors": {"init": "lora"}, "lors_exact": {"init": "lora"}, "slope": {"dropout": 0.0}}


def _methods_under_fsdp(rank: int, port: int, out: str) -> None:
    """One rank: each method trained 3 steps through `training.train` on this rank's half of every global batch,
    against the same method trained in this process on the whole batch; then gathered and merged on rank 0."""
    from lorsbench.config import ProfileConfig, TrainerConfig
    from lorsbench.training import train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks = distributed.FSDP(torch.device("cpu"))
    config = TrainerConfig(max_steps=3, micro_batch_size=2, seq_len=8, lr=1e-3, warmup_steps=0)
    data = batches(3, batch_size=4)
    results = {}
    for name, options in SHARDED_METHODS.items():
        def build():
            model = tiny_llama(torch.float32)
            masks = random_masks(model, "2of4")
            method = build_method(MethodSpec(name, options))
            return model, method, method.attach(model, masks, context())

        reference, ref_method, ref_params = build()
        alone = train(reference, ref_params, iter(data), config, ProfileConfig(0), torch.device("cpu"))
        model, method, params = build()
        model, params = ranks.shard(model, params)
        mine = [{k: v[2 * rank:2 * rank + 2] for k, v in b.items()} for b in data]
        sharded = train(model, params, iter(mine), config, ProfileConfig(0), torch.device("cpu"), ranks=ranks)
        full = ranks.full_model(model)
        same_weights = None
        if rank == 0:
            merged, ref_merged = method.merge(full).state_dict(), ref_method.merge(reference).state_dict()
            # float32 sums in another order; AdamW turns a gradient difference near 0 into up to lr per step
            same_weights = all(torch.allclose(merged[k], v, rtol=1e-4, atol=1e-5) for k, v in ref_merged.items())
        results[name] = {"loss": sharded.final_loss, "loss_alone": alone.final_loss, "same_weights": same_weights,
                         "tokens_per_step": sharded.tokens_per_step}
    Path(out, f"{rank}.json").write_text(json.dumps(results))


@pytest.mark.slow  # ~20 s: six methods trained twice each
def test_every_method_trains_sharded_as_in_one_process(tmp_path):
    """A method does not know it is sharded: 2 gloo ranks of half the global batch give the one-process losses and,
    merged on rank 0, the one-process merged weights."""
    torch.multiprocessing.spawn(_methods_under_fsdp, args=(_free_port(), str(tmp_path)), nprocs=2)
    results = json.loads((tmp_path / "0.json").read_text())
    assert set(results) == set(SHARDED_METHODS)
    for name, result in results.items():
        assert result["loss"] == pytest.approx(result["loss_alone"], rel=LOSS_RTOL), name
        assert result["same_weights"] is True, name
        assert result["tokens_per_step"] == 2 * 2 * 8, name


# ---------------------------------------------------------------------------------------------------------------
# the pipeline through torchrun


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "",
                                          "output": str(2 * i + 1)}) for i in range(24)))
    return path


def _overrides(data: Path, root: Path, *extra: str) -> list[str]:
    return ["model=tiny-llama", "dtype=float32", "device=cpu", "data=local", f"data.path={data}",
            "data.heldout_examples=4", "eval=none", "method=lors", "save_merged=true", "trainer.max_steps=3",
            "trainer.seq_len=32", "trainer.warmup_steps=1", "profile.warmup_steps=1",
            f"paths.cache_dir={root / 'cache'}", f"paths.output_root={root / 'out'}", *extra]


def _torchrun(args: list[str], script: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *(script or ["-m", "lorsbench"]), *args]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    for key in distributed.LAUNCH_ENV:
        env.pop(key, None)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


def _losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_rank_pipeline_matches_one_process(train_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorsbench.pruning.artifacts import MASKS_FILE
    from lorsbench.pruning.masks import MaskSet

    done = _torchrun(_overrides(train_data, tmp_path, "distributed=fsdp", "trainer.micro_batch_size=2"))
    assert done.returncode == 0, done.stderr[-4000:]
    folders = [p.parent for p in (tmp_path / "out").glob("runs/*/run.json")]
    assert len(folders) == 1, folders  # one run folder, one record: rank 0's
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == [folders[0].name]
    run = folders[0]
    record = read_record(run)
    assert record["status"] == "success", record.get("error")
    assert validate_record(record) == [] and unknown_fields(record) == []
    assert record["world_size"] == 2 and record["sharding"] == distributed.SHARDING
    assert record["peak_mem_gib_max_over_ranks"] >= record["peak_mem_gib_rank0"] > 0
    assert record["tokens_per_step"] == 2 * 2 * 32 and record["tokens_per_s"] > 0
    assert not list(run.glob("*.rank*"))  # no rank failed

    single = subprocess.run([sys.executable, "-m", "lorsbench", *_overrides(train_data, tmp_path / "one",
                             "trainer.micro_batch_size=4"), f"hydra.run.dir={tmp_path / 'single'}"],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"},
                            timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    alone = read_record(tmp_path / "single")
    assert _losses(run) == pytest.approx(_losses(tmp_path / "single"), rel=LOSS_RTOL)
    assert record["mask_digest"] == alone["mask_digest"]
    assert record["val_loss"] == pytest.approx(alone["val_loss"], rel=LOSS_RTOL)

    # the merged model exported by rank 0 against the stored mask artifact (the one rank 0 wrote, rank 1 loaded):
    # zero exactly where the mask prunes (a kept weight of this random model is never exactly 0)
    masks = MaskSet.load(Path(record["prune_artifact"]) / MASKS_FILE)
    model = AutoModelForCausalLM.from_pretrained(run / record["merged_dir"], dtype=torch.float32)
    linears = target_linears(model, tuple(record["resolved_config"]["targets"]))
    assert set(masks) == set(linears)
    for name, linear in linears.items():
        assert torch.equal(linear.weight != 0, masks[name].to(torch.bool)), name
    assert record["mask_preserved_after_merge"] is True and record["merged_reload_verified"] is True


@pytest.mark.slow
def test_a_failing_rank_fails_the_run_and_every_rank_exits(train_data, tmp_path):
    done = _torchrun(_overrides(train_data, tmp_path, "distributed=fsdp", "trainer.micro_batch_size=2"),
                     script=[str(REPO / "tests" / "distributed_fail_rank1.py")])
    assert done.returncode != 0
    records = list((tmp_path / "out").glob("runs/*/run.json"))
    assert len(records) == 1, done.stderr[-4000:]
    record = read_record(records[0])
    assert record["status"] == "failed", record
    assert record["error"] == "rank 1: RuntimeError: planted failure on rank 1"
    assert record["phase_failed"] == "fine_tune"
    assert (records[0].parent / "error.rank1.log").exists()


# ---------------------------------------------------------------------------------------------------------------
# the efficiency benchmark at several GPUs (item 6 runs on GPUs: scripts/gpu_distributed.sh)


def test_bench_refuses_several_gpus_without_them(tmp_path, capsys):
    from lorsbench.bench.__main__ import main

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    code = main(["--model", "random-llama2-13b", "--methods", "lora", "--seq-lens", "2048", "--nproc", "2",
                 "--out-dir", str(tmp_path / "bench")])
    assert code == 2
    assert "--nproc 2 runs each cell on 2 GPUs" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


@pytest.mark.slow
def test_bench_cell_under_torchrun_reports_the_world(tmp_path):
    out = tmp_path / "row.json"
    done = _torchrun(["--model", "tiny-llama", "--pattern", "2of4", "--method", "lors", "--seq-len", "32",
                      "--batch-size", "2", "--warmup", "1", "--steps", "2", "--profiled-steps", "0",
                      "--dtype", "float32", "--device", "cpu", "--json-out", str(out)],
                     script=["-m", "lorsbench.bench.cell"])
    assert done.returncode == 0, done.stderr[-4000:]
    row = json.loads(out.read_text())
    assert row["status"] == "ok" and row["world_size"] == 2
    assert row["peak_alloc_gib_max_over_ranks"] >= row["peak_alloc_gib"] > 0
    assert row["tokens_per_s"] == pytest.approx(2 * 2 * 32 / (row["step_ms_median"] / 1000))


def test_a_submitit_task_gets_torchruns_variables(compose, monkeypatch):
    """hydra/launcher=slurm_multigpu: each SLURM task of the job is one rank (submitit's job environment)."""
    pytest.importorskip("submitit")
    from lorsbench.config import build_run_config

    _no_launcher(monkeypatch)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "gpu07"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert distributed.launch_rank() == 1 and distributed.launch_world_size() == 2
    distributed.check_launch(build_run_config(compose(["model=tiny-llama", "distributed=fsdp"])), scheduled=False)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07"


def test_an_sbatch_allocation_of_several_tasks_is_one_process(monkeypatch):
    """SLURM_NTASKS of a plain sbatch job (not a submitit task) says nothing about this process."""
    _no_launcher(monkeypatch)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert distributed.launch_world_size() == 1 and distributed.launch_rank() == 0


def test_scaling_table_relates_each_world_size_to_one_gpu(tmp_path):
    from lorsbench.bench import table
    from lorsbench.bench.scaling import main

    base = {"model": "random-llama2-13b", "pattern": "2of4", "sparsity": 0.5, "batch_size": 4, "seq_len": 2048,
            "status": "ok"}
    rows = [{**base, "label": "lora", "method": "lora", "world_size": 1, "tokens_per_s": 1000.0,
             "step_ms_median": 8.0, "peak_alloc_gib": 40.0},
            {**base, "label": "lora", "method": "lora", "world_size": 2, "tokens_per_s": 1800.0,
             "step_ms_median": 9.0, "peak_alloc_gib": 22.0, "peak_alloc_gib_max_over_ranks": 24.0},
            {**base, "label": "lors", "method": "lors", "world_size": 2, "tokens_per_s": 1500.0,
             "step_ms_median": 11.0, "peak_alloc_gib": 30.0, "peak_alloc_gib_max_over_ranks": 30.0}]
    table.write_csv(rows[:1], tmp_path / "one.csv")
    table.write_csv(rows[1:], tmp_path / "two.csv")
    assert main([str(tmp_path / "scaling.md"), str(tmp_path / "one.csv"), str(tmp_path / "two.csv")]) == 0
    text = (tmp_path / "scaling.md").read_text()
    assert "| `lora` | 2 | 9.0 | 1800 | 0.90 | 22.00 | 24.00 | 1.00 |" in text
    assert "| `lors` | 2 | 11.0 | 1500 | – | 30.00 | 30.00 | 1.25 |" in text  # no 1-GPU lors cell


@pytest.mark.parametrize("method, refused", [("full_sparse_ft", True), ("lors", False), ("lora", False)])
def test_a_method_that_hooks_its_gradients_is_refused(method, refused):
    model = tiny_llama(torch.float32)
    masks = random_masks(model, "unstructured")
    params = dict(lors={"init": "lora"}).get(method, {})
    build_method(MethodSpec(method, params)).attach(model, masks, context())
    if refused:
        with pytest.raises(ConfigError, match="hooks its parameters' gradients"):
            distributed.check_no_gradient_hooks(model)
    else:
        distributed.check_no_gradient_hooks(model)


def test_two_processes_without_fsdp_fail_with_one_record(train_data, tmp_path):
    """torchrun with distributed=none would run the pipeline twice into one folder: refused in setup, one record."""
    done = _torchrun(_overrides(train_data, tmp_path))
    assert done.returncode != 0
    records = list((tmp_path / "out").glob("runs/*/run.json"))
    assert len(records) == 1, done.stderr[-4000:]
    record = read_record(records[0])
    assert record["status"] == "failed" and record["phase_failed"] == "setup"
    assert "add distributed=fsdp" in record["error"] and not record["error"].startswith("rank 1")
