"""Data behaviour that a line-coverage pass of the suite found unexercised: the ImageNet datasets'
refusals of a tree they cannot read (each names what is missing), their pickled state for loader
workers, an out-of-memory error while decoding (not a corrupt image), the transforms' argument
checks and descriptions, an image-folder root that is a file, a list line without its path, and an
image folder's description."""

from __future__ import annotations

import pickle

import pytest
from PIL import Image
from test_datasets import _write

from dinov2.data import transforms
from dinov2.data.datasets import FileList, ImageFolder, ImageNet, ImageNet22k, base
from dinov2.data.datasets import imagenet as imagenet_module


def _root(tmp_path, labels: bool = True):
    root = tmp_path / "in1k"
    _write(root / "train" / "n01000000" / "n01000000_1.JPEG")
    if labels:
        (root / "labels.txt").write_text("n01000000,a class\n")
    return root


# ------------------------------------------------------------------------------------ ImageNet
def test_imagenet_without_its_labels_file_names_the_file_and_its_format(tmp_path):
    root = _root(tmp_path, labels=False)
    with pytest.raises(FileNotFoundError, match=rf"labels file not found: {root / 'labels.txt'} \(lines '<wnid>,"):
        ImageNet(split="TRAIN", root=str(root), extra=str(tmp_path / "extra")).dump_extra()


def test_imagenet_without_the_split_folder_or_its_images_names_the_folder(tmp_path):
    root = _root(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"ImageNet VAL directory not found: {root / 'val'}"):
        ImageNet(split="VAL", root=str(root), extra=str(tmp_path / "extra")).dump_extra()
    (root / "val" / "n01000000").mkdir(parents=True)
    (root / "val" / "n01000000" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=rf"no ImageNet images \(\*\.JPEG\) found under {root / 'val'}"):
        ImageNet(split="VAL", root=str(root), extra=str(tmp_path / "extra")).dump_extra()
    assert not (tmp_path / "extra").exists()  # nothing written for a refused split


def test_imagenet22k_without_a_root_or_class_folders_is_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"ImageNet22k root does not exist .*: {tmp_path / 'missing'}"):
        ImageNet22k(root=str(tmp_path / "missing"), extra=str(tmp_path / "extra"))
    _write(tmp_path / "flat" / "loose.JPEG")  # an image, but in no class folder
    with pytest.raises(FileNotFoundError, match=f"no images in class folders under {tmp_path / 'flat'}"):
        ImageNet22k(root=str(tmp_path / "flat"), extra=str(tmp_path / "extra")).dump_extra()


def test_the_metadata_command_refuses_a_missing_root_or_one_without_splits(tmp_path):
    with pytest.raises(SystemExit, match=f"ImageNet root does not exist .*: {tmp_path / 'missing'}"):
        imagenet_module.main(["--root", str(tmp_path / "missing"), "--extra", str(tmp_path / "extra")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=f"no train/, val/ or test/ directory under {tmp_path / 'empty'}"):
        imagenet_module.main(["--root", str(tmp_path / "empty"), "--extra", str(tmp_path / "extra")])
    assert not (tmp_path / "extra").exists()


def test_a_pickled_dataset_leaves_its_loaded_metadata_behind_and_reads_it_again(tmp_path):
    root = _root(tmp_path)
    _write(tmp_path / "in22k" / "n0001" / "a.JPEG")
    datasets = [
        ImageNet(split="TRAIN", root=str(root), extra=str(tmp_path / "extra")),
        ImageNet22k(root=str(tmp_path / "in22k"), extra=str(tmp_path / "extra22k")),
    ]
    for dataset in datasets:
        dataset.dump_extra()
        assert len(dataset) == 1 and dataset._cache  # the metadata is loaded (memory-mapped) now
        restored = pickle.loads(pickle.dumps(dataset))  # as a loader worker receives it
        assert restored._cache == {}  # workers map the files themselves, not a copy of the arrays
        assert dataset._cache  # the original keeps its own
        assert len(restored) == 1 and restored.get_target(0) == 0
        assert restored.get_image_path(0) == dataset.get_image_path(0)


# ---------------------------------------------------------------------------------- decoding
def test_running_out_of_memory_while_decoding_is_not_taken_for_a_corrupt_image(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (4, 4)).save(path)

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(base.Image, "open", exhausted)
    with pytest.raises(MemoryError):  # not an ImageDecodeError: the image is not skipped and counted
        base.load_image(path)


# -------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("radii", [(0.0, 1.0), (-0.5, 1.0), (2.0, 1.0)])
def test_a_blur_radius_range_that_is_not_positive_and_ordered_is_refused(radii):
    with pytest.raises(ValueError, match=rf"need 0 < radius_min <= radius_max, got {radii[0]}, {radii[1]}"):
        transforms.GaussianBlur(p=0.5, radius_min=radii[0], radius_max=radii[1])


def test_a_blur_of_one_radius_is_allowed_and_every_transform_describes_its_settings():
    blur = transforms.GaussianBlur(p=0.25, radius_min=1.5, radius_max=1.5)
    assert repr(blur) == "GaussianBlur(p=0.25, radius_min=1.5, radius_max=1.5)"
    assert repr(transforms.CentreToAspect(3)) == "CentreToAspect(max_aspect=3)"
    assert repr(transforms.ToRGB()) == "ToRGB()"
    described = repr(transforms.make_classification_eval_transform(max_aspect=5))
    assert "ToRGB()" in described and "CentreToAspect(max_aspect=5)" in described


def test_an_aspect_limit_below_one_is_refused():
    with pytest.raises(ValueError, match="max_aspect must be >= 1, got 0"):
        transforms.CentreToAspect(0)
    with pytest.raises(ValueError, match="max_aspect must be >= 1, got 0"):
        transforms.centre_to_aspect(Image.new("RGB", (4, 2)), max_aspect=0)


# ------------------------------------------------------------------------ folders and file lists
def test_an_image_folder_root_that_is_a_file_is_refused_as_no_directory(tmp_path):
    (tmp_path / "images.zip").write_bytes(b"PK")
    with pytest.raises(NotADirectoryError, match=f"ImageFolder root is not a directory: {tmp_path / 'images.zip'}"):
        ImageFolder(str(tmp_path / "images.zip"))


def test_a_file_list_line_with_a_label_but_no_path_is_refused_with_its_line(tmp_path):
    _write(tmp_path / "a.jpg")
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'a.jpg'},0\n,1\n")
    with pytest.raises(ValueError, match=r"list\.txt:2: missing image path before the label"):
        FileList(str(tmp_path / "list.txt"))


def test_an_image_folder_describes_its_root_and_counts(tmp_path):
    for name in ("cat/a.jpg", "cat/b.jpg", "dog/c.jpg"):
        _write(tmp_path / name)
    assert repr(ImageFolder(str(tmp_path))) == f"ImageFolder(root={str(tmp_path)!r}, images=3, classes=2)"


def test_a_dataset_string_without_a_name_is_refused_with_the_expected_form():
    from dinov2.data.datasets import parse_dataset_str

    assert parse_dataset_str("ImageFolder:root=/x") == ("ImageFolder", {"root": "/x"})
    with pytest.raises(ValueError, match=r"dataset string ':root=/x' has no dataset name; expected 'Name:key=value"):
        parse_dataset_str(":root=/x")
