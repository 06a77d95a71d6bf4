"""README "Adding a method" and README "Adding a pruner, a model source, an eval suite or a metric": each
extension point is the places listed there, and nothing else.

One throwaway plug-in of each kind is added through exactly those places (files in temporary folders that the
registry and Hydra also search, table entries set with monkeypatch), and one run on a tiny model uses all five
through the ordinary path: Hydra composition -> build_run_config -> run_pipeline -> run.json -> the report.
Everything is undone when the test ends.
"""
from __future__ import annotations

import importlib
import json
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lorsbench.pruning.base import Pruner
from lorsbench.pruning.masks import MaskSet, mask_from_scores
from tests.test_pipeline import TASK_YAML  # an lm-eval task `tiny_mc` over a JSON file

METHOD_FILE = '''
"""`ext_gain`: a trainable per-row gain on the frozen pruned weight, W' = W (1 + g) (sparsity kept)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorsbench.methods._adapter import AdapterLinear, AdapterMethod, attach_adapters, merge_dtype
from lorsbench.registry import register_method


class GainLinear(AdapterLinear):
    def __init__(self, base, mask, init):
        super().__init__(base, mask, keep_mask=False)
        self.gain = nn.Parameter(torch.full((self.out_features, 1), float(init)))

    def forward(self, x):
        return F.linear(x, self.weight * (1 + self.gain).to(x.dtype), self.bias)

    def merged_weight(self):
        return self.weight.to(merge_dtype(self.weight)) * (1 + self.gain.to(merge_dtype(self.weight)))


@register_method("ext_gain")
class Gain(AdapterMethod):
    preserves_sparsity = True

    @dataclass(frozen=True)
    class Config:
        init: float = 0.0
        targets: tuple[str, ...] | None = None

    def attach(self, model, masks, ctx):
        return attach_adapters(model, masks, self.target_names(ctx),
                               lambda name, linear, mask: GainLinear(linear, mask, self.config.init))
'''

CONF = {
    "method/ext_gain.yaml": "name: ext_gain\ninit: 0.0\ntargets: ${targets}\n",
    "pruning/ext_random.yaml": "name: ext_random\ntargets: ${targets}\ncalibration: null\nseed: 7\n",
    "model/ext_tiny.yaml": "name: ext_tiny\nsource: ext_builder\npath: null\nattn_implementation: sdpa\n"
                           "architecture: null\n",
    "eval/ext_suite.yaml": textwrap.dedent("""\
        suite: ext_suite
        tasks: [tiny_mc]
        max_examples_per_task: null
        limit: null
        batch_size: 4
        num_fewshot: 0
        perplexity: {source: pydoc, window: 64, stride: 64, max_tokens: 200, batch_size: 2}
        """),
}

class RandomScorePruner(Pruner):
    """A pruner plug-in: random scores (seeded by its one option), one threshold per matrix."""

    name = "ext_random"

    @dataclass(frozen=True)
    class Options:
        seed: int = 0

    def prune(self, model: nn.Module, calibration=None, device=None) -> MaskSet:
        from lorsbench.modules import target_linears

        generator = torch.Generator().manual_seed(self.options.seed)
        masks = MaskSet()
        with torch.no_grad():
            for name, linear in target_linears(model, self.config.targets).items():
                scores = torch.rand(linear.weight.shape, generator=generator)
                mask = mask_from_scores(scores, self.config.sparsity_of(name), self.config.pattern, "matrix")
                linear.weight.mul_(mask.to(linear.weight.dtype))
                masks[name] = mask.cpu()
        return masks


def build_tiny(config, dtype, device, cache_dir):
    """A model-source plug-in: a seeded tiny LLaMA with the byte tokenizer, reported as pretrained weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorsbench.data.tokenizers import byte_tokenizer
    from lorsbench.models import LoadedModel

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    llama = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(llama).to(device=device, dtype=dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, weights="pretrained", source="ext_builder:seed0",
                       digest="ext-tiny-seed0")


def merged_gain_norm(run) -> None:
    """A metric plug-in: the Frobenius norm of the merged target weights, recorded after the merge."""
    from lorsbench.modules import target_linears

    norm = sum(float(l.weight.double().pow(2).sum()) for l in target_linears(run.model, run.cfg.pruning.targets).values())
    run.record.update(merged_weight_norm=norm ** 0.5)


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """Every plug-in added through its README places; returns the Hydra overrides that select them."""
    from lorsbench import pipeline, records, registry
    from lorsbench import pruning as pruners
    from lorsbench.evaluation import lm_eval_runner
    from lorsbench.models import MODEL_LOADERS
    collect = importlib.import_module("lorsbench.report.collect")  # the module (lorsbench.report exports the function)

    # method: methods/<name>.py (+ its conf/method YAML below)
    methods_dir = tmp_path / "methods"
    methods_dir.mkdir()
    (methods_dir / "ext_gain.py").write_text(METHOD_FILE)
    package = registry.methods_package()
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(methods_dir)])
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    # pruner: the class, its `_PRUNERS` entry (+ YAML)
    monkeypatch.setitem(pruners._PRUNERS, "ext_random", f"{__name__}:RandomScorePruner")
    # model source: the loader and its MODEL_LOADERS entry (+ YAML)
    monkeypatch.setitem(MODEL_LOADERS, "ext_builder", build_tiny)
    # eval suite: the preparer and its SUITES entry (+ YAML); here lm-eval task YAMLs in a folder
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = [{"prompt": f"Q: Is {i} even?\nA:", "choices": ["yes", "no"], "gold": i % 2} for i in range(8)]
    (tasks / "tiny_mc.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=tasks / "tiny_mc.jsonl"))

    def prepare(config, cache_dir):
        return lm_eval_runner.PreparedEval(suite="ext_suite", lm_eval_tasks=tuple(config.tasks),
                                           display_names={t: t for t in config.tasks}, include_path=(str(tasks),),
                                           hf_home=cache_dir / "hf", offline=True)

    monkeypatch.setitem(lm_eval_runner.SUITES, "ext_suite", prepare)
    # metric: computed in a phase, typed in the record schema, listed for the report's long table
    monkeypatch.setattr(pipeline, "PHASES", (*pipeline.PHASES, merged_gain_norm))
    monkeypatch.setitem(records._FIELD_TYPES, "merged_weight_norm", float)
    monkeypatch.setattr(collect, "RUN_METRICS", (*collect.RUN_METRICS, "merged_weight_norm"))
    # the YAML of each, in a config folder Hydra searches besides conf/
    conf = tmp_path / "conf"
    for rel, text in CONF.items():
        (conf / rel).parent.mkdir(parents=True, exist_ok=True)
        (conf / rel).write_text(text)
    yield [f"hydra.searchpath=[file://{conf}]", "method=ext_gain", "pruning=ext_random", "model=ext_tiny",
           "eval=ext_suite", "sparsity=0.5", "dtype=float32", "device=cpu", "data=local",
           "trainer.max_steps=2", "trainer.micro_batch_size=2", "trainer.seq_len=32", "trainer.warmup_steps=0",
           "profile.warmup_steps=0", "data.heldout_examples=2",
           f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_root={tmp_path / 'out'}"]
    sys.modules.pop("lorsbench.methods.ext_gain", None)


def test_each_extension_point_works_through_the_pipeline_and_report(plugins, compose, tmp_path):
    from lorsbench.config import build_run_config
    from lorsbench.pipeline import run_pipeline
    from lorsbench.records import unknown_fields, validate_record
    from lorsbench.registry import list_methods
    from lorsbench.report.collect import collect

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)})
                              for i in range(12)))
    assert "ext_gain" in list_methods()
    cfg = build_run_config(compose([*plugins, f"data.path={data}"]))
    record = run_pipeline(cfg, tmp_path / "run")
    assert record["status"] == "success", record.get("error")
    assert (record["method"], record["pruner"], record["model_source"], record["eval_suite"]) == (
        "ext_gain", "ext_random", "ext_builder", "ext_suite")
    assert record["method_config"] == {"init": 0.0, "targets": cfg.pruning.targets}
    assert record["trainable_params"] > 0 and record["mask_preserved_after_merge"] is True
    assert record["sparsity_after_merge"] == pytest.approx(0.5, abs=0.01)
    assert set(record["tasks"]) == {"tiny_mc"} and record["mean_acc"] is not None
    assert record["merged_weight_norm"] > 0
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert validate_record(saved) == [] and unknown_fields(saved) == []
    long = collect([tmp_path / "run"]).long
    metric = long[long["metric"] == "merged_weight_norm"]
    assert metric["value"].tolist() == [pytest.approx(record["merged_weight_norm"])]
