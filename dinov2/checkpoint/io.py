"""Reading weight files that users hand in: safely, from a path or a URL."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def load_weights_file(location: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint or state dict from a local path or an http(s) URL.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(..., weights_only=True)``, which refuses pickled code. URLs are downloaded once
    into the torch hub cache (``$TORCH_HOME/hub/checkpoints``).
    """
    location = str(location)
    if is_url(location):
        return torch.hub.load_state_dict_from_url(location, map_location=map_location, weights_only=True)
    path = Path(location).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    return torch.load(path, map_location=map_location, weights_only=True)
