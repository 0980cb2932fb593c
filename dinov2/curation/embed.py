"""Stage 1, embed: an image pool -> an :class:`~dinov2.curation.store.EmbeddingStore` of L2-normalised vectors.

Embedders (the ``model`` section of a curation config):

* ``kind: backbone``: one of our ViTs (a config naming the architecture, any weights layout that
  the evaluation scripts load: official ``dinov2_*_pretrain.pth``, a training run's
  ``teacher_checkpoint.pth``, a ``.safetensors`` export); eval transform (resize, centre crop),
  autocast on CUDA; the CLS token, the mean patch token or both (``pooling``).
* ``kind: thumbnail``: a tiny-image descriptor (the image area-resized to ``thumbnail_size``
  squared, each channel's mean removed; uniform images share one direction). No model: a fast
  detector of exact and near-exact copies (re-encoded, resized, lightly cropped) for the
  deduplication stage.

Chunks are dealt round robin over ranks (``torchrun``); a chunk already on disk is not redone, so an
interrupted run resumes where it stopped. Unreadable images are skipped and listed per chunk.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from dinov2 import distributed
from dinov2.curation.store import MANIFEST, STAMP, EmbeddingStore, StoreError, read_json
from dinov2.data.datasets.base import ImageDecodeError, load_image

logger = logging.getLogger("dinov2")

POOLINGS = ("cls", "avgpool", "cls_avgpool")
EMBEDDER_KINDS = ("backbone", "thumbnail")


# ------------------------------------------------------------------------------ image lists
def list_images(source: str) -> list[str]:
    """Absolute image paths of ``source``: a folder, a list file (``FileList`` format), or a dataset
    string naming a file-backed dataset (``ImageFolder:root=R``, ``FileList:path=P``, ``ImageNet:...``)."""
    from dinov2.data.datasets import DATASET_NAMES, FileImageDataset, FileList, ImageFolder, make_dataset

    if not source:
        raise ValueError("no image source given (a folder, a list file or a dataset string)")
    path = Path(source).expanduser()
    if path.is_dir():
        dataset = ImageFolder(str(path))
    elif path.is_file():
        dataset = FileList(str(path))
    elif source.split(":", 1)[0].strip().lower() not in {n.lower() for n in DATASET_NAMES}:
        raise FileNotFoundError(
            f"image source {source!r} is neither an existing folder or list file nor a dataset string "
            f"({', '.join(n + ':...' for n in DATASET_NAMES)})"
        )
    else:
        dataset = make_dataset(source)
    if not isinstance(dataset, FileImageDataset):
        raise ValueError(
            f"{source!r} is a {type(dataset).__name__}, which has no image files; curation needs file-backed "
            "images (a folder, a list file, ImageFolder:root=..., FileList:path=..., ImageNet:...)"
        )
    return [os.path.abspath(dataset.get_image_path(i)) for i in range(len(dataset))]


def check_file_list_paths(paths: Sequence[str], source: str) -> None:
    """Raise when a path cannot be written as one FileList line that reads back as itself (a comma or
    tab, which FileList takes for a label separator, or a last word that is an integer)."""
    from dinov2.data.datasets.image_folder import _parse_line

    for path in paths:
        try:
            fits = _parse_line(path, "") == (path, None) and path == path.strip()
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"image {path!r} of {source!r} cannot be listed in the curated FileList (commas, tabs, surrounding "
                "spaces or a last word that is a number read as a label); rename it or list the pool without it"
            )


# ------------------------------------------------------------------------------ source stamps
def _source_anchors(source: str) -> list[str]:
    """The files and folders that ``source``'s image list comes from: the source itself when it
    exists, else the existing paths among a dataset string's ``key=value`` values."""
    if os.path.exists(os.path.expanduser(source)):
        return [os.path.abspath(os.path.expanduser(source))]
    values = [part.partition("=")[2] for part in source.split(":")[1:]]
    return [os.path.abspath(os.path.expanduser(v)) for v in values if v and os.path.exists(os.path.expanduser(v))]


# A time this close to the listing (or after it) does not show that the listing saw the folder's last
# change: it may have come just after, or inside one tick of a coarse file-system clock (FAT: 2 s).
RACY_NS = 2_000_000_000
UNSURE = -1  # recorded for such a time: never a real one, so the next check lists the source again


def _stat(path: str, with_size: bool, listed_ns: int | None = None):
    try:
        st = os.stat(path)
    except OSError:
        return None
    mtime = st.st_mtime_ns
    if listed_ns is not None and mtime >= listed_ns - RACY_NS:
        mtime = UNSURE
    return [st.st_size, mtime] if with_size else mtime


def source_stamp(source: str, paths: Sequence[str], listed_ns: int | None = None) -> dict[str, Any]:
    """What a change of ``source``'s image list would change, found without listing it again: the
    size and modification time of each list file it names, and the modification time of each folder
    it names and of every folder between one of them and a listed image (adding, removing or
    renaming an image changes its folder's time), and where the source's paths lead from the
    current folder. Not seen: an image rewritten under its own name, or images put in a folder that
    held none before under an unchanged parent. ``listed_ns`` is when the listing of ``paths``
    began (``time.time_ns()``; default: now); a time from ``RACY_NS`` before it on is recorded as
    unknown (``UNSURE``), since a change at that time may be missing from ``paths``."""
    listed_ns = time.time_ns() if listed_ns is None else int(listed_ns)
    anchors = _source_anchors(source)
    roots = [a for a in anchors if os.path.isdir(a)]
    folders = set(roots)
    for parent in {os.path.dirname(p) for p in paths} if roots else ():
        while parent not in folders and any(parent.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
            folders.add(parent)
            parent = os.path.dirname(parent)
    files = {a: _stat(a, True, listed_ns) for a in anchors if not os.path.isdir(a)}
    return {"anchors": anchors, "files": files, "folders": {f: _stat(f, False, listed_ns) for f in sorted(folders)}}


def stamp_changed(stamp: dict[str, Any]) -> bool:
    """True when a file or folder of a :func:`source_stamp` has another size or time than recorded
    (or one recorded as unknown)."""
    files = any(_stat(p, True) != (None if v is None else list(v)) for p, v in stamp["files"].items())
    return files or any(_stat(p, False) != v for p, v in stamp["folders"].items())


def write_source_stamp(store_dir: str | os.PathLike, source: str, paths: Sequence[str], listed_ns: int) -> None:
    from dinov2.eval.metrics import write_json_atomic

    write_json_atomic(Path(store_dir) / STAMP, {"source": source, **source_stamp(source, paths, listed_ns)})


def source_change(source: str, store: EmbeddingStore, refresh: bool = True) -> str | None:
    """None when ``source`` still lists the images ``store`` embedded (a store without a stamp is
    taken as current); else what changed. Lists the source again only when its stamp moved (or its
    paths lead elsewhere from the current folder), and then (``refresh``) records the new stamp when
    the list turns out the same."""
    path = store.dir / STAMP
    if not path.is_file():
        return None
    stamp = read_json(path)
    same_anchors = stamp.get("anchors") == _source_anchors(source)
    if stamp.get("source") == source and same_anchors and not stamp_changed(stamp):
        return None
    listed_ns = time.time_ns()
    now, before = list_images(source), store.sources()
    if now == before:
        if refresh:
            write_source_stamp(store.dir, source, now, listed_ns)
        return None
    added, gone = len(set(now) - set(before)), len(set(before) - set(now))
    return f"it listed {len(before)} images when embedded and lists {len(now)} now ({added} new, {gone} gone)"


class _ImageFiles(Dataset):
    """``(index, tensor or None, reason)`` per path; a file that cannot be decoded is reported, not replaced."""

    def __init__(self, paths: Sequence[str], transform) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(load_image(self.paths[index])), ""
        except ImageDecodeError as error:
            return index, None, str(error)


def _collate(batch):
    good = [(i, x) for i, x, _ in batch if x is not None]
    failed = [(i, reason) for i, x, reason in batch if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, failed


# ------------------------------------------------------------------------------ embedders
class ThumbnailEmbedder:
    """Area-resized ``size x size`` RGB thumbnail, channel means removed, flattened and L2-normalised.

    A uniform image (blank, or one colour: an RMS deviation from its channel means below
    ``FLAT_CONTRAST``) has nothing left to normalise; it gets the all-equal direction instead, which
    is orthogonal to every other descriptor (their entries sum to zero per channel), so uniform
    images are copies of each other (similarity 1) and of nothing else (0).
    """

    FLAT_CONTRAST = 1.0 / 255

    def __init__(self, size: int = 16) -> None:
        if size < 2:
            raise ValueError(f"thumbnail_size must be >= 2, got {size}")
        self.size = int(size)
        self.device = torch.device("cpu")

    def transform(self, image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
        return F.adaptive_avg_pool2d(x, self.size)[0]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - images.mean(dim=(2, 3), keepdim=True)).flatten(1)
        flat = x.pow(2).mean(dim=1).sqrt() < self.FLAT_CONTRAST
        x[flat] = 1.0
        return F.normalize(x, dim=1)


class BackboneEmbedder:
    """A frozen ViT's normalised CLS / mean-patch features on the evaluation transform (which keeps an
    image's centre at most 8:1 before the resize, :func:`~dinov2.data.transforms.centre_to_aspect`)."""

    def __init__(self, cfg, device: str | torch.device = "auto") -> None:
        from dinov2.data.transforms import make_classification_eval_transform
        from dinov2.eval.setup import autocast_dtype_for, build_eval_model

        if cfg.pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {POOLINGS}, got {cfg.pooling!r}")
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):  # a random-init baseline is the same on every rank and run
            torch.manual_seed(0)
            self.model, _ = build_eval_model(cfg.config_file or None, cfg.pretrained_weights, list(cfg.opts), device)
        self.device = next(self.model.parameters()).device
        self.autocast = autocast_dtype_for(self.device)
        self.transform = make_classification_eval_transform(int(cfg.resize_size), int(cfg.crop_size))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = self.model.forward_features(images)
        cls, patches = out["x_norm_clstoken"].float(), out["x_norm_patchtokens"].float().mean(dim=1)
        pooled = {"cls": cls, "avgpool": patches, "cls_avgpool": torch.cat([cls, patches], dim=1)}
        return F.normalize(pooled[self.cfg.pooling], dim=1)


def build_embedder(cfg, device: str | torch.device = "auto"):
    """The embedder of a ``model`` config section (see the module docstring)."""
    if cfg.kind == "thumbnail":
        return ThumbnailEmbedder(int(cfg.thumbnail_size))
    if cfg.kind == "backbone":
        return BackboneEmbedder(cfg, device)
    raise ValueError(f"model.kind must be one of {EMBEDDER_KINDS}, got {cfg.kind!r}")


def describe_embedder(cfg) -> dict[str, Any]:
    """What a store records about its embedder, from the config alone (no model is built)."""
    if cfg.kind == "thumbnail":
        return {"kind": "thumbnail", "thumbnail_size": int(cfg.thumbnail_size)}
    keys = ("config_file", "pretrained_weights", "resize_size", "crop_size", "pooling")
    return {"kind": cfg.kind, **{k: cfg[k] for k in keys}, "opts": list(cfg.opts)}


# ------------------------------------------------------------------------------ the stage
def _embed_chunk(embedder, paths: Sequence[str], batch_size: int, num_workers: int, bar) -> tuple:
    loader = DataLoader(
        _ImageFiles(paths, embedder.transform), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=_collate,
    )  # fmt: skip
    rows, vectors, failed = [], [], {}
    for indices, images, bad in loader:
        for index, reason in bad:
            failed[paths[index]] = reason
            logger.warning("Skipping unreadable image %s (%s)", paths[index], reason)
        if images is not None:
            vectors.append(embedder(images).float().cpu().numpy())
            rows.extend(indices)
        if bar is not None:
            bar.update(len(indices) + len(bad))
    dim = vectors[0].shape[1] if vectors else 0
    array = np.concatenate(vectors) if vectors else np.zeros((0, dim), dtype=np.float32)
    return array, [paths[i] for i in rows], failed


def embed_images(
    source: str,
    store_dir: str | os.PathLike,
    model_cfg,
    batch_size: int = 64,
    num_workers: int = 0,
    chunk_size: int = 65536,
    dtype: str = "float16",
    device: str | torch.device = "auto",
    progress: bool = True,
    for_file_list: bool = False,
    weights_from: str | None = None,
) -> EmbeddingStore:
    """Embed every image of ``source`` into ``store_dir``; the chunks are shared by all ranks.

    Resumable: chunks already written are skipped; a store made from other images or another
    embedder is an error (:class:`~dinov2.curation.store.StoreError`). ``for_file_list`` checks
    first that every path can be written to a FileList (the pool's). Returns the store, found
    complete by rank 0 (every rank reading it back sees its own node's view of the files).

    A backbone's ``pretrained_weights`` given as a training run directory (``OUT``,
    ``OUT/checkpoints``) is the checkpoint ``OUT/checkpoints/step_N`` that rank 0 finds latest, on
    every rank, and the store records that step: resuming it once the run has saved a newer
    checkpoint is a :class:`StoreError` instead of a store of two models' vectors. A caller that
    embeds several stores with one model resolves it once (:func:`agree_embedder_weights`) and passes
    the run directory it came from as ``weights_from``, so that every store gets the same step.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"embedding dtype must be float16 or float32, got {dtype!r}")
    if weights_from is None:  # a collective, here where every rank calls
        model_cfg, weights_from = agree_embedder_weights(model_cfg)
    info = {"source": str(source), "embedder": describe_embedder(model_cfg), "dtype": dtype}
    _prepare_on_rank_zero(source, store_dir, chunk_size, info, for_file_list, weights_from)
    rank, world = distributed.get_rank(), distributed.get_world_size()

    def embed_my_chunks() -> None:
        store = EmbeddingStore(store_dir)
        todo = [c for c in store.missing_chunks() if c % world == rank]
        if todo:  # the rank reads its chunks' paths one chunk at a time, never the whole pool's list
            embedder = build_embedder(model_cfg, device)
            _run_chunks(store, embedder, todo, batch_size, num_workers, progress and rank == 0)

    # the all-reduce that shares the outcome is also the barrier before the store is read back
    distributed.on_every_rank(embed_my_chunks, f"embedding the chunks of {store_dir}", EmbedError)

    def check_on_rank_zero() -> None:
        # rank 0's listing alone decides that every chunk is written, and every rank learns it: another
        # node whose view of a shared file system is stale (it looked the other ranks' chunks up as
        # missing moments ago) would stop there alone while rank 0 went on and waited for it
        if distributed.is_main_process():
            EmbeddingStore(store_dir).check_complete()

    distributed.on_every_rank(check_on_rank_zero, f"checking the chunks of {store_dir}", StoreError)
    return EmbeddingStore(store_dir)


class EmbedError(RuntimeError):
    """Another rank failed in the embed stage (the message names it and its error)."""


def agree_embedder_weights(cfg) -> tuple[Any, str | None]:
    """``(cfg, None)`` for a model section ``cfg``, or, for a backbone whose ``pretrained_weights``
    names a training run directory, ``(a copy of cfg with the checkpoint rank 0 finds latest there,
    that run directory)`` (:func:`~dinov2.eval.setup.agreed_pretrained_weights`, a collective)."""
    if cfg.kind != "backbone" or not cfg.pretrained_weights:
        return cfg, None
    from dinov2.eval.setup import agreed_pretrained_weights

    resolved = agreed_pretrained_weights(cfg.pretrained_weights)
    if resolved == str(cfg.pretrained_weights):
        return cfg, None
    return OmegaConf.merge(cfg, {"pretrained_weights": resolved}), str(cfg.pretrained_weights)


def _prepare_on_rank_zero(source, store_dir, chunk_size, info, for_file_list, run_dir=None) -> None:
    """Rank 0 lists the images and creates (or checks) the store; every rank learns whether that
    worked, so a bad input stops all ranks (rank 0 with its own error, the others with a
    :class:`StoreError` naming it) instead of leaving them waiting. ``run_dir``: the training run
    directory that the embedder's weights were resolved from (a refusal says what to do)."""

    def prepare() -> None:
        if not distributed.is_main_process():
            return
        listed_ns = time.time_ns()  # before listing: a change from then on may be missing from the list
        paths = list_images(source)
        if for_file_list:
            check_file_list_paths(paths, source)
        try:
            EmbeddingStore.create(store_dir, paths, chunk_size, info)
        except StoreError as error:
            hint = None if run_dir is None else _other_checkpoint_hint(store_dir, run_dir, info["embedder"])
            if hint is None:
                raise
            raise StoreError(f"{error}; {hint}") from error
        write_source_stamp(store_dir, source, paths, listed_ns)  # the list was just checked against the store's

    distributed.on_every_rank(prepare, f"preparing the embedding store {store_dir}", StoreError)


def _other_checkpoint_hint(store_dir, run_dir: str, embedder: dict[str, Any]) -> str | None:
    """What to do about a store that the weights of ``run_dir`` at another checkpoint than its latest
    now (``embedder``'s) embedded; None where that is not why the store was refused."""
    resolved = embedder["pretrained_weights"]
    try:
        recorded = read_json(Path(store_dir) / MANIFEST)["embedder"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(recorded, dict) or {**recorded, "pretrained_weights": resolved} != embedder:
        return None  # another embedder, or no store yet
    recorded = recorded.get("pretrained_weights")
    if recorded == resolved:
        return None
    now = f"model.pretrained_weights {run_dir!r} is read as the run's latest checkpoint, now {resolved}"
    if recorded == run_dir:  # a store made before the step was recorded
        return (f"{now}, and the store records the run directory alone, not which of its checkpoints embedded it: "
                "set pretrained_weights to that checkpoint if you know it, else remove the store")  # fmt: skip
    return f"{now}: to finish the store, set pretrained_weights to the checkpoint that embedded it, {recorded}"


def _run_chunks(store, embedder, todo, batch_size, num_workers, progress) -> None:
    from tqdm import tqdm

    total = sum(store.chunk_length(c) for c in todo)
    bar = tqdm(total=total, desc=f"embed {store.dir.name}", unit="img", dynamic_ncols=True) if progress else None
    start, done = time.perf_counter(), 0
    try:
        for c, paths in store.iter_chunk_sources(todo):
            vectors, kept, failed = _embed_chunk(embedder, paths, batch_size, num_workers, bar)
            store.write_chunk(c, vectors, kept, failed)
            done += len(paths)
            rate = done / max(time.perf_counter() - start, 1e-9)
            logger.info("Embedded chunk %d/%d (%d images, %d unreadable; %.1f images/s on this rank)",
                        c + 1, store.num_chunks, len(paths), len(failed), rate)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()


__all__ = [
    "BackboneEmbedder",
    "EmbedError",
    "ThumbnailEmbedder",
    "StoreError",
    "build_embedder",
    "embed_images",
    "list_images",
]
