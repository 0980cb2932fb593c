"""Configuration files: the default training config and merging experiment configs on top."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


_REQUIRED = object()


def select(cfg: Any, path: str, default: Any = _REQUIRED) -> Any:
    """``cfg.a.b`` for a dotted ``path``, through mappings (dict, DictConfig) or attributes.

    A missing key returns ``default`` when one is given, else raises ``KeyError`` naming the path.
    """
    node = cfg
    for key in path.split("."):
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif not isinstance(node, Mapping) and hasattr(node, key):
            node = getattr(node, key)
        elif default is not _REQUIRED:
            return default
        else:
            raise KeyError(f"config key {path!r} is missing ({key!r} not found)")
    return node
