"""The config surface as a contract: every key of the default configs is named by the code (a key
that no code names is certainly never read: setting it would change nothing, silently) or is declared
to change nothing (NO_EFFECT_KEYS, and then setting it is warned about); no shipped config sets one.
Naming is a necessary condition only: a common leaf name (``seed``) passes whoever reads it."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dinov2.utils.config import (
    CONFIGS_DIR,
    CURATION_DEFAULT_CONFIG,
    DEFAULT_CONFIG,
    NO_EFFECT_KEYS,
    load_config,
)

PACKAGE = Path(__file__).resolve().parents[2] / "dinov2"
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Keys of NO_EFFECT_KEYS that the code does name: read only to be validated, never applied.
VALIDATED_ONLY = {"buffer_dtype"}  # parallelize.module_policy checks the dtype name, FSDP2 keeps buffers in fp32


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def names_in_code() -> set[str]:
    """Every name the package's code could read a config key by: attribute names (``cfg.train.seed``),
    keyword names, and identifiers inside string constants (``select(cfg, "train.seed")``,
    ``section["seed"]``, f-strings), docstrings and comments excepted; the config loader (whose
    validation walks every key) excepted too. A key whose last part is none of these is read nowhere."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "utils" / "config.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                names.update(IDENTIFIER.findall(node.value))
    return names


def leaf_keys(path: Path) -> list[str]:
    def walk(node, prefix):
        for key in node:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            value = None if OmegaConf.is_missing(node, key) else node[key]  # ``???``: a leaf
            if OmegaConf.is_dict(value) and len(value):
                yield from walk(value, dotted)
            else:
                yield dotted

    return list(walk(OmegaConf.load(path), ""))


@pytest.fixture(scope="module")
def code_names() -> set[str]:
    return names_in_code()


@pytest.mark.parametrize("default", [DEFAULT_CONFIG, CURATION_DEFAULT_CONFIG], ids=["training", "curation"])
def test_every_key_of_a_default_config_is_read_somewhere_or_declared_to_do_nothing(default, code_names):
    unread = [k for k in leaf_keys(default) if k.rsplit(".", 1)[-1] not in code_names and k not in NO_EFFECT_KEYS]
    assert not unread, (
        f"keys of {default.name} that nothing in dinov2/ reads (setting them would change nothing, silently): "
        f"{unread}; read them, remove them, or list them in dinov2.utils.config.NO_EFFECT_KEYS"
    )


def test_the_keys_declared_to_do_nothing_exist_and_are_not_read(code_names):
    schema_keys = set(leaf_keys(DEFAULT_CONFIG))
    assert set(NO_EFFECT_KEYS) <= schema_keys  # a stale entry would warn about a key that cannot be set
    read = [k for k in NO_EFFECT_KEYS if k.rsplit(".", 1)[-1] in code_names - VALIDATED_ONLY]
    assert not read, f"{read} are read by dinov2/ now: drop them from NO_EFFECT_KEYS (and its warning)"


def _shipped_configs() -> list[str]:
    return [
        f"{kind}/{p.stem}" for kind in ("train", "eval", "distill") for p in sorted((CONFIGS_DIR / kind).glob("*.yaml"))
    ]


@pytest.fixture
def dinov2_log(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("dinov2"), "propagate", True)  # setup_logging turns it off
    caplog.set_level(logging.WARNING, logger="dinov2")
    return caplog


@pytest.mark.parametrize(
    "override, key, pointer",
    [
        ("train.saveckp_freq=5", "train.saveckp_freq", "train.checkpoint_period_iterations"),
        ("MODEL.WEIGHTS=/ckpt/teacher.pth", "MODEL.WEIGHTS", "student.pretrained_weights"),
        ("train.cache_dataset=false", "train.cache_dataset", "caches"),
        ("compute_precision.student.backbone.mixed_precision.buffer_dtype=bf16",
         "compute_precision.student.backbone.mixed_precision.buffer_dtype", "fp32"),
    ],
)  # fmt: skip
def test_a_key_that_changes_nothing_is_accepted_with_a_warning_naming_it(override, key, pointer, dinov2_log):
    cfg = load_config(None, [override])
    given = OmegaConf.select(OmegaConf.from_dotlist([override]), key)
    assert OmegaConf.select(cfg, key) == given != OmegaConf.select(OmegaConf.load(DEFAULT_CONFIG), key)  # accepted
    warned = [r.getMessage() for r in dinov2_log.records if key in r.getMessage()]
    assert len(warned) == 1 and "no effect" in warned[0] and pointer in warned[0]
    assert "command-line overrides" in warned[0]


def test_a_config_file_that_sets_one_is_named_and_the_default_value_is_not_warned_about(tmp_path, dinov2_log):
    path = tmp_path / "original.yaml"  # as the original wrote its run configs: every key, at its defaults
    path.write_text(
        "MODEL:\n  WEIGHTS: ''\ntrain:\n  saveckp_freq: 20\n  cache_dataset: true\n  batch_size_per_gpu: 8\n"
    )
    load_config(str(path))
    assert not dinov2_log.records
    path.write_text("train:\n  saveckp_freq: 1\n")
    load_config(str(path))
    assert [r.getMessage().split(":")[0] for r in dinov2_log.records] == [str(path)]


@pytest.mark.parametrize("name", _shipped_configs())
def test_no_shipped_config_sets_a_key_that_changes_nothing(name, dinov2_log):
    load_config(name)
    assert not [r.getMessage() for r in dinov2_log.records if "no effect" in r.getMessage()]
