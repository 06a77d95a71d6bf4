"""One place for each default: the YAML under conf/ and the typed configs must not disagree.

The rule. A group with one option (`trainer/default`, `profile/default`, each `method/<name>`, each pruner's
options) repeats every field of its dataclass, so the CLI can override it, with the dataclass default as the value.
A group with several options (eval, data, model, pattern, pruning.calibration) describes each option in its YAML;
the dataclass default only fills what an option leaves out, so a value that *every* option sets alike must equal
the dataclass default (else the default is never what a run uses).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lorsbench.config import (
    CalibrationConfig, DataConfig, EvalConfig, ModelConfig, PatternConfig, PerplexityConfig, ProfileConfig, RunConfig,
    TrainerConfig,
)
from lorsbench.pruning import list_pruners, pruner_class
from lorsbench.registry import get_method, list_methods

CONF = Path(__file__).resolve().parent.parent / "conf"
MISSING = object()


def _yaml(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _literal(value) -> bool:
    """Not an interpolation (`${...}`) and not Hydra's mandatory marker."""
    return not (isinstance(value, str) and ("${" in value or value == "???"))


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


def _same(yaml_value, default) -> bool:
    if isinstance(yaml_value, list):
        yaml_value = tuple(yaml_value)
    if dataclasses.is_dataclass(default):
        default = dataclasses.asdict(default)
    if isinstance(yaml_value, bool) or isinstance(default, bool):
        return type(yaml_value) is type(default) and yaml_value == default
    return yaml_value == default


def _drift(values: dict, cls: type, where: str, complete: bool = True) -> list[str]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = [f"{where}: '{k}' is no field of {cls.__qualname__}" for k in values if k not in fields]
    if complete:
        problems += [f"{where}: field '{k}' is missing (the CLI could not override it)" for k in fields
                     if k not in values]
    for key, value in values.items():
        if key in fields and _literal(value):
            default = _default(fields[key])
            if default is MISSING:
                problems.append(f"{where}: '{key}' has no dataclass default to check (give it one)")
            elif not _same(value, default):
                problems.append(f"{where}: {key}={value!r} but {cls.__qualname__} says {default!r}")
    return problems


@pytest.mark.parametrize("name", list_methods())
def test_method_yaml_repeats_the_config_defaults(name):
    values = _yaml(CONF / "method" / f"{name}.yaml")
    assert values.pop("name") == name
    assert _drift(values, get_method(name).Config, f"conf/method/{name}.yaml") == []


@pytest.mark.parametrize("group,cls", [("trainer", TrainerConfig), ("profile", ProfileConfig)])
def test_single_option_groups_repeat_the_dataclass_defaults(group, cls):
    options = sorted((CONF / group).glob("*.yaml"))
    assert [p.stem for p in options] == ["default"]
    assert _drift(_yaml(options[0]), cls, f"conf/{group}/default.yaml") == []


@pytest.mark.parametrize("name", list_pruners())
def test_pruner_options_repeat_their_defaults(name):
    values = _yaml(CONF / "pruning" / f"{name}.yaml")
    options = {k: v for k, v in values.items() if k not in ("name", "targets", "calibration")}
    assert values["name"] == name
    assert _drift(options, pruner_class(name).Options, f"conf/pruning/{name}.yaml") == []


def _shared(options: list[dict]) -> dict:
    """The keys every option sets, to the same literal value."""
    first, *rest = options
    return {k: v for k, v in first.items() if _literal(v) and all(k in o and o[k] == v for o in rest)}


@pytest.mark.parametrize("group,cls", [("eval", EvalConfig), ("data", DataConfig), ("model", ModelConfig),
                                       ("pattern", PatternConfig)])
def test_multi_option_groups_agree_with_the_dataclass_where_they_all_agree(group, cls):
    options = {p.stem: _yaml(p) for p in sorted((CONF / group).glob("*.yaml"))}
    problems = [p for stem, values in options.items()
                for p in _drift(values, cls, f"conf/{group}/{stem}.yaml", complete=False)
                if "is no field" in p]
    shared = {k: v for k, v in _shared(list(options.values())).items() if k != "name"}
    problems += _drift(shared, cls, f"conf/{group}/* (set alike by every option)", complete=False)
    assert problems == []


def test_nested_blocks_agree_with_their_dataclasses():
    perplexity = [_yaml(p)["perplexity"] for p in sorted((CONF / "eval").glob("*.yaml"))]
    calibration = [c for p in sorted((CONF / "pruning").glob("*.yaml")) if (c := _yaml(p)["calibration"])]
    assert calibration, "no pruner with calibration"
    problems = _drift(_shared(perplexity), PerplexityConfig, "eval.perplexity", complete=False)
    problems += [p for block in calibration for p in _drift(block, CalibrationConfig, "pruning.calibration")]
    assert problems == []


def test_top_level_keys_agree_with_run_config():
    values = _yaml(CONF / "config.yaml")
    groups = {"model", "pruning", "method", "data", "trainer", "eval", "profile", "paths"}
    top = {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(RunConfig)} - groups}
    assert set(top) >= {"seed", "device", "dtype", "matmul_precision", "smoke", "save_merged", "resume"}
    assert _drift(top, RunConfig, "conf/config.yaml", complete=False) == []


def test_the_drift_check_catches_a_changed_default():
    """The check itself: a YAML value that differs from the dataclass default is reported."""
    steps = TrainerConfig().max_steps
    assert _drift({"max_steps": steps + 1}, TrainerConfig, "x", complete=False) == [
        f"x: max_steps={steps + 1} but TrainerConfig says {steps}"]
    assert _drift({"cuda_graph": 0}, TrainerConfig, "x", complete=False) != []
