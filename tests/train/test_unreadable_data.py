"""The share of unreadable training images is judged over the whole run (all workers, ranks and
resumes): a run stops, or not, at the same iteration with the same counts whatever its worker count."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from dinov2.train.checks import UnreadableDataError
from dinov2.train.train import main

TINY = [
    "train.device=cpu",
    "train.batch_size_per_gpu=4",
    "train.OFFICIAL_EPOCH_LENGTH=8",
    "train.log_period=1",
    "train.checkpoint_period_iterations=1",
    "student.arch=vit_tiny", "student.embed_dim=16", "student.depth=1", "student.num_heads=2",
    "student.patch_size=8", "student.drop_path_rate=0.0",
    "dino.head_n_prototypes=16", "dino.head_hidden_dim=16", "dino.head_bottleneck_dim=8",
    "ibot.head_n_prototypes=16", "ibot.head_hidden_dim=16", "ibot.head_bottleneck_dim=8",
    "optim.epochs=1", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0",
    "teacher.warmup_teacher_temp_epochs=0",
    "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=1",
    "evaluation.eval_period_iterations=1000",
]  # fmt: skip


@pytest.fixture(scope="module")
def mostly_broken(tmp_path_factory):
    """12 files, of which 2 decode: about 5 of 6 decode attempts fail."""
    root = tmp_path_factory.mktemp("images")
    (root / "c").mkdir()
    for i in range(12):
        path = root / "c" / f"img{i:02d}.png"
        if i in (3, 9):
            Image.new("RGB", (20, 20), (10 * i, 50, 90)).save(path)
        else:
            path.write_bytes(b"not an image")
    return root


def _run(mostly_broken, out, workers: int) -> str:
    args = ["--output-dir", str(out), *TINY, f"train.dataset_path=ImageFolder:root={mostly_broken}",
            f"train.num_workers={workers}"]  # fmt: skip
    with pytest.raises(UnreadableDataError) as caught:
        main(args)
    return str(caught.value)


def test_too_many_unreadable_images_stop_the_run_at_the_same_point_for_any_worker_count(mostly_broken, tmp_path):
    # Before: each worker's copy of the dataset judged its own share, so a run stopped (or not) at a
    # point set by the worker count, with counts of one worker only, from inside a worker.
    alone = _run(mostly_broken, tmp_path / "w0", 0)
    with_workers = _run(mostly_broken, tmp_path / "w2", 2)
    pattern = r"(\d+) of (\d+) decode attempts failed by iteration (\d+)"
    skipped, attempts, iteration = map(int, re.search(pattern, alone).groups())
    assert re.sub(r"/w\d/", "/", alone) == re.sub(r"/w\d/", "/", with_workers)
    assert f"ImageFolder at {mostly_broken}" in alone
    # the counts are the run's: samples delivered by the steps so far plus the skipped files, which
    # the metrics of the last logged iteration report too
    assert attempts - skipped == 4 * iteration and skipped > attempts / 2 and attempts >= 20
    record = json.loads((tmp_path / "w0" / "training_metrics.json").read_text().splitlines()[-1])
    assert record["iteration"] == iteration and record["skipped_images"] == skipped
    # the steps before were checkpointed and that checkpoint is kept
    assert f"step_{iteration - 1:07d} is untouched" in alone if iteration > 1 else "no checkpoint" in alone
