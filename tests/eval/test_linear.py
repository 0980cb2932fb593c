import json

import pytest
import torch
from torch import nn

from dinov2.checkpoint import atomic_torch_save
from dinov2.eval import linear
from dinov2.eval import linear_heads as core
from dinov2.eval.setup import build_eval_model
from dinov2.hub import backbones, classifiers

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls, one thread


def _separable(n, dim=16, num_classes=4, margin=0.5, seed=0):
    """Features labelled by argmax of a fixed random linear map, keeping only samples with a margin."""
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(dim, num_classes, generator=torch.Generator().manual_seed(123))
    kept_x, kept_y = [], []
    while sum(len(y) for y in kept_y) < n:
        x = torch.randn(4 * n, dim, generator=gen)
        scores = x @ w_true
        top2 = scores.topk(2, dim=1).values
        keep = top2[:, 0] - top2[:, 1] > margin
        kept_x.append(x[keep])
        kept_y.append(scores[keep].argmax(dim=1))
    return torch.cat(kept_x)[:n], torch.cat(kept_y)[:n]


def _packed(x, n_max=1):
    """Packed features (N, n_max + 1, D) whose every slot is ``x`` scaled differently."""
    return torch.stack([x * (1.0 + 0.1 * i) for i in range(n_max + 1)], dim=1)


def _batches(packed, labels, batch_size, seed=0, start=0):
    """Batch of iteration ``it`` depends only on ``(seed, it)``: deterministic and resumable."""
    it = start
    while True:
        index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed * 100_003 + it))[:batch_size]
        yield packed[index], labels[index]
        it += 1


def _train(lrs, packed, labels, max_iter=60, n_last_blocks=(1,), avgpool=(False, True)):
    heads, base_lrs = core.build_heads(packed.shape[-1], int(labels.max()) + 1, lrs, n_last_blocks, avgpool)
    optimizer = core.make_optimizer(heads, base_lrs)
    core.train_heads(heads, optimizer, _batches(packed, labels, 32), max_iter)
    return heads


def test_linear_probe_separates_linearly_separable_features():
    x, y = _separable(1200)
    train, test = _packed(x[:800]), _packed(x[800:])
    heads = _train([0.01, 0.1, 1.0], train, y[:800], max_iter=300)
    results = core.evaluate_heads(heads, test, y[800:], num_classes=4)
    best = core.best_classifier(results)
    assert results[best]["top1"] >= 95.0
    assert results[best]["top1"] == max(r["top1"] for r in results.values())
    assert set(results) == {core.classifier_name(1, a, lr) for a in (False, True) for lr in (0.01, 0.1, 1.0)}
    # The metric definitions against a direct computation for one classifier.
    logits = heads[best](test)
    assert results[best]["top1"] == pytest.approx(100.0 * (logits.argmax(1) == y[800:]).float().mean().item())
    per_class = [(logits.argmax(1)[y[800:] == c] == c).float().mean().item() for c in range(4)]
    assert results[best]["mean_per_class"] == pytest.approx(100.0 * sum(per_class) / 4)


def test_tied_and_nan_logits_score_chance_and_zero():
    """All-equal logits predict class 0 (the lowest index) for every sample; NaN logits are never
    correct. Expected values from the label counts alone."""
    heads, _ = core.build_heads(8, 7, [0.1, 0.2], n_last_blocks=(1,), avgpool=(False,))
    tied, diverged = heads.values()
    with torch.no_grad():
        tied.linear.weight.zero_()
        diverged.linear.weight.fill_(float("nan"))
    labels = torch.tensor([0, 0, 0, 1, 2, 3, 4, 4, 5, 6])
    results = core.evaluate_heads(heads, torch.randn(10, 2, 8), labels, num_classes=7)
    tied_name, diverged_name = heads.keys()
    assert results[tied_name]["top1"] == pytest.approx(100.0 * (labels == 0).float().mean().item())
    assert results[tied_name]["top5"] == pytest.approx(100.0 * (labels < 5).float().mean().item())
    assert results[tied_name]["mean_per_class"] == pytest.approx(100.0 / 7)  # class 0 all right, others none
    assert results[diverged_name] == {"top1": 0.0, "top5": 0.0, "mean_per_class": 0.0}
    assert core.best_classifier(results) == tied_name


def test_grid_classifiers_are_independent():
    x, y = _separable(256)
    packed = _packed(x, n_max=4)
    grid = dict(n_last_blocks=(1, 4), avgpool=(False, True))
    init, _ = core.build_heads(16, 4, [0.0, 0.1, 0.5], **grid)
    first = _train([0.0, 0.1, 0.5], packed, y, **grid)
    second = _train([0.0, 0.1, 0.3], packed, y, **grid)
    for n in (1, 4):
        for avg in (False, True):
            zero, mid = core.classifier_name(n, avg, 0.0), core.classifier_name(n, avg, 0.1)
            assert first[zero].linear.in_features == (n + avg) * 16
            # lr 0 stays at its initialisation; the others move.
            for p, q in zip(first[zero].parameters(), init[zero].parameters()):
                assert torch.equal(p, q)
            assert not torch.equal(first[mid].linear.weight, init[mid].linear.weight)
            # Changing the third classifier's lr leaves the others bit-identical.
            for name in (zero, mid):
                for p, q in zip(first[name].parameters(), second[name].parameters()):
                    assert torch.equal(p, q)
            high, other = core.classifier_name(n, avg, 0.5), core.classifier_name(n, avg, 0.3)
            assert not torch.equal(first[high].linear.weight, second[other].linear.weight)


def test_head_reads_its_slots_of_the_packed_features():
    head = core.LinearHead(n_blocks=2, use_avgpool=False, embed_dim=3, num_classes=5)
    head.reset_parameters(torch.Generator().manual_seed(0))
    packed = torch.randn(7, 5, 3)  # n_max = 4: cls_1..cls_4, avgpool
    expected = torch.cat([packed[:, 2], packed[:, 3]], dim=1) @ head.linear.weight.T + head.linear.bias
    assert torch.allclose(head(packed), expected)
    hub = head.hub_state_dict()
    assert hub["weight"].shape == (5, 9) and torch.all(hub["weight"][:, 6:] == 0)


def test_resume_of_the_core_loop_matches_uninterrupted(tmp_path):
    x, y = _separable(256)
    packed = _packed(x)
    max_iter, path = 20, tmp_path / "ckpt.pth"

    def run(start=0, crash_at=None, save_at=10):
        heads, lrs = core.build_heads(16, 4, [0.05, 0.2], n_last_blocks=(1,))
        optimizer = core.make_optimizer(heads, lrs)
        if start:
            assert core.load_checkpoint(path, heads, optimizer)["iteration"] == start

        def hook(done):
            if done == save_at:
                atomic_torch_save(core.checkpoint_state(heads, optimizer, done), path)
            if done == crash_at:
                raise KeyboardInterrupt

        core.train_heads(heads, optimizer, _batches(packed, y, 32, start=start), max_iter, start, hook)
        return heads

    reference = run(save_at=None)
    with pytest.raises(KeyboardInterrupt):
        run(crash_at=14)
    resumed = run(start=10)
    for (name, p), q in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_saved_head_loads_into_hub_classifier_with_identical_logits(tmp_path):
    settings = dict(img_size=32, patch_size=8)
    backbone = backbones.make_dinov2_model(arch_name="vit_small", pretrained=False, **settings).eval()
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    heads, _ = core.build_heads(backbone.embed_dim, 6, [0.1], n_last_blocks=(1, 4))
    for head in heads.values():
        head.linear.bias.data.normal_()  # nonzero bias, weights as initialised
    images = torch.randn(3, 3, 32, 32)
    packed = core.pack_features(backbone, images, 4)
    for n in (1, 4):
        path = tmp_path / f"head_{n}.pth"
        atomic_torch_save(heads[core.classifier_name(n, False, 0.1)].hub_state_dict(), path)
        wrapper = classifiers.make_dinov2_linear_classifier(
            arch_name="vit_small", layers=n, weights=str(path),
            backbone_weights=str(tmp_path / "backbone.pth"), num_classes=6, **settings,
        ).eval()  # fmt: skip
        for avgpool in (False, True):
            head = heads[core.classifier_name(n, avgpool, 0.1)]
            state = head.hub_state_dict() if avgpool else torch.load(path, weights_only=True)
            wrapper.linear_head.load_state_dict(state)
            with torch.no_grad():
                assert torch.allclose(wrapper(images), head(packed), atol=1e-5)


TINY_OPTS = ("student.embed_dim=32", "student.depth=4", "student.num_heads=2")


def _main_args(tmp_path, output, num_workers=0, **overrides):
    argv = [
        "--config-file", "vitt8_32px", "--output-dir", str(output), "--device", "cpu",
        "--train-dataset", "Synthetic:split=TRAIN:num_images=40:image_size=40",
        "--val-dataset", "Synthetic:split=VAL:num_images=24:image_size=32",
        "--batch-size", "8", "--num-workers", str(num_workers), "--epochs", "2", "--epoch-length", "3",
        "--eval-period-iterations", "2", "--learning-rates", "0.01", "1.0",
        "--resize-size", "32", "--crop-size", "32", "--no-progress",
        "--pretrained-weights", str(tmp_path / "backbone.pth"), *TINY_OPTS,
    ]  # fmt: skip
    return linear.get_args_parser().parse_args(argv)


def _load_heads(path):
    return torch.load(path, weights_only=True)["heads"]


def test_main_end_to_end_and_resume(tmp_path, monkeypatch):
    backbone, _ = build_eval_model("vitt8_32px", None, opts=TINY_OPTS, device="cpu")
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    record = linear.main(_main_args(tmp_path, tmp_path / "a"))

    results = json.loads((tmp_path / "a" / linear.RESULTS_FILE).read_text())
    assert len(results["classifiers"]) == 2 * 2 * 2  # lrs x n_last_blocks x avgpool
    best = results["best_classifier"]["name"]
    assert results["best_classifier"]["accuracy"] == max(r["top1"] for r in results["classifiers"].values())
    assert results["classifiers"][best]["lr"] == pytest.approx(results["classifiers"][best]["base_lr"] * 8 / 256)
    assert [h["iteration"] for h in results["history"]] == [2, 4]
    assert best in (tmp_path / "a" / linear.TABLE_FILE).read_text()
    assert record["best_classifier"] == results["best_classifier"]
    assert results["pretrained_weights"] == results["weights_read"] == str(tmp_path / "backbone.pth")

    # The best head in hub format, in LinearClassifierWrapper, gives the trained classifier's logits.
    head_state = torch.load(tmp_path / "a" / linear.BEST_HEAD_FILE, weights_only=True)
    n = results["best_classifier"]["n_last_blocks"]
    layer = nn.Linear((1 + n) * backbone.embed_dim, 12)
    layer.load_state_dict(head_state)
    wrapper = classifiers.LinearClassifierWrapper(backbone=backbone, linear_head=layer, layers=n)
    trained, _ = core.build_heads(backbone.embed_dim, 12, [0.01, 1.0])
    trained.load_state_dict(_load_heads(tmp_path / "a" / linear.CHECKPOINT_FILE))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(wrapper(images), trained[best](core.pack_features(backbone, images, 4)), atol=1e-5)

    # Interrupted after 5 steps (checkpoint at 3), then resumed with a worker process: same result.
    calls, real_step = {"n": 0}, core.train_step

    def crashing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(core, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        linear.main(_main_args(tmp_path, tmp_path / "b"))
    assert torch.load(tmp_path / "b" / linear.CHECKPOINT_FILE, weights_only=True)["iteration"] == 3
    monkeypatch.setattr(core, "train_step", real_step)
    resumed = linear.main(_main_args(tmp_path, tmp_path / "b", num_workers=1))
    assert resumed["classifiers"] == record["classifiers"]
    reference = _load_heads(tmp_path / "a" / linear.CHECKPOINT_FILE)
    again = _load_heads(tmp_path / "b" / linear.CHECKPOINT_FILE)
    for key, value in reference.items():
        assert torch.equal(value, again[key]), key


def test_main_counts_unreadable_train_and_val_images(tmp_path):
    """One corrupt training image is met once per pass over the stream position it lands on; one
    corrupt validation image is dropped. Expected train count from the sampler's order."""
    from PIL import Image

    from dinov2.data.seeding import PositionedSampler

    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (8, 8), (50 * i, 120 * c, 30)).save(tmp_path / split / f"c{c}" / f"{i}.png")
    (tmp_path / "train" / "c0" / "3.png").write_bytes(b"")  # index 3 of the sorted paths
    (tmp_path / "val" / "c1" / "0.png").write_bytes(b"garbage")
    backbone, _ = build_eval_model("vitt8_32px", None, opts=TINY_OPTS, device="cpu")
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    args = _main_args(tmp_path, tmp_path / "out")
    args.train_dataset, args.val_dataset = (
        f"ImageFolder:root={tmp_path / 'train'}",
        f"ImageFolder:root={tmp_path / 'val'}",
    )
    record = linear.main(args)
    positions = args.epochs * args.epoch_length * args.batch_size
    stream = iter(PositionedSampler(10, args.batch_size, seed=args.seed, start=0))
    expected_train = sum(next(stream)[1] == 3 for _ in range(positions))
    assert expected_train > 0
    assert record["num_skipped"] == {"train": expected_train, "val": 1}
    saved = json.loads((tmp_path / "out" / linear.RESULTS_FILE).read_text())
    assert saved["num_skipped"] == record["num_skipped"]


def test_val_class_unknown_to_the_train_set_fails_before_training(tmp_path, monkeypatch):
    """A val split with a class the train split lacks cannot be scored by the classifiers: refused
    up front, naming both datasets (it used to fail only at the first evaluation, after training)."""
    from PIL import Image

    for split, classes in (("train", 2), ("val", 3)):
        for c in range(classes):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (60 * i, 100 * c, 30)).save(tmp_path / split / f"c{c}" / f"{i}.png")
    backbone, _ = build_eval_model("vitt8_32px", None, opts=TINY_OPTS, device="cpu")
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    args = _main_args(tmp_path, tmp_path / "out")
    args.train_dataset = f"ImageFolder:root={tmp_path / 'train'}"
    args.val_dataset = f"ImageFolder:root={tmp_path / 'val'}"
    steps = []
    monkeypatch.setattr(core, "train_step", lambda *a, **k: steps.append(1) or 0.0)
    with pytest.raises(ValueError, match=r"val dataset .*class index 2.*train dataset .*2 classes"):
        linear.main(args)
    assert steps == []
    assert not (tmp_path / "out" / linear.CHECKPOINT_FILE).exists()


def test_unlabelled_training_image_fails_before_training(tmp_path, monkeypatch):
    """An image lying in the ImageFolder root next to the class folders has label -1. The probe
    stops before the first step, naming the dataset and the index, instead of when a batch first
    meets it (late, and on one rank only under torchrun, which leaves the others hanging)."""
    from PIL import Image

    from dinov2.data.datasets import make_dataset

    for c in range(2):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (8, 8), (20 * i, 100 * c, 30)).save(tmp_path / "train" / f"c{c}" / f"{i}.png")
    Image.new("RGB", (8, 8), (200, 200, 200)).save(tmp_path / "train" / "stray.png")
    train = f"ImageFolder:root={tmp_path / 'train'}"
    stray = list(make_dataset(train).get_targets()).index(-1)  # from the dataset itself, not the probe
    backbone, _ = build_eval_model("vitt8_32px", None, opts=TINY_OPTS, device="cpu")
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    args = _main_args(tmp_path, tmp_path / "out")
    args.train_dataset, args.batch_size, args.epochs, args.epoch_length = train, 2, 2, 6
    args.eval_period_iterations = 0
    steps, encoded = [], []
    monkeypatch.setattr(core, "train_step", lambda *a, **k: steps.append(1) or 0.0)
    monkeypatch.setattr(linear, "encode_val_set", lambda *a, **k: encoded.append(1) or (None, None, 0))
    with pytest.raises(ValueError, match=rf"train dataset .*1 unlabelled.*index {stray}\b"):
        linear.main(args)
    assert steps == [] and encoded == []


def test_a_failed_table_write_keeps_the_previous_table(tmp_path, monkeypatch):
    """``results_eval_linear.txt`` was written in place (``Path.write_text``): a write that fails
    part-way (here a table that cannot be encoded) left it truncated. It is written like the JSON
    and the head: to a temporary file renamed over it, so the previous table survives."""
    import argparse

    heads, base_lrs = core.build_heads(4, 3, [0.1], n_last_blocks=(1,), avgpool=(False,))
    name = next(iter(heads))
    record = {"best_classifier": {"name": name},
              "classifiers": {name: {"top1": 50.0, "top5": 100.0, "mean_per_class": 50.0}}}  # fmt: skip
    args = argparse.Namespace(output_dir=str(tmp_path), val_metric_type="top1")
    table = tmp_path / linear.TABLE_FILE
    table.write_text("previous table\n")
    monkeypatch.setattr(linear, "results_table", lambda *a, **k: "bad \ud800 cell")
    with pytest.raises(UnicodeEncodeError):
        linear._write_outputs(args, record, heads)
    assert table.read_text() == "previous table\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([linear.TABLE_FILE, linear.RESULTS_FILE,
                                                                 linear.BEST_HEAD_FILE])  # fmt: skip
    monkeypatch.undo()
    linear._write_outputs(args, record, heads)
    assert table.read_text().startswith(f"best (top1): {name}\n") and "50.00" in table.read_text()


def test_resume_refuses_a_checkpoint_of_another_backbone(tmp_path):
    # Two linear evaluations of different backbones in one output directory (the default is the
    # working directory): the second must not take over the first's classifiers (a finished checkpoint
    # would otherwise only be scored on the new features, and reported as this backbone's result).
    backbone, _ = build_eval_model("vitt8_32px", None, opts=TINY_OPTS, device="cpu")
    state = backbone.state_dict()
    torch.save(state, tmp_path / "backbone.pth")
    out = tmp_path / "out"
    first = linear.main(_main_args(tmp_path, out))
    other = tmp_path / "other"
    other.mkdir()
    torch.save({k: v + 0.01 if k.endswith("qkv.weight") else v for k, v in state.items()}, other / "backbone.pth")
    with pytest.raises(ValueError, match=r"another backbone.*--no-resume"):
        linear.main(_main_args(other, out))
    # the same weights under another path resume (finished: the same result)
    (tmp_path / "copy").mkdir()
    torch.save(state, tmp_path / "copy" / "backbone.pth")
    assert linear.main(_main_args(tmp_path / "copy", out))["classifiers"] == first["classifiers"]


def test_resume_refuses_a_checkpoint_of_another_train_dataset(tmp_path):
    # Another train dataset with as many classes would load the classifiers without a shape error and
    # continue them on another data stream (and a finished checkpoint would only be scored again).
    backbone, _ = build_eval_model("vitt8_32px", None, opts=TINY_OPTS, device="cpu")
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    linear.main(_main_args(tmp_path, tmp_path / "out"))
    args = _main_args(tmp_path, tmp_path / "out")
    args.train_dataset = "Synthetic:split=TRAIN:num_images=48:image_size=40"
    with pytest.raises(ValueError, match=r"train dataset.*40 samples.*48.*--no-resume"):
        linear.main(args)
