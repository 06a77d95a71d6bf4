"""The paper-comparison presets (conf/experiment/{main_table*,sparsity_sweep,rank_sweep}.yaml): each is a multirun
whose every job composes into a valid run config, with the grid the papers' tables need."""
from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lorsbench.config import build_run_config
from tests.conftest import CONF_DIR

PRESETS = {"main_table": 84, "main_table_slope": 6, "main_table_dense": 6, "sparsity_sweep": 30, "rank_sweep": 8}


def _axes(params: dict) -> dict[str, list[str]]:
    return {key: [v.strip() for v in str(values).split(",")] for key, values in params.items()}


def _one_factor_jobs(axes: dict[str, list[str]]) -> list[list[str]]:
    """The first job of the grid, then every other value of one axis at a time (the full grid is a product of
    these axes; composing all of it would take minutes)."""
    base = {key: values[0] for key, values in axes.items()}
    jobs = [base] + [{**base, key: value} for key, values in axes.items() for value in values[1:]]
    return [[f"{k}={v}" for k, v in job.items()] for job in jobs]


@pytest.mark.parametrize("preset,n_jobs", PRESETS.items())
def test_preset_is_a_multirun_of_valid_jobs(preset, n_jobs):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}"], return_hydra_config=True)
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
        assert preset in cfg.hydra.sweep.dir
        axes = _axes(OmegaConf.to_container(cfg.hydra.sweeper.params))
        assert math.prod(len(v) for v in axes.values()) == n_jobs
        jobs = _one_factor_jobs(axes)
        names = set()
        for job in jobs:
            run = build_run_config(OmegaConf.to_container(
                compose("config", overrides=[f"experiment={preset}"] + job), resolve=True))
            names.add(run.run_name)
    assert len(names) == len(jobs)  # every swept key is in the run name: job folders are told apart


def test_main_table_grid():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        params = compose("config", overrides=["experiment=main_table"], return_hydra_config=True).hydra.sweeper.params
    assert params["method"].split(",") == ["none", "lora", "spp", "sqft", "lors", "lors_exact", "losa"]
    assert params["pruning"].split(",") == ["wanda", "sparsegpt"]
    assert params["pattern"].split(",") == ["unstructured", "2of4"]
    assert str(params["seed"]).split(",") == ["0", "1", "2"]


def test_rank_sweep_run_names_carry_the_rank():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=rank_sweep", "method=lors", "method.rank=32", "pruning=wanda"])
    assert cfg.run_name == "lors-r32-wanda-unstructured-s0.5-seed0"
