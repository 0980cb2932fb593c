"""One 2-process spawn shared by test_sharding.py and test_init_from_sharded.py (each spawn costs two
fresh interpreters importing torch): each module prepares its inputs, its part runs on both ranks."""

from __future__ import annotations

import pytest
import torch.multiprocessing as mp
from dist_common import WORLD, free_port, run_parts

_MODULES = ("test_sharding", "test_init_from_sharded")


@pytest.fixture(scope="session")
def sharded_parts(tmp_path_factory) -> dict:
    """``{module: its output folder}`` once both modules' rank parts ran in the same 2-rank group."""
    import importlib

    folders, parts = {}, []
    for name in _MODULES:
        folders[name] = tmp_path_factory.mktemp(name)
        module = importlib.import_module(name)
        parts.append((name, "rank_part", module.prepare(folders[name])))
    mp.spawn(run_parts, args=(free_port(), parts), nprocs=WORLD, join=True)
    return folders
