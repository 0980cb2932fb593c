"""Config behaviour that a mutation audit found unpinned: recipe defaults that training reads from the
YAML (not from a class default), keys under a value that is no section, suggestions for a typo,
each layer checked against the default config, booleans for integer settings, ``select`` defaults."""

from __future__ import annotations

import pytest

from dinov2.utils.config import (
    CURATION_DEFAULT_CONFIG,
    ConfigError,
    is_integer_at_least,
    load_config,
    select,
)

# DINOv2's training recipe, as its code applies it (written out here, not read from our files):
# AdamW betas (0.9, 0.999); DINO and iBOT terms weighted 1; position-embedding interpolation with
# offset 0.1 and no antialiasing; blur applied with probability 0 / 0.9 / 0.5 to the first global
# crop, the second and the local crops (the original's GaussianBlur(p) blurs with 1 - p).
RECIPE = {
    "optim.adamw_beta1": 0.9,
    "optim.adamw_beta2": 0.999,
    "dino.loss_weight": 1.0,
    "ibot.loss_weight": 1.0,
    "student.interpolate_offset": 0.1,
    "student.interpolate_antialias": False,
    "crops.global_crops_1_blur_prob": 0.0,
    "crops.global_crops_2_blur_prob": 0.9,
    "crops.local_crops_blur_prob": 0.5,
}


def test_the_default_config_holds_the_recipe_values_training_reads():
    cfg = load_config(None)
    for key, value in RECIPE.items():
        assert select(cfg, key) == value, key


@pytest.mark.parametrize("name", ["vits14_1gpu", "vitb14_1gpu"])
def test_one_gpu_presets_raise_the_teacher_momentum_for_their_smaller_batch(name):
    # Their comment: "a higher teacher momentum suits the smaller batch" (0.994, as the ViT-L/g recipes).
    assert load_config(name).teacher.momentum_teacher == 0.994
    assert load_config(None).teacher.momentum_teacher == 0.992


@pytest.mark.parametrize("override, key", [("student.arch.name=vit_small", "student.arch.name"),
                                           ("train.dataset_path.root=/data", "train.dataset_path.root")])  # fmt: skip
def test_a_key_under_a_value_that_is_no_section_is_named(override, key):
    with pytest.raises(ConfigError, match=rf"unknown config key in command-line overrides:\s+'{key}'"):
        load_config(None, [override])


def test_a_typo_a_few_letters_off_still_gets_a_suggestion():
    # "batch_size" for "batch_size_per_gpu": 8 letters short, still the obvious candidate.
    with pytest.raises(ConfigError, match=r"'train\.batch_size'.*did you mean 'train\.batch_size_per_gpu'"):
        load_config(None, ["train.batch_size=32"])


def test_each_layer_is_checked_against_the_default_not_the_earlier_layers(tmp_path):
    # A config that sets a nullable key: an override may set it back to the default's null.
    path = tmp_path / "short.yaml"
    path.write_text("train:\n  stop_at_iteration: 100\n")
    assert load_config(str(path)).train.stop_at_iteration == 100
    assert load_config(str(path), ["train.stop_at_iteration=null"]).train.stop_at_iteration is None
    # A free-form section the default leaves null, given by a config, may be reset to null too.
    curation = tmp_path / "cur.yaml"
    curation.write_text("dedup:\n  copy_detection: {kind: thumbnail}\n")
    kwargs = dict(default=CURATION_DEFAULT_CONFIG, kinds=("curation",))
    assert load_config(str(curation), **kwargs).dedup.copy_detection.kind == "thumbnail"
    assert load_config(str(curation), ["dedup.copy_detection=null"], **kwargs).dedup.copy_detection is None


def test_a_boolean_is_no_integer_setting():
    assert is_integer_at_least(1, 1) and is_integer_at_least(2.0, 1) and is_integer_at_least(0, 0)
    assert not is_integer_at_least(True, 1) and not is_integer_at_least(False, 0)


def test_a_boolean_batch_size_is_named_not_read_as_one():
    from dinov2.train.train import get_args_parser, setup_config

    args = get_args_parser().parse_args(["--config", "quickstart", "train.batch_size_per_gpu=true"])
    with pytest.raises(ValueError, match=r"train\.batch_size_per_gpu must be a positive integer"):
        setup_config(args)


def test_select_returns_the_given_default_for_a_missing_key():
    cfg = load_config(None)
    assert select(cfg, "optim.no_such_key", default=7) == 7
    assert select(cfg, "no_section.key", default="x") == "x"
    assert select({"a": {"b": None}}, "a.b", default=3) is None  # a present null is the value
    with pytest.raises(KeyError, match="optim.no_such_key"):
        select(cfg, "optim.no_such_key")


def test_select_reads_through_attributes_and_names_the_missing_part():
    from types import SimpleNamespace

    cfg = {"train": SimpleNamespace(batch_size_per_gpu=8)}  # a dict holding an object, as tests and scripts pass
    assert select(cfg, "train.batch_size_per_gpu") == 8
    with pytest.raises(KeyError, match=r"config key 'train\.seed' is missing \('seed' not found\)"):
        select(cfg, "train.seed")
