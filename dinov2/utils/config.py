"""Configuration files: the default training config and merging experiment configs on top."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "ssl_default_config.yaml"


def load_default_config() -> DictConfig:
    """The default SSL config (configs/ssl_default_config.yaml)."""
    if not DEFAULT_CONFIG.is_file():
        raise FileNotFoundError(f"default config not found at {DEFAULT_CONFIG}")
    return OmegaConf.load(DEFAULT_CONFIG)


def default_config_with(*overrides: dict | DictConfig) -> DictConfig:
    """The default config with each mapping in ``overrides`` merged on top, in order."""
    return OmegaConf.merge(load_default_config(), *overrides)
