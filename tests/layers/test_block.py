import pytest
import torch

from dinov2.layers import Block, DropPath, LayerScale, Mlp, SwiGLUFFN
from dinov2.layers.block import SUBSET_DROP_PATH_THRESHOLD
from dinov2.ops import index_add_residual, sample_keep_subset


def _block(drop_path=0.0, **kwargs):
    return Block(dim=32, num_heads=4, qkv_bias=True, init_values=0.5, drop_path=drop_path, **kwargs)


def _groups():
    return [torch.randn(3, 17, 32, requires_grad=True), torch.randn(5, 5, 32, requires_grad=True)]


@pytest.mark.parametrize("backend", ["math", "sdpa", "varlen"])
def test_nested_block_equals_separate_groups_forward_and_grad(backend):
    block = _block(attn_backend=backend).eval()
    xs = _groups()
    nested = block(xs)
    separate = [block(x) for x in xs]
    for a, b in zip(nested, separate):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    grads_nested = torch.autograd.grad(sum((o**2).sum() for o in nested), [*xs, *block.parameters()])
    grads_separate = torch.autograd.grad(sum((o**2).sum() for o in separate), [*xs, *block.parameters()])
    for a, b in zip(grads_nested, grads_separate):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_index_add_residual_touches_only_selected_rows():
    x = torch.randn(6, 4, 8)
    indices = torch.tensor([4, 1])
    residual = torch.randn(2, 4, 8)
    out = index_add_residual(x, indices, residual, scale=3.0)
    for row in range(6):
        expected = x[row] + 3.0 * residual[(indices == row).nonzero()[0, 0]] if row in (1, 4) else x[row]
        torch.testing.assert_close(out[row], expected)


def test_index_add_residual_in_place_updates_x_itself_with_the_same_values():
    x = torch.randn(6, 4, 8)
    indices, residual = torch.tensor([5, 0, 2]), torch.randn(3, 4, 8)
    expected = index_add_residual(x, indices, residual, scale=1.5)
    target = x.clone()
    out = index_add_residual(target, indices, residual, scale=1.5, inplace=True)
    assert out.data_ptr() == target.data_ptr()  # no copy of x
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(target, expected)


class _PassThrough(torch.autograd.Function):
    """What FSDP2 does to a sharded module's inputs (RegisterPostBackwardFunction): a custom autograd
    function that returns them unchanged. Autograd forbids modifying such outputs in place."""

    @staticmethod
    def forward(ctx, *tensors):
        return tensors

    @staticmethod
    def backward(ctx, *grads):
        return grads


@pytest.mark.parametrize("checkpointing", ["off", "selective"])
def test_stochastic_depth_never_writes_into_the_block_inputs(checkpointing):
    """Training with subset stochastic depth: the inputs keep their values and version, and inputs
    that came out of a custom autograd function (as under FSDP2) give the same outputs and gradients."""
    block = _block(drop_path=0.5).train()
    block.checkpointing = checkpointing
    leaves = _groups()

    def run(wrap: bool):
        torch.manual_seed(3)
        xs = [leaf * 1.0 for leaf in leaves]  # non-leaf inputs, as inside the ViT
        xs = list(_PassThrough.apply(*xs)) if wrap else xs
        before = [(x._version, x.detach().clone()) for x in xs]
        outs = block(xs)
        for x, (version, values) in zip(xs, before):
            assert x._version == version and torch.equal(x.detach(), values)
        grads = torch.autograd.grad(sum((o**2).sum() for o in outs), [*leaves, *block.parameters()])
        return outs, grads

    plain_out, plain_grads = run(wrap=False)
    wrapped_out, wrapped_grads = run(wrap=True)  # raised "a view ... modified inplace" before the fix
    for a, b in zip([*plain_out, *plain_grads], [*wrapped_out, *wrapped_grads]):
        torch.testing.assert_close(a, b)


def test_keep_subset_size_and_scale():
    indices, scale = sample_keep_subset(10, 0.4, torch.device("cpu"))
    assert len(indices) == 6 and len(set(indices.tolist())) == 6
    assert scale == pytest.approx(10 / 6)
    indices, scale = sample_keep_subset(3, 0.9, torch.device("cpu"))  # never an empty subset
    assert len(indices) == 1 and scale == 3.0


def test_subset_stochastic_depth_computes_only_kept_samples_and_keeps_dropped_unchanged():
    block = _block(drop_path=0.5).train()
    seen = []
    block.attn.qkv.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    x = torch.randn(8, 5, 32)
    out = block._add_residual_on_subsets([x], block._attn_branch)[0]
    assert seen == [4 * 5]  # 4 of 8 samples, 5 tokens each
    changed = (out - x).abs().flatten(1).amax(dim=1) > 0
    assert changed.sum() == 4

    # Nested groups: each group gets its own subset.
    seen.clear()
    block([torch.randn(8, 5, 32), torch.randn(4, 3, 32)])
    assert seen == [4 * 5 + 2 * 3]


def test_subset_stochastic_depth_is_unbiased():
    block = _block(drop_path=0.5).train()
    x = torch.randn(4, 3, 32)

    def branch(flat, shapes):  # a cheap per-token residual function stands in for attention
        return torch.tanh(flat) + 1.0

    expected = x + branch(x, None)
    draws = torch.stack([block._add_residual_on_subsets([x], branch)[0] for _ in range(4000)])
    # Each sample's branch is kept with probability 1/2 and scaled by 2: the mean tends to x + f(x).
    assert (draws.mean(0) - expected).abs().mean() < 0.05 * (expected - x).abs().mean()


def test_small_drop_rate_uses_per_sample_mask_and_eval_is_deterministic():
    assert SUBSET_DROP_PATH_THRESHOLD == 0.1
    block = _block(drop_path=0.05)
    seen = []
    block.attn.qkv.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    block.train()(torch.randn(8, 5, 32))
    assert seen == [40]  # all samples computed
    block.eval()
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(block(x), block(x))


def test_drop_path_zeroes_whole_samples_and_rescales():
    module = DropPath(0.5).train()
    out = module(torch.ones(1000, 3))
    per_sample = out[:, 0]
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (out == out[:, :1]).all()
    assert 0.4 < (per_sample > 0).float().mean() < 0.6
    assert torch.equal(module.eval()(torch.ones(4, 3)), torch.ones(4, 3))


def test_swiglu_hidden_width_and_formula():
    ffn = SwiGLUFFN(in_features=1536, hidden_features=4 * 1536)
    assert ffn.w12.weight.shape == (2 * 4096, 1536) and ffn.w3.weight.shape == (1536, 4096)
    small = SwiGLUFFN(in_features=8, hidden_features=24)
    x = torch.randn(2, 8)
    hidden = small.w12.weight.shape[0] // 2
    a = x @ small.w12.weight[:hidden].T + small.w12.bias[:hidden]
    b = x @ small.w12.weight[hidden:].T + small.w12.bias[hidden:]
    expected = (a * torch.sigmoid(a) * b) @ small.w3.weight.T + small.w3.bias
    torch.testing.assert_close(small(x), expected)


def test_mlp_and_layerscale():
    mlp = Mlp(8, 16)
    x = torch.randn(3, 8)
    expected = torch.nn.functional.gelu(x @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), expected)
    ls = LayerScale(8, init_values=0.25)
    torch.testing.assert_close(ls(x), x * 0.25)


@pytest.mark.parametrize("drop_path", [0.05, 0.5])  # per-sample mask, and the subset path
def test_stochastic_depth_is_a_no_op_in_eval(drop_path):
    """In eval a block with stochastic depth computes every sample's branches unscaled: it equals
    the same weights without stochastic depth, for a tensor and for nested groups."""
    torch.manual_seed(0)
    dropping = _block(drop_path=drop_path).eval()
    plain = _block(drop_path=0.0).eval()
    plain.load_state_dict(dropping.state_dict())
    xs = [torch.randn(4, 6, 32), torch.randn(8, 3, 32)]
    torch.testing.assert_close(dropping(xs[0]), plain(xs[0]), rtol=0, atol=0)
    for got, want in zip(dropping(xs), plain(xs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
