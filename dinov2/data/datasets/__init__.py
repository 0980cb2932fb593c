"""Datasets and `make_dataset`, which builds one from a string like ``"ImageNet:split=TRAIN:root=R:extra=E"``."""

from __future__ import annotations

import enum
import importlib
import inspect
import logging
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from .base import IMG_EXTENSIONS, FileImageDataset, ImageDecodeError, load_image, to_rgb
from .image_folder import FileList, ImageFolder

logger = logging.getLogger("dinov2")

DATASET_NAMES = ("ImageNet", "ImageNet22k", "ImageFolder", "FileList", "Synthetic")
_MODULES = {"ImageNet": ".imagenet", "ImageNet22k": ".imagenet", "ImageFolder": ".image_folder"}
_MODULES.update(FileList=".image_folder", Synthetic=".synthetic")
_NOT_KEYS = ("self", "transform", "target_transform")


def __getattr__(name: str):
    # ImageNet* and Synthetic load on first use, so that `python -m dinov2.data.datasets.imagenet`
    # runs its module fresh and importing the package stays light.
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _dataset_class(name: str) -> type:
    lookup = {n.lower(): n for n in DATASET_NAMES}
    if name.lower() not in lookup:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    canonical = lookup[name.lower()]
    return getattr(importlib.import_module(_MODULES[canonical], __name__), canonical)


def parse_dataset_str(dataset_str: str) -> tuple[str, dict[str, str]]:
    """Split ``"Name:key=value:key=value"`` into the name and a dict of raw string values."""
    name, *parts = dataset_str.strip().split(":")
    if not name:
        raise ValueError(f"dataset string {dataset_str!r} has no dataset name; expected 'Name:key=value:...'")
    kwargs: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"dataset string {dataset_str!r}: expected 'key=value', got {part!r}")
        if key in kwargs:
            raise ValueError(f"dataset string {dataset_str!r}: key {key!r} given twice")
        if not value.strip():
            # e.g. an unset environment variable: an empty root would silently mean the current directory
            raise ValueError(f"dataset string {dataset_str!r}: key {key!r} has an empty value")
        kwargs[key] = value.strip()
    return name, kwargs


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean (true/false)")


def _convert(value: str, annotation) -> object:
    """Convert a raw string to ``annotation`` (unions tried in order; unknown annotations keep the string)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if type(None) in options and value.lower() == "none":
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option)
            except (ValueError, KeyError) as error:
                errors.append(str(error))
        raise ValueError("; ".join(errors))
    if origin in (tuple, list, Sequence):
        items = [item.strip() for item in value.split(",") if item.strip()]
        return tuple(items) if origin is not list else items
    if annotation is bool:
        return _parse_bool(value)
    if annotation in (int, float, Path):
        return annotation(value)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation[value.upper()]
    return value


def _annotations(cls: type, parameters: dict[str, inspect.Parameter]) -> dict[str, object]:
    """Constructor annotations, falling back to the type of each default when hints cannot be resolved."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolved forward references: use defaults instead
        hints = {}
    for key, parameter in parameters.items():
        default = parameter.default
        if key not in hints and default is not inspect.Parameter.empty and default is not None:
            hints[key] = type(default)
    return hints


def _constructor_kwargs(cls: type, raw: dict[str, str]) -> dict[str, object]:
    signature = inspect.signature(cls.__init__)
    parameters = {
        key: p
        for key, p in signature.parameters.items()
        if key not in _NOT_KEYS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    valid = ", ".join(parameters) or "(none)"
    unknown = [key for key in raw if key not in parameters]
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key {unknown[0]!r}; valid keys: {valid}")
    missing = [key for key, p in parameters.items() if p.default is inspect.Parameter.empty and key not in raw]
    if missing:
        raise ValueError(f"{cls.__name__}: missing required key(s) {', '.join(missing)}; valid keys: {valid}")
    hints = _annotations(cls, parameters)
    kwargs = {}
    for key, value in raw.items():
        try:
            kwargs[key] = _convert(value, hints.get(key, str))
        except (ValueError, KeyError) as error:
            raise ValueError(f"{cls.__name__}: bad value {value!r} for key {key!r}: {error}") from error
    return kwargs


def make_dataset(dataset_str: str, transform=None, target_transform=None):
    """Build a dataset from ``"Name:key=value:..."``; names: ImageNet, ImageNet22k, ImageFolder, FileList, Synthetic.

    Keys are the constructor's arguments (except the transforms); values are converted to the
    annotated type (int, float, bool, enum, tuples from comma-separated lists).
    """
    name, raw = parse_dataset_str(dataset_str)
    cls = _dataset_class(name)
    kwargs = _constructor_kwargs(cls, raw)
    dataset = cls(transform=transform, target_transform=target_transform, **kwargs)
    logger.info("Dataset %r: %s with %d samples", dataset_str, cls.__name__, len(dataset))
    return dataset


__all__ = [
    "DATASET_NAMES",
    "IMG_EXTENSIONS",
    "FileImageDataset",
    "FileList",
    "ImageDecodeError",
    "ImageFolder",
    "ImageNet",
    "ImageNet22k",
    "load_image",
    "make_dataset",
    "parse_dataset_str",
    "Synthetic",
    "to_rgb",
]
