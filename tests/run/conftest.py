"""Fixtures of the launcher tests."""

from __future__ import annotations

import os

import pytest

# The process-group variables a submitit task sets (setup_distributed_env) and torchrun would.
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def clean_dist_env(monkeypatch):
    """Whatever setup_distributed_env writes to os.environ is undone after the test (setenv first, so
    that monkeypatch also removes variables that did not exist before)."""
    for name in DIST_VARS:
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)


@pytest.fixture
def stand_in_slurm(tmp_path, monkeypatch):
    """``sbatch`` (which answers job 4242) and ``srun`` replaced by scripts on PATH: a submit() to the
    SLURM executor then runs for real and writes its sbatch file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
