import pickle

import pytest
import torch
from safetensors.torch import save_file

import hubconf
from dinov2.checkpoint import StateDictMismatchError, load_weights_file
from dinov2.hub import backbones, classifiers

# Published layout of the released backbones: (width, depth, MLP keys -> shapes).
RELEASED = {
    "vits14": (384, 12, "mlp"),
    "vitb14": (768, 12, "mlp"),
    "vitl14": (1024, 24, "mlp"),
    "vitg14": (1536, 40, "swiglu"),
}
PUBLISHED_PARAMS_M = {"vits14": 21, "vitb14": 86, "vitl14": 300, "vitg14": 1100}


def _expected_layout(width, depth, ffn, registers):
    shapes = {
        "cls_token": (1, 1, width),
        "pos_embed": (1, 1 + 37 * 37, width),
        "mask_token": (1, width),
        "patch_embed.proj.weight": (width, 3, 14, 14),
        "patch_embed.proj.bias": (width,),
        "norm.weight": (width,),
        "norm.bias": (width,),
    }
    if registers:
        shapes["register_tokens"] = (1, registers, width)
    if ffn == "mlp":
        mlp = {"mlp.fc1.weight": (4 * width, width), "mlp.fc1.bias": (4 * width,),
               "mlp.fc2.weight": (width, 4 * width), "mlp.fc2.bias": (width,)}  # fmt: skip
    else:
        mlp = {"mlp.w12.weight": (8192, width), "mlp.w12.bias": (8192,),
               "mlp.w3.weight": (width, 4096), "mlp.w3.bias": (width,)}  # fmt: skip
    block = {
        "norm1.weight": (width,), "norm1.bias": (width,),
        "attn.qkv.weight": (3 * width, width), "attn.qkv.bias": (3 * width,),
        "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
        "ls1.gamma": (width,), "norm2.weight": (width,), "norm2.bias": (width,), "ls2.gamma": (width,), **mlp,
    }  # fmt: skip
    for i in range(depth):
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return shapes


@pytest.mark.parametrize("name", sorted(RELEASED))
@pytest.mark.parametrize("reg", [False, True])
def test_released_key_layout(name, reg):
    width, depth, ffn = RELEASED[name]
    entry = getattr(hubconf, f"dinov2_{name}{'_reg' if reg else ''}")
    with torch.device("meta"):
        model = entry(pretrained=False)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _expected_layout(width, depth, ffn, 4 if reg else 0)
    params_m = sum(v.numel() for v in model.state_dict().values()) / 1e6
    assert abs(params_m - PUBLISHED_PARAMS_M[name]) / PUBLISHED_PARAMS_M[name] < 0.06
    assert (model.interpolate_offset, model.interpolate_antialias) == ((0.0, True) if reg else (0.1, False))


def _randomised(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def test_load_pth_and_safetensors_and_training_layout(tmp_path):
    source = _randomised(backbones.dinov2_vits14(pretrained=False))
    state = source.state_dict()
    torch.save(state, tmp_path / "backbone.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "backbone.safetensors")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}}, tmp_path / "teacher_checkpoint.pth")
    for filename in ("backbone.pth", "backbone.safetensors", "teacher_checkpoint.pth"):
        loaded = hubconf.dinov2_vits14(weights=str(tmp_path / filename))
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, state[key]), (filename, key)


def test_wrong_arch_weights_fail_loudly(tmp_path):
    torch.save(backbones.dinov2_vits14_reg(pretrained=False).state_dict(), tmp_path / "reg.pth")
    with pytest.raises(StateDictMismatchError, match="unexpected keys: register_tokens"):
        hubconf.dinov2_vits14(weights=str(tmp_path / "reg.pth"))
    with pytest.raises(FileNotFoundError, match="weights file not found: .*nothing.pth"):
        hubconf.dinov2_vits14(weights=str(tmp_path / "nothing.pth"))


class _Payload:
    ran = False

    def __reduce__(self):
        return (_Payload._run, ())

    @staticmethod
    def _run():
        _Payload.ran = True
        return "payload"


def test_pickled_code_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(1), "extra": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        load_weights_file(tmp_path / "evil.pth")
    assert not _Payload.ran


def test_official_urls(monkeypatch):
    requested = []

    def fake_load(location):
        requested.append(location)
        return {"weight": torch.zeros(1000, 5 * 384), "bias": torch.zeros(1000)} if "head" in location else state

    state = backbones.dinov2_vits14_reg(pretrained=False).state_dict()
    monkeypatch.setattr(backbones, "load_weights_file", fake_load)
    monkeypatch.setattr(classifiers, "load_weights_file", fake_load)
    hubconf.dinov2_vits14_reg()
    hubconf.dinov2_vits14_reg_lc(layers=4)
    base = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/"
    assert requested == [
        base + "dinov2_vits14_reg4_pretrain.pth",
        base + "dinov2_vits14_reg4_pretrain.pth",
        base + "dinov2_vits14_reg4_linear4_head.pth",
    ]
    assert classifiers.linear_head_url("vit_giant2", 14, 0, 1).endswith("dinov2_vitg14/dinov2_vitg14_linear_head.pth")


@pytest.mark.parametrize("layers", [1, 4])
def test_linear_classifier_matches_manual_computation(tmp_path, layers):
    backbone = _randomised(backbones.dinov2_vits14(pretrained=False))
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    head = {"weight": torch.randn(7, (1 + layers) * 384), "bias": torch.randn(7)}
    torch.save(head, tmp_path / "head.pth")
    model = hubconf.dinov2_vits14_lc(
        layers=layers,
        weights=str(tmp_path / "head.pth"),
        backbone_weights=str(tmp_path / "backbone.pth"),
        num_classes=7,
    ).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = backbone.prepare_tokens_with_masks(x)
        states = []
        for block in backbone.blocks:
            tokens = block(tokens)
            states.append(backbone.norm(tokens))
        features = torch.cat([s[:, 0] for s in states[-layers:]] + [states[-1][:, 1:].mean(dim=1)], dim=1)
        torch.testing.assert_close(model(x), features @ head["weight"].T + head["bias"], atol=1e-4, rtol=1e-4)
    torch.save({"weight": torch.randn(7, 3 * 384), "bias": torch.randn(7)}, tmp_path / "bad_head.pth")
    with pytest.raises(StateDictMismatchError, match="weight"):
        hubconf.dinov2_vits14_lc(layers=layers, weights=str(tmp_path / "bad_head.pth"), pretrained=True,
                                 backbone_weights=str(tmp_path / "backbone.pth"), num_classes=7)  # fmt: skip


def test_hubconf_exports():
    names = [f"dinov2_vit{s}14{r}{lc}" for s in "sblg" for r in ("", "_reg") for lc in ("", "_lc")]
    for name in names:
        assert callable(getattr(hubconf, name)), name
    assert hubconf.dependencies == ["torch"]
