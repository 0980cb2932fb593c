import torch

from dinov2.checkpoint import convert_weight_norm_keys
from dinov2.layers import DINOHead


def test_head_structure_and_formula():
    head = DINOHead(in_dim=16, out_dim=10, nlayers=3, hidden_dim=12, bottleneck_dim=6)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(12, 16), (12, 12), (6, 12)]
    x = torch.randn(5, 16)
    hidden = x
    for i, linear in enumerate(linears):
        hidden = hidden @ linear.weight.T + linear.bias
        if i < len(linears) - 1:
            hidden = torch.nn.functional.gelu(hidden)
    unit = hidden / hidden.norm(dim=-1, keepdim=True)
    v = head.last_layer.parametrizations.weight.original1
    prototypes = v / v.norm(dim=1, keepdim=True)  # g fixed at 1: unit-norm prototypes
    torch.testing.assert_close(head(x), unit @ prototypes.T)
    assert head(x).abs().max() <= 1.0 + 1e-5  # cosine similarities


def test_magnitude_is_frozen_at_one_and_direction_trains():
    head = DINOHead(in_dim=8, out_dim=4, nlayers=2, hidden_dim=8, bottleneck_dim=4)
    g = head.last_layer.parametrizations.weight.original0
    assert torch.equal(g, torch.ones(4, 1)) and not g.requires_grad
    head(torch.randn(3, 8)).square().sum().backward()
    assert head.last_layer.parametrizations.weight.original1.grad.abs().sum() > 0
    assert head.last_layer.bias is None
    single = DINOHead(in_dim=8, out_dim=4, nlayers=1, bottleneck_dim=4)
    assert isinstance(single.mlp, torch.nn.Linear)


def test_original_weight_norm_keys_load():
    source = DINOHead(in_dim=8, out_dim=4, nlayers=2, hidden_dim=8, bottleneck_dim=4)
    v = torch.randn(4, 4)
    original = {k: val for k, val in source.state_dict().items() if "last_layer" not in k}
    original.update({"last_layer.weight_g": torch.ones(4, 1), "last_layer.weight_v": v})  # the original's keys
    target = DINOHead(in_dim=8, out_dim=4, nlayers=2, hidden_dim=8, bottleneck_dim=4)
    target.load_state_dict(convert_weight_norm_keys(original), strict=True)
    assert torch.equal(target.last_layer.parametrizations.weight.original1, v)
    x = torch.randn(2, 8)
    expected = torch.nn.functional.normalize(target.mlp(x), dim=-1) @ (v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(target(x), expected)
