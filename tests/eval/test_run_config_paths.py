"""``run_config_of`` on the less usual ways of naming a run's weights: relative paths, runs kept in
a folder named ``checkpoints``, symbolic links. Layouts only (no training): what is looked at is
where ``config.yaml`` lies relative to the weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dinov2.eval.setup import run_config_of


def make_run(out: Path) -> Path:
    """``out`` laid out as a training run: config.yaml, checkpoints/step_0000001/, eval/training_1/."""
    (out / "checkpoints" / "step_0000001").mkdir(parents=True)
    (out / "eval" / "training_1").mkdir(parents=True)
    (out / "eval" / "training_1" / "teacher_checkpoint.pth").write_bytes(b"weights")
    (out / "config.yaml").write_text("student: {arch: vit_tiny}\n")
    return out


def test_relative_locations_inside_the_run_find_its_config(tmp_path, monkeypatch):
    """Named from inside the run (``step_N`` from OUT/checkpoints): the parent of a bare relative name is
    ``.``, whose name is empty, so the layout was not recognised and the default config was used."""
    out = make_run(tmp_path / "OUT")
    expected = out / "config.yaml"
    for cwd, location in [
        (out / "checkpoints", "step_0000001"),
        (out / "checkpoints", "step_0000001/"),
        (out / "checkpoints", "."),
        (out / "eval", "training_1"),
        (out / "eval" / "training_1", "teacher_checkpoint.pth"),
        (out / "eval" / "training_1", "."),
        (out, "."),
        (out, "checkpoints/"),
        (tmp_path, "OUT/eval/../checkpoints/step_0000001"),
    ]:
        monkeypatch.chdir(cwd)
        found = run_config_of(location)
        assert found is not None and found.resolve() == expected.resolve(), (cwd, location)


def test_a_run_kept_in_a_folder_named_checkpoints(tmp_path):
    """~/checkpoints/vitl_run: its parent's name made it look like OUT/checkpoints/step_N, and the
    config was looked for two levels up."""
    out = make_run(tmp_path / "checkpoints" / "vitl_run")
    assert run_config_of(out) == out / "config.yaml"
    assert run_config_of(f"{out}/") == out / "config.yaml"
    assert run_config_of(out / "checkpoints" / "step_0000001") == out / "config.yaml"


def test_a_folder_under_checkpoints_that_is_no_step_is_not_taken_for_one(tmp_path):
    """Not a run (no step_N name): the config.yaml two levels up is someone else's."""
    (tmp_path / "config.yaml").write_text("unrelated: true\n")
    downloads = tmp_path / "checkpoints" / "downloads"
    downloads.mkdir(parents=True)
    assert run_config_of(downloads) is None


def test_a_folder_under_eval_that_is_no_export_is_not_taken_for_one(tmp_path):
    """Only ``eval/training_N`` (and the files in it) are the run's exports: other results under eval/
    (downloaded or copied weights among them) are not attributed to the run's config."""
    out = make_run(tmp_path / "OUT")
    other = out / "eval" / "downloads"
    other.mkdir()
    (other / "weights.pth").write_bytes(b"weights")
    assert run_config_of(other) is None
    assert run_config_of(other / "weights.pth") is None


def test_a_run_layout_without_its_config_belongs_to_no_run(tmp_path):
    out = make_run(tmp_path / "OUT")
    (out / "config.yaml").unlink()
    for location in (out / "checkpoints" / "step_0000001", out / "eval" / "training_1" / "teacher_checkpoint.pth"):
        assert run_config_of(location) is None, location


def test_a_relative_location_gives_the_config_as_an_absolute_path(tmp_path, monkeypatch):
    """The config found stays valid if the working directory changes later."""
    out = make_run(tmp_path / "OUT")
    monkeypatch.chdir(tmp_path)
    assert run_config_of("OUT/checkpoints/step_0000001") == out / "config.yaml"
    assert run_config_of("OUT/eval/training_1/teacher_checkpoint.pth") == out / "config.yaml"


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links")
def test_symbolic_links_to_and_inside_a_run(tmp_path):
    out = make_run(tmp_path / "OUT")
    models = tmp_path / "models"
    models.mkdir()
    # a link to an export file, or to a step directory, elsewhere: found through its target
    (models / "vit_tiny.pth").symlink_to(out / "eval" / "training_1" / "teacher_checkpoint.pth")
    (models / "latest").symlink_to(out / "checkpoints" / "step_0000001", target_is_directory=True)
    expected = (out / "config.yaml").resolve()
    assert run_config_of(models / "vit_tiny.pth").resolve() == expected
    assert run_config_of(models / "latest").resolve() == expected
    # OUT/checkpoints itself a link to scratch space: found by its name, as before
    run2, scratch = tmp_path / "RUN2", tmp_path / "scratch" / "ckpts"
    (scratch / "step_0000002").mkdir(parents=True)
    run2.mkdir()
    (run2 / "config.yaml").write_text("student: {arch: vit_tiny}\n")
    (run2 / "checkpoints").symlink_to(scratch, target_is_directory=True)
    assert run_config_of(run2 / "checkpoints" / "step_0000002") == run2 / "config.yaml"
    assert run_config_of(run2 / "checkpoints") == run2 / "config.yaml"
    # a plain copy of the weights elsewhere still belongs to no run
    (models / "copy.pth").write_bytes(b"weights")
    assert run_config_of(models / "copy.pth") is None
