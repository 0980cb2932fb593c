"""Two gloo ranks, each with half of every batch, train the same classifiers as one process on whole batches."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2.eval import linear_heads as core

pytestmark = pytest.mark.distributed

LRS = [0.05, 0.5]


def _worker(rank, init_file, out_dir, data):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        heads, lrs = core.build_heads(16, 4, LRS, n_last_blocks=(1,))
        optimizer = core.make_optimizer(heads, lrs)
        halves = ((p.chunk(2)[rank], y.chunk(2)[rank]) for p, y in data["batches"])
        core.train_heads(heads, optimizer, halves, len(data["batches"]))
        results = core.evaluate_heads(heads, data["test"], data["test_labels"], num_classes=4)
        torch.save({"heads": heads.state_dict(), "results": results}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_half_batches_equal_one_process_on_full_batches(tmp_path):
    gen = torch.Generator().manual_seed(0)
    centres = 3.0 * torch.randn(4, 2, 16, generator=gen)  # packed: (cls, avgpool) slots per class
    labels = torch.randint(0, 4, (16 * 12 + 101,), generator=gen)
    packed = centres[labels] + torch.randn(len(labels), 2, 16, generator=gen)
    batches = [(packed[i : i + 16], labels[i : i + 16]) for i in range(0, 16 * 12, 16)]
    data = {"batches": batches, "test": packed[16 * 12 :], "test_labels": labels[16 * 12 :]}  # 101: uneven shards
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), data), nprocs=2, join=True)

    heads, lrs = core.build_heads(16, 4, LRS, n_last_blocks=(1,))
    core.train_heads(heads, core.make_optimizer(heads, lrs), batches, len(batches))
    expected = core.evaluate_heads(heads, data["test"], data["test_labels"], num_classes=4)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in heads.state_dict().items():
            torch.testing.assert_close(got["heads"][key], value, rtol=1e-5, atol=1e-6)
        for name, metrics in expected.items():
            assert got["results"][name] == pytest.approx(metrics)
    assert not torch.equal(heads[core.classifier_name(1, True, 0.5)].linear.bias, torch.zeros(4))
