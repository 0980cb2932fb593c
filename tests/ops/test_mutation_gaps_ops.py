"""Gaps found by mutating dinov2/ops: auto-backend selection, the xFormers paths (with a CPU stand-in
for ``xformers.ops``), group checks, the jagged lengths, the keep-subset rounding, mixed dtypes in the
residual add and the xFormers probes."""

from __future__ import annotations

import importlib
import math
import types

import pytest
import torch

import dinov2.ops.xformers as xf
from dinov2.ops import nested_attention, nested_attention_parts, resolve_backend
from dinov2.ops.residual import index_add_residual, sample_keep_subset

attention_module = importlib.import_module("dinov2.ops.attention")


def _per_sequence_reference(q, k, v, seqlens):
    """softmax(q k^T / sqrt(d)) v within each run of ``seqlens`` tokens, float64 loops. (T, H, D)."""
    out, start = torch.empty_like(q, dtype=torch.float64), 0
    for n in seqlens:
        for h in range(q.shape[1]):
            qs, ks, vs = (t[start : start + n, h].double() for t in (q, k, v))
            out[start : start + n, h] = torch.softmax(qs @ ks.T / math.sqrt(q.shape[-1]), dim=-1) @ vs
        start += n
    return out


@pytest.fixture
def fresh_auto():
    attention_module._auto_choice.cache_clear()
    yield
    attention_module._auto_choice.cache_clear()


def test_auto_on_an_unlisted_device_type_is_sdpa(fresh_auto):
    assert resolve_backend("auto", torch.device("meta")) == "sdpa"
    assert resolve_backend("auto", torch.device("meta"), nested=True) == "sdpa"


def test_auto_falls_back_to_sdpa_when_nothing_listed_is_usable(monkeypatch, fresh_auto):
    monkeypatch.setitem(attention_module.AUTO_PREFERENCE, ("cpu", True), ("xformers",))
    assert resolve_backend("auto", torch.device("cpu"), nested=True) == "sdpa"


def test_auto_never_picks_xformers_off_cuda_even_when_it_imports(monkeypatch, fresh_auto):
    monkeypatch.setattr(attention_module, "xformers_available", lambda: True)

    def no_probe(key):
        raise AssertionError(f"probed xFormers for a CPU device ({key})")

    monkeypatch.setattr(attention_module, "attention_failure", no_probe)
    monkeypatch.setitem(attention_module.AUTO_PREFERENCE, ("cpu", True), ("xformers", "varlen"))
    assert resolve_backend("auto", torch.device("cpu"), nested=True) == "varlen"


def test_nested_parts_resolve_auto_as_a_nested_call(monkeypatch, fresh_auto):
    """Several groups resolve ``auto`` through the nested entry of the table (here varlen: one part)."""
    monkeypatch.setitem(attention_module.AUTO_PREFERENCE, ("cpu", True), ("varlen",))
    monkeypatch.setitem(attention_module.AUTO_PREFERENCE, ("cpu", False), ("math",))
    shapes = [(2, 5), (3, 4)]
    q, k, v = (torch.randn(22, 2, 8) for _ in range(3))
    assert len(nested_attention_parts(q, k, v, shapes)) == 1  # varlen, not math's one part per group


def test_groups_describing_fewer_tokens_than_the_inputs_are_refused():
    q = torch.randn(14, 2, 4)
    with pytest.raises(ValueError, match="describe 12 tokens but the inputs hold 14"):
        nested_attention(q, q, q, [(2, 6)], backend="math")


def test_varlen_passes_the_true_shortest_and_longest_sequence(monkeypatch):
    """The jagged tensors carry min/max sequence lengths (CUDA's kernels size their grids by them)."""
    import torch.nn.functional as F

    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        if q.is_nested:
            seen.append((q._min_seqlen, q._max_seqlen))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    shapes = [(2, 7), (3, 3), (1, 5)]
    q, k, v = (torch.randn(2 * 7 + 3 * 3 + 5, 2, 8) for _ in range(3))
    nested_attention(q, k, v, shapes, backend="varlen")
    assert seen == [(3, 7)]


class _FakeOps:
    """``xformers.ops`` stand-in on CPU: memory_efficient_attention honours a block-diagonal bias
    (attends within each of its sequences) or, without one, attends over the whole sequence."""

    def __init__(self):
        fake = self
        self.bias_calls = []

        class BlockDiagonalMask:
            def __init__(self, seqlens):
                self.seqlens = seqlens

            @classmethod
            def from_seqlens(cls, seqlens, device=None):
                fake.bias_calls.append((list(seqlens), device))
                return cls(list(seqlens))

        self.fmha = types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask)

    def memory_efficient_attention(self, q, k, v, attn_bias=None):
        seqlens = attn_bias.seqlens if attn_bias is not None else [q.shape[1]]
        out = [_per_sequence_reference(q[b], k[b], v[b], seqlens) for b in range(q.shape[0])]
        return torch.stack(out).to(q.dtype)


def test_xformers_nested_path_uses_one_sequence_per_sample_on_the_inputs_device(monkeypatch):
    fake = _FakeOps()
    monkeypatch.setattr(xf, "_try_import", lambda: (fake, None))
    attention_module._block_diagonal_bias.cache_clear()
    try:
        shapes = [(2, 5), (3, 4)]
        q, k, v = (torch.randn(22, 2, 8) for _ in range(3))
        out = nested_attention(q, k, v, shapes, backend="xformers")
        nested_attention(q, k, v, shapes, backend="xformers")  # cached: no second bias
    finally:
        attention_module._block_diagonal_bias.cache_clear()
    torch.testing.assert_close(out.double(), _per_sequence_reference(q, k, v, [5, 5, 4, 4, 4]), atol=1e-5, rtol=1e-5)
    assert fake.bias_calls == [([5, 5, 4, 4, 4], torch.device("cpu"))]


def test_keep_subset_rounds_down():
    """keep = max(int(B (1 - p)), 1): 10 samples at p = 0.25 keep 7 (not 8), rescaled by 10 / 7."""
    indices, scale = sample_keep_subset(10, 0.25, torch.device("cpu"))
    assert len(indices) == 7 and len(set(indices.tolist())) == 7
    assert scale == pytest.approx(10 / 7)


def test_index_add_residual_casts_a_low_precision_branch_to_the_stream_dtype():
    """Under autocast a branch returns bf16 while the residual stream is float32."""
    x = torch.randn(5, 3, 4)
    residual = torch.randn(2, 3, 4).bfloat16()
    indices = torch.tensor([3, 0])
    for inplace in (False, True):
        out = index_add_residual(x.clone(), indices, residual, scale=2.0, inplace=inplace)
        expected = x.clone()
        expected[3] += 2.0 * residual[0].float()
        expected[0] += 2.0 * residual[1].float()
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected)


@pytest.fixture
def fresh_probes():
    xf.scaled_index_add_usable.cache_clear()
    xf.fused_swiglu_usable.cache_clear()
    xf.attention_failure.cache_clear()
    yield
    xf.scaled_index_add_usable.cache_clear()
    xf.fused_swiglu_usable.cache_clear()
    xf.attention_failure.cache_clear()


def test_scaled_index_add_needs_its_backward_kernel_too(monkeypatch, fresh_probes):
    import sys

    class Fw:
        is_available = staticmethod(lambda: True)

    class Bw:
        is_available = staticmethod(lambda: False)

    indexing = types.ModuleType("xformers.ops.indexing")
    indexing.ScaledIndexAddFw, indexing.ScaledIndexAddBw = Fw, Bw
    monkeypatch.setitem(sys.modules, "xformers.ops.indexing", indexing)
    monkeypatch.setattr(xf, "_try_import", lambda: (types.SimpleNamespace(), None))
    assert xf.scaled_index_add_usable() is False


def test_swiglu_probe_asks_the_dispatcher_about_packed_weights(monkeypatch, fresh_probes):
    asked, eager = [], object()

    class Dispatch:
        def __init__(self, **kwargs):
            asked.append(kwargs)

        op = object()  # a fused kernel

    monkeypatch.setattr(
        xf, "_try_import", lambda: (types.SimpleNamespace(SwiGLUOpDispatch=Dispatch, SwiGLUEagerOp=eager), None)
    )
    assert xf.fused_swiglu_usable("cuda", torch.float16, False) is True
    assert asked == [dict(device="cuda", dtype=torch.float16, dtype_autocast_gpu=torch.float16, packed_weights=True,
                          bias_enabled=False)]  # fmt: skip


class _Override(torch.autograd.Function):
    """Forward ``forward_value``, backward ``grad_value``, whatever the inputs."""

    @staticmethod
    def forward(ctx, x, forward_value, grad_value):
        ctx.grad_value = grad_value
        return torch.full_like(x, forward_value)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, ctx.grad_value), None, None


@pytest.mark.parametrize("case", ["nan_gradients", "nan_output"])
def test_attention_probe_refuses_nan_outputs_and_gradients(monkeypatch, fresh_probes, case):
    from dinov2.ops.attention import math_attention

    class Ops(_FakeOps):
        def memory_efficient_attention(self, q, k, v, attn_bias=None):
            parts, start = [], 0
            for n in attn_bias.seqlens:
                parts.append(math_attention(*(t[:, start : start + n] for t in (q, k, v))))
                start += n
            right = torch.cat(parts, dim=1)
            if case == "nan_output":
                return _Override.apply(q, float("nan"), 0.0) + 0 * right
            return right.detach() + _Override.apply(q, 0.0, float("nan"))

    monkeypatch.setattr(xf, "_try_import", lambda: (Ops(), None))
    failure = xf.attention_failure("cpu")
    if case == "nan_output":
        assert failure is not None and "differs from a float32 reference" in failure
    else:
        assert failure == "memory_efficient_attention's backward gives no finite gradients"
