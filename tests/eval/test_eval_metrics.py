"""Top-k accuracy conventions, atomic result files and text tables."""

from __future__ import annotations

import json

import pytest
import torch

from dinov2.eval.metrics import format_table, topk_accuracy, topk_correct, write_json_atomic


def test_topk_counts_against_hand_worked_scores():
    scores = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.02],  # label 0: rank 1
            [0.1, 0.2, 0.3, 0.4],  # label 1: two classes higher -> top-3 and up
            [0.5, 0.5, 0.0, 0.0],  # label 1: tie for first -> counts at top-1
            [0.0, 0.0, 0.0, 0.0],  # label 2: all zero -> correct unless a positive score is required
        ]
    )
    labels = torch.tensor([0, 1, 1, 2])
    assert topk_correct(scores, labels, (1, 2, 3, 4)) == {1: 3, 2: 3, 3: 4, 4: 4}
    assert topk_correct(scores, labels, (1, 4), require_positive=True) == {1: 2, 4: 3}
    assert topk_accuracy(scores, labels, (1, 5)) == {1: 75.0, 5: 100.0}  # k >= classes: all


def test_topk_rejects_bad_shapes_and_labels():
    with pytest.raises(ValueError, match="scores"):
        topk_correct(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie"):
        topk_correct(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="zero samples"):
        topk_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_write_json_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"acc": torch.tensor(0.5), "ks": (1, 5), 10: float("nan")})
    assert json.loads(path.read_text()) == {"acc": 0.5, "ks": [1, 5], "10": "nan"}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_write_json_atomic_keeps_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_format_table_aligns_columns_and_formats_floats():
    text = format_table([(10, 81.234, 95.0), (200, 7.5, 60.0)], ("k", "top-1 %", "top-5 %"))
    lines = text.splitlines()
    assert lines[0].split() == ["k", "top-1", "%", "top-5", "%"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["10", "81.23", "95.00"]
    assert lines[3].split() == ["200", "7.50", "60.00"]
    assert len({len(line) for line in lines}) == 1
