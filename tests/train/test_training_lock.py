"""The output-directory lock of ``dinov2.train.train.main`` is given back when the run fails, so that
the same process (tests, a notebook, a script that runs phases one after the other) leaves the
directory free for a job started after it."""

from __future__ import annotations

import fcntl
import os

import pytest

from dinov2.checkpoint.lock import LOCK_FILE


def lock_is_free(directory) -> bool:
    """Whether a new open file description of the lock file can take the lock (flock locks of two
    descriptions conflict, also within one process)."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also drops the lock this check took
    return True


class Failure(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["dinov2.train.train.build_model", "dinov2.train.loop.build_train_dataset"])
def test_a_failed_run_releases_the_lock(tmp_path, monkeypatch, dist_common, where):
    """A failure in main after the lock was taken (building the model), or inside Trainer.run."""
    held_while_running = []

    def fail(*args, **kwargs):
        held_while_running.append(not lock_is_free(tmp_path))
        raise Failure("stop here")

    monkeypatch.setattr(where, fail)
    from dinov2.train.train import main

    with pytest.raises(Failure):
        main(["--output-dir", str(tmp_path), *dist_common.TINY, "train.stop_at_iteration=1"])
    assert held_while_running == [True]  # the lock was held when the run failed...
    assert lock_is_free(tmp_path)  # ...and given back with the error


def test_trainer_run_called_directly_gives_the_lock_back_on_an_error(tmp_path, monkeypatch, dist_common):
    """Benchmarks and scripts drive Trainer.run without main: a failing step must not keep the lock."""
    import torch

    from dinov2.train import loop
    from dinov2.train.train import build_model
    from dinov2.utils.config import load_config

    cfg = load_config(None, [*dist_common.TINY, f"train.output_dir={tmp_path}", "train.stop_at_iteration=2"])
    trainer = loop.Trainer(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"), tmp_path)
    held_while_running = []

    def failing_step(*args, **kwargs):
        held_while_running.append(not lock_is_free(tmp_path))
        raise Failure("a step fails")

    monkeypatch.setattr(trainer, "step", failing_step)
    with pytest.raises(Failure):
        trainer.run()
    assert held_while_running == [True] and lock_is_free(tmp_path)
