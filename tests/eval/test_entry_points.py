"""End to end: knn.py and log_regression.py on a micro ViT and tiny Synthetic splits at 32 px."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinov2.eval import knn, linear, log_regression

REPO = Path(__file__).resolve().parents[2]
DATASETS = [
    "--train-dataset", "Synthetic:split=TRAIN:num_images=48:image_size=32",
    "--val-dataset", "Synthetic:split=VAL:num_images=20:image_size=32",
]  # fmt: skip
COMMON = ["--resize-size", "32", "--crop-size", "32", "--batch-size", "16", "--num-workers", "0", "--device", "cpu"]


def test_knn_main_writes_results(micro_arch, tmp_path, capsys):
    args = knn.get_args_parser().parse_args(
        [*DATASETS, *COMMON, "--output-dir", str(tmp_path), "--nb_knn", "5", "20", "--no-progress", *micro_arch]
    )
    record = knn.main(args)
    saved = json.loads((tmp_path / knn.RESULTS_FILE).read_text())
    assert saved["task"] == "knn" and set(saved["results"]) == {"k5", "k20"}
    assert saved["num_train"] == 48 and saved["num_val"] == 20 and saved["num_classes"] == 12
    for result in saved["results"].values():
        assert set(result) == {"top1", "top5"}
        assert 0.0 <= result["top1"] <= result["top5"] <= 100.0
        assert (result["top1"] * 20 / 100).is_integer()  # a count of the 20 queries
    assert saved["best"]["top1"] == max(r["top1"] for r in saved["results"].values())
    assert saved["results"] == {k: dict(v) for k, v in record["results"].items()}
    assert "top-1 %" in capsys.readouterr().out


def test_knn_main_low_shot_records_each_n_per_class(micro_arch, tmp_path):
    args = knn.get_args_parser().parse_args(
        [*DATASETS, *COMMON, "--output-dir", str(tmp_path), "--nb_knn", "1", "20", "--n-per-class-list", "2", "-1",
         "--n-tries", "2", "--no-progress", *micro_arch]
    )  # fmt: skip
    record = knn.main(args)
    saved = json.loads((tmp_path / knn.RESULTS_FILE).read_text())
    assert set(saved["results"]) == {"k1", "k20"} and saved["n_tries"] == 2
    assert set(saved["few_shot"]) == {"2_per_class"} and set(saved["few_shot"]["2_per_class"]) == {"k1", "k2"}
    for result in saved["few_shot"]["2_per_class"].values():
        assert 0.0 <= result["top1"] <= result["top5"] <= 100.0
        hits = result["top1"] * 20 * 2 / 100  # the mean of 2 counts of the 20 queries
        assert hits == pytest.approx(round(hits))
    assert saved["few_shot"] == json.loads(json.dumps(record["few_shot"]))
    for bad in (["--n-per-class-list", "0"], ["--n-tries", "0"]):
        with pytest.raises(ValueError, match="n-per-class-list"):
            knn.main(knn.get_args_parser().parse_args([*DATASETS, *COMMON, *bad, "--", *micro_arch]))


def test_knn_main_with_trained_weights_equals_direct_computation(micro_arch, tmp_path):
    """The script's numbers are those of extract_features + knn_classify on the loaded weights."""
    from dinov2.data.transforms import make_classification_eval_transform
    from dinov2.eval.features import extract_features, make_eval_dataset
    from dinov2.eval.setup import build_eval_model

    model, _ = build_eval_model(None, None, micro_arch)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "t.pth")
    args = knn.get_args_parser().parse_args(
        [*DATASETS, *COMMON, "--output-dir", str(tmp_path), "--pretrained-weights", str(tmp_path / "t.pth"),
         "--nb_knn", "3", "--temperature", "0.1", "--no-progress", *micro_arch]
    )  # fmt: skip
    record = knn.main(args)
    transform = make_classification_eval_transform(32, 32)
    train = extract_features(model, make_eval_dataset(DATASETS[1], transform), 7, progress=False)
    val = extract_features(model, make_eval_dataset(DATASETS[3], transform), 7, progress=False)
    expected = knn.knn_classify(*train, *val, nb_knn=(3,), temperature=0.1, num_classes=12)
    assert record["results"]["k3"] == expected[3]


@pytest.mark.parametrize(
    ("module", "bad", "message"),
    [
        (knn, ["--nb_knn", "0"], "--nb_knn"),
        (knn, ["--temperature", "0"], "--temperature"),
        (knn, ["--n-per-class-list", "-2"], "n-per-class-list"),
        (knn, ["--chunk-size", "-4"], "--chunk-size"),
        (linear, ["--epochs", "0"], "--epochs"),  # used to write the scores of the untrained classifiers
        (linear, ["--epoch-length", "0"], "--epoch-length"),
        (linear, ["--learning-rates", "0.1", "-1"], "--learning-rates"),
        (log_regression, ["--c-count", "0"], "--c-count"),
        (log_regression, ["--c-values", "1", "-0.5"], "--c-values"),
        # used to fail only in the C sweep, once the features were extracted
        (log_regression, ["--holdout-fraction", "10"], "--holdout-fraction"),
        (log_regression, ["--max-iter", "0"], "--max-iter"),  # used to score the zero-initialised classifier
    ],
)
def test_bad_protocol_arguments_fail_before_the_model_is_built(module, bad, message, monkeypatch, micro_arch):
    def no_model(args):
        raise AssertionError("the model was built (and features would be extracted) before the check")

    monkeypatch.setattr(module, "setup_and_build_model", no_model)
    args = module.get_args_parser().parse_args([*DATASETS, *COMMON, *bad, "--", *micro_arch])
    with pytest.raises(ValueError, match=message):
        module.main(args)


def test_log_regression_main_writes_results(micro_arch, tmp_path):
    args = log_regression.get_args_parser().parse_args(
        [*DATASETS, *COMMON, "--output-dir", str(tmp_path), "--c-values", "0.01", "1", "--max-iter", "50",
         "--holdout-fraction", "0.25", "--no-progress", *micro_arch]
    )  # fmt: skip
    log_regression.main(args)
    saved = json.loads((tmp_path / log_regression.RESULTS_FILE).read_text())
    assert saved["task"] == "log_regression" and saved["best_c"] in (0.01, 1.0)
    assert set(saved["holdout_top1"]) == {"0.01", "1.0"}
    assert 0.0 <= saved["top1"] <= saved["top5"] <= 100.0
    assert saved["metric_type"] == "top1" and 0.0 <= saved["mean_per_class"] <= 100.0


@pytest.mark.slow
def test_knn_script_runs_as_a_file_path(tmp_path):
    """``python dinov2/eval/knn.py ...`` from another directory, on the shipped tiny eval config
    (shrunk further by trailing ``key=value`` overrides)."""
    command = [
        sys.executable, str(REPO / "dinov2" / "eval" / "knn.py"), "--config-file", "vitt8_32px",
        *DATASETS, *COMMON, "--output-dir", str(tmp_path), "--nb_knn", "10", "--no-progress",
        "student.embed_dim=32", "student.depth=2", "student.num_heads=2",  # trailing overrides, for speed
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "top-1 %" in done.stdout
    assert set(json.loads((tmp_path / knn.RESULTS_FILE).read_text())["results"]) == {"k10"}
    assert (tmp_path / "log.txt").is_file()


def _image_folder(root: Path, corrupt: str) -> str:
    """Three classes of four flat-coloured 8x8 images; ``corrupt`` is overwritten with non-image bytes."""
    from PIL import Image

    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * c + 10 * i, 30 * i, 200 - 50 * c)).save(root / f"class{c}" / f"{i}.png")
    (root / corrupt).write_bytes(b"\x89PNG truncated")
    return f"ImageFolder:root={root}"


def test_knn_main_records_unreadable_images(micro_arch, tmp_path):
    datasets = ["--train-dataset", _image_folder(tmp_path / "train", "class1/2.png"),
                "--val-dataset", _image_folder(tmp_path / "val", "class0/0.png")]  # fmt: skip
    args = knn.get_args_parser().parse_args(
        [*datasets, *COMMON, "--output-dir", str(tmp_path), "--nb_knn", "3", "--no-progress", *micro_arch]
    )
    knn.main(args)
    saved = json.loads((tmp_path / knn.RESULTS_FILE).read_text())
    assert saved["num_skipped"] == {"train": 1, "val": 1}
    assert (saved["num_train"], saved["num_val"]) == (11, 11)


def test_linear_resume_under_another_batch_or_length_is_refused(micro_arch, tmp_path):
    """A checkpoint continues only the run that wrote it: under another global batch the data
    position, the scaled learning rates and the cosine schedule would silently mix two runs."""
    from dinov2.eval import linear

    def args(*extra):
        return linear.get_args_parser().parse_args(
            [*DATASETS, *COMMON, "--output-dir", str(tmp_path), "--epochs", "1", "--epoch-length", "2",
             "--eval-period-iterations", "0", "--learning-rates", "0.01", "--n-last-blocks", "1",
             "--no-progress", *extra, *micro_arch]
        )  # fmt: skip

    first = linear.main(args("--batch-size", "8"))
    assert torch.load(tmp_path / linear.CHECKPOINT_FILE, weights_only=True)["iteration"] == 2
    with pytest.raises(ValueError, match=r"global_batch_size 8 -> 4.*--no-resume"):
        linear.main(args("--batch-size", "4"))
    with pytest.raises(ValueError, match=r"iterations 2 -> 4"):
        linear.main(args("--batch-size", "8", "--epochs", "2"))
    assert linear.main(args("--batch-size", "8"))["classifiers"] == first["classifiers"]  # same settings resume
    assert linear.main(args("--batch-size", "4", "--no-resume"))["global_batch_size"] == 4
