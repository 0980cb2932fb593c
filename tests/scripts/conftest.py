"""The scripts under scripts/ are not a package: their tests load them by path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(relative: str, name: str):
    """The module of ``scripts/<relative>``, registered as ``name`` (dataclasses look their module up
    in ``sys.modules`` while a class is made)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def script():
    """``script(relative, name)``: :func:`load_script` for a test."""
    return load_script
