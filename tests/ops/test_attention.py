import math

import pytest
import torch

from dinov2.ops import attention, math_attention, nested_attention, resolve_backend, xformers_available


def _reference(q, k, v):
    """Per-sequence, per-head float64 loops: softmax(q k^T / sqrt(d)) v."""
    q, k, v = (t.double() for t in (q, k, v))
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            scores = q[b, :, h] @ k[b, :, h].T / math.sqrt(q.shape[-1])
            weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            out[b, :, h] = (weights / weights.sum(dim=-1, keepdim=True)) @ v[b, :, h]
    return out


def _qkv(b, n, h, d, dtype=torch.float32, device="cpu"):
    return [torch.randn(b, n, h, d, dtype=dtype, device=device) for _ in range(3)]


@pytest.mark.parametrize("shape", [(2, 5, 3, 8), (1, 17, 2, 16), (3, 1, 1, 4)])
def test_math_matches_float64_reference(shape):
    q, k, v = _qkv(*shape)
    torch.testing.assert_close(math_attention(q, k, v).double(), _reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_math_keeps_float64_inputs_in_float64():
    """The reference backend never rounds float64 inputs down to float32 (errors ~1e-7 before)."""
    q, k, v = _qkv(2, 33, 2, 16, dtype=torch.float64)
    out = math_attention(q, k, v)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _reference(q, k, v), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(2, 5, 3, 8), (4, 50, 6, 32)])
def test_sdpa_matches_math(shape):
    q, k, v = _qkv(*shape)
    torch.testing.assert_close(attention(q, k, v, "sdpa"), attention(q, k, v, "math"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["math", "sdpa", "varlen"])
def test_nested_equals_separate_groups(backend):
    heads, dim = 3, 8
    shapes = [(2, 17), (6, 5), (1, 9)]
    groups = [_qkv(b, n, heads, dim) for b, n in shapes]
    flat = [torch.cat([g[i].reshape(-1, heads, dim) for g in groups]) for i in range(3)]
    out = nested_attention(*flat, shapes, backend=backend)
    expected = torch.cat([_reference(*g).reshape(-1, heads, dim) for g in groups]).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_nested_attention_rejects_inconsistent_groups():
    q = torch.randn(10, 2, 4)
    with pytest.raises(ValueError, match="describe 12 tokens but the inputs hold 10"):
        nested_attention(q, q, q, [(2, 6)], backend="math")


def test_backend_names():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("math", torch.device("cpu")) == "math"
    with pytest.raises(ValueError, match="flash2.*valid backends: math, sdpa, varlen, xformers, auto"):
        resolve_backend("flash2", torch.device("cpu"))


@pytest.mark.parametrize("backend", ["sdpa", "varlen"])
def test_nested_gradients_equal_separate_passes(backend):
    """Gradients of the one-call nested pass equal those of running each group on its own."""
    heads, dim = 2, 8
    shapes = [(2, 17), (8, 5)]
    flat = [torch.randn(sum(b * n for b, n in shapes), heads, dim, requires_grad=True) for _ in range(3)]
    weight = torch.randn(flat[0].shape)
    grads = torch.autograd.grad((nested_attention(*flat, shapes, backend=backend) * weight).sum(), flat)
    start, separate = 0, []
    for b, n in shapes:
        group = [t[start : start + b * n].reshape(b, n, heads, dim) for t in flat]
        separate.append(_reference(*group).reshape(b * n, heads, dim))
        start += b * n
    expected = torch.autograd.grad((torch.cat(separate).float() * weight).sum(), flat)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_varlen_on_one_dense_group_is_sdpa():
    q, k, v = _qkv(3, 11, 2, 8)
    torch.testing.assert_close(attention(q, k, v, "varlen"), attention(q, k, v, "math"), atol=1e-5, rtol=1e-5)


def test_auto_follows_the_preference_table_and_logs_once(monkeypatch, caplog):
    import importlib

    attention_module = importlib.import_module("dinov2.ops.attention")  # the package exports a function of that name
    attention_module._auto_choice.cache_clear()
    monkeypatch.setitem(attention_module.AUTO_PREFERENCE, ("cpu", True), ("xformers", "varlen", "sdpa"))
    with caplog.at_level("INFO", logger="dinov2"):
        # xFormers is never usable on CPU, so the nested choice falls through to varlen.
        assert resolve_backend("auto", torch.device("cpu"), nested=True) == "varlen"
        assert resolve_backend("auto", torch.device("cpu"), nested=True) == "varlen"
        assert resolve_backend("auto", torch.device("cpu"), nested=False) == "sdpa"
    attention_module._auto_choice.cache_clear()
    lines = [r.getMessage() for r in caplog.records if "attention backend auto" in r.getMessage()]
    assert len(lines) == 2 and "varlen on cpu (nested" in lines[0] and "sdpa on cpu (dense" in lines[1]


@pytest.mark.skipif(xformers_available(), reason="xFormers is installed here")
def test_missing_xformers_gives_a_clear_error():
    q, k, v = _qkv(1, 4, 1, 8)
    with pytest.raises(RuntimeError, match="xFormers cannot be imported.*sdpa"):
        attention(q, k, v, "xformers")


@pytest.mark.gpu
@pytest.mark.xformers
@pytest.mark.parametrize("nested", [False, True])
def test_xformers_matches_sdpa_bf16(nested):
    device = torch.device("cuda")
    heads, dim = 6, 64
    if nested:
        shapes = [(8, 257), (32, 37)]
        tokens = sum(b * n for b, n in shapes)
        q, k, v = (torch.randn(tokens, heads, dim, device=device, dtype=torch.bfloat16) for _ in range(3))
        out = nested_attention(q, k, v, shapes, backend="xformers")
        ref = nested_attention(q, k, v, shapes, backend="sdpa")
    else:
        q, k, v = _qkv(8, 257, heads, dim, torch.bfloat16, device)
        out, ref = attention(q, k, v, "xformers"), attention(q, k, v, "math")
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "varlen", pytest.param("xformers", marks=pytest.mark.xformers)])
def test_nested_backends_agree_in_bf16_on_cuda_forward_and_backward(backend):
    if backend == "xformers" and not xformers_available():
        pytest.skip("xFormers is not installed")
    device = torch.device("cuda")
    heads, dim, shapes = 6, 64, [(8, 257), (32, 37)]
    tokens = sum(b * n for b, n in shapes)
    base = [torch.randn(tokens, heads, dim, device=device) for _ in range(3)]
    weight = torch.randn(tokens, heads, dim, device=device)

    def run(name, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in base]
        out = nested_attention(*inputs, shapes, backend=name)
        grads = torch.autograd.grad((out.float() * weight).sum(), inputs)
        return out.float(), [g.float() for g in grads]

    out, grads = run(backend, torch.bfloat16)
    ref_out, ref_grads = run("math", torch.float32)
    torch.testing.assert_close(out, ref_out, atol=3e-2, rtol=3e-2)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=6e-2, rtol=6e-2)


def test_math_backend_stays_float32_under_autocast():
    """The reference backend computes in float32 even inside bf16 autocast: its output equals the
    float32 computation on the same (bf16-rounded) inputs to float32 rounding, not bf16's."""
    q, k, v = (torch.randn(2, 33, 2, 16).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = math_attention(q.float(), k.float(), v.float())
    want = math_attention(q.float(), k.float(), v.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


class _FakeXformersOps:
    """An ``xformers.ops`` stand-in: block-diagonal attention by per-sequence SDPA, optionally wrong
    or raising, so the probe that guards ``auto`` can be checked on CPU."""

    def __init__(self, mode: str):
        self.mode = mode
        fake = self

        class BlockDiagonalMask:
            def __init__(self, seqlens):
                self.seqlens = seqlens

            @classmethod
            def from_seqlens(cls, seqlens, device=None):
                fake.bias_device = device
                return cls(seqlens)

        self.fmha = type("fmha", (), {"BlockDiagonalMask": BlockDiagonalMask})

    def memory_efficient_attention(self, q, k, v, attn_bias):
        if self.mode == "raises":
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")
        parts, start = [], 0
        for n in attn_bias.seqlens:
            parts.append(attention(q[:, start : start + n], k[:, start : start + n], v[:, start : start + n], "sdpa"))
            start += n
        out = torch.cat(parts, dim=1)
        return out * 1.5 if self.mode == "wrong" else out


@pytest.mark.parametrize("mode", ["right", "wrong", "raises"])
def test_xformers_probe_accepts_only_a_kernel_that_runs_and_is_right(monkeypatch, mode):
    import dinov2.ops.xformers as xf

    fake = _FakeXformersOps(mode)
    monkeypatch.setattr(xf, "_try_import", lambda: (fake, None))
    xf.attention_failure.cache_clear()
    state = torch.random.get_rng_state()
    try:
        failure = xf.attention_failure("cpu")
    finally:
        xf.attention_failure.cache_clear()
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is untouched
    if mode == "right":
        assert failure is None and fake.bias_device == torch.device("cpu")
    elif mode == "wrong":
        assert "differs from a float32 reference" in failure
    else:
        assert failure.startswith("NotImplementedError: No operator found")


def test_auto_on_cuda_falls_back_to_sdpa_when_the_xformers_probe_fails(monkeypatch, caplog):
    import importlib

    attention_module = importlib.import_module("dinov2.ops.attention")
    monkeypatch.setattr(attention_module, "xformers_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda = torch.device("cuda", 0)
    for failure, expected in (("NotImplementedError: no operator", "sdpa"), (None, "xformers")):
        monkeypatch.setattr(attention_module, "attention_failure", lambda key, failure=failure: failure)
        attention_module._auto_choice.cache_clear()
        with caplog.at_level("INFO", logger="dinov2"):
            assert resolve_backend("auto", cuda, nested=True) == expected
    attention_module._auto_choice.cache_clear()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot be used here (NotImplementedError: no operator)" in warnings[0]


def test_build_time_resolution_replaces_auto_on_every_layer():
    from dinov2.distributed.parallelize import resolve_attention_backends
    from dinov2.models.vision_transformer import DinoVisionTransformer

    model = DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, block_chunks=2)
    model.blocks[1][3].attn.backend = "math"  # an explicit choice stays
    assert resolve_attention_backends(model, torch.device("cpu")) == ["sdpa", "math"]  # CPU's auto is sdpa
    assert [b.attn.backend for b in model.iter_blocks()] == ["sdpa", "sdpa", "sdpa", "math"]


def test_xformers_can_be_switched_off_by_the_environment(monkeypatch):
    """DINOV2_DISABLE_XFORMERS=1: an installed xFormers is treated as absent (``auto`` goes native, the
    xformers backend's error names the variable); unset or 0, the module is used."""
    import sys
    import types

    import dinov2.ops.xformers as xf

    fake = types.ModuleType("xformers.ops")
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", fake)
    try:
        for setting, available in (("1", False), ("0", True), (None, True)):
            if setting is None:
                monkeypatch.delenv(xf.DISABLE_VARIABLE, raising=False)
            else:
                monkeypatch.setenv(xf.DISABLE_VARIABLE, setting)
            xf._try_import.cache_clear()
            assert xf.xformers_available() is available, setting
            if available:
                assert xf.xformers_ops() is fake
            else:
                with pytest.raises(RuntimeError, match="disabled by DINOV2_DISABLE_XFORMERS=1"):
                    xf.xformers_ops()
    finally:
        xf._try_import.cache_clear()
