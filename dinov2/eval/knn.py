"""Weighted k-nearest-neighbour classification on frozen features (the DINO k-NN protocol).

Features are L2-normalised; each query's ``k`` most cosine-similar training features vote for
their labels with weight ``exp(similarity / T)``; classes are ranked by summed votes. The weights
are computed as ``exp((similarity - top similarity) / T)``, the same ranking scaled by a per-query
constant, which cannot overflow for small ``T``. Training features at exactly the same similarity
are taken in index order (a tie at the ``k``-th place goes to the lower index, on any number of ranks;
``torch.topk`` alone leaves it unspecified). Accuracy follows :mod:`dinov2.eval.metrics` (ties go
to the lower class index, a class without votes is never predicted).

    python dinov2/eval/knn.py --config-file vitl14_pretrain --pretrained-weights W.pth \\
        --train-dataset ImageNet:split=TRAIN:root=R:extra=E --val-dataset ImageNet:split=VAL:root=R:extra=E \\
        --output-dir OUT --nb_knn 10 20 100 200 --temperature 0.07

writes ``OUT/results_eval_knn.json``. Under ``torchrun`` the ranks share feature extraction and
the training features of the search (each device holds ``1/world`` of them; ``--gather-on-cpu`` keeps
the whole set in CPU memory). ``--n-per-class-list 1 2 -1 --n-tries 3`` adds the low-shot protocol:
k-NN on ``n`` training images per class (``-1``: the whole set), averaged over ``n_tries`` draws.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from dinov2 import distributed
from dinov2.data.transforms import make_classification_eval_transform
from dinov2.eval.features import align_class_indices, check_labelled, extract_labelled_features, make_eval_dataset
from dinov2.eval.metrics import format_table, run_record, topk_correct, write_json_atomic
from dinov2.eval.setup import get_args_parser as get_setup_args_parser
from dinov2.eval.setup import setup_and_build_model
from dinov2.utils.device import full_precision_matmuls

logger = logging.getLogger("dinov2")

RESULTS_FILE = "results_eval_knn.json"
BACKENDS = ("torch", "faiss")


def _similarity_then_index_order(sims: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The permutation of each row's candidates that sorts them by similarity, descending, then row index,
    ascending (``torch.topk`` leaves the order of equal values unspecified)."""
    by_id = ids.argsort(dim=1, stable=True)
    by_sim = sims.gather(1, by_id).argsort(dim=1, descending=True, stable=True)
    return by_id.gather(1, by_sim)


def _sorted_neighbours(sims: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = _similarity_then_index_order(sims, ids)
    return sims.gather(1, order), ids.gather(1, order)


def _torch_neighbours(train: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's ``k`` most similar training rows, sorted by similarity; exact ties go to the lower row
    index, also at the ``k``-th place (rows where ``topk`` kept a higher-indexed one of the tied values
    are redone), so that the neighbours do not depend on ``topk``'s order or on how the rows are sharded."""
    all_sims = queries @ train.T
    sims, ids = all_sims.topk(k, dim=1)
    last = sims[:, -1:]
    redo = ((all_sims == last).sum(dim=1) > (sims == last).sum(dim=1)).nonzero().flatten().tolist()
    for row in redo:  # exact ties across the k-th place: rare (duplicate images with other labels)
        above = (all_sims[row] > last[row]).nonzero().flatten()
        tied = (all_sims[row] == last[row]).nonzero().flatten()[: k - len(above)]
        ids[row] = torch.cat((above, tied))
        sims[row] = all_sims[row, ids[row]]
    return _sorted_neighbours(sims, ids)


def _faiss_index(train: torch.Tensor):
    try:
        import faiss
    except ImportError as error:
        raise ImportError("backend='faiss' needs faiss (pip install faiss-cpu)") from error
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train.detach().cpu().float().contiguous().numpy())
    return index


def _faiss_neighbours(index, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`_torch_neighbours`; which of the rows tied at the ``k``-th place are kept is faiss's choice."""
    sims, ids = index.search(queries.detach().cpu().float().contiguous().numpy(), k)
    return _sorted_neighbours(torch.from_numpy(sims).to(queries.device), torch.from_numpy(ids).to(queries.device))


def knn_votes(sims: torch.Tensor, neighbour_labels: torch.Tensor, k: int, temperature: float, num_classes: int):
    """Class scores (Q, C): the first ``k`` neighbours' ``exp(sim / T)`` summed per label, each
    query's scores divided by ``exp(top sim / T)`` so that the largest weight is 1 and nothing
    overflows; the ranking is unchanged. Weights are at least the smallest normal float32, so a
    class that got a vote never scores 0 (the score of a class without votes)."""
    sims = sims[:, :k].float()
    shifted = (sims - sims.amax(dim=1, keepdim=True)) / temperature
    weights = shifted.exp().clamp_min(torch.finfo(torch.float32).tiny)
    votes = torch.zeros(sims.shape[0], num_classes, dtype=torch.float32, device=sims.device)
    return votes.scatter_add_(1, neighbour_labels[:, :k], weights)


def _merge_rank_neighbours(
    sims: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``(Q, <= k)`` nearest neighbours among its training rows (``ids``: global row indices)
    -> the similarities and labels of the ``(Q, k)`` nearest overall, sorted by similarity, ties by row
    index as on one process (an all-gather; a rank with fewer than ``k`` rows pads with ``-inf``)."""
    missing = k - sims.shape[1]
    if missing:
        sims = torch.cat((sims, sims.new_full((len(sims), missing), float("-inf"))), dim=1)
        ids = torch.cat((ids, ids.new_full((len(ids), missing), torch.iinfo(ids.dtype).max)), dim=1)
        labels = torch.cat((labels, labels.new_zeros((len(labels), missing))), dim=1)
    world, queries = distributed.get_world_size(), len(sims)
    gathered = [
        distributed.all_gather_cat(t.contiguous()).view(world, queries, k).permute(1, 0, 2).reshape(queries, -1)
        for t in (sims, ids, labels)
    ]
    all_sims, all_ids, all_labels = gathered
    order = _similarity_then_index_order(all_sims, all_ids)[:, :k]
    return all_sims.gather(1, order), all_labels.gather(1, order)


def _query_slice(n: int, shard_queries: bool) -> slice:
    if not shard_queries:
        return slice(0, n)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    per_rank = -(-n // world)
    return slice(min(rank * per_rank, n), min((rank + 1) * per_rank, n))


@full_precision_matmuls()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    nb_knn: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 256,
    backend: str = "torch",
    shard_queries: bool = False,
    shard_train: bool = False,
    device: torch.device | None = None,
) -> dict[int, dict[str, float]]:
    """``{k: {"top1": %, "top5": %}}`` for each ``k`` in ``nb_knn`` (``k`` clipped to the training size).

    Runs on ``device`` (default: the training features'), ``chunk_size`` queries at a time (memory
    ``chunk_size x N_train``). ``backend="faiss"`` searches with a flat inner-product index (same
    neighbours). With ``shard_queries`` each rank classifies a slice of the queries and the counts are
    summed over ranks (all ranks must call; they must hold the same features). With ``shard_train``
    each rank moves only its contiguous ``1/world`` share of the training features to ``device``
    (default: where they are), finds every query's ``k`` nearest among them, and the ranks' candidates
    are merged by an all-gather: the same neighbours, with ``1/world`` of the training features per
    device (ImageNet-22k's 14M ViT-g features are 86 GB in fp32).
    """
    if shard_queries and shard_train:
        raise ValueError("shard_queries and shard_train are alternatives: pass one")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not nb_knn or min(nb_knn) < 1 or temperature <= 0:
        raise ValueError(f"need positive nb_knn and temperature, got {tuple(nb_knn)} and {temperature}")
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("k-NN needs at least one training and one test feature")
    if chunk_size < 1:  # a negative step would skip every query and report 0 %
        raise ValueError(f"chunk_size must be a positive number of queries, got {chunk_size}")
    device = train_features.device if device is None else torch.device(device)
    sharded = shard_train and distributed.get_world_size() > 1
    own = _query_slice(len(train_features), sharded)  # this rank's training rows (all of them unsharded)
    train = F.normalize(train_features[own].to(device).float(), dim=1)
    train_labels = train_labels.to(device).long()
    own_labels = train_labels[own]
    test_labels = test_labels.to(device).long()
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    ks = {int(k): min(int(k), len(train_features)) for k in nb_knn}
    k_max = max(ks.values())
    k_own = min(k_max, len(train))  # this rank's candidates (fewer when it holds fewer rows)
    index = _faiss_index(train) if backend == "faiss" and len(train) else None
    correct = torch.zeros(len(ks), 2, dtype=torch.int64, device=device)
    part = _query_slice(len(test_features), shard_queries)
    for start in range(part.start, part.stop, chunk_size):
        stop = min(start + chunk_size, part.stop)
        queries = F.normalize(test_features[start:stop].to(device).float(), dim=1)
        if index is not None:
            sims, ids = _faiss_neighbours(index, queries, k_own)
        else:
            sims, ids = _torch_neighbours(train, queries, k_own)
        neighbour_labels = own_labels[ids]
        if sharded:
            sims, neighbour_labels = _merge_rank_neighbours(sims, ids + own.start, neighbour_labels, k_max)
        for row, k in enumerate(ks.values()):
            votes = knn_votes(sims, neighbour_labels, k, temperature, num_classes)
            counts = topk_correct(votes, test_labels[start:stop], (1, 5), require_positive=True)
            correct[row, 0] += counts[1]
            correct[row, 1] += counts[5]
    if shard_queries:
        distributed.all_reduce(correct)
    n = len(test_features)
    return {k: {"top1": 100.0 * int(c[0]) / n, "top5": 100.0 * int(c[1]) / n} for k, c in zip(ks, correct.cpu())}


def class_balanced_subset(labels: torch.Tensor, n_per_class: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices (CPU) of ``n_per_class`` random rows of each class of ``labels`` (every row of a
    class with fewer), drawn by a generator seeded with ``seed``, the classes taken in ascending order."""
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be positive, got {n_per_class}")
    labels = labels.cpu().long()
    generator = torch.Generator().manual_seed(int(seed))
    order = labels.argsort(stable=True)
    counts = torch.bincount(labels)
    groups = [group for group in order.split(counts.tolist()) if len(group)]
    chosen = [group[torch.randperm(len(group), generator=generator)[:n_per_class]] for group in groups]
    return torch.cat(chosen).sort().values


def few_shot_knn(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    n_per_class: int,
    n_tries: int = 1,
    nb_knn: Sequence[int] = (10, 20, 100, 200),
    **knn_kwargs,
) -> dict[int, dict[str, float]]:
    """The low-shot k-NN protocol: :func:`knn_classify` (``knn_kwargs``) with the training features of
    :func:`class_balanced_subset` for seeds ``0 .. n_tries - 1``; per ``k`` (those of ``nb_knn`` up to
    ``n_per_class``, and ``n_per_class`` itself) the mean top-1 / top-5 over the tries."""
    if n_tries < 1:
        raise ValueError(f"n_tries must be positive, got {n_tries}")
    ks = sorted({int(k) for k in nb_knn if k <= n_per_class} | {int(n_per_class)})
    tries = []
    for seed in range(n_tries):
        rows = class_balanced_subset(train_labels, n_per_class, seed).to(train_labels.device)
        subset_features = train_features[rows.to(train_features.device)]
        tries.append(knn_classify(subset_features, train_labels[rows], test_features, test_labels, nb_knn=ks,
                                  **knn_kwargs))  # fmt: skip
    return {k: {m: sum(t[k][m] for t in tries) / n_tries for m in ("top1", "top5")} for k in ks}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parents = [get_setup_args_parser(add_help=False)]
    parser = argparse.ArgumentParser(description="k-NN evaluation", parents=parents, add_help=add_help)
    parser.add_argument("--nb_knn", "--nb-knn", dest="nb_knn", type=int, nargs="+", default=[10, 20, 100, 200])
    parser.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)")
    parser.add_argument("--gather-on-cpu", action="store_true", help="keep gathered features in CPU memory")
    parser.add_argument("--resize-size", type=int, default=256, help="eval transform: shorter side resized to")
    parser.add_argument("--crop-size", type=int, default=224, help="eval transform: center crop")
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="neighbour search")
    parser.add_argument("--chunk-size", type=int, default=256, help="queries per similarity block")
    parser.add_argument("--n-per-class-list", type=int, nargs="+", default=[-1],
                        help="low-shot: training images per class (-1: the whole training set)")  # fmt: skip
    parser.add_argument("--n-tries", type=int, default=1, help="low-shot: random subsets per n, averaged")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def extract_train_and_val(args, model, autocast_dtype, device: torch.device) -> dict:
    """Build both datasets with the eval transform and extract their features (labels included);
    ``num_skipped`` holds the number of unreadable (dropped) images of each split."""
    transform = make_classification_eval_transform(resize_size=args.resize_size, crop_size=args.crop_size)
    out = {"num_skipped": {}}
    datasets = {}
    for name, dataset_str in (("train", args.train_dataset), ("val", args.val_dataset)):
        datasets[name] = make_eval_dataset(dataset_str, transform, role=f"{name} dataset")
        check_labelled(datasets[name], dataset_str, role=f"{name} dataset")  # before the features of either
    align_class_indices(datasets["train"], datasets["val"])  # ImageFolder trees: the same index per class name
    for name, dataset in datasets.items():
        result = extract_labelled_features(
            model, dataset, args.batch_size, args.num_workers, device=device, autocast_dtype=autocast_dtype,
            gather_on_cpu=args.gather_on_cpu, progress=args.progress,
        )  # fmt: skip
        # left where the extraction gathered them (CPU with --gather-on-cpu): knn_classify moves only
        # this rank's share of the training features to the device
        out[f"{name}_features"], out[f"{name}_labels"] = result.features, result.labels
        out["num_skipped"][name] = result.num_skipped
    return out


def results_table(results: dict[int, dict[str, float]]) -> str:
    return format_table([(k, r["top1"], r["top5"]) for k, r in results.items()], ("k", "top-1 %", "top-5 %"))


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before the model is built and the features extracted, a ``--nb_knn``, ``--temperature``
    or ``--chunk-size`` that is not positive, a ``--n-per-class-list`` entry that is neither positive
    nor -1, or ``--n-tries`` below 1."""
    if min(args.nb_knn) < 1 or args.temperature <= 0:
        raise ValueError(f"--nb_knn and --temperature must be positive, got {args.nb_knn} and {args.temperature}")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be a positive number of queries, got {args.chunk_size}")
    bad = [n for n in args.n_per_class_list if n == 0 or n < -1]
    if bad or args.n_tries < 1:
        raise ValueError(
            f"--n-per-class-list takes positive counts or -1 (the whole training set), got {args.n_per_class_list}; "
            f"--n-tries must be >= 1, got {args.n_tries}"
        )


def main(args: argparse.Namespace) -> dict:
    """Run the k-NN evaluation; returns (and on rank 0 writes) the results record. ``results`` and
    ``best`` are those of the whole training set (when -1 is in ``--n-per-class-list``, the default);
    ``few_shot`` holds ``{"<n>_per_class": {"k<k>": mean over the tries}}`` for the other entries."""
    check_args(args)
    model, autocast_dtype, _ = setup_and_build_model(args)
    device = next(model.parameters()).device
    start = time.perf_counter()
    data = extract_train_and_val(args, model, autocast_dtype, device)
    extract_s = time.perf_counter() - start
    num_classes = int(max(data["train_labels"].max(), data["val_labels"].max())) + 1
    features = (data["train_features"], data["train_labels"], data["val_features"], data["val_labels"])
    options = {"temperature": args.temperature, "num_classes": num_classes, "chunk_size": args.chunk_size,
               "backend": args.backend, "shard_train": True, "device": device}  # fmt: skip
    summary, few_shot = {}, {}
    for n in dict.fromkeys(args.n_per_class_list):
        if n < 0:
            results = knn_classify(*features, nb_knn=args.nb_knn, **options)
            best_k = max(results, key=lambda k: results[k]["top1"])
            summary = {"results": {f"k{k}": r for k, r in results.items()}, "best": {"k": best_k, **results[best_k]}}
        else:
            few_shot[n] = few_shot_knn(*features, n_per_class=n, n_tries=args.n_tries, nb_knn=args.nb_knn, **options)
    if few_shot:
        summary["few_shot"] = {f"{n}_per_class": {f"k{k}": r for k, r in res.items()} for n, res in few_shot.items()}
        summary["n_tries"] = args.n_tries
    seconds = {"features": extract_s, "total": time.perf_counter() - start}
    record = run_record("knn", args, data, seconds, **summary, temperature=args.temperature, num_classes=num_classes)
    if distributed.is_main_process():
        path = write_json_atomic(Path(args.output_dir) / RESULTS_FILE, record)
        if "results" in summary:
            print(results_table(results))
        for n, res in few_shot.items():
            print(f"{n} per class (mean of {args.n_tries} tries):\n{results_table(res)}")
        logger.info("k-NN results written to %s", path)
    return record


if __name__ == "__main__":
    main(get_args_parser().parse_args())
