"""Teacher targets are built in one float32 (rows x K) buffer, without full-size temporaries."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dinov2.loss import sinkhorn_knopp, softmax_center


class FreshAllocations(TorchDispatchMode):
    """Records every op output of at least ``min_numel`` elements whose storage is not one of the op's
    inputs' (a new buffer, as opposed to the result of an in-place op or a view)."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel = min_numel
        self.fresh: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_in, _ = torch.utils._pytree.tree_flatten((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        flat_out, _ = torch.utils._pytree.tree_flatten(out)
        for t in flat_out:
            if isinstance(t, torch.Tensor) and t.numel() >= self.min_numel:
                if t.untyped_storage().data_ptr() not in inputs:
                    self.fresh.append((str(func), t.dtype))
        return out


def fresh_full_size(fn, rows, k):
    mode = FreshAllocations(rows * k)
    with mode:
        result = fn()
    return mode.fresh, result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_center_allocates_one_full_size_buffer(dtype):
    logits, center = torch.randn(16, 300).to(dtype), torch.randn(1, 300)
    fresh, out = fresh_full_size(lambda: softmax_center(logits, center, 0.07), 16, 300)
    assert len(fresh) == 1 and fresh[0][1] == torch.float32, fresh
    expected = torch.softmax((logits.double() - center.double()) / 0.07, dim=-1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n_iterations", [0, 3])
def test_sinkhorn_allocates_one_full_size_buffer(n_iterations):
    logits = torch.randn(16, 300).to(torch.bfloat16)
    fresh, out = fresh_full_size(lambda: sinkhorn_knopp(logits, 0.07, n_iterations=n_iterations), 16, 300)
    assert len(fresh) == 1 and fresh[0][1] == torch.float32, fresh
    if n_iterations:  # the last normalisation is over rows
        torch.testing.assert_close(out.sum(dim=-1), torch.ones(16), rtol=1e-5, atol=1e-5)
