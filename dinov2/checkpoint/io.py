"""Reading weight files that users hand in: safely, from a path or a URL."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path
from urllib.parse import urlparse

import torch

from dinov2.checkpoint.training import CheckpointLoadError

logger = logging.getLogger("dinov2")

# The released DINOv2 weights: their file names are unique, and torch.hub caches them under them.
OFFICIAL_HOST = "dl.fbaipublicfiles.com"


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def cached_download(url: str) -> Path:
    """Download ``url`` once into ``$TORCH_HOME/hub/checkpoints`` and return the local file.

    Files from the official DINOv2 server keep their (unique) names there, the ones torch.hub
    gives them. Any other URL goes into a sub-folder named after a hash of the whole URL: files
    with the same name from different places (every Hugging Face repository's
    ``model.safetensors``) never stand in for one another.
    """
    parts = urlparse(url)
    name = os.path.basename(parts.path) or "weights.pth"
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    if parts.netloc != OFFICIAL_HOST:
        directory = directory / hashlib.sha256(url.encode()).hexdigest()[:16]
    cached = directory / name
    if not cached.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s to %s", url, cached)
        torch.hub.download_url_to_file(url, str(cached), progress=False)  # to a temp file, then moved
    return cached


def expand_user(location: str | os.PathLike) -> Path:
    """``location`` with ``~`` expanded; an unknown ``~user`` stays as written (``Path.expanduser``
    raises RuntimeError there), so that the error about the missing file names it."""
    return Path(os.path.expanduser(os.fspath(location)))


def load_weights_file(location: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint or state dict from a local path or an http(s) URL.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(..., weights_only=True)``, which refuses pickled code. URLs are downloaded once
    into the torch hub cache (:func:`cached_download`). A file that cannot be read raises an error
    that names it (``pickle.UnpicklingError`` for pickled objects other than weights,
    :class:`~dinov2.checkpoint.CheckpointLoadError` for a truncated or corrupt file).
    """
    location = str(location)
    path = cached_download(location) if is_url(location) else expand_user(location)
    if path.is_dir():
        raise IsADirectoryError(
            f"weights file expected, got the directory {path}: a training run's weights are its exports "
            "(OUT/eval/training_N/teacher_checkpoint.pth) or a file written by python -m dinov2.checkpoint.consolidate"
        )
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    # a download the server cut short or answered with an error page stays cached: say how to redo it
    source = f"{path} (downloaded from {location}; delete it to download again)" if is_url(location) else str(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(map_location))
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(f"weights file {source} was refused: {exc}") from exc
    except Exception as exc:
        raise CheckpointLoadError(f"cannot read weights file {source}: {exc}") from exc
