import pytest
import torch

from dinov2.checkpoint import StateDictMismatchError, adapt_backbone_state_dict, load_backbone_state_dict
from dinov2.models import DinoVisionTransformer


def _vit(**overrides):
    kwargs = dict(img_size=16, patch_size=8, embed_dim=32, depth=4, num_heads=2, init_values=1.0, block_chunks=0)
    kwargs.update(overrides)
    return DinoVisionTransformer(**kwargs)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _training_checkpoint(backbone_state):
    """The original's teacher_checkpoint.pth layout: chunked backbone plus heads."""
    teacher = {}
    for key, value in backbone_state.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            key = f"blocks.{int(parts[1]) // 2}." + ".".join(parts[1:])
        teacher[f"backbone.{key}"] = value
    teacher["dino_head.mlp.0.weight"] = torch.zeros(3, 32)
    teacher["ibot_head.last_layer.weight_g"] = torch.ones(5, 1)
    return {"teacher": teacher}


def test_flat_to_chunked_and_back_round_trip():
    flat, chunked, flat_again = _vit(), _vit(block_chunks=2), _vit()
    load_backbone_state_dict(chunked, flat.state_dict())
    report = load_backbone_state_dict(flat_again, chunked.state_dict())
    assert report.unchunked and not report.rechunked
    _assert_same_weights(flat, flat_again)


def test_training_checkpoint_with_heads_and_chunks():
    source, target = _vit(), _vit()
    report = load_backbone_state_dict(target, _training_checkpoint(source.state_dict()))
    _assert_same_weights(source, target)
    assert report.container == "teacher" and report.unchunked
    assert sorted(report.set_aside) == ["dino_head.mlp.0.weight", "ibot_head.last_layer.weight_g"]


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes(prefix):
    source, target = _vit(), _vit()
    load_backbone_state_dict(target, {"state_dict": {prefix + k: v for k, v in source.state_dict().items()}})
    _assert_same_weights(source, target)


def test_student_teacher_branches_in_full_training_checkpoint():
    student, teacher, target = _vit(), _vit(), _vit()
    model = {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
    model.update({f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()})
    checkpoint = {"model": model, "iteration": 10}
    load_backbone_state_dict(target, checkpoint)
    _assert_same_weights(teacher, target)
    load_backbone_state_dict(target, checkpoint, branch="student")
    _assert_same_weights(student, target)
    with pytest.raises(ValueError, match="no 'student.' keys"):
        load_backbone_state_dict(target, {"model": {k: v for k, v in model.items() if k.startswith("teacher.")}},
                                 branch="student")  # fmt: skip


def test_missing_unexpected_and_shape_errors_name_the_keys():
    target = _vit()
    state = dict(_vit().state_dict())
    del state["blocks.2.ls1.gamma"]
    state["blocks.2.attn.qkv.weight_extra"] = torch.zeros(1)
    # the model (16 px, patch 8) has 1 + 2*2 positions; 1 + 10 is no square grid, so it cannot be resampled
    state["pos_embed"] = torch.zeros(1, 11, 32)
    with pytest.raises(StateDictMismatchError) as info:
        load_backbone_state_dict(target, state, source="ckpt.pth")
    message = str(info.value)
    assert "ckpt.pth" in message
    assert "missing keys: blocks.2.ls1.gamma" in message
    assert "unexpected keys: blocks.2.attn.qkv.weight_extra" in message
    assert "shape mismatch keys: pos_embed (1, 11, 32) vs model (1, 5, 32)" in message
    assert info.value.missing == ["blocks.2.ls1.gamma"]


def test_registers_into_plain_model_is_an_error():
    with pytest.raises(StateDictMismatchError, match="unexpected keys: register_tokens"):
        load_backbone_state_dict(_vit(), _vit(num_register_tokens=4).state_dict())


def test_not_a_state_dict():
    with pytest.raises(ValueError, match="Not a state dict"):
        adapt_backbone_state_dict({"optimizer": {"lr": 0.1}})
