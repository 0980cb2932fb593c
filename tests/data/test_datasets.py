"""ImageFolder, FileList, ImageNet, ImageNet22k and make_dataset on tiny trees written into tmp_path."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dinov2.data.datasets import FileList, ImageFolder, ImageNet, ImageNet22k, make_dataset, parse_dataset_str


def _write(path, value=0, size=(8, 6)):
    """A tiny RGB image whose red channel encodes ``value`` so tests can tell files apart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.new("RGB", size, (value, 0, 0)).save(path, format=fmt)
    return path


# ImageFolder --------------------------------------------------------------------------------------


def test_image_folder_with_class_folders(tmp_path):
    _write(tmp_path / "dog" / "b.png")
    _write(tmp_path / "dog" / "a.png")
    _write(tmp_path / "cat" / "x.png")
    _write(tmp_path / "cat" / "nested" / "deep" / "y.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = ImageFolder(str(tmp_path))
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    names = [ds.get_image_path(i)[len(str(tmp_path)) + 1 :] for i in range(len(ds))]
    assert names == ["cat/nested/deep/y.png", "cat/x.png", "dog/a.png", "dog/b.png"]
    assert ds.get_targets().tolist() == [0, 0, 1, 1]
    image, target = ds[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (8, 6)
    assert target == 1


def test_image_folder_unlabeled_and_extensions(tmp_path):
    _write(tmp_path / "b.PNG")
    _write(tmp_path / "a.JpEg")
    _write(tmp_path / "c.gif.bak")
    _write(tmp_path / ".hidden.png")
    ds = ImageFolder(str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in map(ds.get_image_path, range(len(ds)))] == ["a.JpEg", "b.PNG"]
    assert ds.num_classes == 0 and ds.get_targets().tolist() == [-1, -1]
    assert ds[0][1] == -1
    only_png = ImageFolder(str(tmp_path), extensions=(".png",))
    assert len(only_png) == 1 and only_png.get_image_path(0).endswith("b.PNG")
    _write(tmp_path / "d.g")  # ".png" read letter by letter would mean the extensions ".", ".p", ".n", ".g"
    for given, expected in ((".png", ["b.PNG"]), ("png", ["b.PNG"]), ("png, .jpeg", ["a.JpEg", "b.PNG"])):
        ds = ImageFolder(str(tmp_path), extensions=given)  # a string: a comma-separated list, as in a dataset string
        assert [p.rsplit("/", 1)[-1] for p in map(ds.get_image_path, range(len(ds)))] == expected


def test_image_folder_mixed_top_level_files_are_unlabeled(tmp_path, caplog):
    _write(tmp_path / "loose.png")
    _write(tmp_path / "k1" / "a.png")
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        ds = ImageFolder(str(tmp_path))
    assert ds.get_targets().tolist() == [0, -1] and ds.num_classes == 1
    assert "label -1" in caplog.text


def test_image_folder_transforms(tmp_path):
    _write(tmp_path / "c" / "a.png", value=200)
    ds = ImageFolder(str(tmp_path), transform=lambda im: im.getpixel((0, 0))[0], target_transform=lambda t: t + 10)
    assert ds[0] == (200, 10)


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ImageFolder(str(tmp_path / "does-not-exist"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"empty.*\.jpg"):
        ImageFolder(str(tmp_path / "empty"))


def test_an_unlistable_folder_is_named_not_silently_dropped(tmp_path, monkeypatch, caplog):
    """os.walk alone skips a folder it cannot list without a word: the class would vanish and the others
    be renumbered. ImageFolder warns; the ImageNet dumps, which persist the listing, stop."""
    import os

    for name in ("ants", "bees", "cats"):
        _write(tmp_path / name / f"{name}_1.JPEG")
    real_scandir = os.scandir

    def scandir(path="."):  # running as root, chmod cannot deny access: refuse one folder here
        if os.path.basename(os.fspath(path)) == "bees":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        assert ImageFolder(str(tmp_path)).classes == ["ants", "cats"]
    assert "bees (Permission denied); its images are left out" in caplog.text
    with pytest.raises(PermissionError, match=r"bees.*Permission denied"):
        ImageNet22k(root=str(tmp_path), extra=str(tmp_path / "extra")).dump_extra()
    assert not (tmp_path / "extra").exists()
    monkeypatch.setattr(os, "scandir", real_scandir)
    assert ImageFolder(str(tmp_path)).classes == ["ants", "bees", "cats"]


def _relative_names(ds, root):
    return [ds.get_image_path(i)[len(str(root)) + 1 :] for i in range(len(ds))]


def test_image_folder_symlink_cycles_are_listed_once(tmp_path, caplog):
    root = tmp_path / "data"
    _write(root / "cats" / "a.png")
    _write(root / "cats" / "inner" / "c.png")
    _write(root / "dogs" / "b.png")
    (root / "cats" / "inner" / "up").symlink_to("../..")  # -> root: an unguarded walk re-enters root repeatedly
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        ds = ImageFolder(str(root))
    assert _relative_names(ds, root) == ["cats/a.png", "cats/inner/c.png", "dogs/b.png"]
    assert ds.classes == ["cats", "dogs"] and ds.get_targets().tolist() == [0, 0, 1]
    assert "cats/inner/up" in caplog.text


def test_image_folder_follows_symlinked_class_folders(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    _write(root / "cats" / "a.png")
    _write(outside / "birds" / "x.png")
    _write(outside / "birds" / "sub" / "y.png")
    _write(outside / "extra" / "z.png")
    (root / "birds").symlink_to(outside / "birds")  # a class folder stored elsewhere
    (root / "cats" / "more").symlink_to(outside / "extra")  # a sub-folder stored elsewhere
    (outside / "birds" / "home").symlink_to(root)  # leads back into the tree: not walked again
    ds = ImageFolder(str(root))
    assert _relative_names(ds, root) == ["birds/sub/y.png", "birds/x.png", "cats/a.png", "cats/more/z.png"]
    assert ds.classes == ["birds", "cats"] and ds.get_targets().tolist() == [0, 0, 1, 1]


def test_image_folder_two_paths_to_one_folder_keep_the_first_name(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    _write(outside / "birds" / "x.png")
    (root / "zz_birds").mkdir(parents=True)
    (root / "birds").symlink_to(outside / "birds")
    (root / "zz_birds" / "copy").symlink_to(outside / "birds")  # the same folder again, deeper
    ds = ImageFolder(str(root))
    assert _relative_names(ds, root) == ["birds/x.png"] and ds.classes == ["birds"]


def test_image_folder_names_first_level_folders_that_are_not_classes(tmp_path, caplog):
    # An empty class folder, one holding only files of other kinds, or a link to a folder that is gone (an
    # unmounted drive) used to drop out of the classes silently, renumbering the classes after it.
    _write(tmp_path / "ant" / "a.png")
    (tmp_path / "bee").mkdir()
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "c.heic").write_bytes(b"not listed")
    _write(tmp_path / "dog" / "d.png")
    (tmp_path / "eel").symlink_to(tmp_path / "unmounted" / "eel")
    (tmp_path / ".cache").mkdir()
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        ds = ImageFolder(str(tmp_path))
    assert ds.classes == ["ant", "dog"] and ds.get_targets().tolist() == [0, 1]
    warning = [r.getMessage() for r in caplog.records if "not classes" in r.getMessage()]
    assert len(warning) == 1 and "bee, cat, eel" in warning[0] and ".cache" not in warning[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        ImageFolder(str(tmp_path / "ant"))  # no sub-folders, or no classes at all: nothing to renumber
    assert caplog.text == ""


# FileList -----------------------------------------------------------------------------------------


def test_file_list_with_labels_comments_and_relative_paths(tmp_path):
    _write(tmp_path / "imgs" / "a.png", value=10)
    _write(tmp_path / "imgs" / "b c.png", value=20)
    absolute = _write(tmp_path / "elsewhere" / "d.png", value=30)
    list_file = tmp_path / "list.txt"
    list_file.write_text(f"# a comment\n\nimgs/a.png 2\nimgs/b c.png,0\n{absolute}\t1\n")
    ds = FileList(str(list_file))
    assert len(ds) == 3 and ds.num_classes == 3
    assert ds.get_targets().tolist() == [2, 0, 1]
    assert ds.get_image_path(1) == str(tmp_path / "imgs" / "b c.png")
    assert ds.get_image_path(2) == str(absolute)
    assert [ds[i][0].getpixel((0, 0))[0] for i in range(3)] == [10, 20, 30]


def test_file_list_without_labels_and_root(tmp_path):
    _write(tmp_path / "data" / "x y.png")
    _write(tmp_path / "data" / "z.png")
    list_file = tmp_path / "lists" / "l.txt"
    list_file.parent.mkdir()
    list_file.write_text("x y.png\nz.png\n")
    ds = FileList(str(list_file), root=str(tmp_path / "data"))
    assert ds.num_classes == 0 and ds.get_targets().tolist() == [-1, -1]
    assert ds.get_image_path(0) == str(tmp_path / "data" / "x y.png")
    assert ds[1][1] == -1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a.png 1\nb.png\n", "all entries or none"),
        ("a.png,cat\n", "not an integer"),
        ("a.png -3\n", "negative"),
        ("# only a comment\n\n", "lists no images"),
        ("missing1.png\nmissing2.png\n", "none of the first 2"),
    ],
)
def test_file_list_errors(tmp_path, content, message):
    _write(tmp_path / "a.png")
    _write(tmp_path / "b.png")
    list_file = tmp_path / "list.txt"
    list_file.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        FileList(str(list_file))


def test_file_list_missing_list_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        FileList(str(tmp_path / "nope.txt"))


# ImageNet -----------------------------------------------------------------------------------------

WNIDS = ["n02000000", "n01000000", "n03000000"]  # deliberately unsorted in labels.txt


@pytest.fixture
def imagenet_root(tmp_path):
    root = tmp_path / "in1k"
    root.mkdir()
    (root / "labels.txt").write_text("".join(f"{w},name of {w}, with comma\n" for w in WNIDS))
    for w in WNIDS:
        for n in (7, 12):
            _write(root / "train" / w / f"{w}_{n}.JPEG", value=int(w[2]))
    val = {1: "n03000000", 2: "n01000000", 3: "n02000000", 4: "n01000000"}
    for index, w in val.items():
        _write(root / "val" / w / f"ILSVRC2012_val_{index:08d}.JPEG")
    for index in (2, 1):
        _write(root / "test" / f"ILSVRC2012_test_{index:08d}.JPEG")
    return root


def test_imagenet_dump_and_reload(imagenet_root, tmp_path):
    extra = tmp_path / "extra"
    for split in ImageNet.Split:
        ImageNet(split=split, root=str(imagenet_root), extra=str(extra)).dump_extra()
    assert (extra / "entries-TRAIN.npy").is_file() and (extra / "class-names-VAL.npy").is_file()

    train = ImageNet(split="TRAIN", root=str(imagenet_root), extra=str(extra))
    assert len(train) == 6 and train.num_classes == 3
    assert train.get_targets().tolist() == [0, 0, 1, 1, 2, 2]
    assert train.get_image_path(1) == str(imagenet_root / "train" / "n01000000" / "n01000000_12.JPEG")
    assert train.get_class_id(4) == "n03000000"
    image, target = train[5]
    assert image.getpixel((0, 0))[0] in range(2, 5) and target == 2  # JPEG: value 3 within rounding
    entries = np.load(extra / "entries-TRAIN.npy")
    assert {"actual_index", "class_index", "class_id", "class_name"} <= set(entries.dtype.names)
    assert str(entries[0]["class_name"]) == "name of n01000000, with comma"
    assert np.load(extra / "class-ids-TRAIN.npy").tolist() == sorted(WNIDS)

    val = ImageNet(split=ImageNet.Split.VAL, root=str(imagenet_root), extra=str(extra))
    assert val.get_targets().tolist() == [2, 0, 1, 0]
    assert val.get_image_path(0).endswith("val/n03000000/ILSVRC2012_val_00000001.JPEG")

    test = ImageNet(split="test", root=str(imagenet_root), extra=str(extra))
    assert len(test) == 2 and test.num_classes == 0 and test.get_targets().tolist() == [-1, -1]
    assert test.get_image_path(0).endswith("test/ILSVRC2012_test_00000001.JPEG")
    assert test[1][1] == -1


def test_imagenet_missing_extra_mentions_command(imagenet_root, tmp_path):
    ds = ImageNet(split="TRAIN", root=str(imagenet_root), extra=str(tmp_path / "no-extra"))
    with pytest.raises(FileNotFoundError, match=r"python -m dinov2\.data\.datasets\.imagenet --root .* --extra"):
        len(ds)


def test_imagenet_errors(imagenet_root, tmp_path):
    with pytest.raises(ValueError, match="TRAIN, VAL, TEST"):
        ImageNet(split="holdout", root=str(imagenet_root), extra=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageNet(split="TRAIN", root=str(tmp_path / "nowhere"), extra=str(tmp_path))
    _write(imagenet_root / "train" / "n09999999" / "n09999999_1.JPEG")
    with pytest.raises(ValueError, match="not listed in"):
        ImageNet(split="TRAIN", root=str(imagenet_root), extra=str(tmp_path / "e")).dump_extra()
    _write(imagenet_root / "val" / "n01000000" / "photo.JPEG")
    with pytest.raises(ValueError, match="unexpected file.*photo.JPEG"):
        ImageNet(split="VAL", root=str(imagenet_root), extra=str(tmp_path / "e")).dump_extra()


def test_imagenet_module_entry_dumps_all_splits(imagenet_root, tmp_path):
    extra = tmp_path / "cli-extra"
    cmd = [sys.executable, "-m", "dinov2.data.datasets.imagenet", "--root", str(imagenet_root), "--extra", str(extra)]
    subprocess.run(cmd, check=True, capture_output=True)
    assert sorted(p.name for p in extra.glob("entries-*.npy")) == [f"entries-{s}.npy" for s in ("TEST", "TRAIN", "VAL")]


def test_imagenet22k_dump_and_reload(tmp_path):
    root = tmp_path / "in22k"
    for w, count in (("n0002", 2), ("n0001", 1), ("n0003", 3)):
        for n in range(count):
            _write(root / w / f"{w}_{n}.JPEG")
    extra = tmp_path / "extra22k"
    ds = ImageNet22k(root=str(root), extra=str(extra))
    with pytest.raises(FileNotFoundError, match="--22k"):
        len(ds)
    ds.dump_extra()
    reloaded = ImageNet22k(root=str(root), extra=str(extra))
    assert len(reloaded) == 6 and reloaded.num_classes == 3
    assert reloaded.get_targets().tolist() == [0, 1, 1, 2, 2, 2]
    assert reloaded.get_image_path(2) == str(root / "n0002" / "n0002_1.JPEG")
    assert reloaded.get_class_id(5) == "n0003" and reloaded[5][1] == 2


def test_imagenet_classes_and_class_to_idx_mean_what_torchvision_image_folder_means(imagenet_root, tmp_path):
    """``classes`` / ``class_to_idx`` as torchvision's ImageFolder over the same class folders (the wnids):
    ``classes[target]`` names the folder each image lies in; the unlabelled TEST split names none."""
    from torchvision.datasets import ImageFolder as TorchvisionImageFolder

    extra = tmp_path / "extra"
    for split in ImageNet.Split:
        ImageNet(split=split, root=str(imagenet_root), extra=str(extra)).dump_extra()
    reference = TorchvisionImageFolder(str(imagenet_root / "train"))
    for split in ("TRAIN", "VAL"):
        ds = ImageNet(split=split, root=str(imagenet_root), extra=str(extra))
        assert ds.classes == reference.classes == sorted(WNIDS) and ds.class_to_idx == reference.class_to_idx
        folders = [ds.get_image_path(i).split("/")[-2] for i in range(len(ds))]
        assert [ds.classes[t] for t in ds.get_targets()] == folders
    test = ImageNet(split="TEST", root=str(imagenet_root), extra=str(extra))
    assert test.classes == [] and test.class_to_idx == {}
    from dinov2.eval.features import class_names_of  # an empty ``classes`` names no class: nothing to align

    assert class_names_of(test) is None and class_names_of(ds) == sorted(WNIDS)

    root = tmp_path / "in22k"
    for w, count in (("n0002", 2), ("n0001", 1)):
        for n in range(count):
            _write(root / w / f"{w}_{n}.JPEG")
    ImageNet22k(root=str(root), extra=str(tmp_path / "e22k")).dump_extra()
    ds, reference = ImageNet22k(root=str(root), extra=str(tmp_path / "e22k")), TorchvisionImageFolder(str(root))
    assert ds.classes == reference.classes == ["n0001", "n0002"] and ds.class_to_idx == reference.class_to_idx
    assert ds.get_targets().tolist() == [t for _, t in reference.samples]


def test_imagenet22k_dump_names_wnid_folders_without_images(tmp_path, caplog):
    _write(tmp_path / "n0001" / "n0001_0.JPEG")
    (tmp_path / "n0002").mkdir()  # an interrupted extraction: its images would have been class 1
    _write(tmp_path / "n0003" / "n0003_0.JPEG")
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        ImageNet22k(root=str(tmp_path), extra=str(tmp_path / ".extra")).dump_extra()
    assert "ImageNet22k" in caplog.text and "not classes (n0002)" in caplog.text


# make_dataset -------------------------------------------------------------------------------------


def test_parse_dataset_str():
    assert parse_dataset_str("ImageNet:split=TRAIN:root=/a b") == ("ImageNet", {"split": "TRAIN", "root": "/a b"})
    with pytest.raises(ValueError, match="key=value"):
        parse_dataset_str("ImageFolder:root")
    with pytest.raises(ValueError, match="twice"):
        parse_dataset_str("ImageFolder:root=a:root=b")


def test_make_dataset_file_datasets(tmp_path, caplog):
    _write(tmp_path / "photos" / "c1" / "a.png")
    _write(tmp_path / "photos" / "c1" / "b.jpg")
    with caplog.at_level(logging.INFO, logger="dinov2"):
        ds = make_dataset(f"ImageFolder:root={tmp_path / 'photos'}", transform=lambda im: im.size)
    assert isinstance(ds, ImageFolder) and len(ds) == 2 and ds[0] == ((8, 6), 0)
    assert "ImageFolder with 2 samples" in caplog.text
    only_png = make_dataset(f"imagefolder:root={tmp_path / 'photos'}:extensions=.png,.bmp")
    assert only_png.get_image_path(0).endswith("a.png") and len(only_png) == 1
    (tmp_path / "list.txt").write_text("photos/c1/a.png 4\n")
    fl = make_dataset(f"FileList:path={tmp_path / 'list.txt'}", target_transform=str)
    assert isinstance(fl, FileList) and fl[0][1] == "4"


def test_make_dataset_imagenet(imagenet_root, tmp_path):
    extra = tmp_path / "extra"
    ImageNet(split="VAL", root=str(imagenet_root), extra=str(extra)).dump_extra()
    ds = make_dataset(f"ImageNet:split=VAL:root={imagenet_root}:extra={extra}")
    assert isinstance(ds, ImageNet) and ds.split is ImageNet.Split.VAL and len(ds) == 4
    ImageNet22k(root=str(imagenet_root / "train"), extra=str(extra)).dump_extra()
    ds22 = make_dataset(f"ImageNet22k:root={imagenet_root / 'train'}:extra={extra}")
    assert isinstance(ds22, ImageNet22k) and len(ds22) == 6


def test_make_dataset_synthetic_types():
    pytest.importorskip("dinov2.data.datasets.synthetic")
    ds = make_dataset("Synthetic:split=VAL:num_images=7:image_size=16:seed=3")
    assert type(ds).__name__ == "Synthetic" and len(ds) == 7
    image, target = ds[0]
    assert image.size == (16, 16) and isinstance(target, int)
    with pytest.raises(ValueError, match="'num_images'.*'seven'"):
        make_dataset("Synthetic:num_images=seven")
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        make_dataset("Synthetic:seed=-1")  # was NumPy's "expected non-negative integer", naming no key


def test_make_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="ImageNet, ImageNet22k, ImageFolder, FileList, Synthetic"):
        make_dataset("Imagenette:root=/x")
    with pytest.raises(ValueError, match=r"unknown key 'rot'.*valid keys: root, extensions"):
        make_dataset(f"ImageFolder:rot={tmp_path}")
    with pytest.raises(ValueError, match=r"missing required key\(s\) root, extra"):
        make_dataset("ImageNet:split=TRAIN")
    with pytest.raises(ValueError, match="TRAIN, VAL, TEST"):
        make_dataset(f"ImageNet:split=bogus:root={tmp_path}:extra={tmp_path}")
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        make_dataset(f"ImageFolder:root={tmp_path / 'missing-dir'}")
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty-dir"):
        make_dataset(f"ImageFolder:root={tmp_path / 'empty-dir'}")


def test_value_conversion_follows_annotations():
    from dinov2.data.datasets import _convert

    assert _convert("yes", bool) is True and _convert("False", bool) is False
    assert _convert("0.25", float) == 0.25 and _convert("12", int | None) == 12
    assert _convert("none", int | None) is None and _convert("val", ImageNet.Split | str) is ImageNet.Split.VAL
    assert _convert(".a, .b", tuple[str, ...]) == (".a", ".b")
    with pytest.raises(ValueError):
        _convert("maybe", bool)


# ----------------------------------------------------------------------------- found by a mutation audit
def test_imagenet_test_images_have_no_class_id(imagenet_root, tmp_path):
    ImageNet(split="TEST", root=str(imagenet_root), extra=str(tmp_path / "e")).dump_extra()
    test = ImageNet(split="TEST", root=str(imagenet_root), extra=str(tmp_path / "e"))
    assert [test.get_class_id(i) for i in range(len(test))] == [None, None]


def test_imagenet_labels_are_stripped_and_an_empty_wnid_is_refused(imagenet_root, tmp_path):
    from dinov2.data.datasets.imagenet import read_labels

    (imagenet_root / "labels.txt").write_text(" n02000000 ,  goldfish \nn01000000,tench\n\nn03000000,shark\n")
    ids, names = read_labels(imagenet_root)
    assert ids == sorted(WNIDS) and names == ["tench", "goldfish", "shark"]
    (imagenet_root / "labels.txt").write_text("n01000000,tench\n , nameless\n")
    with pytest.raises(ValueError, match=r"labels.txt:2: expected '<wnid>,<class name>'"):
        read_labels(imagenet_root)


def test_an_imagenet_image_named_for_another_class_than_its_folder_is_refused(imagenet_root, tmp_path):
    _write(imagenet_root / "train" / "n01000000" / "n02000000_3.JPEG")  # a goldfish file among the tench
    with pytest.raises(ValueError, match=r"unexpected file.*n01000000/n02000000_3\.JPEG"):
        ImageNet(split="TRAIN", root=str(imagenet_root), extra=str(tmp_path / "e")).dump_extra()


def test_imagenet_main_dumps_only_the_splits_that_are_there(imagenet_root, tmp_path):
    import shutil

    from dinov2.data.datasets.imagenet import main

    shutil.rmtree(imagenet_root / "val")
    shutil.rmtree(imagenet_root / "test")
    main(["--root", str(imagenet_root), "--extra", str(tmp_path / "e")])
    assert sorted(p.name for p in (tmp_path / "e").glob("entries-*.npy")) == ["entries-TRAIN.npy"]


def test_imagenet22k_lists_class_folders_only_and_a_second_dump_is_seen(tmp_path):
    root = tmp_path / "in22k"
    for w in ("n0001", "n0002"):
        _write(root / w / f"{w}_0.JPEG")
    _write(root / "stray.JPEG")  # no class folder: not an ImageNet-22k image
    ds = ImageNet22k(root=str(root), extra=str(tmp_path / "e"))
    ds.dump_extra()
    assert (len(ds), ds.classes) == (2, ["n0001", "n0002"])
    _write(root / "n0003" / "n0003_0.JPEG")
    ds.dump_extra()  # the same object reads the new metadata, not what it had loaded
    assert (len(ds), ds.classes) == (3, ["n0001", "n0002", "n0003"])
