"""Shared fixtures: Hydra composition of the real conf/, and the gpu marker's clean skip without CUDA."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorsbench.registry import methods_package

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
methods_package()  # `lorsbench.methods` also in a checkout that is not pip-installed (the GPU device's copy)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def compose():
    """compose(overrides) -> resolved config dict, composed from the repository's conf/ like the CLI does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    def _compose(overrides: list[str] = (), return_hydra_config: bool = False):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
        if return_hydra_config:
            return cfg
        return OmegaConf.to_container(cfg, resolve=True)

    return _compose


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_tensors(request):
    """Tiny-tensor tests run faster single-threaded (thread start-up dominates); slow tests keep the default."""
    if "slow" in request.keywords:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
