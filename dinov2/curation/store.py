"""Embedding stores: L2-normalised vectors in chunks on disk, each chunk with the paths of its rows.

A store is a directory::

    manifest.json            source, number of images, chunk size, storage dtype, embedder
                             (the dim is read from the chunks; a ``dim`` another tool records is not compared)
    sources.txt              every input image path, one per line (the order that chunks follow)
    chunk_00000.npy          (rows, dim) embeddings of the images of chunk 0 that could be read
    chunk_00000.paths.txt    the path of each row, one per line
    chunk_00000.failed.json  {path: reason} for the images of chunk 0 that could not be read
    ...
    source_stamp.json        optional: sizes and times of the source's list files and folders
                             (:func:`dinov2.curation.embed.source_stamp`), for the pipeline's rerun check

Chunk ``c`` covers ``sources.txt`` lines ``[c * chunk_size, (c + 1) * chunk_size)``. Its files are
written to temporary names and renamed, the ``.npy`` last, so a chunk exists exactly when its
``.npy`` does and an interrupted run redoes only the chunks it had not finished. A vector's *id*
is its row in the concatenation of all chunks in order (unreadable images have no id).

Any tool can write a store (for instance copy-detection embeddings made elsewhere): every stage
reads it through :class:`EmbeddingStore`, which checks that each chunk's rows and paths match.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from dinov2.checkpoint.training import atomic_write
from dinov2.eval.metrics import write_json_atomic

MANIFEST = "manifest.json"
SOURCES = "sources.txt"
STAMP = "source_stamp.json"  # optional: what the pipeline checks to see that the source is unchanged
STORE_VERSION = 1


class StoreError(ValueError):
    """An embedding store that is incomplete, inconsistent, or made from other inputs."""


def chunk_name(index: int) -> str:
    return f"chunk_{index:05d}"


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _read_manifest(path: Path) -> dict[str, Any]:
    """``manifest.json`` as a dict; one that is not a JSON object (cut short, edited by hand) is a
    :class:`StoreError` naming the file."""
    try:
        manifest = read_json(path)
    except (ValueError, UnicodeDecodeError) as error:  # json.JSONDecodeError is a ValueError
        raise StoreError(f"{path} is not valid JSON ({error}): remove the store to embed it again") from error
    if not isinstance(manifest, dict):
        raise StoreError(
            f"{path} holds a JSON {type(manifest).__name__}, not an object: remove the store to embed it again"
        )
    return manifest


def _read_lines(path: Path) -> list[str]:
    """The lines of a file written one path per line. Only ``"\\n"`` ends a line: a path may hold other
    characters that ``str.splitlines`` would also split at (form feed, U+0085, U+2028)."""
    with open(path, encoding="utf-8", newline="\n") as handle:
        lines = handle.read().split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def _lists(path: Path, lines: Sequence[str]) -> bool:
    """Whether the file holds exactly ``lines``, read one line at a time (not a second copy of them)."""
    count = 0
    with open(path, encoding="utf-8", newline="\n") as handle:
        for count, line in enumerate(handle, start=1):
            if count > len(lines) or (line[:-1] if line.endswith("\n") else line) != lines[count - 1]:
                return False
    return count == len(lines)


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")  # a name in another encoding is listed with lone surrogates, which do not encode
    except UnicodeEncodeError:
        return False
    return True


def _check_paths(paths: Sequence[str]) -> None:
    bad = next((p for p in paths if "\n" in p or "\r" in p or not (p.isascii() or _is_utf8(p))), None)
    if bad is not None and not _is_utf8(bad):
        raise StoreError(f"image path {bad!r} is not valid UTF-8 (a file name in another encoding); stores and "
                         "the curated FileList keep UTF-8 paths: rename it, or list the source without it")  # fmt: skip
    if bad is not None:
        raise StoreError(f"image path {bad!r} contains a line break; stores keep one path per line")


class EmbeddingStore:
    """Read (and, through :meth:`create` and :meth:`write_chunk`, write) one store directory."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        if not (self.dir / MANIFEST).is_file():
            raise StoreError(f"{self.dir} is not an embedding store (no {MANIFEST}); run the embed stage first")
        self.manifest = _read_manifest(self.dir / MANIFEST)
        missing = [k for k in ("num_images", "chunk_size") if k not in self.manifest]
        if missing or not (self.dir / SOURCES).is_file():
            what = f"{MANIFEST} has no {' or '.join(missing)}" if missing else f"no {SOURCES}"
            raise StoreError(f"{self.dir} is not a complete embedding store ({what}; see dinov2/curation/store.py)")
        self.chunk_size = int(self.manifest["chunk_size"])
        self.num_images = int(self.manifest["num_images"])
        self.num_chunks = max(1, -(-self.num_images // self.chunk_size))
        self._rows: list[int] | None = None
        self._path_counts: dict[int, int] = {}

    # Writing ------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, directory: str | os.PathLike, sources: Sequence[str], chunk_size: int, info: dict
    ) -> EmbeddingStore:
        """A new store for ``sources``, or the existing one when it was made from the same inputs.

        ``info`` (source description, embedder, dtype) is compared with an existing manifest:
        any difference, or another list of images, is a :class:`StoreError` naming it, so a rerun
        never mixes embeddings of two models or two image lists.
        """
        directory = Path(directory)
        if chunk_size < 1:
            raise StoreError(f"chunk_size must be >= 1, got {chunk_size}")
        if not sources:
            raise StoreError(f"no images to embed into {directory}")
        _check_paths(sources)
        manifest = {"version": STORE_VERSION, "num_images": len(sources), "chunk_size": int(chunk_size), **info}
        if (directory / MANIFEST).is_file():
            old = _read_manifest(directory / MANIFEST)
            changed = sorted(k for k in set(old) | set(manifest) if k != "dim" and old.get(k) != manifest.get(k))
            if changed:
                raise StoreError(
                    f"{directory} holds embeddings made with other settings ({', '.join(changed)} differ: "
                    f"{ {k: old.get(k) for k in changed} } vs { {k: manifest.get(k) for k in changed} }); "
                    "use another output directory or remove it"
                )
            if not _lists(directory / SOURCES, sources):
                raise StoreError(f"{directory} was made from another list of images ({SOURCES} differs)")
            return cls(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / SOURCES, "".join(p + "\n" for p in sources))
        write_json_atomic(directory / MANIFEST, manifest)
        return cls(directory)

    def sources(self) -> list[str]:
        return _read_lines(self.dir / SOURCES)

    def chunk_sources(self, index: int, sources: Sequence[str] | None = None) -> list[str]:
        if sources is None:
            return next(self.iter_chunk_sources([index]))[1]
        return list(sources[index * self.chunk_size : (index + 1) * self.chunk_size])

    def chunk_length(self, index: int) -> int:
        """Number of ``sources.txt`` lines that chunk ``index`` covers."""
        return max(0, min(self.chunk_size, self.num_images - index * self.chunk_size))

    def iter_chunk_sources(self, chunks: Iterable[int]) -> Iterator[tuple[int, list[str]]]:
        """``(c, chunk_sources(c))`` for each of ``chunks``, in increasing order, from one pass over
        ``sources.txt`` that holds one chunk's paths at a time: an embedding rank keeps its own
        chunk's paths, not the whole pool's list."""
        position = 0
        with open(self.dir / SOURCES, encoding="utf-8", newline="\n") as handle:
            for index in sorted(set(chunks)):
                start, size = index * self.chunk_size, self.chunk_length(index)
                deque(islice(handle, start - position), maxlen=0)  # skip the lines of other ranks' chunks
                paths = [line[:-1] if line.endswith("\n") else line for line in islice(handle, size)]
                position = start + size
                if len(paths) < size:
                    raise StoreError(f"{self.dir / SOURCES} has fewer lines than the {self.num_images} images "
                                     f"that {MANIFEST} lists: remove the store to embed it again")  # fmt: skip
                yield index, paths

    def is_done(self, index: int) -> bool:
        return (self.dir / f"{chunk_name(index)}.npy").is_file()

    def missing_chunks(self) -> list[int]:
        return [c for c in range(self.num_chunks) if not self.is_done(c)]

    def write_chunk(self, index: int, vectors: np.ndarray, paths: Sequence[str], failed: dict[str, str]) -> None:
        """Write chunk ``index`` (the ``.npy`` last, so it exists only when the chunk is complete)."""
        if len(vectors) != len(paths):
            raise StoreError(f"{chunk_name(index)}: {len(vectors)} embeddings for {len(paths)} paths")
        dtype = np.dtype(self.manifest.get("dtype", "float16"))
        vectors = np.ascontiguousarray(vectors, dtype=dtype)
        vectors = vectors.reshape(len(paths), -1) if len(paths) else vectors.reshape(0, vectors.shape[-1])
        base = self.dir / chunk_name(index)
        write_json_atomic(base.with_suffix(".failed.json"), dict(failed))
        write_text_atomic(base.with_suffix(".paths.txt"), "".join(p + "\n" for p in paths))
        atomic_write(base.with_suffix(".npy"), lambda f: np.save(f, vectors))
        self._rows = None
        self._path_counts.pop(index, None)

    # Reading ------------------------------------------------------------------------------------
    def check_complete(self) -> None:
        missing = self.missing_chunks()
        if missing:
            raise StoreError(
                f"{self.dir}: {len(missing)} of {self.num_chunks} chunks are not written yet "
                f"(e.g. {chunk_name(missing[0])}); rerun the embed stage to finish them"
            )

    def load_chunk(self, index: int, mmap: bool = False) -> np.ndarray:
        """Chunk ``index``'s vectors; a chunk whose rows and paths differ in number is a StoreError."""
        base = self.dir / chunk_name(index)
        try:
            vectors = np.load(base.with_suffix(".npy"), mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise StoreError(f"{chunk_name(index)} in {self.dir} cannot be read: {error}") from error
        rows = self._path_count(index)
        if vectors.ndim != 2 or vectors.shape[0] != rows:
            raise StoreError(
                f"{chunk_name(index)} in {self.dir} does not match its path list: {tuple(vectors.shape)} "
                f"embeddings but {rows} paths in {chunk_name(index)}.paths.txt"
            )
        return vectors

    def _path_count(self, index: int) -> int:
        """Lines of the chunk's path list (counted once per store object: chunks are never rewritten)."""
        if index not in self._path_counts:
            path = (self.dir / chunk_name(index)).with_suffix(".paths.txt")
            if not path.is_file():
                raise StoreError(f"{chunk_name(index)} in {self.dir} has embeddings but no {path.name}")
            with open(path, "rb") as handle:
                self._path_counts[index] = sum(1 for _ in handle)
        return self._path_counts[index]

    def chunk_paths(self, index: int) -> list[str]:
        return _read_lines((self.dir / chunk_name(index)).with_suffix(".paths.txt"))

    def failed(self) -> dict[str, str]:
        """Every unreadable image of the written chunks, with its reason."""
        out: dict[str, str] = {}
        for c in range(self.num_chunks):
            path = (self.dir / chunk_name(c)).with_suffix(".failed.json")
            if path.is_file():
                out.update(read_json(path))
        return out

    @property
    def rows(self) -> list[int]:
        """Number of vectors per chunk (validated once per store object)."""
        if self._rows is None:
            self.check_complete()
            self._rows = [self._check_unit_norm(c, self.load_chunk(c, mmap=True)) for c in range(self.num_chunks)]
        return self._rows

    def _check_unit_norm(self, index: int, vectors: np.ndarray, count: int = 8) -> int:
        """The chunk's number of rows, after checking that its first ``count`` rows are unit vectors:
        every stage takes inner products for cosine similarities (a store another tool wrote may not be)."""
        norms = np.linalg.norm(np.asarray(vectors[:count], dtype=np.float64), axis=1)
        bad = np.nonzero(~(np.abs(norms - 1.0) <= 0.01))[0]
        if len(bad):
            raise StoreError(
                f"{chunk_name(index)} in {self.dir}: row {bad[0]} has norm {norms[bad[0]]:.4g}; a store holds "
                "L2-normalised vectors (inner product = cosine similarity), so normalise them before writing"
            )
        return int(vectors.shape[0])

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)

    def __len__(self) -> int:
        return int(sum(self.rows))

    @property
    def dim(self) -> int:
        for c in range(self.num_chunks):
            if self.rows[c]:
                return int(self.load_chunk(c, mmap=True).shape[1])
        raise StoreError(f"{self.dir} holds no embeddings (every image failed to load)")

    def iter_chunks(self, keep: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, float32 vectors)`` per chunk, only the ids where ``keep`` is true; one chunk in memory."""
        offsets = self.offsets
        for c in range(self.num_chunks):
            ids = np.arange(offsets[c], offsets[c + 1])
            if keep is not None:
                ids = ids[keep[ids]]
            if len(ids):
                vectors = self.load_chunk(c, mmap=True)
                yield ids, np.asarray(vectors[ids - offsets[c]], dtype=np.float32)

    def _checked_ids(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` as int64, or a :class:`StoreError` naming those outside ``[0, len(self))``."""
        ids = np.asarray(ids, dtype=np.int64)
        outside = ids[(ids < 0) | (ids >= len(self))]
        if len(outside):
            raise StoreError(
                f"{self.dir} holds {len(self)} vectors (ids 0 to {len(self) - 1}); {len(outside)} requested "
                f"ids are outside that range, e.g. {int(outside[0])}"
            )
        return ids

    def read(self, ids: np.ndarray) -> np.ndarray:
        """float32 vectors of ``ids`` (any order), read through memory maps chunk by chunk."""
        ids = self._checked_ids(ids)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        offsets = self.offsets
        chunk_of = np.searchsorted(offsets, ids, side="right") - 1
        for c in np.unique(chunk_of):
            where = np.nonzero(chunk_of == c)[0]
            rows = ids[where] - offsets[c]
            order = np.argsort(rows)
            out[where[order]] = self.load_chunk(int(c), mmap=True)[rows[order]]
        return out

    def sample_ids(self, count: int, seed: int, keep: np.ndarray | None = None) -> np.ndarray:
        """Sorted ids of a seeded uniform sample of ``count`` vectors (all of them when fewer)."""
        candidates = np.arange(len(self)) if keep is None else np.nonzero(keep)[0]
        if count >= len(candidates):
            return candidates
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(candidates, size=count, replace=False))

    def paths(self, ids: np.ndarray | None = None) -> list[str]:
        """The image paths of ``ids`` (sorted by id), or of every vector; read chunk by chunk."""
        offsets = self.offsets
        if ids is None:
            return [p for c in range(self.num_chunks) for p in self.chunk_paths(c)]
        ids = np.sort(self._checked_ids(ids))
        out: list[str] = []
        for c in range(self.num_chunks):
            inside = ids[(ids >= offsets[c]) & (ids < offsets[c + 1])] - offsets[c]
            if len(inside):
                chunk = self.chunk_paths(c)
                out.extend(chunk[i] for i in inside)
        return out
