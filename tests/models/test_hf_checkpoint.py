"""Hugging Face Dinov2 checkpoints load into our backbone through the state-dict adapters.

A tiny transformers model gets seeded random weights; its state dict (transformers 5 module
names), its ``save_pretrained`` file (the Hub's ``model.safetensors`` names) and a classification
wrapper's state dict are each adapted and loaded into our backbone, which must then reproduce
the transformers model's outputs. The opposite direction (our weights into transformers) is
``test_hf_equivalence.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

from dinov2.checkpoint import load_backbone_state_dict, load_weights_file  # noqa: E402
from dinov2.models import DinoVisionTransformer  # noqa: E402

EMBED_DIM, DEPTH, HEADS, PATCH, IMG = 32, 2, 2, 8, 32
TOL = {"atol": 1e-5, "rtol": 1e-5}
CASES = {  # name: (registers, SwiGLU FFN)
    "plain": (0, False),
    "registers": (4, False),
    "swiglu": (0, True),
}


def _hf_config(registers: int, swiglu: bool, **extra):
    common = dict(
        hidden_size=EMBED_DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=4,
        image_size=IMG, patch_size=PATCH, qkv_bias=True, layer_norm_eps=1e-6, hidden_act="gelu",
        use_swiglu_ffn=swiglu, attn_implementation="eager", **extra,
    )  # fmt: skip
    if registers:
        return transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
    return transformers.Dinov2Config(**common)


def _randomise_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter O(1) and distinct, so a wrongly mapped tensor changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2 and name.endswith(".weight"):
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1 + 0.3 * noise)
            elif name.endswith(".bias") or name.endswith(".lambda1"):
                p.copy_(0.3 * noise)
            else:  # cls / register / mask tokens, position embeddings
                p.copy_(noise)


def _hf_model(case: str):
    registers, swiglu = CASES[case]
    config = _hf_config(registers, swiglu)
    model = transformers.Dinov2WithRegistersModel(config) if registers else transformers.Dinov2Model(config)
    _randomise_(model)
    return model.eval()


def _ours(case: str, **overrides) -> DinoVisionTransformer:
    registers, swiglu = CASES[case]
    kwargs = dict(
        img_size=IMG, patch_size=PATCH, embed_dim=EMBED_DIM, depth=DEPTH, num_heads=HEADS, init_values=1.0,
        ffn_layer="swiglufused" if swiglu else "mlp", block_chunks=0, num_register_tokens=registers,
        # transformers' resampling: explicit output size (no offset), antialiased for the registers model
        interpolate_offset=0.0, interpolate_antialias=registers > 0, attn_backend="math",
    )  # fmt: skip
    kwargs.update(overrides)
    return DinoVisionTransformer(**kwargs).eval()


def _assert_same_outputs(ours: DinoVisionTransformer, hf_backbone, sizes=((IMG, IMG), (48, 32))) -> None:
    r = ours.num_register_tokens
    for height, width in sizes:
        x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height + width))
        with torch.no_grad():
            feats = ours.forward_features(x)
            ref = hf_backbone(pixel_values=x)
        torch.testing.assert_close(feats["x_norm_clstoken"], ref.pooler_output, **TOL)
        torch.testing.assert_close(feats["x_norm_regtokens"], ref.last_hidden_state[:, 1 : 1 + r], **TOL)
        torch.testing.assert_close(feats["x_norm_patchtokens"], ref.last_hidden_state[:, 1 + r :], **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_state_dict_loads_and_matches(case):
    hf = _hf_model(case)
    state = hf.state_dict()
    assert any(".attention.q_proj." in k for k in state)  # transformers 5 module names
    ours = _ours(case)
    report = load_backbone_state_dict(ours, state, source="transformers state_dict")
    assert report.hugging_face
    _assert_same_outputs(ours, hf)


@pytest.mark.parametrize("case", list(CASES))
def test_hub_file_layout_loads_and_matches(case, tmp_path: Path):
    """``save_pretrained`` writes the Hub's names (``attention.attention.query``, ``mlp.weights_in``)."""
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path)
    state = load_weights_file(str(tmp_path / "model.safetensors"))
    assert any(".attention.attention.query." in k for k in state)
    ours = _ours(case)
    report = load_backbone_state_dict(ours, state, source="model.safetensors")
    assert report.hugging_face
    _assert_same_outputs(ours, hf)


@pytest.mark.parametrize("case", ["plain", "registers"])
def test_classification_wrapper_loads_its_backbone(case):
    registers, swiglu = CASES[case]
    config = _hf_config(registers, swiglu, num_labels=3)
    wrapper_cls = (
        transformers.Dinov2WithRegistersForImageClassification
        if registers
        else transformers.Dinov2ForImageClassification
    )
    wrapper = wrapper_cls(config)
    _randomise_(wrapper)
    wrapper.eval()
    ours = _ours(case)
    report = load_backbone_state_dict(ours, wrapper.state_dict())
    prefix = "dinov2_with_registers." if registers else "dinov2."
    assert report.hugging_face and prefix in report.stripped_prefixes
    assert sorted(report.set_aside) == ["classifier.bias", "classifier.weight"]
    backbone = wrapper.dinov2_with_registers if registers else wrapper.dinov2
    _assert_same_outputs(ours, backbone, sizes=((IMG, IMG),))


def test_hf_checkpoint_into_chunked_backbone():
    hf = _hf_model("plain")
    ours = _ours("plain", block_chunks=2)
    report = load_backbone_state_dict(ours, hf.state_dict())
    assert report.hugging_face and report.rechunked
    _assert_same_outputs(ours, hf, sizes=((IMG, IMG),))
