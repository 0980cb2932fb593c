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
    prototypes = v / v.norm(dim=1, keepdim=True)  # g starts at 1: unit-norm prototypes
    torch.testing.assert_close(head(x), unit @ prototypes.T)
    assert head(x).abs().max() <= 1.0 + 1e-5  # cosine similarities


def test_magnitude_starts_at_one_and_trains_with_the_direction():
    # As the original's weight_g (DINOv2 trains it; DINO v1's norm_last_layer froze it).
    head = DINOHead(in_dim=8, out_dim=4, nlayers=2, hidden_dim=8, bottleneck_dim=4)
    g = head.last_layer.parametrizations.weight.original0
    assert torch.equal(g, torch.ones(4, 1)) and g.requires_grad
    x = torch.randn(3, 8)
    head(x).square().sum().backward()
    assert head.last_layer.parametrizations.weight.original1.grad.abs().sum() > 0
    # d/dg_k of sum(scores^2), scores_k = g_k * cos_k: 2 * sum_rows(g_k * cos_k^2) = 2 * sum_rows(cos_k^2) at g = 1
    with torch.no_grad():
        cos = head(x)  # g = 1: the scores are the cosines
    torch.testing.assert_close(g.grad.squeeze(1), 2 * cos.square().sum(0))
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
