"""Config composition of every group option and preset, and one clear error for each bad input."""
from __future__ import annotations

import pytest

from lorsbench.config import ConfigError, build_run_config
from lorsbench.config_checks import check_run_config
from tests.conftest import CONF_DIR

GROUPS = ["model", "pruning", "pattern", "method", "data", "trainer", "eval", "profile", "paths"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _valid_overrides(group: str, option: str) -> list[str]:
    overrides = [f"{group}={option}"]
    if group == "model" and option == "hf":
        overrides.append("model.path=some/model")
    if group == "pattern" and option != "unstructured":
        n, m = {"2of4": (2, 4), "4of8": (4, 8)}[option]
        overrides.append(f"sparsity={1 - n / m}")
    if group == "data" and option == "local":
        overrides.append("data.path=train.jsonl")
    if group == "eval" and option == "local":
        overrides += ["eval.include_path=/tmp/tasks", "eval.tasks=[my_task]"]
    if group == "method" and option == "slope":
        overrides += ["pattern=2of4"]
    return overrides


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(compose, group, option):
    cfg = build_run_config(compose(_valid_overrides(group, option)))
    assert cfg.run_name


@pytest.mark.parametrize("preset", _options("experiment"))
def test_every_experiment_preset_composes(compose, preset):
    cfg = compose([f"experiment={preset}"])
    build_run_config(cfg)


def test_default_config_is_the_headline_run(compose):
    cfg = build_run_config(compose([]))
    assert cfg.model.name == "smollm2-135m" and cfg.pruning.sparsity == 0.5
    assert cfg.eval.suite == "zeroshot7" and cfg.eval.limit is None and not cfg.smoke


def test_smoke_preset_is_flagged(compose):
    cfg = build_run_config(compose(["experiment=smoke"]))
    assert cfg.smoke and cfg.eval.limit is not None


@pytest.mark.parametrize("sparsity", [0, 1, 1.5, -0.1, "half"])
def test_sparsity_outside_open_interval_is_rejected(compose, sparsity):
    with pytest.raises(ConfigError, match=r"sparsity must be a number in \(0, 1\)"):
        build_run_config(compose([f"sparsity={sparsity}"]))


def test_nm_pattern_with_other_sparsity_is_rejected(compose):
    with pytest.raises(ConfigError, match="2of4 fixes sparsity at 0.5"):
        build_run_config(compose(["pattern=2of4", "sparsity=0.7"]))


def test_dense_reference_ignores_sparsity(compose):
    cfg = build_run_config(compose(["pruning=none", "method=none"]))
    assert cfg.pruning.sparsity == 0.0


@pytest.mark.parametrize("key,kind", [("method.name=nope", "method"), ("pruning.name=nope", "pruner"),
                                      ("model.source=nope", "model source"), ("pattern.m=3", "pattern")])
def test_unknown_names_list_the_valid_ones(compose, key, kind):
    with pytest.raises(ConfigError) as err:
        check_run_config(build_run_config(compose([key])))  # registry names: lorsbench.config_checks
    message = str(err.value)
    assert kind in message
    if kind in ("method", "pruner"):
        assert "Valid:" in message and "lora" in message or "magnitude" in message


def test_unknown_group_option_is_a_hydra_error_listing_options(compose):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        compose(["method=nope"])
    assert "lora" in str(err.value)


def test_limit_outside_smoke_is_rejected(compose):
    with pytest.raises(ConfigError, match="smoke"):
        build_run_config(compose(["eval.limit=10"]))


def test_hf_model_needs_a_path(compose):
    with pytest.raises(ConfigError, match=r"model.path \(set model.path=...\)"):
        build_run_config(compose(["model=hf"]))


def test_unknown_method_option_is_clear(compose):
    from lorsbench.registry import build_method

    cfg = build_run_config(compose(["+method.rnak=4"]))
    with pytest.raises(ConfigError, match="did you mean 'rank'"):
        build_method(cfg.method)


@pytest.mark.parametrize("overrides,message", [
    (["pruning=sparsegpt", "+pruning.blcksize=64"], r"unknown option\(s\)"),
    (["pruning=sparsegpt", "pruning.percdamp=0"], "percdamp must be > 0"),
    (["pruning=sparsegpt", "pattern=2of4", "pruning.blocksize=6"], "multiple of m=4"),
])
def test_bad_pruner_options_fail_at_the_config_edge(compose, overrides, message):
    """Pruner options are checked at the config edge (config_checks), before any model is loaded."""
    with pytest.raises(ConfigError, match=message):
        check_run_config(build_run_config(compose(overrides)))


def test_matmul_precision_is_checked_and_carried(compose):
    assert build_run_config(compose(["matmul_precision=high"])).matmul_precision == "high"
    with pytest.raises(ConfigError, match=r"matmul_precision.*'tf32'.*highest"):
        build_run_config(compose(["matmul_precision=tf32"]))
