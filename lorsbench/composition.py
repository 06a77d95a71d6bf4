"""The repository's `conf/` as Python sees it: Hydra composition outside `python -m lorsbench` (the benchmark's
cells, the study drivers) and the defaults other code reads from it instead of repeating them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lorsbench.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """`conf/config.yaml` + overrides, composed by Hydra and resolved (as `python -m lorsbench` does)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"{type(exc).__name__}: {exc}") from exc


def default_targets() -> tuple[str, ...]:
    """The projections every run prunes and adapts (`targets` in conf/config.yaml)."""
    from omegaconf import OmegaConf

    return tuple(OmegaConf.load(CONF_DIR / "config.yaml").targets)
