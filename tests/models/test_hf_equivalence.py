"""Numerical equivalence with Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel``.

Our backbone gets random (non-trivial) weights in the official DINOv2 layout; a mapping written
here converts them to the transformers layout, and both models must agree to 1e-5 on the CLS,
register and patch tokens and on every intermediate block output.

Position-embedding resampling in the installed transformers (checked in 5.23): both models resize
the stored grid bicubically to an explicit ``size=(H // p, W // p)`` (no ``+0.1`` offset), in
float32; ``Dinov2Model`` uses ``antialias=False`` and ``Dinov2WithRegistersModel`` uses
``antialias=True``. Both skip resampling only when the patch count equals the stored one and
``H == W``. Our models are therefore built with ``interpolate_offset=0`` and the matching
``interpolate_antialias``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

from dinov2.models.vision_transformer import DinoVisionTransformer  # noqa: E402

EMBED_DIM, DEPTH, HEADS, PATCH, IMG = 64, 3, 4, 8, 32
TOL = {"atol": 1e-5, "rtol": 1e-5}
# (height, width): native, larger square, non-square, and a non-square grid with the stored patch count
RESOLUTIONS = [(32, 32), (48, 48), (32, 48), (16, 64)]
BACKENDS = ["math", "sdpa"]


@dataclass(frozen=True)
class Case:
    name: str
    num_register_tokens: int
    ffn_layer: str

    @property
    def swiglu(self) -> bool:
        return self.ffn_layer != "mlp"

    @property
    def antialias(self) -> bool:
        return self.num_register_tokens > 0  # what the HF registers model does


CASES = {
    c.name: c
    for c in (
        Case("plain", 0, "mlp"),
        Case("registers", 4, "mlp"),
        Case("swiglu", 0, "swiglufused"),
    )
}


# ---------------------------------------------------------------------------------------- builders
def build_ours(case: Case, seed: int = 0, **overrides) -> DinoVisionTransformer:
    """Our model with every parameter replaced by seeded random values of O(1) effect."""
    torch.manual_seed(seed)
    kwargs = dict(
        img_size=IMG, patch_size=PATCH, embed_dim=EMBED_DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=4,
        qkv_bias=True, init_values=1e-5, ffn_layer=case.ffn_layer, block_chunks=0,
        num_register_tokens=case.num_register_tokens, interpolate_antialias=case.antialias,
        interpolate_offset=0.0, attn_backend="math",
    )  # fmt: skip
    kwargs.update(overrides)
    model = DinoVisionTransformer(**kwargs).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(".gamma"):  # LayerScale: random magnitudes and signs
                signs = torch.randint(0, 2, p.shape, generator=gen) * 2 - 1
                p.copy_(signs * (0.3 + 0.7 * torch.rand(p.shape, generator=gen)))
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1 + 0.3 * noise)
            elif p.ndim >= 2 and name.endswith(".weight"):  # linear / conv: keep activations O(1)
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:  # cls / register / mask tokens, pos_embed
                p.copy_(noise)
    return model


def to_hf_state_dict(ours: dict[str, torch.Tensor], swiglu: bool) -> dict[str, torch.Tensor]:
    """Official DINOv2 keys -> transformers keys. Fails if any of our keys is left unused."""
    src = dict(ours)
    out = {
        "embeddings.cls_token": src.pop("cls_token"),
        "embeddings.mask_token": src.pop("mask_token"),
        "embeddings.position_embeddings": src.pop("pos_embed"),
        "embeddings.patch_embeddings.projection.weight": src.pop("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.projection.bias": src.pop("patch_embed.proj.bias"),
        "layernorm.weight": src.pop("norm.weight"),
        "layernorm.bias": src.pop("norm.bias"),
    }
    if "register_tokens" in src:
        out["embeddings.register_tokens"] = src.pop("register_tokens")
    depth = len({k.split(".")[1] for k in src if k.startswith("blocks.")})
    for i in range(depth):
        a, b = f"blocks.{i}.", f"encoder.layer.{i}."
        for norm in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                out[f"{b}{norm}.{p}"] = src.pop(f"{a}{norm}.{p}")
        for p in ("weight", "bias"):
            q, k, v = src.pop(f"{a}attn.qkv.{p}").chunk(3, dim=0)
            out[f"{b}attention.q_proj.{p}"] = q
            out[f"{b}attention.k_proj.{p}"] = k
            out[f"{b}attention.v_proj.{p}"] = v
            out[f"{b}attention.o_proj.{p}"] = src.pop(f"{a}attn.proj.{p}")
            if swiglu:
                gate, up = src.pop(f"{a}mlp.w12.{p}").chunk(2, dim=0)  # hidden = silu(gate) * up
                out[f"{b}mlp.gate_proj.{p}"] = gate
                out[f"{b}mlp.up_proj.{p}"] = up
                out[f"{b}mlp.down_proj.{p}"] = src.pop(f"{a}mlp.w3.{p}")
            else:
                out[f"{b}mlp.fc1.{p}"] = src.pop(f"{a}mlp.fc1.{p}")
                out[f"{b}mlp.fc2.{p}"] = src.pop(f"{a}mlp.fc2.{p}")
        out[f"{b}layer_scale1.lambda1"] = src.pop(f"{a}ls1.gamma")
        out[f"{b}layer_scale2.lambda1"] = src.pop(f"{a}ls2.gamma")
    assert not src, f"unmapped keys: {sorted(src)}"
    return out


def build_hf(case: Case, state_dict: dict[str, torch.Tensor]):
    common = dict(
        hidden_size=EMBED_DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=4,
        image_size=IMG, patch_size=PATCH, qkv_bias=True, layer_norm_eps=1e-6, hidden_act="gelu",
        use_swiglu_ffn=case.swiglu, attn_implementation="eager",
    )  # fmt: skip
    if case.num_register_tokens:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=case.num_register_tokens, **common)
        model = transformers.Dinov2WithRegistersModel(config)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    result = model.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


@cache
def model_pair(case_name: str):
    case = CASES[case_name]
    ours = build_ours(case)
    return ours, build_hf(case, to_hf_state_dict(ours.state_dict(), case.swiglu))


def images(height: int, width: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height * 1000 + width))


def run_hf(hf, x: torch.Tensor, mask: torch.Tensor | None = None):
    with torch.no_grad():
        return hf(pixel_values=x, bool_masked_pos=mask, output_hidden_states=True)


# ---------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", RESOLUTIONS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case_name", list(CASES))
def test_forward_features_match(case_name, size, backend):
    ours, hf = model_pair(case_name)
    ours.set_attn_backend(backend)
    x = images(*size)
    r = ours.num_register_tokens
    with torch.no_grad():
        feats = ours.forward_features(x)
    ref = run_hf(hf, x)
    n_patches = (size[0] // PATCH) * (size[1] // PATCH)
    assert feats["x_norm_patchtokens"].shape == (2, n_patches, EMBED_DIM)
    torch.testing.assert_close(feats["x_norm_clstoken"], ref.pooler_output, **TOL)
    torch.testing.assert_close(feats["x_norm_clstoken"], ref.last_hidden_state[:, 0], **TOL)
    torch.testing.assert_close(feats["x_norm_regtokens"], ref.last_hidden_state[:, 1 : 1 + r], **TOL)
    torch.testing.assert_close(feats["x_norm_patchtokens"], ref.last_hidden_state[:, 1 + r :], **TOL)
    torch.testing.assert_close(feats["x_prenorm"], ref.hidden_states[-1], **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", RESOLUTIONS[:3], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case_name", list(CASES))
def test_intermediate_layers_match(case_name, size, backend):
    """Block ``i`` output is HF ``hidden_states[i + 1]`` (index 0 holds the embeddings)."""
    ours, hf = model_pair(case_name)
    ours.set_attn_backend(backend)
    x = images(*size)
    r = ours.num_register_tokens
    ref = run_hf(hf, x)
    assert len(ref.hidden_states) == DEPTH + 1
    with torch.no_grad():
        for norm in (True, False):
            expected = [ref.hidden_states[i + 1] for i in range(DEPTH)]
            if norm:
                expected = [hf.layernorm(h) for h in expected]
            got = ours.get_intermediate_layers(x, n=DEPTH, return_class_token=True, norm=norm)
            assert len(got) == DEPTH
            for (patch, cls), exp in zip(got, expected):
                torch.testing.assert_close(patch, exp[:, 1 + r :], **TOL)
                torch.testing.assert_close(cls, exp[:, 0], **TOL)
            # an explicit, non-contiguous index list (negative index counts from the end)
            picked = ours.get_intermediate_layers(x, n=[0, -1], norm=norm)
            assert len(picked) == 2
            torch.testing.assert_close(picked[0], expected[0][:, 1 + r :], **TOL)
            torch.testing.assert_close(picked[1], expected[-1][:, 1 + r :], **TOL)


@pytest.mark.parametrize("size", [(32, 32), (32, 48)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case_name", list(CASES))
def test_mask_token_matches(case_name, size):
    ours, hf = model_pair(case_name)
    ours.set_attn_backend("sdpa")
    x = images(*size)
    n_patches = (size[0] // PATCH) * (size[1] // PATCH)
    mask = torch.rand(2, n_patches, generator=torch.Generator().manual_seed(7)) < 0.4
    mask[0, 0], mask[1, 0] = True, False  # both values present, and the two images differ
    r = ours.num_register_tokens
    with torch.no_grad():
        feats = ours.forward_features(x, masks=mask)
        unmasked = ours.forward_features(x)
    ref = run_hf(hf, x, mask)
    torch.testing.assert_close(feats["x_norm_clstoken"], ref.pooler_output, **TOL)
    torch.testing.assert_close(feats["x_norm_patchtokens"], ref.last_hidden_state[:, 1 + r :], **TOL)
    # the mask really changed the output, so the comparison above exercised the mask token
    assert (feats["x_norm_clstoken"] - unmasked["x_norm_clstoken"]).abs().max() > 1e-3


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", ["swap_qk", "swap_kv", "swap_gate_up", "offset", "antialias"])
def test_comparison_detects_wrong_conversion(variant):
    """Negative controls: a plausible mapping or interpolation mistake must break the agreement,
    so the random weights and inputs above are discriminative."""
    case = CASES["swiglu" if variant == "swap_gate_up" else "plain"]
    ours = build_ours(case)
    sd = to_hf_state_dict(ours.state_dict(), case.swiglu)
    size = (32, 32)
    if variant in ("swap_qk", "swap_kv", "swap_gate_up"):
        first, second = {"swap_qk": ("q", "k"), "swap_kv": ("k", "v"), "swap_gate_up": ("gate", "up")}[variant]
        module = "mlp" if variant == "swap_gate_up" else "attention"
        for p in ("weight", "bias"):
            key1, key2 = (f"encoder.layer.1.{module}.{n}_proj.{p}" for n in (first, second))
            sd[key1], sd[key2] = sd[key2], sd[key1]
    else:  # our default offset 0.1 / the other antialias setting, away from the native size
        size = (48, 48)
        override = {"interpolate_offset": 0.1} if variant == "offset" else {"interpolate_antialias": not case.antialias}
        ours = build_ours(case, **override)
    hf = build_hf(case, sd)
    x = images(*size)
    with torch.no_grad():
        feats = ours.forward_features(x)
    ref = run_hf(hf, x)
    assert _max_diff(feats["x_norm_patchtokens"], ref.last_hidden_state[:, 1:]) > 1e-3
