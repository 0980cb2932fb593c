"""Learning regression: a reduced quickstart must beat its own random initialisation on k-NN.

Marked ``slow`` (about two CPU minutes) and run by ``.ci/run`` all the same, so that a change which
breaks learning (a wrong sign, a detached teacher, a broken schedule) cannot land.
"""

from __future__ import annotations

import pytest

from dinov2.train.train import main


@pytest.mark.slow
def test_reduced_quickstart_gains_five_knn_points(tmp_path):
    summary = main(
        [
            "--config",
            "quickstart",
            "--output-dir",
            str(tmp_path),
            "optim.epochs=2",  # 100 iterations
            "train.num_workers=0",
            "train.device=cpu",  # the CPU figure it guards, also on a machine with a GPU
        ]
    )
    gain = summary["knn_top1_trained"] - summary["knn_top1_random_init"]
    # Measured +12.2 points after these 100 iterations (9.6% -> 21.8%, docs/training.md); with lr 0 the gain is negative.
    assert gain >= 5.0, summary
