"""Top-k accuracy conventions, atomic result files and text tables."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dinov2.eval.metrics import format_table, topk_accuracy, topk_correct, write_json_atomic


def test_topk_counts_against_hand_worked_scores():
    scores = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.02],  # label 0: rank 1
            [0.1, 0.2, 0.3, 0.4],  # label 1: two classes higher -> top-3 and up
            [0.5, 0.5, 0.0, 0.0],  # label 1: tied with class 0, which wins the tie -> top-2 and up
            [0.0, 0.0, 0.0, 0.0],  # label 2: all tied, classes 0 and 1 win -> top-3 (never if positive required)
        ]
    )
    labels = torch.tensor([0, 1, 1, 2])
    assert topk_correct(scores, labels, (1, 2, 3, 4)) == {1: 1, 2: 2, 3: 4, 4: 4}
    assert topk_correct(scores, labels, (1, 4), require_positive=True) == {1: 1, 4: 3}
    assert topk_accuracy(scores, labels, (1, 5)) == {1: 25.0, 5: 100.0}  # k >= classes: all


def _reference_rank(row: list[float], label: int) -> float:
    """Position of ``label`` when sorting classes by (NaN first, score descending, index ascending);
    infinity when the true score is NaN (never correct)."""
    if math.isnan(row[label]):
        return math.inf
    order = sorted(range(len(row)), key=lambda j: (not math.isnan(row[j]), -row[j] if not math.isnan(row[j]) else 0, j))
    return order.index(label)


def test_topk_matches_an_explicit_sort_with_ties_and_nan():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (300, 6), generator=gen).float()  # many ties
    scores[torch.rand(300, 6, generator=gen) < 0.1] = float("nan")
    labels = torch.randint(0, 6, (300,), generator=gen)
    ks = (1, 2, 5, 6, 10)
    ranks = [_reference_rank(row, label) for row, label in zip(scores.tolist(), labels.tolist())]
    assert topk_correct(scores, labels, ks) == {k: sum(r < k for r in ranks) for k in ks}
    assert any(math.isinf(r) for r in ranks) and any(r == 0 for r in ranks)


def test_exactly_k_classes_are_chosen_per_sample():
    """Every sample has exactly one correct class at top-1 and k at top-k, whatever the ties."""
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 2, (50, 7), generator=gen).float()
    for k in (1, 3, 7):
        hits = sum(torch.tensor(topk_correct(scores, torch.full((50,), c), (k,))[k]) for c in range(7))
        assert int(hits) == 50 * k


def test_nan_and_constant_scores_are_not_rewarded():
    labels = torch.arange(40) % 10
    nan_scores = torch.full((40, 10), float("nan"))
    assert topk_correct(nan_scores, labels, (1, 5, 10, 20)) == {1: 0, 5: 0, 10: 0, 20: 0}
    # a NaN on another class ranks above the true class
    one_nan = torch.tensor([[1.0, float("nan"), 0.0]])
    assert topk_correct(one_nan, torch.tensor([0]), (1, 2)) == {1: 0, 2: 1}
    # all-equal scores: class 0 is predicted for everyone, i.e. chance on balanced labels
    assert topk_accuracy(torch.zeros(40, 10), labels, (1, 5)) == {1: 10.0, 5: 50.0}


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


def test_write_json_atomic_converts_numpy_arrays_and_non_finite_numpy_scalars(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "results.json"
    write_json_atomic(path, {"per_class": np.array([0.5, 1.0]), "loss": np.float32("nan"), "n": np.int64(3)})
    text = path.read_text()
    assert "NaN" not in text  # not valid JSON; non-finite numbers are written as strings
    assert json.loads(text) == {"per_class": [0.5, 1.0], "loss": "nan", "n": 3}


def test_mean_per_class_accuracy_averages_the_classes_present():
    from dinov2.eval.metrics import mean_per_class_accuracy

    # class 0: 3 of 4 right; class 2: 0 of 1 right; class 1 absent (predicted once, not averaged in)
    scores = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]])
    labels = torch.tensor([0, 0, 0, 0, 2])
    assert mean_per_class_accuracy(scores, labels) == pytest.approx((75.0 + 0.0) / 2)
    assert topk_accuracy(scores, labels, (1,))[1] == pytest.approx(60.0)  # top-1 weighs samples, not classes
    tied = torch.zeros(4, 3)  # all-equal scores predict class 0 (the tie convention)
    assert mean_per_class_accuracy(tied, torch.tensor([0, 1, 1, 2])) == pytest.approx(100.0 / 3)
    with pytest.raises(ValueError, match="zero samples"):
        mean_per_class_accuracy(scores[:0], labels[:0])


# ----------------------------------------------------------------------------- found by a mutation audit
def test_labels_of_another_length_or_outside_the_classes_are_refused():
    from dinov2.eval.metrics import true_class_rank

    scores = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"need scores \(N, C\) and labels \(N,\), got \(3, 4\) and \(2,\)"):
        true_class_rank(scores, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got \[-1, 2\]"):
        true_class_rank(scores, torch.tensor([0, -1, 2]))  # -1 would silently index the last class


def test_the_results_json_takes_paths_as_strings_under_any_key_and_ends_with_a_newline(tmp_path):
    from pathlib import Path

    path = write_json_atomic(tmp_path / "r.json", {"weights": Path("/w/teacher.pth"), Path("/data"): 1, 10: 2})
    text = path.read_text()
    assert text.endswith("}\n")
    assert json.loads(text) == {"weights": "/w/teacher.pth", "/data": 1, "10": 2}


def test_table_cells_are_right_aligned_under_their_headers():
    table = format_table([["vit_s", 81.234], ["vit_giant2", 7.0]], ["model", "top1"])
    assert table.splitlines() == [
        "     model   top1",
        "----------  -----",
        "     vit_s  81.23",
        "vit_giant2   7.00",
    ]


def test_the_run_record_names_the_checkpoint_read_and_the_skipped_images():
    from types import SimpleNamespace

    from dinov2.eval.metrics import run_record

    args = SimpleNamespace(config_file="c.yaml", pretrained_weights="runs/a", train_dataset="T", val_dataset="V")
    data = {"train_labels": [0, 1, 1], "val_labels": [1], "num_skipped": {"train": 2, "val": 0}}
    record = run_record("knn", args, data, {"total": 1.5}, results={"top1": 50.0})
    assert record["weights_read"] == "runs/a"  # nothing resolved: the argument itself
    assert (record["num_train"], record["num_val"], record["num_skipped"]) == (3, 1, {"train": 2, "val": 0})
    args.weights_read = "runs/a/checkpoints/step_0000010"
    assert run_record("knn", args, data, {})["weights_read"] == "runs/a/checkpoints/step_0000010"
