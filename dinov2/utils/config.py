"""Configuration: the default training config, experiment configs and ``key=value`` overrides.

Order of precedence: ``configs/ssl_default_config.yaml`` <- an experiment config (a name under
``configs/train/``, ``configs/eval/`` or ``configs/distill/``, a ``<kind>/<name>`` such as
``distill/vits14``, or a path) <- command-line ``key=value`` overrides. The
default config is also the schema: every key of an experiment config or override must exist in
it, and a misspelt key fails with its dotted name and the nearest valid keys. Values are checked
against the default's kind where that is unambiguous: a number for a numeric key, a list for a list,
a section (not null) for a section (``optim.base_lr=abc`` fails naming ``optim.base_lr``), and no
misspelt or quoted boolean for a true/false key (``train.gpu_augmentation=flase`` would read as true). OmegaConf
interpolations (``optim.min_lr=${optim.base_lr}``) resolve against the whole merged config; one that
cannot resolve fails at load time, naming its key. The original's keys that change nothing here
(``NO_EFFECT_KEYS``: ``train.saveckp_freq``, ...) are accepted, with a warning when given another value.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, InterpolationToMissingValueError

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "ssl_default_config.yaml"
CONFIG_KINDS = ("train", "eval", "distill")
CURATION_DEFAULT_CONFIG = CONFIGS_DIR / "curation" / "default.yaml"

logger = logging.getLogger("dinov2")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema (names the offending keys)."""


def load_default_config(path: Path = DEFAULT_CONFIG) -> DictConfig:
    """The default SSL config (configs/ssl_default_config.yaml), or another schema file."""
    if not path.is_file():
        raise FileNotFoundError(f"default config not found at {path}")
    return OmegaConf.load(path)


def default_config_with(*overrides: dict | DictConfig) -> DictConfig:
    """The default config with each mapping in ``overrides`` merged on top, in order."""
    return OmegaConf.merge(load_default_config(), *overrides)


def available_configs(kind: str = "train") -> list[str]:
    """Names of the configs shipped under ``configs/<kind>/`` (without ``.yaml``)."""
    return sorted(p.stem for p in (CONFIGS_DIR / kind).glob("*.yaml"))


def resolve_config_path(name: str | Path, kinds: Sequence[str] = CONFIG_KINDS) -> Path:
    """An existing file path, a config name looked up (with or without ``.yaml``) under
    ``configs/<kind>/`` for each of ``kinds`` in turn, or ``<kind>/<name>`` (``distill/vits14``)."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name.removesuffix(".yaml")
    if path.parent == Path("."):
        for kind in kinds:
            candidate = CONFIGS_DIR / kind / f"{stem}.yaml"
            if candidate.is_file():
                return candidate
    elif str(path.parent) in kinds and (CONFIGS_DIR / path.parent / f"{stem}.yaml").is_file():
        return CONFIGS_DIR / path.parent / f"{stem}.yaml"
    if path.is_dir():  # and no shipped config of that name
        inside = " (a run's is its config.yaml)" if (path / "config.yaml").is_file() else ""
        raise FileNotFoundError(f"config {str(name)!r} is a directory: pass a config file{inside}")
    shipped = [f"{kind}/{n}" for kind in kinds for n in available_configs(kind)]
    wanted = stem if path.parent == Path(".") else f"{path.parent.name}/{stem}"
    by_name: dict[str, str] = {}  # a bare name is looked up kind by kind: the first kind's file wins
    for entry in shipped:
        by_name.setdefault(entry.split("/", 1)[1] if path.parent == Path(".") else entry, entry)
    close = [by_name[c] for c in difflib.get_close_matches(wanted, list(by_name), n=3, cutoff=0.6)]
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise FileNotFoundError(
        f"config {str(name)!r} is neither a file nor a shipped config{hint}; shipped: {', '.join(shipped)}"
    )


def _unreadable(node: Any, key: Any) -> bool:
    """A value that cannot be read where it stands: required and not given yet (``???``), or an
    interpolation (which resolves only against the merged config, not inside one layer)."""
    return isinstance(node, DictConfig | ListConfig) and (
        OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key)
    )


def _child(node: Any, key: Any) -> Any:
    """``node[key]``, or None for a value that cannot be read in place (``???``, ``${...}``)."""
    return None if _unreadable(node, key) else node[key]


def _dotted_keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, Mapping | DictConfig):
        for key in node:
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            yield from _dotted_keys(_child(node, key), path)


def _leaf_keys(node: Any, prefix: str) -> list[str]:
    """Dotted paths of the non-mapping values under ``node`` (``[prefix]`` for a value or empty mapping)."""
    if not isinstance(node, Mapping | DictConfig) or not node:
        return [prefix]
    return [leaf for key in node for leaf in _leaf_keys(_child(node, key), f"{prefix}.{key}")]


def unknown_keys(cfg: Any, schema: Any) -> list[str]:
    """Dotted keys of ``cfg`` that ``schema`` does not have (the leaves of an unknown section)."""
    problems = []

    def walk(node: Any, ref: Any, prefix: str) -> None:
        for key in node:
            path = f"{prefix}.{key}" if prefix else str(key)
            if not isinstance(ref, Mapping | DictConfig) or key not in ref.keys():
                problems.extend(_leaf_keys(_child(node, key), path))
                continue
            value, ref_value = _child(node, key), _child(ref, key)
            if isinstance(value, Mapping | DictConfig) and isinstance(ref_value, Mapping | DictConfig):
                walk(value, ref_value, path)
            elif isinstance(value, Mapping | DictConfig) and value and ref_value is not None:
                problems.extend(_leaf_keys(value, path))  # keys under a value that is no section

    walk(cfg, schema, "")
    return problems


def check_against_schema(cfg: Any, schema: Any, source: str) -> None:
    """Raise :class:`ConfigError` for every key of ``cfg`` missing from ``schema``, with suggestions."""
    bad = unknown_keys(cfg, schema)
    if not bad:
        return
    valid = list(_dotted_keys(schema))
    lines = [f"unknown config key{'s' if len(bad) > 1 else ''} in {source}:"]
    for key in bad:
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        lines.append(f"  {key!r}{hint}")
    raise ConfigError("\n".join(lines))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_integer_at_least(value: Any, minimum: int) -> bool:
    """Whether a setting's ``value`` is a whole number ``>= minimum``: an int, or a float or NumPy
    number equal to one; never a bool or a string."""
    try:
        return not isinstance(value, (bool, str)) and int(value) == value and value >= minimum
    except (TypeError, ValueError, OverflowError):
        return False


# Number keys of which null is a documented value (clip_grad: no clipping; layerscale: none; the offset: 0);
# null for any other number key
# would fail later, in arithmetic, naming no key.
NULLABLE_NUMBERS = frozenset({"optim.clip_grad", "student.layerscale", "student.interpolate_offset"})
# True/false keys that also take strings, and read "true"/"false" (any case) as the booleans.
STRING_BOOLEANS = frozenset({"train.compile"})

# What a bool key given as a string most likely meant: a quoted YAML boolean, or a misspelt true/false.
BOOLEAN_WORDS = ("true", "false", "yes", "no", "on", "off", "none")

# Keys of the default training config that change nothing: the original's, kept so that its configs
# and run configs still load. A config or override giving one a value other than the default is
# accepted with a warning that says what does that job here (else the setting would vanish silently).
_BUFFERS = "FSDP2 keeps buffers in their own dtype (fp32); the dtype name is only checked"
NO_EFFECT_KEYS = {
    "MODEL.WEIGHTS": "start from weights with student.pretrained_weights (training) or --pretrained-weights (evaluation)",
    "train.saveckp_freq": "checkpoints are written every train.checkpoint_period_iterations",
    "train.cache_dataset": "nothing caches the dataset",
    **{
        f"compute_precision.{role}.{module}.mixed_precision.buffer_dtype": _BUFFERS
        for role in ("teacher", "student")
        for module in ("backbone", "dino_head", "ibot_head")
    },
}


def _looks_boolean(value: str) -> bool:
    word = value.strip().lower()
    return word in BOOLEAN_WORDS or bool(difflib.get_close_matches(word, ["true", "false"], n=1, cutoff=0.6))


def _describe(value: Any) -> str:
    if isinstance(value, DictConfig):
        return "a section"
    if isinstance(value, ListConfig):
        return f"{OmegaConf.to_container(value, resolve=False)!r}"
    return f"{value!r}"


def type_problems(cfg: Any, schema: Any) -> list[str]:
    """One line for each value of ``cfg`` whose kind contradicts the default in ``schema``: a string
    (or list, or section) for a numeric key, a scalar for a list or a section, a non-number in a
    list of numbers, ``null`` for a section (an empty ``optim:`` in YAML would erase the section) or
    for a number key (but those of :data:`NULLABLE_NUMBERS`), a string for a true/false key that
    reads as a boolean word (``"false"``, ``no``) or a misspelt one (``flase``: any string is true to
    the code). Keys the schema lacks, ``null`` defaults, other strings
    and booleans (which several keys take interchangeably, e.g. ``train.compile``), other ``null`` values,
    ``???`` and interpolations pass."""
    problems = []

    def check(value: Any, ref: Any, path: str) -> None:
        if ref is None:
            return
        if value is None:  # a section header with nothing under it is null in YAML, and would erase the section
            if _is_number(ref) and path not in NULLABLE_NUMBERS:
                problems.append(f"  {path!r} expects a number (default {ref!r}), got null")
            elif isinstance(ref, DictConfig):
                problems.append(
                    f"  {path!r} is a section (keys: {', '.join(map(str, ref.keys()))}), got null (an empty "
                    "section: give it keys or remove it)"
                )
            return
        if isinstance(ref, DictConfig):
            if not isinstance(value, DictConfig):
                problems.append(
                    f"  {path!r} is a section (keys: {', '.join(map(str, ref.keys()))}), got {_describe(value)}"
                )
            else:
                for key in value:
                    if key in ref.keys() and not _unreadable(value, key) and not _unreadable(ref, key):
                        check(value[key], ref[key], f"{path}.{key}")
        elif isinstance(ref, ListConfig):
            if not isinstance(value, ListConfig):
                problems.append(f"  {path!r} expects a list (default {_describe(ref)}), got {_describe(value)}")
            elif len(ref) and all(_is_number(ref[i]) for i in range(len(ref)) if not _unreadable(ref, i)):
                bad = [value[i] for i in range(len(value)) if not _unreadable(value, i) and not _is_number(value[i])]
                if bad:
                    problems.append(f"  {path!r} expects a list of numbers, got {_describe(value)}")
        elif _is_number(ref) and not isinstance(value, int | float):  # booleans pass: clip_grad=false means 0
            problems.append(f"  {path!r} expects a number (default {ref!r}), got {_describe(value)}")
        elif (
            isinstance(ref, bool)
            and isinstance(value, str)
            and _looks_boolean(value)  # any string reads as true
            and not (path in STRING_BOOLEANS and value.strip().lower() in ("true", "false"))
        ):
            problems.append(f"  {path!r} expects true or false (default {str(ref).lower()}), got the string "
                            f"{value!r}: write true or false, unquoted")  # fmt: skip

    for key in cfg:
        if key in schema.keys() and not _unreadable(cfg, key) and not _unreadable(schema, key):
            check(cfg[key], schema[key], str(key))
    return problems


def check_types(cfg: Any, schema: Any, source: str) -> None:
    """Raise :class:`ConfigError` when a value of ``cfg`` is of the wrong kind for its key (see
    :func:`type_problems`)."""
    problems = type_problems(cfg, schema)
    if problems:
        raise ConfigError("\n".join([f"wrong value type{'s' if len(problems) > 1 else ''} in {source}:", *problems]))


def no_effect_settings(cfg: Any, schema: Any, no_effect: Mapping[str, str] = NO_EFFECT_KEYS) -> list[str]:
    """One line for each key of ``no_effect`` that ``cfg`` (one layer) sets to a value other than the
    default in ``schema``: the setting would change nothing (see :data:`NO_EFFECT_KEYS`)."""
    lines = []
    for key, instead in no_effect.items():
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node.keys() or _unreadable(node, leaf):
            continue
        default = OmegaConf.select(schema, key, default=None)
        if node[leaf] != default:
            lines.append(f"{key}={node[leaf]!r} has no effect (default {default!r}): {instead}")
    return lines


def _interpolation_paths(node: Any, prefix: str = "") -> Iterator[str]:
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        path = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_interpolation(node, key):
            yield path
        elif not OmegaConf.is_missing(node, key) and isinstance(node[key], DictConfig | ListConfig):
            yield from _interpolation_paths(node[key], path)


def check_interpolations(cfg: DictConfig) -> None:
    """Resolve every interpolation of ``cfg`` once, so that one naming a key that does not exist (or
    an unset environment variable) fails now, as a :class:`ConfigError` naming it, not when the
    value is first read. One that points at a still-required ``???`` value is left for later."""
    problems = []
    for path in _interpolation_paths(cfg):
        try:
            OmegaConf.select(cfg, path, throw_on_missing=False)
        except InterpolationToMissingValueError:
            continue
        except (InterpolationResolutionError, ValueError, KeyError) as error:
            problems.append(f"  {path!r}: {str(error).splitlines()[0]}")
    if problems:
        raise ConfigError("\n".join(["interpolation that does not resolve:", *problems]))


def parse_overrides(opts: Sequence[str]) -> DictConfig:
    """``["optim.lr=0.1", "student.arch=vit_small"]`` -> a config (values parsed as YAML)."""
    bad = [opt for opt in opts if "=" not in opt or not opt.split("=", 1)[0].strip()]
    if bad:
        options = [opt for opt in bad if opt.startswith("-")]
        hint = (f"; options ({', '.join(options)}) go before the first key=value override: everything after it "
                "is read as overrides") if options else ""  # fmt: skip
        raise ConfigError(f"overrides must look like key=value, got: {', '.join(map(repr, bad))}{hint}")
    for opt in opts:  # one at a time, so that a value YAML cannot parse is named
        try:
            OmegaConf.from_dotlist([opt])
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"override {opt!r}: the value is not valid YAML ({problem})") from None
    return OmegaConf.from_dotlist(list(opts))


def _load_config_file(path: Path) -> DictConfig:
    """An experiment config file, which must be YAML holding a mapping (of sections)."""
    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config {path} must hold a mapping of sections (train:, optim:, ...), not a list")
    if not layer:  # an empty file (or comments only): a run would silently train on the defaults alone
        raise ConfigError(f"config {path} is empty (no keys); omit --config to run on the default config alone")
    return layer


def load_config(
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    default: Path = DEFAULT_CONFIG,
    kinds: Sequence[str] = CONFIG_KINDS,
) -> DictConfig:
    """The default config <- ``config`` (name or path; None for the default alone) <- ``overrides``,
    each layer checked against the default config's keys and kinds (not against what an earlier
    layer made of them: a section the default leaves ``null``, free-form, such as curation's
    ``dedup.copy_detection``, may be given other keys or ``null`` by an override). ``???`` in a layer
    marks a key required (see :func:`required_keys`). ``default`` and ``kinds`` select another family
    of configs (the curation pipeline: ``CURATION_DEFAULT_CONFIG`` and ``("curation",)``). With the
    default training config, a layer that sets a key of :data:`NO_EFFECT_KEYS` to another value than
    the default logs a warning naming the key (it is accepted, and changes nothing)."""
    cfg = base = load_default_config(default)
    layers = []
    if config:
        path = resolve_config_path(config, kinds)
        layers.append((_load_config_file(path), str(path)))
    if overrides:
        layers.append((parse_overrides(overrides), "command-line overrides"))
    for layer, source in layers:
        check_against_schema(layer, base, source)
        check_types(layer, base, source)
        if default == DEFAULT_CONFIG:
            for line in no_effect_settings(layer, base):
                logger.warning("%s: %s", source, line)
        cfg = OmegaConf.merge(cfg, layer)
        for key in required_keys(layer):  # merging ``???`` keeps the old value; a config means "required"
            OmegaConf.update(cfg, key, "???", merge=False)
    check_interpolations(cfg)
    return cfg


def required_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is ``???`` (OmegaConf's mandatory value): a config that sets one
    requires a later layer (an override) to give it; reading it before raises naming the key."""
    found = []
    for key in node:
        path = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_missing(node, key):
            found.append(path)
        elif not OmegaConf.is_interpolation(node, key) and isinstance(node[key], DictConfig):
            found.extend(required_keys(node[key], path))
    return found


def is_required_unset(cfg: Any, path: str) -> bool:
    """True when the dotted ``path`` holds ``???``: a config requires it and no later layer gave it
    (reading it would raise). False for any other value, and outside OmegaConf configs."""
    if not isinstance(cfg, DictConfig):
        return False
    parent, _, key = path.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and key in node.keys() and OmegaConf.is_missing(node, key)


_REQUIRED = object()


def select(cfg: Any, path: str, default: Any = _REQUIRED) -> Any:
    """``cfg.a.b`` for a dotted ``path``, through mappings (dict, DictConfig) or attributes.

    A missing key returns ``default`` when one is given, else raises ``KeyError`` naming the path.
    """
    node = cfg
    for key in path.split("."):
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif not isinstance(node, Mapping) and hasattr(node, key):
            node = getattr(node, key)
        elif default is not _REQUIRED:
            return default
        else:
            raise KeyError(f"config key {path!r} is missing ({key!r} not found)")
    return node
