"""Robust decoding: bad files are skipped, counted and reported; unusual modes come out as correct RGB."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from dinov2.data.datasets import FileList, ImageDecodeError, ImageFolder, load_image


def _jpeg_bytes(size=(16, 16), color=(0, 128, 255)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


BAD_FILES = {
    "truncated.jpg": lambda: _jpeg_bytes()[:200],
    "corrupt.jpg": lambda: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
    "empty.jpg": lambda: b"",
    "text.jpg": lambda: b"this is a text file, not a JPEG\n",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_load_image_raises_decode_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name]())
    with pytest.raises(ImageDecodeError):
        load_image(path)


def test_bad_files_are_skipped_counted_and_reported(tmp_path, caplog):
    # sorted order: 0_good, 1_truncated, 2_good, 3_corrupt, 4_good, 5_empty, 6_good, 7_text, 8_good
    bad = iter(sorted(BAD_FILES))
    for i in range(9):
        if i % 2 == 0:
            Image.new("RGB", (5, 4), (i, 0, 0)).save(tmp_path / f"{i}_good.png")
        else:
            name = next(bad)
            (tmp_path / f"{i}_{name}").write_bytes(BAD_FILES[name]())
    ds = ImageFolder(str(tmp_path))
    assert len(ds) == 9
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        values = [ds[i][0].getpixel((0, 0))[0] for i in range(len(ds))]
    assert values == [0, 2, 2, 4, 4, 6, 6, 8, 8]  # a bad index yields the next (good) sample
    assert ds.num_skipped == 4 and ds.num_attempts == 13
    bad_names = [p.rsplit("/", 1)[-1] for p in ds.bad_paths]
    assert bad_names == ["1_corrupt.jpg", "3_empty.jpg", "5_text.jpg", "7_truncated.jpg"]
    report = ds.skipped_report()
    assert report["num_skipped"] == 4 and report["root"] == str(tmp_path)
    assert "zero-byte" in report["bad_paths"][str(tmp_path / "3_empty.jpg")]
    assert caplog.text.count("Skipping unreadable image") == 4 and "7_truncated.jpg" in caplog.text


def test_bad_last_index_wraps_around(tmp_path):
    Image.new("RGB", (3, 3), (9, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"")
    ds = ImageFolder(str(tmp_path))
    assert ds[1][0].getpixel((0, 0)) == (9, 0, 0) and ds.num_skipped == 1
    with pytest.raises(IndexError):
        ds[2]


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_cmyk_jpeg(tmp_path):
    path = _save(Image.new("CMYK", (7, 5), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", format="JPEG", quality=100)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (7, 5)
    red, green, blue = image.getpixel((3, 2))
    assert red > 200 and green < 50 and blue < 50


def test_rgba_png_composited_on_white(tmp_path):
    array = np.zeros((4, 6, 4), dtype=np.uint8)
    array[:, :3] = (255, 0, 0, 255)  # opaque red on the left
    array[:, 3:] = (0, 0, 0, 0)  # fully transparent black on the right
    path = _save(Image.fromarray(array, mode="RGBA"), tmp_path / "rgba.png")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (6, 4)
    assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((5, 3)) == (255, 255, 255)


def test_palette_png_with_transparency(tmp_path):
    palette = Image.new("P", (4, 2))
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 1)  # blue; everything else index 0, which is transparent
    path = _save(palette, tmp_path / "p.png", transparency=0)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (4, 2)
    assert image.getpixel((0, 0)) == (0, 0, 255) and image.getpixel((3, 1)) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (3, 1))
    path = _save(Image.fromarray(ramp), tmp_path / "ramp16.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (32, 3)
    row = np.asarray(image)[1, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) > 0)  # strictly increasing ramp, not saturated
    np.testing.assert_allclose(row, np.linspace(0, 255, 32), atol=1)
    assert np.all(np.asarray(image)[..., 0] == np.asarray(image)[..., 2])


def test_mode_i_uses_sixteen_bit_scale(tmp_path):
    image = load_image(
        _save(Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), mode="I"), tmp_path / "i.tif")
    )
    assert np.asarray(image)[0, :, 1].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode", ["L", "1"])
def test_gray_and_bilevel_to_rgb(tmp_path, mode):
    source = Image.new(mode, (9, 4), 0)
    source.putpixel((8, 3), 255 if mode == "L" else 1)
    image = load_image(_save(source, tmp_path / f"{mode}.png"))
    assert image.mode == "RGB" and image.size == (9, 4)
    assert image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((8, 3)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = _save(Image.new("RGB", (10, 4)), tmp_path / "rotated.jpg", format="JPEG", exif=exif)
    assert load_image(path).size == (4, 10)


@pytest.mark.parametrize(("orientation", "turns"), [(6, -1), (8, 1), (3, 2)])  # np.rot90 turns counter-clockwise
def test_exif_orientation_decides_what_the_crops_see(tmp_path, orientation, turns):
    # Decision (docs/data.md): crops are taken from the image as it is displayed, upright; torchvision's
    # plain loader ignores the tag. Both augmentation paths read the image load_image returns.
    from dinov2.data.gpu_augmentation import MultiCropParams

    stored = np.zeros((4, 10, 3), dtype=np.uint8)
    stored[:, 0] = (255, 0, 0)  # the left column of the stored pixels is red
    stored[0, :] = (0, 0, 255)  # the top row blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    (tmp_path / "c").mkdir()
    _save(Image.fromarray(stored), tmp_path / "c" / "photo.png", exif=exif)
    dataset = ImageFolder(str(tmp_path), transform=MultiCropParams((0.3, 1.0), (0.1, 0.3), 0, 8, 4))
    upright = np.rot90(stored, turns)
    assert np.array_equal(np.asarray(load_image(dataset.get_image_path(0))), upright)
    assert np.array_equal(dataset[0][0]["image"].permute(1, 2, 0).numpy(), upright)


def test_mostly_bad_dataset_stops_with_clear_error(tmp_path):
    lines = []
    for i in range(40):
        name = f"img{i:02d}.jpg"
        if i % 4 == 0:
            Image.new("RGB", (2, 2)).save(tmp_path / name, format="JPEG")
        else:
            (tmp_path / name).write_bytes(b"garbage")
        lines.append(name)
    (tmp_path / "list.txt").write_text("\n".join(lines))
    ds = FileList(str(tmp_path / "list.txt"))
    with pytest.raises(RuntimeError) as info:
        for i in range(len(ds)):
            ds[i]
    message = str(info.value)
    assert "FileList at " + str(tmp_path) in message and "decode attempts failed" in message
    assert "img01.jpg" in message
    assert ds.num_attempts < 40 and ds.num_skipped > ds.num_attempts / 2


def test_consecutive_failures_stop(tmp_path):
    for i in range(6):
        (tmp_path / f"bad{i}.png").write_bytes(b"nope")
    Image.new("RGB", (2, 2)).save(tmp_path / "z_good.png")
    ds = ImageFolder(str(tmp_path))
    ds.max_consecutive_failures = 3
    with pytest.raises(RuntimeError, match=r"3 images in a row failed.*bad0\.png"):
        ds[0]


def test_all_bad_small_dataset_does_not_spin(tmp_path):
    for i in range(3):
        (tmp_path / f"bad{i}.png").write_bytes(b"")
    ds = ImageFolder(str(tmp_path))
    with pytest.raises(RuntimeError, match="none of its 3 images could be decoded"):
        ds[1]
    assert ds.num_attempts == 3


@pytest.mark.parametrize("length", [1, 2, 3, 5, 10, 97, 100, 1024])
def test_substitute_order_tries_neighbours_then_every_index_once(length):
    from dinov2.data.datasets.base import substitute_order

    for index in {0, length // 2, length - 1}:
        order = list(substitute_order(index, length, neighbours=3))
        assert sorted(order) == list(range(length))  # each index exactly once
        near = min(4, length)
        assert order[:near] == [(index + k) % length for k in range(near)]
        if length >= 100:  # the first jump leaves the neighbourhood by far
            assert min(abs(order[near] - index), length - abs(order[near] - index)) > length // 4


def test_a_broken_class_folder_is_skipped_not_fatal(tmp_path):
    """A block of 60 unreadable files in a row (one broken class folder among 400 images), read in
    a shuffled order as training does: every sample comes back, each substitute a readable image,
    and the skips are counted. Walking the block file by file would stop at 50 failures in a row."""
    lines = []
    for i in range(400):
        name = f"img{i:03d}.png"
        if 150 <= i < 210:
            (tmp_path / name).write_bytes(b"broken")
        else:
            Image.new("RGB", (2, 2), (i % 256, 0, 0)).save(tmp_path / name)
        lines.append(name)
    (tmp_path / "list.txt").write_text("\n".join(lines))
    ds = FileList(str(tmp_path / "list.txt"))
    order = np.random.default_rng(0).permutation(len(ds))
    values = [ds[int(i)][0].getpixel((0, 0))[0] for i in order]
    assert len(values) == 400
    readable = {i % 256 for i in range(400) if not 150 <= i < 210}
    assert set(values) <= readable
    assert ds.num_skipped >= 60 and set(ds.bad_paths) == {str(tmp_path / f"img{i:03d}.png") for i in range(150, 210)}
    assert ds.num_skipped <= 4 * 60 + 10  # a few failures per broken sample, not a walk through the block


def test_decompression_bombs_are_skipped_and_counted_and_warned_ones_load(tmp_path, monkeypatch):
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS (DecompressionBombError) and only warns above 1 x.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (5, 5), (1, 0, 0)).save(tmp_path / "a_small.png")
    Image.new("RGB", (15, 15), (2, 0, 0)).save(tmp_path / "b_bomb.png")  # 225 > 200 pixels
    Image.new("RGB", (12, 12), (3, 0, 0)).save(tmp_path / "c_large.png")  # 144: a warning, still loaded
    dataset = ImageFolder(str(tmp_path))
    with pytest.warns(Image.DecompressionBombWarning):
        reds = [dataset[i][0].getpixel((0, 0))[0] for i in range(3)]
    assert reds == [1, 3, 3] and dataset.num_skipped == 1
    assert "DecompressionBombError" in dataset.skipped_report()["bad_paths"][str(tmp_path / "b_bomb.png")]
