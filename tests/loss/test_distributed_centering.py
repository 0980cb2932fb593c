"""Two gloo processes, each holding part of a batch, must reproduce the one-process results on the whole batch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp

pytestmark = pytest.mark.distributed

WORLD = 2
K = 6
TEMP = 0.1
IBOT_SPLITS = {"unequal": (5, 9), "empty_rank": (0, 7)}  # masked-token counts of rank 0 and rank 1


def _rank_rows(tensor: torch.Tensor, counts, rank: int) -> torch.Tensor:
    start = sum(counts[:rank])
    return tensor[start : start + counts[rank]]


def _sinkhorn_results(rank, data):
    out = {}
    half = data["dino_logits"].chunk(WORLD)[rank]
    out["dino_sk"] = DINOLoss(K).sinkhorn_knopp_teacher(half, TEMP, n_iterations=5)
    for name, counts in IBOT_SPLITS.items():
        rows = _rank_rows(data["ibot_logits"], counts, rank)
        n_masked = torch.tensor([counts[rank]])
        out[f"ibot_sk_{name}"] = iBOTPatchLoss(K).sinkhorn_knopp_teacher(rows, TEMP, n_masked, n_iterations=5)
        out[f"n_masked_after_{name}"] = n_masked
    # all logits far below 0 and no rows on rank 0: its empty batch must not pull the all-rank maximum
    # up to 0 (exp((z - 0) / T) underflows to 0 for every entry, and the targets become NaN)
    rows = _rank_rows(data["ibot_logits"] - 30.0, IBOT_SPLITS["empty_rank"], rank)
    n_masked = torch.tensor([IBOT_SPLITS["empty_rank"][rank]])
    out["ibot_sk_negative_empty_rank"] = iBOTPatchLoss(K).sinkhorn_knopp_teacher(rows, TEMP, n_masked, n_iterations=5)
    return out


def _center_results(rank, data):
    dino, ibot = DINOLoss(K, center_momentum=0.8), iBOTPatchLoss(K, center_momentum=0.7)
    for step, batch in enumerate(data["dino_batches"]):
        dino.update_center(batch.chunk(WORLD)[rank])
        ibot.update_center(_rank_rows(data["ibot_batches"][step], data["ibot_counts"][step], rank).unsqueeze(0))
    pending_dino = dino.center.clone()
    dino.apply_center_update()
    ibot.apply_center_update()
    return {"dino_center": dino.center, "dino_center_pending": pending_dino, "ibot_center": ibot.center}


def _koleo_results(rank, data):
    feats = data["koleo"].chunk(WORLD)[rank]
    return {"koleo": KoLeoLoss(gather_across_ranks=True)(feats), "koleo_local": KoLeoLoss()(feats)}


def _worker(rank: int, init_file: str, out_dir: str, data: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {**_sinkhorn_results(rank, data), **_center_results(rank, data), **_koleo_results(rank, data)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Spawn the two ranks once; returns (data, [results of rank 0, results of rank 1])."""
    tmp = tmp_path_factory.mktemp("dist_centering")
    gen = torch.Generator().manual_seed(1234)
    ibot_counts = [(3, 5), (4, 1), (2, 6)]
    data = {
        "dino_logits": torch.randn(8, K, generator=gen),
        "ibot_logits": torch.randn(14, K, generator=gen),
        "dino_batches": [torch.randn(6, K, generator=gen) * 2 + i for i in range(3)],
        "ibot_batches": [torch.randn(sum(c), K, generator=gen) - i for i, c in enumerate(ibot_counts)],
        "ibot_counts": ibot_counts,
        "koleo": torch.randn(12, 5, generator=gen),
    }
    data["koleo"][7] = data["koleo"][2]  # a duplicate that only the gathered search can find
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp), data), nprocs=WORLD, join=True)
    return data, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_dino_sinkhorn_equals_single_process_on_full_batch(run):
    data, results = run
    expected = sinkhorn_knopp(data["dino_logits"], TEMP, n_iterations=5)
    torch.testing.assert_close(torch.cat([r["dino_sk"] for r in results]), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(IBOT_SPLITS))
def test_ibot_sinkhorn_with_unequal_masked_counts(run, name):
    data, results = run
    counts = IBOT_SPLITS[name]
    assert [r[f"ibot_sk_{name}"].shape[0] for r in results] == list(counts)
    full = data["ibot_logits"][: sum(counts)]
    expected = iBOTPatchLoss(K).sinkhorn_knopp_teacher(full, TEMP, torch.tensor([sum(counts)]), n_iterations=5)
    got = torch.cat([r[f"ibot_sk_{name}"] for r in results])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # each rank's count tensor was not all-reduced in place
    assert [r[f"n_masked_after_{name}"].item() for r in results] == list(counts)


def test_an_empty_rank_leaves_the_shift_of_negative_logits_to_the_ranks_with_rows(run):
    data, results = run
    full = data["ibot_logits"][: sum(IBOT_SPLITS["empty_rank"])] - 30.0
    expected = iBOTPatchLoss(K).sinkhorn_knopp_teacher(full, TEMP, torch.tensor([len(full)]), n_iterations=5)
    got = torch.cat([r["ibot_sk_negative_empty_rank"] for r in results])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_center_updates_equal_single_process_on_full_batch(run):
    data, results = run
    dino, ibot = DINOLoss(K, center_momentum=0.8), iBOTPatchLoss(K, center_momentum=0.7)
    for dino_batch, ibot_batch in zip(data["dino_batches"], data["ibot_batches"]):
        dino.update_center(dino_batch)
        ibot.update_center(ibot_batch)
    dino.apply_center_update()
    ibot.apply_center_update()
    for r in results:
        torch.testing.assert_close(r["dino_center"], dino.center)
        torch.testing.assert_close(r["ibot_center"], ibot.center)
        # the last update was still pending (deferred) before apply_center_update
        assert not torch.allclose(r["dino_center_pending"], r["dino_center"])


def koleo_row_terms(features: torch.Tensor, eps: float = 1e-8) -> list[float]:
    """Per-row -log(d_i + eps) on the whole batch: brute-force nearest other row, float64, with the
    original's distance ||x_i - x_j + eps|| (eps sqrt(D) for a duplicate)."""
    x = torch.nn.functional.normalize(features.double(), dim=-1)
    terms = []
    for i in range(x.shape[0]):
        j = min((j for j in range(x.shape[0]) if j != i), key=lambda j: (x[i] - x[j]).norm().item())
        terms.append(-math.log((x[i] - x[j] + eps).norm().item() + eps))
    return terms


def test_koleo_gathered_neighbours_equal_single_process_loss(run):
    data, results = run
    full = KoLeoLoss()(data["koleo"])
    per_rank = torch.stack([r["koleo"] for r in results])
    torch.testing.assert_close(per_rank.mean(), full)
    # each rank's loss is the mean of the full-batch per-row terms over its own rows
    terms = koleo_row_terms(data["koleo"])
    n_local = len(terms) // WORLD
    for rank, r in enumerate(results):
        own = terms[rank * n_local : (rank + 1) * n_local]
        assert r["koleo"].item() == pytest.approx(sum(own) / n_local, rel=1e-5)
        assert r["koleo"].item() > r["koleo_local"].item() + 1.0  # only the gathered search sees the duplicate
