import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

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


def _record_loads(monkeypatch, state, head_shape=(1000, 5 * 384)):
    """Stand-in for downloads: records each location and returns ``state`` or a zero head."""
    requested = []

    def fake_load(location):
        requested.append(str(location))
        return {"weight": torch.zeros(head_shape), "bias": torch.zeros(head_shape[0])} if "head" in location else state

    monkeypatch.setattr(backbones, "load_weights_file", fake_load)
    monkeypatch.setattr(classifiers, "load_weights_file", fake_load)
    return requested


BASE_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/"
TINY = {"depth": 1, "img_size": 28}  # a one-block ViT-S/14 on a 2 x 2 grid


def test_backbone_weights_names_follow_the_original(monkeypatch, tmp_path):
    """``Weights.LVD142M`` and ``"LVD142M"`` download the backbone; ``"IMAGENET1K"`` (the heads'
    weight set), the heads' enum, a typo or ``None`` are refused before anything is loaded."""
    requested = _record_loads(monkeypatch, backbones.dinov2_vits14(pretrained=False, **TINY).state_dict())
    for ok in (backbones.Weights.LVD142M, "LVD142M"):
        hubconf.dinov2_vits14(weights=ok, **TINY)
    assert requested == [BASE_URL + "dinov2_vits14_pretrain.pth"] * 2
    monkeypatch.chdir(tmp_path)  # bare words name no file here
    for bad in ("IMAGENET1K", classifiers.ClassifierWeights.IMAGENET1K, "LVD142", "lvd142m", None):
        with pytest.raises(
            ValueError,
            match=r"unsupported weights .*accepted: dinov2\.hub\.backbones\.Weights\.LVD142M \(or 'LVD142M'\)",
        ):
            hubconf.dinov2_vits14(weights=bad, **TINY)
    assert len(requested) == 2
    hubconf.dinov2_vits14(weights="IMAGENET1K", pretrained=False, **TINY)  # nothing to load: not checked
    torch.save(backbones.dinov2_vits14(pretrained=False, **TINY).state_dict(), tmp_path / "IMAGENET1K")
    hubconf.dinov2_vits14(weights="IMAGENET1K", **TINY)  # a file of that name is a path
    hubconf.dinov2_vits14(weights=Path("LVD142"), **TINY)  # a Path object always is
    assert requested[-2:] == ["IMAGENET1K", "LVD142"]


def test_weight_sets_from_another_enum_class_and_unknown_home_dirs(monkeypatch, tmp_path):
    """A member of another ``Weights`` class (the original package's, or this module's before an
    ``importlib.reload``) counts by its value, as the original's hub compares them; one with
    another weight set's value is still refused. A ``~unknown_user`` path is a path (it used to
    raise ``RuntimeError: Could not determine home directory`` from the check)."""
    from enum import Enum

    requested = _record_loads(monkeypatch, backbones.dinov2_vits14(pretrained=False, **TINY).state_dict())
    original = Enum("Weights", {"LVD142M": "LVD142M"})  # a stand-in for the original's enum
    assert original.LVD142M is not backbones.Weights.LVD142M
    hubconf.dinov2_vits14(weights=original.LVD142M, **TINY)
    assert requested == [BASE_URL + "dinov2_vits14_pretrain.pth"]
    with pytest.raises(ValueError, match="unsupported weights <Heads.IMAGENET1K"):
        hubconf.dinov2_vits14(weights=Enum("Heads", {"IMAGENET1K": "IMAGENET1K"}).IMAGENET1K, **TINY)
    monkeypatch.chdir(tmp_path)
    for location in ("~no_such_user_x1/w.pth", "~no_such_user_x1/w"):
        assert backbones.is_weight_set(location, backbones.Weights) is False
    with pytest.raises(ValueError, match="unsupported weights '~no_such_user_x1'"):  # a bare word, no file
        backbones.is_weight_set("~no_such_user_x1", backbones.Weights)


def test_classifier_weights_names_follow_the_original(monkeypatch):
    """The heads take ``classifiers.Weights.IMAGENET1K`` (the original's name) or ``"IMAGENET1K"``;
    the backbone's name for the head, or a head's name for the backbone, is refused up front."""
    state = backbones.dinov2_vits14(pretrained=False, **TINY).state_dict()
    requested = _record_loads(monkeypatch, state, head_shape=(1000, 2 * 384))
    assert classifiers.Weights is classifiers.ClassifierWeights
    for ok in (classifiers.Weights.IMAGENET1K, "IMAGENET1K"):
        hubconf.dinov2_vits14_lc(layers=1, weights=ok, **TINY, num_classes=1000)
    assert requested == [BASE_URL + "dinov2_vits14_pretrain.pth", BASE_URL + "dinov2_vits14_linear_head.pth"] * 2
    head_error = (
        r"unsupported weights .*accepted: dinov2\.hub\.classifiers\.ClassifierWeights\.IMAGENET1K \(or 'IMAGENET1K'\)"
    )
    for bad in ("LVD142M", backbones.Weights.LVD142M, "IMAGENET"):
        with pytest.raises(ValueError, match=head_error):
            hubconf.dinov2_vits14_lc(layers=1, weights=bad, **TINY)
    with pytest.raises(ValueError, match=r"accepted: dinov2\.hub\.backbones\.Weights\.LVD142M"):
        hubconf.dinov2_vits14_lc(layers=1, backbone_weights="IMAGENET1K", **TINY)
    assert len(requested) == 4


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


REPO = Path(__file__).resolve().parents[2]

_TORCH_ONLY = textwrap.dedent(
    """
    import sys

    class Blocked:
        \"\"\"Refuses the packages hubconf does not declare (installed here, absent for hub users).\"\"\"

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("omegaconf", "yaml"):
                raise ImportError(f"blocked for the test: {name}")
            return None

    sys.meta_path.insert(0, Blocked())
    import torch

    model = torch.hub.load(sys.argv[1], "dinov2_vits14_reg", source="local", pretrained=False, img_size=28)
    tokens = model.forward_features(torch.zeros(1, 3, 28, 28))["x_norm_patchtokens"]
    assert tuple(tokens.shape) == (1, 4, 384), tokens.shape
    assert not {"omegaconf", "yaml"} & {m.split(".")[0] for m in sys.modules}
    print("built")
    """
)


def test_hub_load_needs_no_config_packages():
    """``torch.hub.load`` of a backbone imports only what ``hubconf.dependencies`` declares (plus
    what torch itself imports): no omegaconf, no PyYAML."""
    done = subprocess.run([sys.executable, "-c", _TORCH_ONLY, str(REPO)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("built")


def _manual_lc_logits(backbone, head, layers, x):
    """Block-by-block reference: normed CLS of the last ``layers`` blocks and the mean of the last
    block's normed patch tokens (registers excluded), then the linear head."""
    skip = 1 + backbone.num_register_tokens
    tokens = backbone.prepare_tokens_with_masks(x)
    states = []
    for block in backbone.blocks:
        tokens = block(tokens)
        states.append(backbone.norm(tokens))
    features = torch.cat([s[:, 0] for s in states[-layers:]] + [states[-1][:, skip:].mean(dim=1)], dim=1)
    return features @ head["weight"].T + head["bias"]


@pytest.mark.parametrize("layers", [1, 4])
def test_documented_head_recipe_with_a_registers_backbone(tmp_path, layers):
    """``make_dinov2_linear_classifier(arch_name=..., registers=True, backbone_weights=<probed>)``
    builds the register architecture, loads the given backbone and head, and agrees with the
    named entry point and a manual computation."""
    backbone = _randomised(backbones.dinov2_vits14_reg(pretrained=False, img_size=28)).eval()
    torch.save(backbone.state_dict(), tmp_path / "probed_backbone.pth")
    head = {"weight": torch.randn(5, (1 + layers) * 384), "bias": torch.randn(5)}
    torch.save(head, tmp_path / "linear_head_best.pth")
    files = dict(weights=str(tmp_path / "linear_head_best.pth"), backbone_weights=str(tmp_path / "probed_backbone.pth"))
    model = classifiers.make_dinov2_linear_classifier(
        arch_name="vit_small", registers=True, layers=layers, num_classes=5, img_size=28, **files
    ).eval()
    assert model.backbone.num_register_tokens == 4
    assert (model.backbone.interpolate_antialias, model.backbone.interpolate_offset) == (True, 0.0)
    named = hubconf.dinov2_vits14_reg_lc(layers=layers, num_classes=5, img_size=28, **files).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = _manual_lc_logits(backbone, head, layers, x)
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(named(x), expected, atol=1e-4, rtol=1e-4)


def test_generic_classifier_builds_the_released_vitg_layout():
    with torch.device("meta"):
        generic = classifiers.make_dinov2_linear_classifier(arch_name="vit_giant2", layers=1, pretrained=False)
        named = hubconf.dinov2_vitg14_lc(layers=1, pretrained=False)
    got = {k: tuple(v.shape) for k, v in generic.state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in named.state_dict().items()}
    assert got["backbone.blocks.0.mlp.w12.weight"] == (8192, 1536)  # SwiGLU, as released


def test_custom_head_on_the_default_backbone_warns(monkeypatch, tmp_path, caplog):
    """A probed head without ``backbone_weights`` lands on the official backbone: say so."""
    state = backbones.dinov2_vits14(pretrained=False).state_dict()
    requested = []

    def fake_load(location):
        requested.append(str(location))
        return state if "pretrain" in str(location) else {"weight": torch.zeros(3, 768), "bias": torch.zeros(3)}

    monkeypatch.setattr(backbones, "load_weights_file", fake_load)
    monkeypatch.setattr(classifiers, "load_weights_file", fake_load)
    with caplog.at_level("WARNING", logger="dinov2"):
        classifiers.make_dinov2_linear_classifier(arch_name="vit_small", layers=1, weights="head.pth", num_classes=3)
    assert requested[0].endswith("dinov2_vits14_pretrain.pth")
    assert any("backbone_weights=" in record.getMessage() for record in caplog.records)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown arch_name 'vit_huge'; valid architectures: vit_tiny, vit_small"):
        backbones.make_dinov2_model(arch_name="vit_huge", pretrained=False)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"arch_name": "vit_tiny"}, "dinov2_vitt14"),
        ({"arch_name": "vit_small", "patch_size": 16}, "dinov2_vits16"),
        ({"arch_name": "vit_large", "num_register_tokens": 2}, "dinov2_vitl14_reg2"),
    ],
)
def test_official_weights_of_an_unreleased_model_are_refused_before_download(monkeypatch, kwargs, name):
    """Official weights exist for ViT-S/B/L/g with patch 14 and 0 or 4 registers only; another model
    asking for them is a ValueError naming it, not a download of a URL that does not exist."""
    requested = _record_loads(monkeypatch, {})
    with pytest.raises(ValueError, match=rf"no released LVD-142M weights for {name}\b.*pretrained=False"):
        backbones.make_dinov2_model(depth=1, img_size=28, **kwargs)
    with pytest.raises(ValueError, match=rf"no released ImageNet-1k linear head for {name}\b"):
        classifiers.make_dinov2_linear_classifier(layers=1, backbone_weights="backbone.pth", **kwargs)
    assert requested == []
    backbones.make_dinov2_model(depth=1, img_size=28, pretrained=False, **kwargs)  # random weights: fine
