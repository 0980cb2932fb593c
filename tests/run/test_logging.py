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


class _RecordingSummaryWriter:
    """Stands in for torch's SummaryWriter (tensorboard is optional): records how it was opened."""

    opened: list[dict] = []

    def __init__(self, **kwargs):
        self.kwargs, self.scalars = kwargs, []
        _RecordingSummaryWriter.opened.append(self.__dict__)

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))

    def flush(self):
        pass

    def close(self):
        pass


def _fake_tensorboard(monkeypatch):
    import sys
    import types

    _RecordingSummaryWriter.opened = []
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = _RecordingSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return _RecordingSummaryWriter.opened


def test_a_resume_purges_the_tensorboard_events_after_its_checkpoint(tmp_path, monkeypatch):
    # Resumed at iteration 2 (the checkpoint), the run logs 3, 4, ... again: TensorBoard must drop the
    # events the interrupted run logged from step 3 on, or its curves show both runs overlapping.
    opened = _fake_tensorboard(monkeypatch)
    first = MetricsWriter(tmp_path)
    for it in (1, 2, 3, 4):
        first.write(it, {"loss": float(it)})
    resumed = MetricsWriter(tmp_path)
    resumed.truncate_after(2)
    resumed.write(3, {"loss": 30.0})
    assert [w["kwargs"].get("purge_step") for w in opened] == [None, 3]
    assert opened[1]["kwargs"]["log_dir"] == str(tmp_path / "tensorboard")
    assert opened[1]["scalars"] == [("loss", 30.0, 3)]
    # a fresh start (nothing to resume) drops whatever a run lost before its first checkpoint logged
    fresh = MetricsWriter(tmp_path)
    fresh.truncate_after(-1)
    fresh.write(1, {"loss": 1.0})
    assert opened[2]["kwargs"]["purge_step"] == 0
    # no writer at all on other ranks
    MetricsWriter(tmp_path, enabled=False).write(1, {"loss": 1.0})
    assert len(opened) == 3


def test_a_warning_naming_a_file_name_that_is_not_utf8_reaches_the_log(tmp_path, capsys):
    """A Latin-1 file name arrives as a lone surrogate (os.fsdecode); the warning naming it must be written."""
    import os

    from dinov2.utils.logging import setup_logging

    name = os.fsdecode(b"caf\xe9.png")
    logger = setup_logging(tmp_path)
    try:
        logger.warning("skipped %s", name)
        for handler in logger.handlers:
            handler.flush()
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
    captured = capsys.readouterr()
    assert "Logging error" not in captured.err
    logged = (tmp_path / "log.txt").read_text(encoding="utf-8")
    assert "skipped caf\\udce9.png" in logged and "skipped caf\\udce9.png" in captured.out
