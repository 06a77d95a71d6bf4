"""The efficiency benchmark's pieces on CPU with a tiny random LLaMA (the GPU numbers live in results/efficiency/)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lorsbench.bench import layer, step, table
from lorsbench.config import ConfigError, PatternConfig


def _spec(method: str, seq_len: int = 16, **kw) -> step.StepSpec:
    base = dict(model="tiny-llama", pattern="2of4", method=method, seq_len=seq_len, warmup_steps=1,
                measured_steps=2, dtype="float32", device="cpu")
    base.update(kw)
    return step.StepSpec(**base)


def test_method_spec_applies_the_protocol_then_overrides():
    spec = step.method_spec("lors:kernel=torch,alpha=32", rank=16)
    assert spec.name == "lors"
    assert spec.params["rank"] == 16 and spec.params["init"] == "lora"  # no data-dependent init in a step bench
    assert spec.params["kernel"] == "torch" and spec.params["alpha"] == 32
    assert "targets" not in spec.params  # the yaml's ${targets} interpolation is dropped (the run's targets apply)
    assert step.method_spec("spp", rank=16).params.get("rank") == 16  # spp's rank only sets its scale
    assert "rank" not in step.method_spec("full_sparse_ft", rank=16).params


def test_bad_names_and_overrides_are_one_clear_error():
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        step.model_config("nope")
    with pytest.raises(ConfigError, match="not key=value"):
        step.parse_method("lors:kernel")


def test_magnitude_masks_keep_two_of_four_and_zero_the_rest():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300))
    masks = step.magnitude_masks(model, step.TARGETS, 0.5, PatternConfig("2of4", 2, 4))
    assert len(masks) == 7
    for name, module in model.named_modules():
        if name in masks:
            assert bool((masks[name].reshape(-1, 4).sum(1) == 2).all())
            assert bool((module.weight[~masks[name]] == 0).all())


@pytest.mark.parametrize("method", ["lora", "lors", "full_sparse_ft"])
def test_run_step_measures_one_configuration(method):
    row = step.run_step(_spec(method))
    assert row.status == "ok", row.error
    assert row.measured_steps == 2 and row.step_ms_median > 0 and math.isfinite(row.final_loss)
    assert row.saved_activations_gib > 0
    assert row.trainable_params > 0 and row.method == method
    assert row.gpu_kernel_ms is None  # kernel time is measured on CUDA only


def test_run_step_reports_an_out_of_memory_error_as_a_row(monkeypatch):
    import lorsbench.training

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(lorsbench.training, "train", boom)
    row = step.run_step(_spec("lora"))
    assert row.status == "oom" and row.phase == "train" and "out of memory" in row.error


def test_sqft_saves_more_activation_memory_than_lora():
    """SQFT's plain-autograd masked delta keeps a d_out×d_in tensor per layer for backward (methods.md 7.1)."""
    lora = step.run_step(_spec("lora"))
    sqft = step.run_step(_spec("sqft"))
    assert sqft.status == lora.status == "ok"
    assert sqft.saved_activations_gib > lora.saved_activations_gib


def _row(label, seq, ms, gib, status="ok"):
    return {"label": label, "method": label.split(":")[0], "model": "m", "pattern": "2of4", "sparsity": 0.5,
            "seq_len": seq, "batch_size": 1, "dtype": "bfloat16", "status": status, "step_ms_median": ms,
            "step_ms_p90": ms, "peak_alloc_gib": gib, "peak_reserved_gib": gib, "static_alloc_gib": 1.0,
            "saved_activations_gib": 0.5, "trainable_params": 10, "gpu": "NVIDIA H100 80GB HBM3",
            "torch_version": "2.11", "triton_version": "3.6", "date_utc": "2026-01-01", "error": None,
            "method_config": {"rank": 16}, "step_ms_runs": [ms]}


def test_ratios_markdown_and_csv_round_trip(tmp_path):
    rows = table.add_ratios([_row("lora", 512, 200.0, 20.0), _row("lors", 512, 220.0, 20.2),
                             _row("sqft", 512, None, None, status="oom"), _row("lors", 1024, 300.0, 25.0)])
    lors = next(r for r in rows if r["label"] == "lors" and r["seq_len"] == 512)
    assert lors["time_vs_ref"] == pytest.approx(1.1) and lors["mem_vs_ref"] == pytest.approx(1.01)
    assert next(r for r in rows if r["seq_len"] == 1024)["time_vs_ref"] is None  # no lora row at 1024
    text = table.markdown(rows, "t")
    assert "| `lors` | 20.20 (1.01×) | 220.0 (1.10×) |" in text and "OOM" in text and "H100" in text
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


def test_bench_cli_writes_csv_markdown_and_plot(tmp_path, capsys):
    from lorsbench.bench.__main__ import main

    code = main(["--model", "tiny-llama", "--device", "cpu", "--dtype", "float32", "--seq-lens", "16",
                 "--methods", "lora", "lors:kernel=torch", "--warmup", "1", "--steps", "2",
                 "--out-dir", str(tmp_path), "--name", "t"])
    assert code == 0
    rows = table.read_csv(tmp_path / "t.csv")
    assert [r["label"] for r in rows] == ["lora", "lors:kernel=torch"]
    assert all(r["status"] == "ok" for r in rows) and rows[0]["time_vs_ref"] == 1.0
    assert (tmp_path / "t.png").exists() and "lors:kernel=torch" in (tmp_path / "t.md").read_text()


def test_bench_cli_rejects_an_unknown_method_before_building_anything(capsys):
    from lorsbench.bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["--model", "tiny-llama", "--device", "cpu", "--methods", "lroa"])
    assert "unknown method 'lroa'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["dense", "lora", "lors:kernel=torch", "full_sparse_ft"])
def test_layer_bench_builds_each_method_module_and_times_it(method):
    rows = layer.layer_rows([method], [(64, 32)], [16], "2of4", torch.device("cpu"), torch.float32)
    assert len(rows) == 1 and rows[0].status == "ok", rows[0].error
    assert rows[0].ms_median > 0


def test_every_default_bench_method_is_a_valid_configuration():
    from lorsbench.bench.__main__ import DEFAULT_METHODS
    from lorsbench.method import build_method

    for text in (*DEFAULT_METHODS, *(m for m in layer.METHODS if m != "dense")):
        build_method(step.method_spec(text, rank=16))  # raises on an invalid combination (e.g. fused + weight mask)


def test_layer_bench_keeps_the_base_weight_sparse_for_full_fine_tuning():
    module, params = layer.build_layer("full_sparse_ft", 64, 32, "2of4", torch.device("cpu"), torch.float32)
    assert params == [module.weight]
    assert bool((module.weight[~module.mask] == 0).all())


def test_markdowns_render():
    rows = [layer.LayerRow("lora", 64, 32, 16, ms_median=1.0, vs_lora=1.0, peak_extra_mib=2.0),
            layer.LayerRow("lors", 64, 32, 16, status="oom")]
    text = layer.layer_markdown(rows, "## x")
    assert "| `lora` | 1.000 (1.00) / 2 |" in text and "OOM" in text
    semi = layer.semi_markdown([{"N": 8, "K": 8, "T": 16, "gemm": "fwd", "dense_ms": 2.0, "sparse_ms": 1.0,
                                 "speedup": 2.0, "rel_err": 1e-5}])
    assert "2.00×" in semi
    assert json.dumps(rows[0].__dict__)


def test_repeats_keep_the_median_run_and_the_one_kernel_time():
    from lorsbench.bench.__main__ import _median_run

    runs = [_row("lors", 512, ms, 20.0) for ms in (300.0, 200.0, 250.0)]
    runs[0]["gpu_kernel_ms"] = 90.0  # only one run profiled
    runs.append(_row("lors", 512, None, None, status="oom"))
    row = _median_run(runs)
    assert row["step_ms_median"] == 250.0 and row["step_ms_runs"] == [300.0, 200.0, 250.0]
    assert row["gpu_kernel_ms"] == 90.0


def test_merge_lets_later_calls_win_and_recomputes_ratios(tmp_path):
    from lorsbench.bench import merge

    first, second = tmp_path / "a" / "m_2of4.csv", tmp_path / "b" / "m_2of4.csv"
    table.write_csv([_row("lors", 512, 300.0, 20.0), _row("sqft", 512, 250.0, 30.0)], first)
    table.write_csv([_row("lora", 512, 200.0, 20.0), _row("lors", 512, 220.0, 20.2)], second)
    assert merge.main([str(tmp_path / "out"), str(first), str(second), "--note", "seen twice", "--no-plot"]) == 0
    rows = table.read_csv(tmp_path / "out" / "m_2of4.csv")
    assert [r["label"] for r in rows] == ["lora", "lors", "sqft"]  # reference first, whatever the file order
    assert rows[1]["step_ms_median"] == 220.0 and rows[1]["time_vs_ref"] == pytest.approx(1.1)
    assert rows[2]["mem_vs_ref"] == pytest.approx(1.5)
    assert "- seen twice" in (tmp_path / "out" / "m_2of4.md").read_text()
    with pytest.raises(SystemExit):
        merge.main([str(tmp_path / "out"), str(tmp_path / "nope.csv")])


def test_bench_row_says_which_step_mode_ran():
    eager = step.run_step(_spec("lora"))
    graph = step.run_step(_spec("lora", cuda_graph=True))
    assert (eager.step_mode, eager.cuda_graph_fallback) == ("eager", None)
    assert (graph.step_mode, graph.cuda_graph_fallback) == ("eager", "no CUDA device")  # device=cpu
    assert {"step_mode", "cuda_graph_fallback"} <= set(table.COLUMNS)
