"""The efficiency benchmark's pieces on CPU with a tiny random LLaMA (the GPU numbers live in results/efficiency/)."""
from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch import nn

from lorsbench.bench import cell, flops, layer, peers, table
from lorsbench.config import ConfigError, TrainerConfig

REPO = Path(__file__).resolve().parent.parent
CPU = ["--model", "tiny-llama", "--device", "cpu", "--dtype", "float32", "--seq-lens", "16", "--warmup", "1",
       "--steps", "2", "--no-plot"]


def _spec(method: str, seq_len: int = 16, **kw) -> cell.CellSpec:
    base = dict(model="tiny-llama", pattern="2of4", method=method, seq_len=seq_len, warmup_steps=1,
                measured_steps=2, dtype="float32", device="cpu")
    base.update(kw)
    return cell.CellSpec(**base)


# --- the cell's config: Hydra + build_run_config -----------------------------------------------------------------

def test_a_cell_is_composed_from_the_preset_the_protocol_then_the_label():
    cfg = cell.compose_cell(_spec("lors:kernel=torch,alpha=32"))
    assert cfg.method.name == "lors"
    assert cfg.method.params["rank"] == 16 and cfg.method.params["init"] == "lora"  # no data-dependent init
    assert cfg.method.params["kernel"] == "torch" and cfg.method.params["alpha"] == 32
    assert tuple(cfg.method.params["targets"]) == cfg.pruning.targets == (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # ${targets} resolved
    assert cfg.pruning.name == "magnitude" and cfg.eval.suite == "none"  # the preset's
    assert (cfg.trainer.micro_batch_size, cfg.trainer.seq_len, cfg.trainer.max_steps) == (1, 16, 3)
    assert cfg.trainer.lr == 1e-5 and cfg.trainer.warmup_steps == 0 and cfg.profile.warmup_steps == 1
    assert cfg.pruning.sparsity == 0.5 and cfg.pruning.pattern.m == 4
    assert cell.compose_cell(_spec("spp")).method.params["rank"] == 16  # spp's rank only sets its scale
    assert "rank" not in cell.compose_cell(_spec("full_sparse_ft")).method.params


def test_user_overrides_reach_the_cell_and_the_label_wins_over_the_protocol():
    cfg = cell.compose_cell(_spec("lora:rank=8", overrides=("trainer.lr=3e-5", "targets=[q_proj,v_proj]"),
                                  batch_size=4))
    assert cfg.method.params["rank"] == 8 and cfg.trainer.lr == 3e-5 and cfg.trainer.micro_batch_size == 4
    assert cfg.pruning.targets == ("q_proj", "v_proj")
    unstructured = cell.compose_cell(_spec("lora", pattern="unstructured", sparsity=0.3))
    assert unstructured.pruning.sparsity == 0.3 and not unstructured.pruning.pattern.is_nm


def test_cuda_graph_mode_sets_the_trainer_option():
    assert "++trainer.cuda_graph=true" in cell.cell_overrides(_spec("lora", cuda_graph=True))
    if "cuda_graph" in {f.name for f in fields(TrainerConfig)}:
        assert cell.compose_cell(_spec("lora", cuda_graph=True)).trainer.cuda_graph is True
    else:  # before the training loop captures graphs: one clear error naming the key
        with pytest.raises(ConfigError, match="cuda_graph"):
            cell.compose_cell(_spec("lora", cuda_graph=True))


def test_bad_cells_are_one_clear_error():
    with pytest.raises(ConfigError, match="nope"):
        cell.compose_cell(_spec("lora", model="nope"))
    with pytest.raises(ConfigError, match="unknown method 'lroa'"):
        cell.compose_cell(_spec("lroa"))
    with pytest.raises(ConfigError, match="not key=value"):
        cell.parse_label("lors:kernel")
    with pytest.raises(ConfigError, match="unknown peer 'peft'"):
        cell.compose_cell(_spec("peer:peft"))
    with pytest.raises(ConfigError, match="needs calibration data"):
        cell.compose_cell(_spec("lora", overrides=("pruning=wanda",)))
    with pytest.raises(ConfigError, match="pattern 2of4 fixes sparsity at 0.5"):
        cell.compose_cell(_spec("lora", sparsity=0.3))


# --- one cell ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "lors", "full_sparse_ft", "peer:authors_lors"])
def test_run_cell_measures_one_configuration(method):
    row = cell.run_cell(_spec(method, gemm_tflops=1.0))
    assert row.status == "ok", row.error
    assert row.measured_steps == 2 and row.step_ms_median > 0 and math.isfinite(row.final_loss)
    assert row.saved_activations_gib > 0 and row.trainable_params > 0
    assert row.step_mode == "eager" and row.cuda_graph is False
    assert row.step_gflop > 0 and row.floor_ms == pytest.approx(row.step_gflop / 1.0)  # GFLOP at 1 TFLOP/s = ms
    assert row.x_floor == pytest.approx(row.step_ms_median / row.floor_ms)
    assert row.gpu_kernel_ms is None  # kernel time is measured on CUDA only
    assert row.peer == method.startswith("peer:") and row.method == ("peer" if row.peer else method)


def test_run_cell_prunes_through_the_pruning_package_with_masks_on_the_device(monkeypatch):
    from lorsbench.pruning.magnitude import MagnitudePruner

    seen = {}
    original = MagnitudePruner.prune

    def spy(self, model, calibration=None, device=None, keep_on_device=False):
        seen["keep_on_device"] = keep_on_device
        return original(self, model, calibration, device, keep_on_device)

    monkeypatch.setattr(MagnitudePruner, "prune", spy)
    assert cell.run_cell(_spec("lora")).status == "ok" and seen == {"keep_on_device": True}


def test_magnitude_masks_stay_where_the_weights_are_when_asked():
    from lorsbench.config import PatternConfig, PruningConfig
    from lorsbench.pruning import build_pruner

    holder = layer._Holder(8, 8).to("meta")
    config = PruningConfig("magnitude", 0.5, PatternConfig("2of4", 2, 4), ("proj",))
    try:
        on_device = build_pruner(config).prune(holder, None, keep_on_device=True)
    except NotImplementedError:
        pytest.skip("magnitude pruning does not run on the meta device")
    assert on_device["layers.0.proj"].device.type == "meta"


def test_a_failure_is_a_result_with_the_shared_failure_rule(monkeypatch):
    import lorsbench.training
    from lorsbench.records import failure_status

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(lorsbench.training, "train", boom)
    row = cell.run_cell(_spec("lora"))
    assert row.status == "oom" and row.phase == "train" and "out of memory" in row.error
    assert failure_status(RuntimeError("CUDA error: out of memory")) == "oom"
    assert failure_status(ValueError("bad")) == "failed"
    bad = cell.run_cell(_spec("lora", model="nope"))
    assert bad.status == "failed" and bad.phase == "config" and "nope" in bad.error


def test_sqft_saves_more_activation_memory_than_lora():
    """SQFT's plain-autograd masked delta keeps a d_out×d_in tensor per layer for backward."""
    lora = cell.run_cell(_spec("lora"))
    sqft = cell.run_cell(_spec("sqft"))
    assert sqft.status == lora.status == "ok"
    assert sqft.saved_activations_gib > lora.saved_activations_gib


# --- FLOP floor ----------------------------------------------------------------------------------------------------

def test_step_flops_match_a_hand_count():
    shapes = flops.StepShapes(linears=((8, 4), (4, 8)), lm_head=(10, 4), attention_layers=1, attention_width=4)
    # tokens = 2 × 3 = 6. base fwd + dX: 4·6·(32 + 32) = 1536; lm_head: 4·6·40 = 960;
    # rank-1 adapters: 6·6·1·(12 + 12) = 864; causal attention: 6·1·2·3²·4 = 432.
    assert flops.step_flops(shapes, batch_size=2, seq_len=3, rank=1) == 1536 + 960 + 864 + 432
    assert flops.floor_ms(2e12, 1000.0) == pytest.approx(2.0)


def test_model_shapes_read_every_target_linear_and_the_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300))
    shapes = flops.model_shapes(model, ("q_proj", "k_proj", "down_proj"))
    assert sorted(set(shapes.linears)) == [(16, 32), (32, 32), (32, 64)] and len(shapes.linears) == 6
    assert shapes.lm_head == (300, 32) and shapes.attention_layers == 2 and shapes.attention_width == 32


def test_the_gemm_probe_measures_a_rate():
    rate = flops.gemm_tflops(torch.device("cpu"), torch.float32, n=64, iters=2)
    assert math.isfinite(rate) and rate > 0


# --- peers ---------------------------------------------------------------------------------------------------------

def _pruned_linear(d_out=6, d_in=8, bias=True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(d_in, d_out, bias=bias).double()
    with torch.no_grad():
        linear.weight[torch.rand(d_out, d_in) < 0.5] = 0.0
    return linear


def test_authors_lors_forward_and_gradients_match_float64_formulas():
    base = _pruned_linear()
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    module = peers.AuthorsLorsLinear(base, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(1))
    assert module.lora_A.dtype == module.lora_B.dtype == W.dtype  # adapters in the weight's dtype, as theirs
    assert bool((module.lora_A == 0).all()) and float(module.lora_B.detach().abs().max()) <= 1 / math.sqrt(8)
    with torch.no_grad():
        module.lora_A.normal_()
    A, B = module.lora_A.detach().clone(), module.lora_B.detach().clone()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, 6, dtype=torch.float64)
    y = module(x)
    y.backward(dy)
    s = 4.0 / math.sqrt(2)
    w_eff = (W + s * A @ B) * (W != 0)
    X, G = x.detach().reshape(-1, 8), dy.reshape(-1, 6)
    torch.testing.assert_close(y.detach(), x.detach() @ w_eff.T + b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, dy @ w_eff, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.lora_A.grad, G.T @ X @ B.T, rtol=1e-12, atol=1e-12)  # no s, unmasked
    torch.testing.assert_close(module.lora_B.grad, (G @ A).T @ X, rtol=1e-12, atol=1e-12)
    assert module.weight.grad is None and module.bias.grad is None


def test_peft_lora_forward_and_gradients_match_float64_formulas():
    pytest.importorskip("peft")
    holder = layer._Holder(6, 8)
    holder.layers[0].proj = _pruned_linear(bias=False)
    W = holder.layers[0].proj.weight.detach().clone()
    params = peers.attach_peft_lora(holder, {"rank": 2, "alpha": 4.0, "dropout": 0.0}, ("proj",),
                                    torch.Generator().manual_seed(0))
    module = holder.layers[0].proj
    A, B = module.lora_A["default"].weight, module.lora_B["default"].weight  # r × d_in, d_out × r (zero)
    assert {id(p) for p in params} == {id(A), id(B)} and bool((B == 0).all())
    with torch.no_grad():
        B.normal_()
        A.data, B.data = A.data.double(), B.data.double()
    x = torch.randn(4, 8, dtype=torch.float64)
    dy = torch.randn(4, 6, dtype=torch.float64)
    y = holder.layers[0].proj(x)
    y.backward(dy)
    s = 4.0 / 2
    torch.testing.assert_close(y.detach(), x @ W.T + s * x @ A.detach().T @ B.detach().T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A.grad, s * B.detach().T @ dy.T @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(B.grad, s * dy.T @ x @ A.detach().T, rtol=1e-12, atol=1e-12)


def test_peers_are_never_methods():
    from lorsbench.config import MethodSpec
    from lorsbench.registry import build_method, list_methods

    assert peers.PEERS and not set(peers.PEERS) & set(list_methods())
    for name in peers.PEERS:
        with pytest.raises(ConfigError, match=f"unknown method '{name}'"):
            build_method(MethodSpec(name))
        assert peers.PEERS[name].config_method in list_methods()  # their hyper-parameters come from a method's yaml


# --- the table ------------------------------------------------------------------------------------------------------

def _row(label, seq, ms, gib, status="ok", **kw):
    row = {"label": label, "method": label.split(":")[0], "model": "m", "pattern": "2of4", "sparsity": 0.5,
           "seq_len": seq, "batch_size": 1, "dtype": "bfloat16", "status": status, "step_ms_median": ms,
           "step_ms_p90": ms, "peak_alloc_gib": gib, "peak_reserved_gib": gib, "static_alloc_gib": 1.0,
           "saved_activations_gib": 0.5, "trainable_params": 10, "gpu": "NVIDIA H100 80GB HBM3",
           "torch_version": "2.11", "triton_version": "3.6", "date_utc": "2026-01-01", "error": None,
           "method_config": {"rank": 16}, "step_ms_runs": [ms]}
    row.update(kw)
    return row


def test_ratios_markdown_and_csv_round_trip(tmp_path):
    rows = table.add_ratios([_row("lora", 512, 200.0, 20.0), _row("lors", 512, 220.0, 20.2),
                             _row("sqft", 512, None, None, status="oom"), _row("lors", 1024, 300.0, 25.0)])
    lors = next(r for r in rows if r["label"] == "lors" and r["seq_len"] == 512)
    assert lors["time_vs_ref"] == pytest.approx(1.1) and lors["mem_vs_ref"] == pytest.approx(1.01)
    assert next(r for r in rows if r["seq_len"] == 1024)["time_vs_ref"] is None  # no lora row at 1024
    text = table.markdown(rows, "t")
    assert "| `lors` | 20.20 (1.01×) | 220.0 (1.10×) |" in text and "**OOM**" in text and "H100" in text
    table.write_csv(rows, tmp_path / "x.csv")
    back = table.read_csv(tmp_path / "x.csv")
    assert back[1]["step_ms_median"] == 220.0 and back[1]["method_config"] == {"rank": 16}
    assert back[2]["status"] == "oom" and back[2]["step_ms_median"] is None
    assert table.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert "kernel ms" not in text.split("Full numbers")[0]  # no kernel column where no row measured one
    assert table.plot(rows, tmp_path / "x.png", "t") and (tmp_path / "x.png").stat().st_size > 0


def test_kernel_time_gets_its_own_ratio_and_headline_column(tmp_path):
    lora, lors = _row("lora", 512, 200.0, 20.0), _row("lors", 512, 190.0, 20.0)
    lora["gpu_kernel_ms"], lors["gpu_kernel_ms"] = 80.0, 60.0
    rows = table.add_ratios([lora, lors])
    assert rows[1]["kernel_vs_ref"] == pytest.approx(0.75)
    assert "| `lors` | 20.00 (1.00×) | 190.0 (0.95×) | 60.0 (0.75×) |" in table.markdown(rows, "t")
    assert table.plot(rows, tmp_path / "k.png", "t")  # a third panel for the kernel time


def test_step_modes_peers_loads_and_the_floor_are_cells_of_their_own(tmp_path):
    rows = [_row("lora", 512, 200.0, 20.0, step_mode="eager", x_floor=10.0, gemm_tflops=790.0),
            _row("lora", 512, 60.0, 20.0, cuda_graph=True, step_mode="cuda_graph", x_floor=3.0),
            _row("lors", 512, 50.0, 20.0, cuda_graph=True, step_mode="eager", cuda_graph_fallback="no capture"),
            _row("peer:peft_lora", 512, 240.0, 21.0, peer=True, method="peer"),
            _row("lora", 2048, 650.0, 72.0, batch_size=4, tokens_per_s=12600.0),
            _row("lora", 2048, 900.0, 130.0, batch_size=7, largest_batch=True)]
    rows = table.add_ratios(rows)
    assert rows[2]["time_vs_ref"] == pytest.approx(50 / 60)  # graph rows compare with the graph reference
    assert rows[3]["time_vs_ref"] == pytest.approx(1.2)
    text = table.markdown(rows, "t")
    assert "| `lora` · graph | 20.00 (1.00×) | 60.0 (1.00×) | 3.00× |" in text
    assert "`peer:peft_lora` (peer)" in text and "@4×2048" in text and "7×2048 (largest that fits)" in text
    assert "eager (fallback: no capture)" in text and "790 TFLOP/s" in text and "12600" in text
    table.write_csv(rows, tmp_path / "m.csv")
    back = table.read_csv(tmp_path / "m.csv")
    assert [table.cell_key(r) for r in back] == [table.cell_key(r) for r in rows]
    assert back[1]["cuda_graph"] is True and back[0]["cuda_graph"] is False and back[3]["peer"] is True


def test_repeats_keep_the_median_run_and_the_one_kernel_time():
    from lorsbench.bench.__main__ import _median_run

    runs = [_row("lors", 512, ms, 20.0) for ms in (300.0, 200.0, 250.0)]
    runs[0]["gpu_kernel_ms"], runs[0]["top_kernels"] = 90.0, [["gemm", 60.0]]  # only one run profiled
    runs.append(_row("lors", 512, None, None, status="oom"))
    row = _median_run(runs)
    assert row["step_ms_median"] == 250.0 and row["step_ms_runs"] == [300.0, 200.0, 250.0]
    assert row["gpu_kernel_ms"] == 90.0 and row["top_kernels"] == [["gemm", 60.0]]


def test_top_kernels_sum_each_name_per_step_and_show_in_the_table(tmp_path):
    from lorsbench.profiling import top_kernels

    events = [("sm90_gemm", 4_000_000), ("add", 1_000_000), ("sm90_gemm", 2_000_000), ("mul", 3_000_000)]
    assert top_kernels(events, active_steps=2, n=2) == (("sm90_gemm", 3.0), ("mul", 1.5))
    assert top_kernels([("x" * 200, 1_000_000)], 1, 1, name_chars=10) == (("x" * 10, 1.0),)
    row = _row("lors", 512, 200.0, 20.0, gpu_kernel_ms=80.0, top_kernels=[["sm90_gemm", 50.0], ["a|b", 3.0]])
    text = table.markdown([row], "t")
    assert "| `lors` | 512 | 80.0 | `sm90_gemm` 50.0; `a\\|b` 3.0 |" in text
    table.write_csv([row], tmp_path / "k.csv")
    assert table.read_csv(tmp_path / "k.csv")[0]["top_kernels"] == [["sm90_gemm", 50.0], ["a|b", 3.0]]


def test_largest_batch_doubles_then_bisects_to_the_last_batch_that_fits():
    from lorsbench.bench.__main__ import largest_batch

    tried = []

    def measure(batch):
        tried.append(batch)
        return _row("lora", 2048, 1.0, 1.0, batch_size=batch, status="ok" if batch <= 6 else "oom")

    row = largest_batch(measure, 1, 64)
    assert row["batch_size"] == 6 and row["largest_batch"] is True and tried == [1, 2, 4, 8, 6, 7]
    assert largest_batch(measure, 8, 64)["status"] == "oom"  # nothing fits: the failure is the row
    assert largest_batch(measure, 1, 4)["batch_size"] == 4  # the limit ends the search


def test_merge_lets_later_calls_win_and_recomputes_ratios(tmp_path):
    from lorsbench.bench import merge

    first, second = tmp_path / "a" / "m_2of4.csv", tmp_path / "b" / "m_2of4.csv"
    table.write_csv([_row("lors", 512, 300.0, 20.0), _row("sqft", 512, 250.0, 30.0)], first)
    table.write_csv([_row("lora", 512, 200.0, 20.0), _row("lors", 512, 220.0, 20.2),
                     _row("lors", 512, 70.0, 20.2, cuda_graph=True)], second)
    assert merge.main([str(tmp_path / "out"), str(first), str(second), "--note", "seen twice", "--no-plot"]) == 0
    rows = table.read_csv(tmp_path / "out" / "m_2of4.csv")
    assert [(r["label"], r["cuda_graph"]) for r in rows] == [("lora", False), ("lors", False), ("lors", True),
                                                             ("sqft", False)]
    assert rows[1]["step_ms_median"] == 220.0 and rows[1]["time_vs_ref"] == pytest.approx(1.1)
    assert rows[3]["mem_vs_ref"] == pytest.approx(1.5)
    assert "- seen twice" in (tmp_path / "out" / "m_2of4.md").read_text()
    with pytest.raises(SystemExit):
        merge.main([str(tmp_path / "out"), str(tmp_path / "nope.csv")])


# --- the command line -----------------------------------------------------------------------------------------------

def test_bench_cli_writes_csv_markdown_and_plot(tmp_path):
    from lorsbench.bench.__main__ import main

    code = main([*CPU[:-1], "--methods", "lora", "lors:kernel=torch", "--peers", "authors_lors",
                 "--out-dir", str(tmp_path), "--name", "t"])
    assert code == 0
    rows = table.read_csv(tmp_path / "t.csv")
    assert [r["label"] for r in rows] == ["lora", "lors:kernel=torch", "peer:authors_lors"]
    assert all(r["status"] == "ok" for r in rows) and rows[0]["time_vs_ref"] == 1.0
    assert rows[2]["peer"] is True and all(r["x_floor"] > 0 and r["gemm_tflops"] > 0 for r in rows)
    assert (tmp_path / "t.png").exists() and "(peer)" in (tmp_path / "t.md").read_text()


def test_bench_cli_without_cuda_is_one_clear_error_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from lorsbench.bench.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # what main sets; restored after the test
    monkeypatch.setenv("LORSBENCH_OUTPUT", str(tmp_path / "root"))
    monkeypatch.chdir(tmp_path)
    assert main(["--model", "tiny-llama", "--methods", "lora", "--seq-lens", "16"]) == 2
    assert main(["--model", "tiny-llama", "--methods", "lora", "--out-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is available" in err and "--device cpu" in err
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_bench_cli_refuses_an_existing_table_unless_append_or_force(tmp_path, capsys):
    from lorsbench.bench.__main__ import main

    old = table.write_csv([_row("sqft", 16, 5.0, 1.0, model="tiny-llama")], tmp_path / "t.csv")  # noqa: F841
    before = (tmp_path / "t.csv").read_bytes()
    args = [*CPU, "--methods", "lora", "--out-dir", str(tmp_path), "--name", "t"]
    assert main(args) == 2
    assert "t.csv exists" in capsys.readouterr().err and (tmp_path / "t.csv").read_bytes() == before
    assert not (tmp_path / "t.md").exists()
    assert main([*args, "--append"]) == 0
    assert [r["label"] for r in table.read_csv(tmp_path / "t.csv")] == ["sqft", "lora"]
    assert main([*args, "--force"]) == 0
    assert [r["label"] for r in table.read_csv(tmp_path / "t.csv")] == ["lora"]
    with pytest.raises(SystemExit):
        main([*args, "--append", "--force"])


def test_bench_cli_exits_non_zero_when_a_cell_fails(tmp_path, monkeypatch):
    import lorsbench.training
    from lorsbench.bench.__main__ import main

    def boom(*args, **kwargs):
        raise RuntimeError("a kernel failed")

    monkeypatch.setattr(lorsbench.training, "train", boom)  # the forked cell inherits it
    assert main([*CPU, "--methods", "lora", "--out-dir", str(tmp_path), "--name", "t"]) == 1
    row = table.read_csv(tmp_path / "t.csv")[0]
    assert row["status"] == "failed" and row["phase"] == "train" and "a kernel failed" in row["error"]


def test_bench_cli_writes_under_the_output_root_by_default(tmp_path, monkeypatch):
    from lorsbench.bench.__main__ import main

    monkeypatch.setenv("LORSBENCH_OUTPUT", str(tmp_path))
    assert main([*CPU, "--methods", "lora"]) == 0
    written = list((tmp_path / "bench").glob("*/tiny-llama_2of4.csv"))
    assert len(written) == 1 and written[0].parent.name.startswith("cpu")


def test_bench_cli_rejects_bad_input_before_building_anything(capsys):
    from lorsbench.bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["--model", "tiny-llama", "--device", "cpu", "--methods", "lroa"])
    assert "unknown method 'lroa'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "tiny-llama", "--device", "cpu", "--methods", "lora", "--max-batch", "lors"])
    assert "not among the measured labels" in capsys.readouterr().err


# --- the layer bench and the kernel tuner ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dense", "lora", "lors:kernel=torch", "full_sparse_ft"])
def test_layer_bench_builds_each_method_module_and_times_it(method):
    rows = layer.layer_rows([method], [(64, 32)], [16], "2of4", torch.device("cpu"), torch.float32)
    assert len(rows) == 1 and rows[0].status == "ok", rows[0].error
    assert rows[0].ms_median > 0


def test_every_default_bench_method_is_a_valid_configuration():
    from lorsbench.bench.__main__ import DEFAULT_METHODS

    for text in (*DEFAULT_METHODS, *(m for m in layer.METHODS if m != "dense")):
        cell.compose_cell(_spec(text))  # raises on an invalid combination (e.g. fused + weight mask)


def test_layer_bench_keeps_the_base_weight_sparse_for_full_fine_tuning():
    module, params = layer.build_layer("full_sparse_ft", 64, 32, "2of4", torch.device("cpu"), torch.float32)
    assert params == [module.weight]
    assert bool((module.weight[~module.mask] == 0).all())


def test_markdowns_render_through_the_report_table_writer():
    rows = [layer.LayerRow("lora", 64, 32, 16, ms_median=1.0, vs_lora=1.0, peak_extra_mib=2.0),
            layer.LayerRow("lors", 64, 32, 16, status="oom")]
    text = layer.layer_markdown(rows, "## x")
    assert "| `lora` | 1.000 (1.00) / 2 |" in text and "**OOM**" in text and "|---|---:|" in text
    semi = layer.semi_markdown([{"N": 8, "K": 8, "T": 16, "gemm": "fwd", "dense_ms": 2.0, "sparse_ms": 1.0,
                                 "speedup": 2.0, "rel_err": 1e-5}])
    assert "2.00×" in semi
    assert json.dumps(rows[0].__dict__)


def test_the_kernel_tuner_is_reached_through_the_registry_not_by_name():
    from lorsbench.methods import _lors_tuning

    from lorsbench.registry import kernel_tuners

    tuners = kernel_tuners()
    assert len(tuners) == 1 and set(tuners) <= {"lors", "lors_exact"}  # one tuner, shared by both LoRS methods
    rows = [{"kind": "fwd", "N": 8, "K": 8, "T": 16, "config": c, "ms": ms}
            for c, ms in (("cublas_dense", 1.0), ("torch_unfused", 2.0), ("triton_build+cublas", 1.5), ("b64", 0.5))]
    assert "| fwd | 8×8 | 16 | 1.0000 | 2.0000 | 1.5000 | 0.5000 (b64) | 0.50 | 0.25 |" in _lors_tuning.tune_markdown(rows)
    for path in (REPO / "lorsbench").rglob("*.py"):  # the package never imports a method's internals
        text = path.read_text()
        assert "_lors_triton" not in text and "_effective_weight" not in text, path


def test_the_cell_command_writes_its_result_as_json(tmp_path, capsys):
    out = tmp_path / "row.json"
    code = cell.main(["--model", "tiny-llama", "--device", "cpu", "--dtype", "float32", "--method", "lora",
                      "--seq-len", "16", "--warmup", "1", "--steps", "2", "--gemm-tflops", "2.0",
                      "--json-out", str(out)])
    row = json.loads(out.read_text())
    assert code == 0 and row["status"] == "ok" and row["gemm_tflops"] == 2.0 and row["x_floor"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "lors", "peer:authors_lors", "peer:peft_lora"])
def test_run_cell_on_cuda_measures_kernel_time_memory_and_the_floor(method):
    rate = flops.gemm_tflops(torch.device("cuda"), n=2048, iters=5)
    row = cell.run_cell(_spec(method, seq_len=64, device="cuda", dtype="bfloat16", gemm_tflops=rate))
    assert row.status == "ok", row.error
    assert row.gpu_kernel_ms > 0 and row.peak_alloc_gib > row.static_alloc_gib > 0 and row.x_floor > 1
    assert 0 < len(row.top_kernels) <= cell.TOP_KERNELS and sum(ms for _, ms in row.top_kernels) <= row.gpu_kernel_ms * 1.5
