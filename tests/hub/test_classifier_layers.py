"""Hub linear classifiers on a number of blocks other than the released 1 and 4.

The linear probe (``--n-last-blocks n``, any n up to the depth) writes ``linear_head_best.pth`` with
``(1 + n) * D`` inputs and docs/evaluation.md loads it with ``make_dinov2_linear_classifier(layers=n)``.
"""

import pytest
import torch

from dinov2.hub import backbones, classifiers

SMALL = {"depth": 3, "img_size": 28}  # a 3-block ViT-S/14 on a 2 x 2 patch grid


def _reference_logits(backbone, head, layers, x):
    """Block by block: final-normed CLS of the last ``layers`` blocks, then the mean of the last
    block's normed patch tokens, then the affine head."""
    tokens = backbone.prepare_tokens_with_masks(x)
    normed = []
    for block in backbone.iter_blocks():
        tokens = block(tokens)
        normed.append(torch.nn.functional.layer_norm(tokens, (tokens.shape[-1],), backbone.norm.weight,
                                                     backbone.norm.bias, eps=1e-6))  # fmt: skip
    cls = [state[:, 0] for state in normed[-layers:]]
    patches = normed[-1][:, 1 + backbone.num_register_tokens :]
    features = torch.cat(cls + [patches.sum(dim=1) / patches.shape[1]], dim=1)
    return features @ head["weight"].T + head["bias"]


@pytest.mark.parametrize("layers", [2, 3])
def test_probe_head_on_other_block_counts_loads_and_matches(tmp_path, layers):
    torch.manual_seed(0)
    backbone = backbones.dinov2_vits14(pretrained=False, **SMALL).eval()
    with torch.no_grad():
        for p in backbone.parameters():
            p.normal_(std=0.2)
    torch.save(backbone.state_dict(), tmp_path / "probed_backbone.pth")
    head = {"weight": torch.randn(5, (1 + layers) * 384), "bias": torch.randn(5)}
    torch.save(head, tmp_path / "linear_head_best.pth")
    model = classifiers.make_dinov2_linear_classifier(
        arch_name="vit_small", layers=layers, num_classes=5, weights=str(tmp_path / "linear_head_best.pth"),
        backbone_weights=str(tmp_path / "probed_backbone.pth"), **SMALL,
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_logits(backbone, head, layers, x), atol=1e-4, rtol=1e-4)


def test_official_head_with_unreleased_layers_fails_before_any_download(monkeypatch):
    def no_download(location):
        raise AssertionError(f"downloaded {location} before checking layers")

    monkeypatch.setattr(backbones, "load_weights_file", no_download)
    monkeypatch.setattr(classifiers, "load_weights_file", no_download)
    with pytest.raises(ValueError, match="layers 1 or 4"):
        classifiers.dinov2_vits14_lc(layers=2)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="positive int"):
            classifiers.dinov2_vits14_lc(layers=bad)


def test_more_layers_than_blocks_is_refused():
    with pytest.raises(ValueError, match="depth"):
        classifiers.make_dinov2_linear_classifier(arch_name="vit_small", layers=4, pretrained=False, **SMALL)
