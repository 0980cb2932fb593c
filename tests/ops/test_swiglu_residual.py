"""Fused SwiGLU (native and xFormers) and the index_add residual of stochastic depth."""

import pytest
import torch
import torch.nn.functional as F

from dinov2.layers import Block, SwiGLUFFN, SwiGLUFFNFused
from dinov2.ops.residual import index_add_residual
from dinov2.ops.swiglu import silu_mul, swiglu


def _reference_swiglu(x, w12, b12, w3, b3):
    """Written out with the three separate weights, in float64."""
    x, w12, b12, w3, b3 = (t.double() for t in (x, w12, b12, w3, b3))
    hidden = w3.shape[1]
    w1, w2, b1, b2 = w12[:hidden], w12[hidden:], b12[:hidden], b12[hidden:]
    a = x @ w1.T + b1
    return (a * torch.sigmoid(a) * (x @ w2.T + b2)) @ w3.T + b3


@pytest.mark.parametrize("fused", [False, True])
def test_swiglu_matches_float64_reference_forward_and_backward(fused):
    x = torch.randn(5, 7, 16, requires_grad=True)
    params = [torch.randn(24, 16), torch.randn(24), torch.randn(16, 12), torch.randn(16)]
    params = [p.requires_grad_() for p in params]
    out = swiglu(x, *params, fused=fused)
    torch.testing.assert_close(out.double(), _reference_swiglu(x, *params), atol=1e-4, rtol=1e-4)
    weight = torch.randn(out.shape)
    grads = torch.autograd.grad((out * weight).sum(), [x, *params])
    ref = torch.autograd.grad((_reference_swiglu(x, *params) * weight.double()).sum(), [x, *params])
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-3, rtol=1e-4)


def test_silu_mul_gradcheck():
    gate = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    value = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(silu_mul, (gate, value))


def test_silu_mul_second_derivatives_match_the_written_out_formula():
    """Double backward (create_graph=True, e.g. a gradient penalty) gives the true second derivatives
    (it used to fail inside aten's silu_backward, which has no derivative)."""
    gate = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    value = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(silu_mul, (gate, value))

    def penalty(fn):
        out = fn(gate, value)
        grads = torch.autograd.grad(out.pow(2).sum(), (gate, value), create_graph=True)
        return torch.autograd.grad(sum(g.pow(2).sum() for g in grads), (gate, value))

    written_out = penalty(lambda g, v: g * torch.sigmoid(g) * v)
    for got, want in zip(penalty(silu_mul), written_out):
        torch.testing.assert_close(got, want)


def _saved_bytes(fn, *inputs) -> int:
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes() if t.numel() else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(saved)


def test_fused_native_swiglu_saves_a_third_less_for_backward():
    gate, value = (torch.randn(64, 256, requires_grad=True) for _ in range(2))
    plain = _saved_bytes(lambda a, b: F.silu(a) * b, gate, value)
    fused = _saved_bytes(silu_mul, gate, value)
    one = gate.numel() * gate.element_size()
    assert plain == 3 * one and fused == 2 * one


def test_swiglufused_module_has_the_swiglu_keys_and_values():
    torch.manual_seed(0)
    plain = SwiGLUFFN(32, hidden_features=128)
    fused = SwiGLUFFNFused(32, hidden_features=128)
    assert list(plain.state_dict()) == list(fused.state_dict()) == ["w12.weight", "w12.bias", "w3.weight", "w3.bias"]
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(3, 10, 32)
    torch.testing.assert_close(fused(x), plain(x), atol=1e-6, rtol=1e-6)
    hidden_bytes = 3 * 10 * plain.hidden_features * 4
    assert _saved_bytes(plain, x) - _saved_bytes(fused, x) == hidden_bytes  # one hidden tensor fewer


def test_index_add_residual_adds_scaled_rows_out_of_place():
    x = torch.randn(6, 4, 3)
    residual = torch.randn(2, 4, 3)
    indices = torch.tensor([4, 1])
    out = index_add_residual(x, indices, residual, scale=3.0)
    expected = x.clone()
    expected[4] += 3.0 * residual[0]
    expected[1] += 3.0 * residual[1]
    torch.testing.assert_close(out, expected)
    assert out.data_ptr() != x.data_ptr()


@pytest.mark.gpu
@pytest.mark.xformers
@pytest.mark.parametrize("checkpointing", ["off", "full"])
def test_block_stochastic_depth_with_xformers_kernels_matches_native_on_cuda(checkpointing):
    """The subset path (drop rate 0.4) with xFormers' attention and (without checkpointing, where the
    in-place add is allowed) its scaled_index_add gives the native path's outputs and gradients for
    the same sampled subsets. The SwiGLU FFN takes xFormers' fused op only where its dispatcher picks
    a fused kernel (xFormers 0.0.35 never does, so both runs then use the native packed matmul)."""
    import dinov2.ops.residual as residual_module
    from dinov2.ops.xformers import scaled_index_add_usable, xformers_ops

    device = torch.device("cuda")
    calls = {"scaled_index_add": 0}
    kernel = xformers_ops().scaled_index_add

    def counted(*args, **kwargs):
        calls["scaled_index_add"] += 1
        return kernel(*args, **kwargs)

    torch.manual_seed(0)
    block = Block(64, 4, drop_path=0.4, init_values=1e-1, ffn_layer=SwiGLUFFNFused, attn_backend="xformers").to(device)
    block.checkpointing = checkpointing
    xs = [torch.randn(8, 17, 64, device=device), torch.randn(16, 5, 64, device=device)]

    def run(native: bool):
        torch.manual_seed(1)
        inputs = [x.clone().requires_grad_() for x in xs]
        start = [t * 1.0 for t in inputs]  # non-leaf block inputs, as inside the ViT
        if native:
            block.attn.backend, block.mlp.fused = "sdpa", False
            saved = residual_module.scaled_index_add_usable
            residual_module.scaled_index_add_usable = lambda: False
        try:
            outs = block(start)
            loss = sum((o * o).sum() for o in outs)
            grads = torch.autograd.grad(loss, [*inputs, *block.parameters()])
        finally:
            if native:
                residual_module.scaled_index_add_usable = saved
                block.attn.backend, block.mlp.fused = "xformers", True
        return outs, grads

    ops = xformers_ops()
    ops.scaled_index_add = counted
    try:
        out_x, grads_x = run(native=False)
    finally:
        ops.scaled_index_add = kernel
    if checkpointing == "off":  # the kernel ran (on sm80+ Triton is there), not a silent fallback
        assert scaled_index_add_usable() and calls["scaled_index_add"] > 0
    else:
        assert calls["scaled_index_add"] == 0  # no in-place add inside checkpointing
    out_n, grads_n = run(native=True)
    for a, b in zip(out_x, out_n):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    for a, b in zip(grads_x, grads_n):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def _fake_xformers(monkeypatch, swiglu_choice: str, triton_kernels: bool):
    """An ``xformers.ops`` stand-in whose SwiGLU dispatcher picks ``swiglu_choice`` ("eager" or
    "fused") and whose scaled_index_add kernels are there or not."""
    import sys
    import types

    import dinov2.ops.xformers as xf

    eager, fused = object(), object()

    class Dispatch:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        @property
        def op(self):
            return eager if swiglu_choice == "eager" else fused

    class Kernel:
        @staticmethod
        def is_available():
            return triton_kernels

    ops = types.SimpleNamespace(SwiGLUOpDispatch=Dispatch, SwiGLUEagerOp=eager)
    indexing = types.ModuleType("xformers.ops.indexing")
    indexing.ScaledIndexAddFw = indexing.ScaledIndexAddBw = Kernel
    monkeypatch.setitem(sys.modules, "xformers.ops.indexing", indexing)
    monkeypatch.setattr(xf, "_try_import", lambda: (ops, None))
    xf.fused_swiglu_usable.cache_clear()  # the test clears them again when it ends
    xf.scaled_index_add_usable.cache_clear()
    return xf


@pytest.mark.parametrize("choice, kernels", [("eager", False), ("fused", True)])
def test_xformers_kernels_are_used_only_where_they_would_really_run(monkeypatch, choice, kernels):
    """xFormers' swiglu dispatching to its eager op (three matmuls: 0.0.35 always does) is no better
    than ours, and its scaled_index_add raises when Triton is off (GPUs before sm80): neither is used then."""
    xf = _fake_xformers(monkeypatch, choice, kernels)
    try:
        assert xf.fused_swiglu_usable("cuda", torch.bfloat16, True) is (choice == "fused")
        assert xf.scaled_index_add_usable() is kernels
    finally:
        xf.fused_swiglu_usable.cache_clear()
        xf.scaled_index_add_usable.cache_clear()


def test_xformers_release_without_these_kernels_falls_back_to_native(monkeypatch):
    """An xFormers that imports but has no ``xformers.ops.indexing`` module or SwiGLU dispatcher (an
    older or a newer release): both probes answer False, so the native paths run instead of a crash."""
    import sys
    import types

    import dinov2.ops.xformers as xf

    monkeypatch.setitem(sys.modules, "xformers.ops.indexing", None)  # its import raises ImportError
    monkeypatch.setattr(xf, "_try_import", lambda: (types.SimpleNamespace(), None))
    xf.fused_swiglu_usable.cache_clear()
    xf.scaled_index_add_usable.cache_clear()
    try:
        assert xf.scaled_index_add_usable() is False
        assert xf.fused_swiglu_usable("cuda", torch.bfloat16, True) is False
    finally:
        xf.fused_swiglu_usable.cache_clear()
        xf.scaled_index_add_usable.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_silu_mul_gradients_equal_plain_autograd_bit_for_bit(dtype):
    """The memory-saving silu_mul gives exactly autograd's gradients of F.silu(gate) * value, also
    in bf16/fp16, where a step-by-step derivative would round at every step (relative errors up to
    ~80% where silu's derivative crosses zero, near gate = -1.28)."""
    gen = torch.Generator().manual_seed(0)
    gate = (3 * torch.randn(256, 128, generator=gen)).to(dtype)
    gate[0, :64] = torch.linspace(-1.4, -1.2, 64).to(dtype)  # around the derivative's zero
    value, grad_out = (torch.randn(256, 128, generator=gen).to(dtype) for _ in range(2))
    grads = []
    for fn in (lambda a, b: F.silu(a) * b, silu_mul):
        a, b = gate.clone().requires_grad_(), value.clone().requires_grad_()
        grads.append(torch.autograd.grad(fn(a, b), (a, b), grad_out))
    for plain, fused in zip(*grads):
        assert torch.equal(fused, plain)
