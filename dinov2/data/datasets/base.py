"""Robust image decoding and the base class for file-backed image datasets.

Decoding (`load_image`) opens a file with PIL, applies the EXIF orientation and converts every
common mode to 8-bit RGB:

- ``RGB``: unchanged; ``L``, ``1``, ``CMYK``, ``YCbCr``: ``Image.convert("RGB")`` (no ICC colour management);
- anything with transparency (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a ``transparency`` entry):
  composited on a white background, so transparent regions come out white rather than black or as the
  arbitrary colours hidden under alpha 0;
- 16-bit and 32-bit integer grayscale (``I;16*``, ``I``): values are read on the 16-bit scale 0..65535 and
  mapped linearly to 0..255 (no per-image stretching, no clipping to white);
- ``F`` (float): values in [0, 1] are scaled by 255, otherwise clipped to [0, 255].

Any failure (missing, zero-byte, truncated or corrupt file, not an image) raises `ImageDecodeError`.
`FileImageDataset.__getitem__` catches it, logs a warning, records the path and returns the next index
instead (a distant one after a few failures in a row); too many failures raise a RuntimeError (see `FileImageDataset`). PIL's global
``ImageFile.LOAD_TRUNCATED_IMAGES`` is left untouched: truncated files count as bad.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

logger = logging.getLogger("dinov2")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".gif")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageDecodeError(Exception):
    """An image file could not be read or decoded."""


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _integer_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.int64)
    values = np.clip(values, 0, 65535)
    gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _float_to_rgb(image: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any common mode to 8-bit RGB (see the module docstring)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _integer_to_rgb(image)
    if mode == "F":
        return _float_to_rgb(image)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        return _composite_on_white(image)
    if mode == "RGB":
        return image
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode, EXIF-orient and convert one image file to RGB; raise `ImageDecodeError` on failure."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise ImageDecodeError("zero-byte file") from error
        raise ImageDecodeError(f"{type(error).__name__}: {error}") from error


def read_utf8_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file (a leading byte-order mark dropped; ``\\n``, ``\\r\\n`` and ``\\r`` end
    lines, as in text mode). A file in another encoding raises a ValueError naming the file and line."""
    data = Path(path).read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(f"{path}:1: the file is UTF-16 encoded (a Windows 'Unicode' text file); save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[error.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _directory_key(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the directory ``path`` resolves to (symlinks followed); None if unreadable."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _unvisited_subdirs(directory: str, subdirs: list[str], visited: set[tuple[int, int]]) -> list[str]:
    """The non-hidden ``subdirs`` of ``directory`` (sorted) whose real directory is not in ``visited``;
    marks them visited. A pruned one (a symlink cycle, or a second path to a listed folder) is logged."""
    kept = []
    for name in sorted(d for d in subdirs if not d.startswith(".")):
        path = os.path.join(directory, name)
        key = _directory_key(path)
        if key is None:
            continue
        if key in visited:
            logger.warning("find_images: skipping %s, its directory %s is already listed", path, os.path.realpath(path))
            continue
        visited.add(key)
        kept.append(name)
    return kept


def _unlistable(strict: bool):
    """``os.walk``'s error hook for a folder it cannot list (os.walk alone skips it silently): raise an
    OSError naming it with ``strict``, else log a warning."""

    def hook(error: OSError) -> None:
        if strict:
            message = f"find_images: cannot list folder {error.filename} ({error.strerror}); fix its permissions"
            raise OSError(error.errno, message) from error
        logger.warning(
            "find_images: cannot list folder %s (%s); its images are left out", error.filename, error.strerror
        )

    return hook


def find_images(root: str | os.PathLike, extensions: Iterable[str] = IMG_EXTENSIONS, strict: bool = False) -> list[str]:
    """Relative POSIX paths of all image files under root (recursive, sorted, hidden entries skipped).

    Extensions are matched case-insensitively (a string is read as a comma-separated list). Symlinked
    folders are followed, but every real directory (identified by device and inode) is listed once: a
    symlink to a folder already reached (an ancestor, which would loop, or a second path to the same
    folder) is skipped with a warning. Where two paths lead to one folder, the first claimed is kept:
    the walk goes depth-first in name order and claims all sub-folders of a folder when it lists that
    folder. A folder that cannot be listed (no permission) is skipped with a warning naming it, or, with
    ``strict`` (the ImageNet metadata dumps, which persist the listing), raises an OSError naming it.
    """
    if isinstance(extensions, str):  # ".jpg,.png" or ".jpg": iterating it would give single characters
        extensions = extensions.split(",")
    extensions = [ext.strip() for ext in extensions if ext.strip()]
    suffixes = tuple(ext.lower() if ext.startswith(".") else "." + ext.lower() for ext in extensions)
    root = os.fspath(root)
    root_key = _directory_key(root)
    visited = {root_key} if root_key is not None else set()
    found = []
    for directory, subdirs, files in os.walk(root, onerror=_unlistable(strict), followlinks=True):
        subdirs[:] = _unvisited_subdirs(directory, subdirs, visited)
        rel_dir = os.path.relpath(directory, root)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(suffixes):
                found.append(Path(rel_dir, name).as_posix() if rel_dir != "." else name)
    return sorted(found)


def warn_folders_without_images(root: Path, class_names: list[str], loose_images: set[str], what: str) -> None:
    """Name the first-level (non-hidden) folders that are not classes because no image was listed in them:
    an empty or unreadable folder, one with files of other kinds only, a link to a folder that is gone.
    Classes are numbered without them, so the folders after them get other indices than they would."""
    classes = set(class_names)
    try:
        with os.scandir(root) as listing:
            names = sorted(
                e.name
                for e in listing
                if not e.name.startswith(".")
                and e.name not in classes
                and e.name not in loose_images
                and (e.is_dir() or (e.is_symlink() and not os.path.exists(e.path)))
            )
    except OSError:  # only a warning: a root that cannot be listed again has already been reported
        return
    if names:
        logger.warning(
            "%s %s: %d first-level folders hold no listed images and are not classes (%s); the %d "
            "classes are numbered without them",
            what,
            root,
            len(names),
            ", ".join(names[:10]) + (", ..." if len(names) > 10 else ""),
            len(class_names),
        )


def encode_paths(paths: Sequence[str]) -> np.ndarray:
    """Paths as a compact fixed-width bytes array (no per-item Python objects to copy into workers)."""
    return np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)


def decode_path(encoded: bytes) -> str:
    return os.fsdecode(bytes(encoded))


GOLDEN = 0.6180339887498949


def substitute_order(index: int, length: int, neighbours: int = 3):
    """The indexes tried for ``index`` of a dataset of ``length``: ``index`` itself, then its next
    ``neighbours`` (cyclically), then every other index once, in strides of about 0.62 * length.

    Deterministic, and a permutation of ``range(length)``: the stride is coprime with ``length``.
    The jump keeps a contiguous block of unreadable files (a broken class folder) from being walked
    file by file, which would count as a long run of failures and stop training.
    """
    near = min(neighbours + 1, length)
    for offset in range(near):
        yield (index + offset) % length
    stride = max(1, round(length * GOLDEN))
    while math.gcd(stride, length) != 1:
        stride += 1
    for k in range(1, length + 1):  # k * stride mod length: every residue once
        candidate = (index + near - 1 + k * stride) % length
        if (candidate - index) % length >= near:
            yield candidate


class FileImageDataset(Dataset):
    """Base class for datasets of image files: returns ``(transform(image), target_transform(target))``.

    Subclasses implement ``__len__``, ``get_image_path(index)``, ``get_target(index)``, ``get_targets()``
    and ``num_classes``; targets are class indices, -1 when unlabeled.

    A file that fails to decode is skipped: a warning is logged, the failure is recorded (``num_skipped``,
    ``bad_paths``, ``skipped_report()``) and the next index (cyclically) is tried, then, after
    ``neighbours_tried`` neighbours, distant ones (:func:`substitute_order`). A RuntimeError naming
    the root and example paths stops the run when ``max_consecutive_failures`` decodes fail in a row, or
    when more than ``max_failure_fraction`` of all decode attempts failed after at least
    ``min_attempts_for_fraction`` attempts. Counters are per process: each DataLoader worker holds its
    own copy of the dataset, so a report describes what this process saw.
    """

    max_consecutive_failures: int = 50
    neighbours_tried: int = 3
    max_failure_fraction: float = 0.5
    min_attempts_for_fraction: int = 20

    def __init__(self, root: str | os.PathLike, transform=None, target_transform=None) -> None:
        self.root = str(root)
        self.transform = transform
        self.target_transform = target_transform
        self.num_attempts = 0
        self.num_skipped = 0
        self._consecutive_failures = 0
        self._bad: dict[str, str] = {}

    # Interface for subclasses -------------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def get_image_path(self, index: int) -> str:
        raise NotImplementedError

    def get_target(self, index: int) -> int:
        raise NotImplementedError

    def get_targets(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    # Loading ------------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> tuple[Any, Any]:
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {length}")
        index %= length
        for current in substitute_order(index, length, self.neighbours_tried):
            path = self.get_image_path(current)
            self.num_attempts += 1
            try:
                image = load_image(path)
            except ImageDecodeError as error:
                self._record_failure(path, str(error))
                continue
            self._consecutive_failures = 0
            target = self.get_target(current)
            if self.transform is not None:
                image = self.transform(image)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return image, target
        raise RuntimeError(f"{self._describe()}: none of its {length} images could be decoded{self._examples()}")

    def _record_failure(self, path: str, reason: str) -> None:
        self.num_skipped += 1
        self._consecutive_failures += 1
        self._bad.setdefault(path, reason)
        logger.warning("Skipping unreadable image %s (%s) in %s", path, reason, self._describe())
        if self._consecutive_failures >= self.max_consecutive_failures:
            raise RuntimeError(
                f"{self._describe()}: {self._consecutive_failures} images in a row failed to decode; "
                f"stopping instead of skipping further{self._examples()}"
            )
        fraction = self.num_skipped / self.num_attempts
        if self.num_attempts >= self.min_attempts_for_fraction and fraction > self.max_failure_fraction:
            raise RuntimeError(
                f"{self._describe()}: {self.num_skipped} of {self.num_attempts} decode attempts failed "
                f"({fraction:.0%} > {self.max_failure_fraction:.0%}); check the dataset{self._examples()}"
            )

    def _describe(self) -> str:
        return f"{type(self).__name__} at {self.root}"

    def _examples(self, limit: int = 5) -> str:
        items = list(self._bad.items())[:limit]
        if not items:
            return ""
        return ". Failing files, e.g.: " + "; ".join(f"{path} ({reason})" for path, reason in items)

    @property
    def bad_paths(self) -> list[str]:
        """Distinct paths that failed to decode in this process, in first-seen order."""
        return list(self._bad)

    def skipped_report(self) -> dict[str, Any]:
        """What this process saw: attempts, skips and the failing paths with their first error."""
        return {
            "dataset": type(self).__name__,
            "root": self.root,
            "pid": os.getpid(),
            "num_attempts": self.num_attempts,
            "num_skipped": self.num_skipped,
            "bad_paths": dict(self._bad),
        }
