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


def test_weight_pieces_split_each_qkv_bias_into_its_thirds(compare):
    import torch

    bias, weight = torch.arange(12.0), torch.ones(2, 2)
    state = {"student.b.attn.qkv.bias": bias, "student.b.attn.qkv.weight": weight, "teacher.x": weight,
             "student.steps": torch.tensor(3)}  # fmt: skip
    pieces = compare.weight_pieces(state, "student")
    assert sorted(pieces) == ["student.b.attn.qkv.bias[k]", "student.b.attn.qkv.bias[q]",
                              "student.b.attn.qkv.bias[v]", "student.b.attn.qkv.weight"]  # fmt: skip
    assert pieces["student.b.attn.qkv.bias[k]"].tolist() == [4.0, 5.0, 6.0, 7.0]
    assert compare.set_apart("student.b.attn.qkv.bias[k]") and not compare.set_apart("student.b.attn.qkv.bias[q]")
    assert compare.set_apart("teacher.backbone.pos_embed") is None  # decayed in both (optim.decay_tokens)


def test_full_steps_find_no_difference_in_identical_code_and_do_find_joint_clipping(compare, monkeypatch, tmp_path):
    """The full-step comparison with our own loop on both sides: identical updates report 0; updates
    made with one joint clip over all student modules (the rule before the per-module one) are found."""
    import random

    import torch

    from dinov2.data.collate import collate_data_and_cast
    from dinov2.data.masking import MaskingGenerator
    from dinov2.distributed.grads import clip_grad_norm_
    from dinov2.train import loop
    from dinov2.train.schedules import apply_optim_scheduler

    args = argparse.Namespace(centering="centering", separate_ibot_head=False)
    case = "spread_features"
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    torch.manual_seed(0)
    cfg = load_config(None, compare.settings(args, case) + ["train.device=cpu"])
    student = SSLMetaArch(cfg).student.state_dict()
    weights = {f"{side}.{k}": v.clone() for side in ("student", "teacher") for k, v in student.items()}
    generator = torch.Generator().manual_seed(1)
    samples = [({"global_crops": [torch.rand(3, 64, 64, generator=generator) for _ in range(2)],
                 "local_crops": [torch.rand(3, 32, 32, generator=generator) for _ in range(4)]}, ())
               for _ in range(8)]  # fmt: skip
    masks = MaskingGenerator(input_size=4, max_num_patches=8)
    batches = [collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, n_tokens=16, mask_generator=masks,
                                     random_generator=random.Random(i)) for i in range(2)]  # fmt: skip

    def reference_steps():
        ours, cfg = compare.our_model(args, case, weights)
        trainer = loop.Trainer(cfg, ours, torch.device("cpu"), tmp_path)
        out = []
        for values, batch in zip(compare.FULL_STEPS, batches, strict=True):
            apply_optim_scheduler(trainer.optimizer, values["lr"], values["wd"], values["last_layer_lr"])
            trainer.step(iter([batch]), {"teacher_temp": compare.TEACHER_TEMP, **values})
            state = {side: getattr(ours, side).state_dict() for side in ("student", "teacher")}
            out.append({f"{side}.{k}": v.clone() for side, part in state.items() for k, v in part.items()})
        return out

    same = {"weights": weights, "batches": batches, "full_steps": reference_steps()}
    report, _ = compare.compare_full_steps(args, case, same)
    assert all(step[side]["rel"] == 0.0 for step in report["steps"] for side in ("student", "teacher"))

    def joint_clip(self):
        params = [p for p in self.model.student.parameters() if p.grad is not None]
        return clip_grad_norm_(params, float(self.cfg.optim.clip_grad))

    with monkeypatch.context() as patch:
        patch.setattr(loop.Trainer, "clip_gradients", joint_clip)
        joint = {"weights": weights, "batches": batches, "full_steps": reference_steps()}
    report, _ = compare.compare_full_steps(args, case, joint)
    assert report["steps"][1]["student"]["rel"] > 1e-2  # the second AdamW step shows the clipping
