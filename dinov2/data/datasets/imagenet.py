"""ImageNet-1k (official folder layout) and ImageNet-22k (one folder per wnid), with prebuilt metadata.

Scanning a million files at every start is slow, so both datasets read metadata files from an
``extra`` directory, built once with ``dump_extra()`` or ``python -m dinov2.data.datasets.imagenet``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from enum import Enum
from pathlib import Path

import numpy as np

from .base import FileImageDataset, decode_path, find_images, read_utf8_lines, warn_folders_without_images

logger = logging.getLogger("dinov2")

_DUMP_COMMAND = "python -m dinov2.data.datasets.imagenet --root {root} --extra {extra}"


class _Split(Enum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"

    @property
    def dirname(self) -> str:
        return self.value


_FILE_PATTERNS = {
    _Split.TRAIN: (re.compile(r"(?P<wnid>n\d+)_(?P<index>\d+)\.JPEG"), "{wnid}/{wnid}_{index}.JPEG"),
    _Split.VAL: (re.compile(r"ILSVRC2012_val_(?P<index>\d{8})\.JPEG"), "{wnid}/ILSVRC2012_val_{index:08d}.JPEG"),
    _Split.TEST: (re.compile(r"ILSVRC2012_test_(?P<index>\d{8})\.JPEG"), "ILSVRC2012_test_{index:08d}.JPEG"),
}


def read_labels(root: Path) -> tuple[list[str], list[str]]:
    """Class ids (wnids, sorted) and names from ``root/labels.txt`` (lines ``<wnid>,<class name>``)."""
    labels_path = root / "labels.txt"
    if not labels_path.is_file():
        raise FileNotFoundError(f"ImageNet labels file not found: {labels_path} (lines '<wnid>,<class name>')")
    pairs = {}
    for number, raw in enumerate(read_utf8_lines(labels_path), start=1):
        line = raw.strip()
        if not line:
            continue
        wnid, sep, name = line.partition(",")
        if not sep or not wnid.strip():
            raise ValueError(f"{labels_path}:{number}: expected '<wnid>,<class name>', got {line!r}")
        pairs[wnid.strip()] = name.strip()
    class_ids = sorted(pairs)
    return class_ids, [pairs[c] for c in class_ids]


def _save_all(arrays: dict[str, np.ndarray]) -> None:
    """Write each ``path -> array`` as .npy, atomically: every array first goes to a temporary file
    next to its target, and the targets are replaced only once all of them are written, so an
    interrupted dump never leaves a truncated file (or new entries next to old class ids)."""
    staged = []
    try:
        for path, array in arrays.items():
            temporary = f"{path}.tmp-{os.getpid()}"
            staged.append((temporary, path))
            with open(temporary, "wb") as handle:
                np.save(handle, array)
                handle.flush()
                os.fsync(handle.fileno())
        for temporary, path in staged:
            os.replace(temporary, path)
    finally:
        for temporary, _ in staged:
            if os.path.exists(temporary):
                os.remove(temporary)


def _entries_dtype(class_ids: list[str], class_names: list[str]) -> np.dtype:
    id_len = max([len(c) for c in class_ids] + [1])
    name_len = max([len(n) for n in class_names] + [1])
    return np.dtype(
        [("actual_index", "<u4"), ("class_index", "<i4"), ("class_id", f"U{id_len}"), ("class_name", f"U{name_len}")]
    )


def _parse_split(split: _Split | str) -> _Split:
    if isinstance(split, _Split):
        return split
    try:
        return _Split[str(split).upper()]
    except KeyError:
        raise ValueError(f"unknown ImageNet split {split!r}; valid: {', '.join(s.name for s in _Split)}") from None


class ImageNet(FileImageDataset):
    """ImageNet-1k in the official layout; labels are positions of wnids in sorted ``labels.txt`` order.

    Layout: ``root/train/<wnid>/<wnid>_<n>.JPEG``, ``root/val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG``,
    ``root/test/ILSVRC2012_test_<8 digits>.JPEG`` (unlabeled) and ``root/labels.txt``. ``extra`` holds
    ``entries-{SPLIT}.npy`` (fields actual_index, class_index, class_id, class_name),
    ``class-ids-{SPLIT}.npy`` and ``class-names-{SPLIT}.npy``, read lazily (memory-mapped) on first use.
    """

    Split = _Split

    def __init__(self, split: _Split | str, root: str, extra: str, transform=None, target_transform=None) -> None:
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise FileNotFoundError(f"ImageNet root does not exist or is not a directory: {root_path}")
        super().__init__(root_path, transform=transform, target_transform=target_transform)
        self.split = _parse_split(split)
        self.extra = str(Path(extra).expanduser())
        self._cache: dict[str, np.ndarray] = {}

    def _extra_path(self, kind: str) -> str:
        return os.path.join(self.extra, f"{kind}-{self.split.name}.npy")

    def _load_extra(self, kind: str) -> np.ndarray:
        if kind not in self._cache:
            path = self._extra_path(kind)
            if not os.path.isfile(path):
                command = _DUMP_COMMAND.format(root=self.root, extra=self.extra)
                raise FileNotFoundError(f"ImageNet metadata file missing: {path}. Build it once with: {command}")
            self._cache[kind] = np.load(path, mmap_mode="r" if kind == "entries" else None)
        return self._cache[kind]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = {}  # workers re-open the memory maps instead of receiving copies
        return state

    @property
    def _entries(self) -> np.ndarray:
        return self._load_extra("entries")

    def __len__(self) -> int:
        return len(self._entries)

    def get_image_path(self, index: int) -> str:
        entry = self._entries[index]
        pattern = _FILE_PATTERNS[self.split][1]
        relative = pattern.format(wnid=str(entry["class_id"]), index=int(entry["actual_index"]))
        return os.path.join(self.root, self.split.dirname, relative)

    def get_target(self, index: int) -> int:
        return -1 if self.split is _Split.TEST else int(self._entries[index]["class_index"])

    def get_targets(self) -> np.ndarray:
        if self.split is _Split.TEST:
            return np.full(len(self), -1, dtype=np.int64)
        return np.asarray(self._entries["class_index"], dtype=np.int64)

    def get_class_id(self, index: int) -> str | None:
        return None if self.split is _Split.TEST else str(self._entries[index]["class_id"])

    @property
    def num_classes(self) -> int:
        return 0 if self.split is _Split.TEST else len(self._load_extra("class-ids"))

    @property
    def classes(self) -> list[str]:
        """The class ids (wnids) in class-index order, as ``torchvision``'s ``ImageFolder.classes`` (its
        class folder names, here the wnid folders); empty for the unlabelled TEST split."""
        return [] if self.split is _Split.TEST else [str(c) for c in self._load_extra("class-ids")]

    @property
    def class_to_idx(self) -> dict[str, int]:
        """``{wnid: class index}``, as ``torchvision``'s ``ImageFolder.class_to_idx``."""
        return {name: i for i, name in enumerate(self.classes)}

    def _scan(self, class_ids: list[str]) -> list[tuple[int, int, str]]:
        """(actual_index, class_index, wnid) for every file of the split, checked against the layout."""
        split_dir = Path(self.root, self.split.dirname)
        if not split_dir.is_dir():
            raise FileNotFoundError(f"ImageNet {self.split.name} directory not found: {split_dir}")
        regex, pattern = _FILE_PATTERNS[self.split]
        class_to_index = {c: i for i, c in enumerate(class_ids)}
        rows = []
        for relative in find_images(split_dir, (".JPEG",), strict=True):
            wnid = relative.split("/", 1)[0] if "/" in relative else ""
            match = regex.fullmatch(relative.rsplit("/", 1)[-1])
            if match is None or pattern.format(wnid=wnid, index=int(match["index"])) != relative:
                raise ValueError(
                    f"unexpected file in the ImageNet {self.split.name} layout: {split_dir / relative} "
                    f"(expected {self.split.dirname}/{pattern})"
                )
            if self.split is not _Split.TEST and wnid not in class_to_index:
                raise ValueError(f"class folder {split_dir / wnid} is not listed in {Path(self.root, 'labels.txt')}")
            rows.append((int(match["index"]), class_to_index.get(wnid, -1), wnid))
        if not rows:
            raise FileNotFoundError(f"no ImageNet images (*.JPEG) found under {split_dir}")
        return sorted(rows, key=lambda row: (row[1], row[0]) if self.split is _Split.TRAIN else row[0])

    def dump_extra(self) -> None:
        """Scan ``root/<split>`` and write this split's metadata files into ``extra``."""
        class_ids, class_names = read_labels(Path(self.root))
        rows = self._scan(class_ids)
        entries = np.empty(len(rows), dtype=_entries_dtype(class_ids, class_names))
        for i, (actual_index, class_index, wnid) in enumerate(rows):
            name = class_names[class_index] if class_index >= 0 else ""
            entries[i] = (actual_index, class_index, wnid, name)
        os.makedirs(self.extra, exist_ok=True)
        _save_all(
            {
                self._extra_path("entries"): entries,
                self._extra_path("class-ids"): np.array(class_ids),
                self._extra_path("class-names"): np.array(class_names),
            }
        )
        self._cache = {}
        logger.info("ImageNet %s: wrote metadata for %d images to %s", self.split.name, len(rows), self.extra)


class ImageNet22k(FileImageDataset):
    """ImageNet-22k as a folder tree ``root/<wnid>/<images>`` (tar shards are not supported).

    Labels are positions of the wnid folders in sorted order. ``extra`` holds ``22k-entries.npy``
    (fields class_index and path, relative to root) and ``22k-class-ids.npy``, built by ``dump_extra()``.
    """

    def __init__(self, root: str, extra: str, transform=None, target_transform=None) -> None:
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise FileNotFoundError(f"ImageNet22k root does not exist or is not a directory: {root_path}")
        super().__init__(root_path, transform=transform, target_transform=target_transform)
        self.extra = str(Path(extra).expanduser())
        self._cache: dict[str, np.ndarray] = {}

    def _extra_path(self, kind: str) -> str:
        return os.path.join(self.extra, f"22k-{kind}.npy")

    def _load_extra(self, kind: str) -> np.ndarray:
        if kind not in self._cache:
            path = self._extra_path(kind)
            if not os.path.isfile(path):
                command = _DUMP_COMMAND.format(root=self.root, extra=self.extra) + " --22k"
                raise FileNotFoundError(f"ImageNet22k metadata file missing: {path}. Build it once with: {command}")
            self._cache[kind] = np.load(path, mmap_mode="r" if kind == "entries" else None)
        return self._cache[kind]

    __getstate__ = ImageNet.__getstate__

    def __len__(self) -> int:
        return len(self._load_extra("entries"))

    def get_image_path(self, index: int) -> str:
        return os.path.join(self.root, decode_path(self._load_extra("entries")[index]["path"]))

    def get_target(self, index: int) -> int:
        return int(self._load_extra("entries")[index]["class_index"])

    def get_targets(self) -> np.ndarray:
        return np.asarray(self._load_extra("entries")["class_index"], dtype=np.int64)

    def get_class_id(self, index: int) -> str:
        return str(self._load_extra("class-ids")[self.get_target(index)])

    @property
    def num_classes(self) -> int:
        return len(self._load_extra("class-ids"))

    @property
    def classes(self) -> list[str]:
        """The class ids (wnid folder names) in class-index order, as ``torchvision``'s ``ImageFolder.classes``."""
        return [str(c) for c in self._load_extra("class-ids")]

    class_to_idx = ImageNet.class_to_idx

    def dump_extra(self) -> None:
        """Scan ``root/<wnid>/`` folders and write the metadata files into ``extra``."""
        relatives = [p for p in find_images(self.root, strict=True) if "/" in p]
        if not relatives:
            raise FileNotFoundError(f"no images in class folders under {self.root}")
        class_ids = sorted({p.split("/", 1)[0] for p in relatives})
        warn_folders_without_images(Path(self.root), class_ids, set(), "ImageNet22k")
        class_to_index = {c: i for i, c in enumerate(class_ids)}
        encoded = [os.fsencode(p) for p in relatives]
        dtype = np.dtype([("class_index", "<i4"), ("path", f"S{max(len(e) for e in encoded)}")])
        entries = np.array([(class_to_index[p.split("/", 1)[0]], e) for p, e in zip(relatives, encoded)], dtype=dtype)
        os.makedirs(self.extra, exist_ok=True)
        _save_all({self._extra_path("entries"): entries, self._extra_path("class-ids"): np.array(class_ids)})
        self._cache = {}
        logger.info(
            "ImageNet22k: wrote metadata for %d images in %d classes to %s", len(entries), len(class_ids), self.extra
        )


def main(argv: list[str] | None = None) -> None:
    """Dump the metadata of every ImageNet split present under --root (or of ImageNet-22k with --22k)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--root", required=True, help="dataset root (holds train/ val/ test/ labels.txt)")
    parser.add_argument("--extra", required=True, help="directory to write the metadata files into")
    parser.add_argument("--22k", dest="is_22k", action="store_true", help="root is an ImageNet-22k folder tree")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.is_22k:
        ImageNet22k(root=args.root, extra=args.extra).dump_extra()
        return
    if not Path(args.root).is_dir():
        raise SystemExit(f"ImageNet root does not exist or is not a directory: {args.root}")
    splits = [s for s in _Split if Path(args.root, s.dirname).is_dir()]
    if not splits:
        raise SystemExit(f"no train/, val/ or test/ directory under {args.root}")
    for split in splits:
        ImageNet(split=split, root=args.root, extra=args.extra).dump_extra()


if __name__ == "__main__":
    main()
