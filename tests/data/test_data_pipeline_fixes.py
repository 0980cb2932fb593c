"""Regression tests for data-pipeline defects: interrupted metadata dumps, byte-order marks, empty
dataset-string values, invalid iBOT mask settings and memory pinning for CPU training."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dinov2.data.collate import collate_data_and_cast
from dinov2.data.datasets import FileList, ImageNet, ImageNet22k, make_dataset
from dinov2.data.masking import MaskingGenerator

WNIDS = ["n01000000", "n02000000"]


def _write(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), (value, 0, 0)).save(path, format="JPEG" if path.suffix.upper() == ".JPEG" else "PNG")


@pytest.fixture
def imagenet_root(tmp_path):
    root = tmp_path / "in1k"
    root.mkdir()
    (root / "labels.txt").write_text("".join(f"{w},class {w}\n" for w in WNIDS))
    for w in WNIDS:
        for n in (1, 2):
            _write(root / "train" / w / f"{w}_{n}.JPEG")
    return root


def _failing_save(monkeypatch, fail_on_call: int):
    """Make ``np.save`` write a few bytes and raise on call number ``fail_on_call`` (1-based), as a
    process killed or a disk filling up in the middle of a write would; earlier calls really save."""
    real_save = np.save
    calls = {"n": 0}

    def save(file, arr, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < fail_on_call:
            return real_save(file, arr, *args, **kwargs)
        if hasattr(file, "write"):
            file.write(b"\x93NUMPY\x01\x00")
        else:
            with open(file, "wb") as handle:
                handle.write(b"\x93NUMPY\x01\x00")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "save", save)


def test_interrupted_first_dump_leaves_no_truncated_metadata(imagenet_root, tmp_path, monkeypatch):
    extra = tmp_path / "extra"
    _failing_save(monkeypatch, fail_on_call=1)
    with pytest.raises(OSError, match="No space"):
        ImageNet(split="TRAIN", root=str(imagenet_root), extra=str(extra)).dump_extra()
    monkeypatch.undo()
    assert sorted(p.name for p in extra.iterdir()) == []  # neither truncated targets nor temporary files
    with pytest.raises(FileNotFoundError, match="Build it once with"):
        len(ImageNet(split="TRAIN", root=str(imagenet_root), extra=str(extra)))


def test_interrupted_redump_keeps_the_previous_metadata(imagenet_root, tmp_path, monkeypatch):
    extra = tmp_path / "extra"
    ImageNet(split="TRAIN", root=str(imagenet_root), extra=str(extra)).dump_extra()
    before = {p.name: p.read_bytes() for p in extra.iterdir()}
    _write(imagenet_root / "train" / WNIDS[0] / f"{WNIDS[0]}_3.JPEG")  # the re-dump would list 5 images
    _failing_save(monkeypatch, fail_on_call=2)  # entries written, then the class ids fail
    with pytest.raises(OSError):
        ImageNet(split="TRAIN", root=str(imagenet_root), extra=str(extra)).dump_extra()
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in extra.iterdir()} == before
    dataset = ImageNet(split="TRAIN", root=str(imagenet_root), extra=str(extra))
    assert len(dataset) == 4 and dataset.num_classes == 2


def test_interrupted_22k_dump_leaves_no_truncated_metadata(tmp_path, monkeypatch):
    root = tmp_path / "in22k"
    _write(root / "n0001" / "a.JPEG")
    extra = tmp_path / "extra22k"
    _failing_save(monkeypatch, fail_on_call=2)
    with pytest.raises(OSError):
        ImageNet22k(root=str(root), extra=str(extra)).dump_extra()
    monkeypatch.undo()
    assert list(extra.iterdir()) == []


def test_labels_file_with_byte_order_mark(imagenet_root, tmp_path):
    text = (imagenet_root / "labels.txt").read_text()
    (imagenet_root / "labels.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())  # as Windows editors save it
    extra = tmp_path / "extra"
    ImageNet(split="TRAIN", root=str(imagenet_root), extra=str(extra)).dump_extra()
    assert np.load(extra / "class-ids-TRAIN.npy").tolist() == WNIDS
    assert np.load(extra / "class-names-TRAIN.npy").tolist() == [f"class {w}" for w in WNIDS]


def test_file_list_with_byte_order_mark_reads_the_first_path(tmp_path):
    _write(tmp_path / "a.png", value=10)
    _write(tmp_path / "b.png", value=20)
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbf" + b"a.png 0\nb.png 1\n")
    dataset = FileList(str(tmp_path / "list.txt"))
    assert dataset.get_image_path(0) == str(tmp_path / "a.png")
    image, target = dataset[0]
    assert dataset.num_skipped == 0 and target == 0 and image.getpixel((0, 0))[0] == 10


@pytest.mark.parametrize("dataset_str", ["ImageFolder:root=", "ImageFolder:root= ", "FileList:path=list.txt:root="])
def test_empty_dataset_string_value_is_an_error(tmp_path, monkeypatch, dataset_str):
    # an unset variable in "ImageFolder:root=$DATA" must not train on the current directory
    _write(tmp_path / "stray.png")
    (tmp_path / "list.txt").write_text("stray.png\n")
    monkeypatch.chdir(tmp_path)
    key = "root"
    with pytest.raises(ValueError, match=rf"key '{key}' has an empty value"):
        make_dataset(dataset_str)


def _samples(batch=2):
    crops = {"global_crops": [torch.zeros(3, 8, 8)] * 2, "local_crops": []}
    return [(crops, 0)] * batch


@pytest.mark.parametrize(
    ("ratio", "probability", "message"),
    [
        ((0.1, 0.5), 1.5, "mask_probability must be in"),
        ((0.1, 0.5), -0.1, "mask_probability must be in"),
        ((0.1, 1.5), 0.5, "mask_ratio_tuple must be"),
        ((-0.1, 0.5), 0.5, "mask_ratio_tuple must be"),
        ((0.1,), 0.5, "mask_ratio_tuple must be"),
        ((0.1, 0.5), None, "mask_probability must be in.*None"),  # an unset key, not a TypeError
        ((0.1, 0.5), "half", "mask_probability must be in.*'half'"),
        ((0.1, None), 0.5, "mask_ratio_tuple must be"),
        (0.3, 0.5, "mask_ratio_tuple must be"),  # a single number, not a pair
    ],
)
def test_invalid_mask_settings_are_named(ratio, probability, message):
    generator = MaskingGenerator(4, max_num_patches=8)
    with pytest.raises(ValueError, match=message):
        collate_data_and_cast(_samples(), ratio, probability, torch.float32, mask_generator=generator,
                              random_generator=random.Random(0))  # fmt: skip


def _train_cfg(device="auto", mask_probability=0.5, seed=0):
    return OmegaConf.create(
        {
            "train": {"seed": seed, "batch_size_per_gpu": 2, "num_workers": 0, "sampler_type": "INFINITE",
                      "gpu_augmentation": False, "device": device},
            "crops": {"global_crops_scale": [0.32, 1.0], "local_crops_scale": [0.05, 0.32], "local_crops_number": 1,
                      "global_crops_size": 16, "local_crops_size": 8, "global_crops_1_blur_prob": 0.0,
                      "global_crops_2_blur_prob": 0.9, "local_crops_blur_prob": 0.5},
            "student": {"patch_size": 8},
            "ibot": {"mask_ratio_min_max": [0.1, 0.5], "mask_sample_probability": mask_probability},
        }
    )  # fmt: skip


def test_build_collate_names_the_config_keys():
    from dinov2.train.data import build_collate

    with pytest.raises(ValueError, match=r"ibot\.mask_sample_probability.*must be in \[0, 1\], got 2"):
        build_collate(_train_cfg(mask_probability=2))


@pytest.mark.parametrize(("device", "cuda_present", "pinned"), [
    ("cpu", True, False), ("cuda", True, True), ("cuda:1", True, True), ("auto", True, True), ("auto", False, False),
])  # fmt: skip
def test_train_loader_pins_memory_only_for_cuda_training(monkeypatch, device, cuda_present, pinned):
    from dinov2.train.data import build_train_loader

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_present)
    dataset = make_dataset("Synthetic:num_images=4:image_size=16")
    loader = build_train_loader(_train_cfg(device=device), dataset)
    assert loader.pin_memory is pinned


def test_a_negative_train_seed_is_named_when_the_loader_is_built():
    from dinov2.data.seeding import PositionedSampler
    from dinov2.train.data import build_train_loader

    dataset = make_dataset("Synthetic:num_images=4:image_size=16")
    with pytest.raises(ValueError, match=r"train\.seed must be a non-negative integer, got -3"):
        build_train_loader(_train_cfg(seed=-3), dataset)  # not an obscure NumPy error at the first batch
    with pytest.raises(ValueError, match="seed >= 0"):
        PositionedSampler(4, 2, seed=-3)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a.png 0\nb.png 1\n".encode("utf-16"), r"list\.txt:1: .*UTF-16.*save it as UTF-8"),  # Notepad's "Unicode"
        (b"a.png 0\ncaf\xe9.png 1\n", r"list\.txt:2: not valid UTF-8 \(byte 0xe9 at column 4\)"),  # Latin-1
    ],
    ids=["utf16", "latin1"],
)
def test_a_list_file_that_is_not_utf8_is_named_with_its_line(tmp_path, content, message):
    # It used to fail with a bare UnicodeDecodeError naming neither the file nor the line.
    _write(tmp_path / "a.png")
    (tmp_path / "list.txt").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        FileList(str(tmp_path / "list.txt"))


def test_a_labels_file_that_is_not_utf8_is_named(imagenet_root, tmp_path):
    (imagenet_root / "labels.txt").write_bytes(b"n00000001,caf\xe9\n")
    with pytest.raises(ValueError, match=r"labels\.txt:1: not valid UTF-8"):
        ImageNet(split="TRAIN", root=str(imagenet_root), extra=str(tmp_path / "extra")).dump_extra()


def test_list_file_line_endings_are_kept(tmp_path):
    _write(tmp_path / "a.png", value=10)
    _write(tmp_path / "b.png", value=20)
    (tmp_path / "list.txt").write_bytes(b"a.png 0\r\nb.png 1\rb.png 1\n")  # Windows and old-Mac line ends
    dataset = FileList(str(tmp_path / "list.txt"))
    assert [dataset.get_image_path(i) for i in range(3)] == [str(tmp_path / n) for n in ("a.png", "b.png", "b.png")]
