import pytest
import torch

from dinov2.checkpoint import StateDictMismatchError, adapt_backbone_state_dict, load_backbone_state_dict
from dinov2.checkpoint.adapters import branch_state_dict, convert_weight_norm_keys, strip_wrapper_segments
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


# ------------------------------------------------------------------ branch containers
@pytest.mark.parametrize("stored, requested", [("teacher", "student"), ("student", "teacher")])
def test_other_branch_container_is_an_error_not_a_substitute(stored, requested):
    checkpoint = {stored: {f"backbone.{k}": v for k, v in _vit().state_dict().items()}, "iteration": 3}
    with pytest.raises(ValueError) as info:
        load_backbone_state_dict(_vit(), checkpoint, branch=requested)
    message = str(info.value)
    assert f"branch={requested!r}" in message and f"only a {stored!r} state dict" in message
    assert "'iteration'" in message  # the keys present are listed


def test_teacher_and_student_containers_pick_the_requested_one():
    teacher, student, target = _vit(), _vit(), _vit()
    checkpoint = {
        "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()},
        "student": {f"backbone.{k}": v for k, v in student.state_dict().items()},
    }
    report = load_backbone_state_dict(target, checkpoint, branch="student")
    assert report.container == "student"
    _assert_same_weights(student, target)
    report = load_backbone_state_dict(target, checkpoint)
    assert report.container == "teacher"
    _assert_same_weights(teacher, target)
    load_backbone_state_dict(target, {"student": checkpoint["student"]}, branch="student")
    _assert_same_weights(student, target)


# ------------------------------------------------------------------ Hugging Face names
def _hf_names(state, hub_layout: bool, prefix: str = ""):
    """Rename our (published-layout) keys to Hugging Face Dinov2 names, independently of the adapter:
    the Hub's file layout (``attention.attention.query``, ``mlp.weights_in``) or transformers 5's
    module names (``attention.q_proj``, ``mlp.gate_proj`` / ``mlp.up_proj``)."""
    root = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
            "pos_embed": "embeddings.position_embeddings", "register_tokens": "embeddings.register_tokens",
            "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
            "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
            "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}  # fmt: skip
    attn = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
    if not hub_layout:
        attn = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
    out = {}
    for key, value in state.items():
        if key in root:
            out[root[key]] = value
            continue
        _, index, *module, leaf = key.split(".")
        module, layer = ".".join(module), f"encoder.layer.{index}."
        if module == "attn.qkv":
            for name, piece in zip(attn, value.chunk(3)):
                out[f"{layer}{name}.{leaf}"] = piece
        elif module == "mlp.w12" and not hub_layout:
            for name, piece in zip(("mlp.gate_proj", "mlp.up_proj"), value.chunk(2)):
                out[f"{layer}{name}.{leaf}"] = piece
        else:
            renamed = {"attn.proj": "attention.output.dense" if hub_layout else "attention.o_proj",
                       "ls1": "layer_scale1", "ls2": "layer_scale2", "mlp.w12": "mlp.weights_in",
                       "mlp.w3": "mlp.weights_out" if hub_layout else "mlp.down_proj"}.get(module, module)  # fmt: skip
            out[f"{layer}{renamed}.{'lambda1' if leaf == 'gamma' else leaf}"] = value
    return {prefix + k: v for k, v in out.items()}


@pytest.mark.parametrize("hub_layout", [True, False], ids=["hub_file", "transformers5"])
@pytest.mark.parametrize("overrides", [{}, {"num_register_tokens": 2}, {"ffn_layer": "swiglufused"}],
                         ids=["plain", "registers", "swiglu"])  # fmt: skip
def test_hugging_face_names_load(hub_layout, overrides):
    source, target = _vit(**overrides), _vit(**overrides)
    hf_state = _hf_names(source.state_dict(), hub_layout)
    assert not any(k in source.state_dict() for k in hf_state)  # really renamed
    report = load_backbone_state_dict(target, hf_state)
    assert report.hugging_face
    _assert_same_weights(source, target)


def test_hugging_face_wrapper_prefix_sets_the_classifier_aside():
    source, target = _vit(), _vit()
    state = _hf_names(source.state_dict(), hub_layout=True, prefix="dinov2.")
    state.update({"classifier.weight": torch.zeros(3, 32), "classifier.bias": torch.zeros(3)})
    report = load_backbone_state_dict(target, state)
    assert report.hugging_face and "dinov2." in report.stripped_prefixes
    assert sorted(report.set_aside) == ["classifier.bias", "classifier.weight"]
    _assert_same_weights(source, target)


def test_hugging_face_incomplete_or_unknown_keys_are_errors():
    state = _hf_names(_vit().state_dict(), hub_layout=True)
    partial = dict(state)
    del partial["encoder.layer.1.attention.attention.value.weight"]
    with pytest.raises(ValueError, match="encoder.layer.1.attention.attention.query.weight"):
        load_backbone_state_dict(_vit(), partial)
    state["encoder.layer.0.attention.attention.rel_pos.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError, match="unexpected keys: encoder.layer.0.attention.attention.rel_pos"):
        load_backbone_state_dict(_vit(), state)


def test_flat_state_dict_with_a_non_tensor_entry_names_it():
    """A state dict saved with an extra counter next to the tensors is refused with the entry named,
    not described as having no tensors."""
    state = {**_vit().state_dict(), "epoch": 3}
    with pytest.raises(ValueError, match=r"Not a state dict.*entries that are not tensors: 'epoch' \(int\)") as info:
        adapt_backbone_state_dict(state, _vit())
    assert "blocks.0" not in str(info.value)  # the tensor keys are not what is wrong


def test_two_copies_of_one_parameter_under_wrapper_names_are_an_error_naming_both():
    state = dict(_vit().state_dict())
    state["module.pos_embed"] = state["pos_embed"] + 1  # a second, different copy: neither may win silently
    with pytest.raises(ValueError, match=r"'pos_embed' and 'module.pos_embed' both become 'pos_embed'"):
        adapt_backbone_state_dict(state, _vit())
    whole = {f"teacher.{k}": v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"'teacher.pos_embed' and 'teacher.module.pos_embed'"):
        branch_state_dict(whole, "teacher")


# ----------------------------------------------------------------------------- found by a mutation audit
def test_wrapper_segments_are_whole_name_segments():
    assert strip_wrapper_segments("module._orig_mod.blocks.0.attn.qkv.weight") == "blocks.0.attn.qkv.weight"
    assert strip_wrapper_segments("head.module.weight") == "head.weight"
    # a name that only ends in "module" is a module of its own, not a wrapper
    assert strip_wrapper_segments("head.submodule.weight") == "head.submodule.weight"
    assert strip_wrapper_segments("my_orig_mod.weight") == "my_orig_mod.weight"


def test_a_mismatch_message_lists_twelve_keys_and_counts_the_rest():
    missing = [f"k{i:02d}" for i in range(20)]
    message = str(StateDictMismatchError(missing, [], [], "w.pth"))
    assert message.startswith("checkpoint w.pth does not match the model:")
    assert "missing keys: " + ", ".join(missing[:12]) + ", ... (20 in all)" in message
    assert "k12" not in message


def test_an_empty_state_dict_or_container_is_not_a_state_dict():
    with pytest.raises(ValueError, match="Not a state dict"):
        adapt_backbone_state_dict({})
    # an empty teacher container beside a whole model's state dict: the model's teacher is loaded
    source, target = _vit(), _vit()
    model = {f"teacher.backbone.{k}": v for k, v in source.state_dict().items()}
    report = load_backbone_state_dict(target, {"teacher": {}, "model": model})
    assert report.container == "model"
    _assert_same_weights(source, target)


def test_an_unknown_branch_is_refused_even_for_a_branchless_file():
    with pytest.raises(ValueError, match=r"branch must be one of \('teacher', 'student'\), got 'ema'"):
        adapt_backbone_state_dict(_vit().state_dict(), branch="ema")
    with pytest.raises(ValueError, match="got 'ema'"):
        branch_state_dict(_vit().state_dict(), branch="ema")


def test_branch_state_dict_takes_the_branch_container_over_a_whole_model():
    a, b, c = torch.ones(2), torch.zeros(2), torch.full((2,), 5.0)
    export = {"teacher": {"backbone.w": a}, "student": {"backbone.w": b}, "model": {"teacher.backbone.w": c}}
    assert torch.equal(branch_state_dict(export, "teacher")["backbone.w"], a)
    assert torch.equal(branch_state_dict(export, "student")["backbone.w"], b)
    assert torch.equal(branch_state_dict({"model": {"teacher.backbone.w": c}}, "teacher")["backbone.w"], c)


def test_hugging_face_keys_that_map_to_one_tensor_twice_are_errors():
    state = _hf_names(_vit().state_dict(), hub_layout=True)
    both = dict(state)  # the same layer's q/k/v in the Hub file's and in transformers 5's names
    for name in ("q", "k", "v"):
        both[f"encoder.layer.0.attention.{name}_proj.weight"] = torch.zeros(32, 32)
    with pytest.raises(ValueError, match=r"both map to 'blocks\.0\.attn\.qkv\.weight'"):
        load_backbone_state_dict(_vit(), both)
    ours_too = dict(state, **{"blocks.0.attn.qkv.weight": torch.zeros(96, 32)})  # an HF key and one of ours
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv\.weight' and another key both map to"):
        load_backbone_state_dict(_vit(), ours_too)


def test_a_position_grid_that_differs_because_the_patch_size_does_is_reported_not_resampled():
    # patch 8 -> 4 on 16 px: 2x2 -> 4x4 grid; resampling pos_embed would hide the cause in the report
    with pytest.raises(StateDictMismatchError) as error:
        load_backbone_state_dict(_vit(patch_size=4), _vit().state_dict())
    mismatched = " ".join(error.value.mismatched)
    assert "pos_embed (1, 5, 32) vs model (1, 17, 32)" in mismatched and "patch_embed.proj.weight" in mismatched


def test_a_resampled_half_precision_position_grid_keeps_its_dtype():
    state = {k: v.half() for k, v in _vit().state_dict().items()}
    adapted, report = adapt_backbone_state_dict(state, _vit(img_size=24))
    assert report.pos_embed_grid == (2, 3) and adapted["pos_embed"].shape == (1, 10, 32)
    assert adapted["pos_embed"].dtype == torch.float16


def test_a_top_level_weight_norm_key_is_renamed_without_a_leading_dot():
    renamed = convert_weight_norm_keys({"weight_g": torch.ones(1), "last_layer.weight_v": torch.ones(1)})
    assert set(renamed) == {"parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"}


def test_a_transposed_tensor_of_the_right_size_is_a_shape_mismatch():
    state = _vit().state_dict()
    state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"].t()  # 128 x 32 stored as 32 x 128
    with pytest.raises(StateDictMismatchError, match=r"blocks\.0\.mlp\.fc1\.weight \(32, 128\) vs model \(128, 32\)"):
        load_backbone_state_dict(_vit(), state)
