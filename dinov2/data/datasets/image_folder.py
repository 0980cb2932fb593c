"""Datasets over your own images: a folder tree (`ImageFolder`) or a list file (`FileList`)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import (
    IMG_EXTENSIONS,
    FileImageDataset,
    decode_path,
    encode_paths,
    find_images,
    read_utf8_lines,
    warn_folders_without_images,
)

logger = logging.getLogger("dinov2")


def _check_dir(root: Path, what: str) -> None:
    if not root.exists():
        raise FileNotFoundError(f"{what} root does not exist: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"{what} root is not a directory: {root}")


class _PathListDataset(FileImageDataset):
    """Shared storage: encoded relative (or absolute) paths and an int64 target array."""

    def __init__(self, root, paths: Sequence[str], targets: np.ndarray, transform, target_transform) -> None:
        super().__init__(root, transform=transform, target_transform=target_transform)
        self._paths = encode_paths(paths)
        self._targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._paths)

    def get_image_path(self, index: int) -> str:
        return os.path.join(self.root, decode_path(self._paths[index]))

    def get_target(self, index: int) -> int:
        return int(self._targets[index])

    def get_targets(self) -> np.ndarray:
        return self._targets.copy()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, images={len(self)}, classes={self.num_classes})"


class ImageFolder(_PathListDataset):
    """All images under ``root`` (recursive, sorted by relative path).

    Labels: when ``root`` has first-level sub-folders that contain images, each such folder is a class
    (index = position of its name in sorted order) and every image below it, at any depth, gets that
    label. Images lying directly in ``root`` next to class folders get -1 (unlabeled) and a warning is
    logged. Without class folders the whole dataset is unlabeled (targets -1, ``num_classes`` 0).
    Hidden files and folders (name starting with ".") are ignored; extensions match case-insensitively.
    """

    def __init__(
        self,
        root: str,
        transform=None,
        target_transform=None,
        extensions: tuple[str, ...] = IMG_EXTENSIONS,
    ) -> None:
        root_path = Path(root).expanduser()
        _check_dir(root_path, "ImageFolder")
        paths = find_images(root_path, extensions)
        if not paths:
            raise FileNotFoundError(
                f"ImageFolder found no images under {root_path} (looked recursively for extensions "
                f"{extensions if isinstance(extensions, str) else ', '.join(extensions)}, case-insensitive)"
            )
        class_names = sorted({p.split("/", 1)[0] for p in paths if "/" in p})
        class_to_index = {name: i for i, name in enumerate(class_names)}
        targets = [class_to_index[p.split("/", 1)[0]] if "/" in p else -1 for p in paths]
        num_top_level = targets.count(-1)
        if class_names and num_top_level:
            logger.warning(
                "ImageFolder %s: %d images lie directly in the root next to %d class folders; "
                "they are kept with label -1 (unlabeled)",
                root_path,
                num_top_level,
                len(class_names),
            )
        if class_names:
            warn_folders_without_images(root_path, class_names, {p for p in paths if "/" not in p}, "ImageFolder")
        super().__init__(root_path, paths, np.array(targets), transform, target_transform)
        self.classes = class_names
        self.class_to_idx = class_to_index

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_INT = re.compile(r"[+-]?\d+")


def _parse_line(line: str, where: str) -> tuple[str, int | None]:
    """Split one list line into (path, label or None); see `FileList` for the format."""
    cut = max(line.rfind(","), line.rfind("\t"))
    if cut >= 0:
        path, label = line[:cut].strip(), line[cut + 1 :].strip()
        if not _INT.fullmatch(label):
            raise ValueError(f"{where}: label {label!r} is not an integer")
    else:
        parts = line.rsplit(None, 1)
        if len(parts) == 2 and _INT.fullmatch(parts[1]):
            path, label = parts[0].strip(), parts[1]
        else:
            return line, None
    if not path:
        raise ValueError(f"{where}: missing image path before the label")
    if int(label) < 0:
        raise ValueError(f"{where}: label {label} is negative; labels are class indices >= 0")
    return path, int(label)


def read_file_list(list_path: Path) -> tuple[list[str], list[int] | None]:
    """Parse a list file into paths and labels (None when the file has no labels)."""
    paths, labels = [], []
    for number, raw in enumerate(read_utf8_lines(list_path), start=1):  # a byte-order mark is not part of a path
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        path, label = _parse_line(line, f"{list_path}:{number}")
        paths.append(path)
        labels.append(label)
    if not paths:
        raise ValueError(f"FileList {list_path} lists no images (only blank lines or comments)")
    num_labeled = sum(label is not None for label in labels)
    if 0 < num_labeled < len(labels):
        first = next(i for i, label in enumerate(labels) if (label is None) != (labels[0] is None))
        raise ValueError(
            f"FileList {list_path}: {num_labeled} of {len(labels)} entries have a label; labels must be given "
            f"for all entries or none (first mismatch: entry {first + 1}, {paths[first]!r})"
        )
    return paths, (labels if num_labeled else None)


class FileList(_PathListDataset):
    """Images listed in a text file, one per line: ``<path>`` or ``<path> <label>``.

    The label is an integer class index after the last comma, tab or run of spaces; either every entry
    has one or none does. Blank lines and lines starting with '#' are ignored. A comma or tab always
    introduces a label; with a space separator a last word that is not an integer belongs to the path,
    so paths containing spaces work. Relative paths are resolved against ``root`` or, by default, the
    list file's directory. ``num_classes`` is ``max(label) + 1`` (0 without labels).
    """

    def __init__(self, path: str, root: str | None = None, transform=None, target_transform=None) -> None:
        list_path = Path(path).expanduser()
        if not list_path.is_file():
            raise FileNotFoundError(f"FileList: list file not found: {list_path}")
        base = Path(root).expanduser() if root is not None else list_path.parent
        paths, labels = read_file_list(list_path)
        targets = np.array(labels if labels is not None else [-1] * len(paths), dtype=np.int64)
        super().__init__(base, paths, targets, transform, target_transform)
        self.list_path = str(list_path)
        self._num_classes = int(targets.max()) + 1 if labels is not None else 0
        self._check_some_exist()

    def _check_some_exist(self, count: int = 5) -> None:
        """Fail early when the first entries all miss (wrong root); single missing files are skipped later."""
        checked = [self.get_image_path(i) for i in range(min(count, len(self)))]
        if not any(os.path.exists(p) for p in checked):
            raise FileNotFoundError(
                f"FileList {self.list_path}: none of the first {len(checked)} listed images exist, e.g. "
                f"{checked[0]} (relative paths resolve against {self.root}; pass root=... to change that)"
            )

    @property
    def num_classes(self) -> int:
        return self._num_classes
