"""scripts/compare_original.py runs the original implementation beside ours (not available here; its
results are in docs/method.md). What can be checked without it: every setting the comparison gives
both codes is a key of our config and lands there with the value the original receives (a renamed
key or a mangled value would make the comparison compare something else)."""

from __future__ import annotations

import argparse

import pytest
from omegaconf import OmegaConf

from dinov2.utils.config import load_config


@pytest.fixture(scope="module")
def compare(script):
    return script("compare_original.py", "compare_original")


@pytest.mark.parametrize("separate_head", [False, True])
def test_every_setting_of_every_case_reaches_our_config(compare, separate_head):
    for case in compare.CASES:
        args = argparse.Namespace(centering="sinkhorn_knopp", separate_ibot_head=separate_head)
        dotlist = compare.settings(args, case)
        cfg = load_config(None, dotlist)  # an unknown key raises here
        expected = OmegaConf.from_dotlist(dotlist)  # the values the original's OmegaConf merge receives
        for key in (item.split("=", 1)[0] for item in dotlist):
            assert OmegaConf.select(cfg, key) == OmegaConf.select(expected, key), f"{case}: {key}"
        assert cfg.student.drop_path_rate == 0.0 and cfg.ibot.separate_head is separate_head


def test_the_recipe_model_settings_reach_our_config(compare):
    cfg = load_config("vitl16_short", compare.RECIPE_MODEL)
    expected = OmegaConf.from_dotlist(compare.RECIPE_MODEL)
    for key in (item.split("=", 1)[0] for item in compare.RECIPE_MODEL):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(expected, key), key
