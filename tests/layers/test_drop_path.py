import torch

from dinov2.layers import DropPath
from dinov2.layers.drop_path import drop_path


def test_drop_rate_one_zeroes_every_sample_without_nan():
    x = torch.randn(6, 4, 3)
    module = DropPath(1.0).train()
    out = module(x)
    assert torch.equal(out, torch.zeros_like(x))  # every sample dropped, nothing rescaled by 1/0
    assert torch.equal(drop_path(x, 1.0, training=False), x)  # eval: identity


def test_kept_samples_are_rescaled_by_the_inverse_keep_probability():
    torch.manual_seed(0)
    x = torch.ones(2000, 2)
    out = DropPath(0.25).train()(x)
    kept = out[:, 0] != 0
    torch.testing.assert_close(out[kept, 0], torch.full((int(kept.sum()),), 1.0 / 0.75))
    assert 0.2 < 1 - kept.float().mean() < 0.3
    assert torch.equal(out[:, 0], out[:, 1])  # whole samples
