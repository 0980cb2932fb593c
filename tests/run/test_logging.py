"""The metrics stream a resumed (requeued) run rewrites: OUTPUT/training_metrics.json."""

from __future__ import annotations

import json

from dinov2.utils.logging import MetricsWriter


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_drops_later_records_and_a_line_torn_by_a_kill(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for it in (1, 2, 3):
        writer.write(it, {"loss": float(it)})
    with open(writer.path, "a") as handle:  # killed half-way through appending iteration 4
        handle.write('{"iteration": 4, "lo')
    resumed = MetricsWriter(tmp_path, tensorboard=False)
    resumed.truncate_after(2)  # the checkpoint the requeued job resumes from
    resumed.write(3, {"loss": 30.0})
    assert records(resumed.path) == [{"iteration": 1, "loss": 1.0}, {"iteration": 2, "loss": 2.0},
                                     {"iteration": 3, "loss": 30.0}]  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["training_metrics.json"]  # no temporary left behind


def test_truncate_keeps_records_up_to_the_iteration_and_is_a_no_op_when_disabled(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for it in (10, 20, 30):
        writer.write(it, {"knn_top1": 5.0} if it == 20 else {"loss": 1.0})
    writer.truncate_after(20)
    assert [r["iteration"] for r in records(writer.path)] == [10, 20]
    MetricsWriter(tmp_path, enabled=False).truncate_after(0)
    assert [r["iteration"] for r in records(writer.path)] == [10, 20]
