#!/usr/bin/env python
"""Curation at laptop scale, scored against ground truth the pipeline never sees; two parts.

1. Balance and retrieval: a pool of Synthetic images whose 12 classes come in geometric proportions
   (each ``--skew`` times as frequent as the next), curated with the quickstart backbone
   (``--config quickstart``, deduplication off: Synthetic's procedural pictures of one class are
   near-identical to any embedder). Seeds are ``--seeds`` VAL images of one rare class. Reported:
   the class counts of the pool and of the balanced sample, and how many nearest-neighbour
   retrievals belong to the seeds' class.
2. Deduplication: ``--pictures`` distinct random pictures (:mod:`dinov2.curation.planted`),
   ``--copies`` re-encoded / resized / cropped / exact copies of them, ``--leaked`` pictures of an
   evaluation set, and one corrupt file, through the ``embed`` and ``dedup`` stages with the
   thumbnail detector at the quickstart config's threshold. Reported: copies and leaks removed,
   distinct pictures lost.

    python dinov2/train/train.py --config quickstart --output-dir runs/quickstart
    python scripts/curation_demo.py --weights runs/quickstart/eval/training_300/teacher_checkpoint.pth \\
        --work-dir runs/curation_demo

writes ``WORK/demo_report.json`` and the pipelines' directories ``WORK/balance`` and ``WORK/dedup``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from dinov2.curation import clustering, retrieve
from dinov2.curation.__main__ import main as curate
from dinov2.curation.faiss_index import build_index
from dinov2.curation.planted import COPY_KINDS, altered_copy, random_picture
from dinov2.curation.store import EmbeddingStore
from dinov2.data.datasets.synthetic import Synthetic
from dinov2.utils.benchmark import environment


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="backbone weights for the quickstart architecture")
    p.add_argument("--work-dir", type=Path, default=Path("runs/curation_demo"))
    p.add_argument("--pool-size", type=int, default=3000, help="Synthetic pool images (part 1)")
    p.add_argument("--skew", type=float, default=1.35, help="ratio between the frequencies of consecutive classes")
    p.add_argument("--seeds", type=int, default=20, help="seed images (VAL split) of --seed-class")
    p.add_argument("--seed-class", type=int, default=10)
    p.add_argument("--balanced-size", type=int, default=600)
    p.add_argument("--levels", default="[36,12]", help="clustering.levels")
    p.add_argument("--pictures", type=int, default=3000, help="distinct random pictures (part 2)")
    p.add_argument("--copies", type=int, default=300, help="planted copies of pictures (part 2)")
    p.add_argument("--leaked", type=int, default=50, help="evaluation pictures also put in the pool (part 2)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ part 1: balance and retrieval
def write_skewed_pool(args) -> dict[str, int]:
    """The Synthetic pool (``{path: class}``) and the seed folder."""
    weights = np.array([args.skew**-c for c in range(12)])
    per_class = np.maximum(1, np.round(weights / weights.sum() * args.pool_size)).astype(int)
    source = Synthetic(split="TRAIN", num_images=40 * args.pool_size, image_size=64, seed=1)
    targets = source.get_targets()
    pool, seeds = args.work_dir / "synthetic_pool", args.work_dir / "seeds"
    pool.mkdir(parents=True, exist_ok=True)
    seeds.mkdir(parents=True, exist_ok=True)
    classes = {}
    for c in range(12):
        for i in np.nonzero(targets == c)[0][: per_class[c]]:
            path = pool / f"train_{i:06d}.png"
            source.get_image(int(i)).save(path)
            classes[str(path.resolve())] = c
    val = Synthetic(split="VAL", num_images=1000, image_size=64, seed=1)
    for i in np.nonzero(val.get_targets() == args.seed_class)[0][: args.seeds]:
        val.get_image(int(i)).save(seeds / f"seed_{i:04d}.png")
    return classes


def balance_and_retrieval(args) -> dict:
    classes = write_skewed_pool(args)
    out = args.work_dir / "balance"
    curate([
        "run", "--config", "quickstart", "--output-dir", str(out), f"pool={args.work_dir / 'synthetic_pool'}",
        f"embed.model.pretrained_weights={args.weights}", "dedup.enabled=false",
        f"retrieval.seeds=[{{name: rare, dataset: {args.work_dir / 'seeds'}, mode: nn, per_seed: 4}}]",
        f"retrieval.balanced_size={args.balanced_size}", f"clustering.levels={args.levels}",
    ])  # fmt: skip
    pool = EmbeddingStore(out / "embeddings" / "pool")
    cfg = json.loads((out / "report.json").read_text())["stages"]
    h = clustering.Hierarchy.load(out / "cluster")
    balanced = Counter(classes[p] for p in pool.paths(clustering.balanced_sample(h, args.balanced_size, 0)))
    from omegaconf import OmegaConf

    index = build_index(pool, OmegaConf.load(out / "config.yaml").index)
    nn = pool.paths(retrieve.nearest_neighbours(index, EmbeddingStore(out / "embeddings" / "seeds" / "rare"), 4))
    uniform = random.Random(0).sample(sorted(classes), args.balanced_size)
    counts = Counter(classes.values())
    return {
        "pool_class_counts": [counts[c] for c in range(12)],
        "balanced_class_counts": [balanced[c] for c in range(12)],
        "uniform_sample_class_counts": [Counter(classes[p] for p in uniform)[c] for c in range(12)],
        "seed_class": args.seed_class,
        "seed_class_share_of_pool": counts[args.seed_class] / len(classes),
        "nn_retrieved": len(nn),
        "nn_retrieved_in_seed_class": sum(classes[p] == args.seed_class for p in nn),
        "curated": cfg["retrieve"]["curated"],
    }


# ------------------------------------------------------------------ part 2: deduplication
def write_pictures_with_copies(args) -> dict[str, tuple[str, int]]:
    """The picture pool (``{path: (kind, picture)}``) and the evaluation folder."""
    rng = random.Random(0)
    pool, evals = args.work_dir / "picture_pool", args.work_dir / "eval"
    pool.mkdir(parents=True, exist_ok=True)
    evals.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(args.pictures):
        path = pool / f"pic_{i:05d}.png"
        random_picture(i).save(path)
        truth[str(path.resolve())] = ("original", i)
    for n in range(args.copies):
        picture, kind = rng.randrange(args.pictures), COPY_KINDS[n % len(COPY_KINDS)]
        path = pool / f"copy_{n:05d}_{kind}.png"
        altered_copy(random_picture(picture), kind).save(path)
        truth[str(path.resolve())] = (kind, picture)
    for j in range(200):
        random_picture(10**6 + j).save(evals / f"val_{j:04d}.png")
        if j < args.leaked:
            path = pool / f"leak_{j:04d}.png"
            altered_copy(random_picture(10**6 + j), COPY_KINDS[j % len(COPY_KINDS)]).save(path)
            truth[str(path.resolve())] = ("leak", 10**6 + j)
    (pool / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return truth


def deduplication(args) -> dict:
    truth = write_pictures_with_copies(args)
    out = args.work_dir / "dedup"
    common = ["--config", "quickstart", "--output-dir", str(out), f"pool={args.work_dir / 'picture_pool'}",
              "embed.model.kind=thumbnail", f"dedup.eval_datasets=[{args.work_dir / 'eval'}]"]  # fmt: skip
    curate(["embed", *common])
    curate(["dedup", *common])
    pool = EmbeddingStore(out / "embeddings" / "copy")
    kept = set(pool.paths(np.nonzero(np.load(out / "dedup" / "keep.npy"))[0]))
    copies = [p for p, (kind, _) in truth.items() if kind not in ("original", "leak")]
    leaks = [p for p, (kind, _) in truth.items() if kind == "leak"]
    survivors = Counter(picture for p, (kind, picture) in truth.items() if p in kept and kind != "leak")
    copied = Counter(picture for kind, picture in (truth[p] for p in copies))
    report = json.loads((out / "dedup" / "done.json").read_text())["report"]
    return {  # a group of copies keeps its first file in pool order, which may be a copy: count survivors
        "pool_files": len(truth) + 1,
        "unreadable": len(pool.failed()),
        "planted_copies": len(copies),
        "pictures_with_copies": len(copied),
        "pictures_with_copies_left_once": sum(survivors[picture] == 1 for picture in copied),
        "copies_missed": sum(n - 1 for n in survivors.values() if n > 1),
        "leaks": len(leaks),
        "leaks_removed": sum(p not in kept for p in leaks),
        "distinct_pictures": args.pictures,
        "distinct_pictures_lost": args.pictures - len(survivors),
        "threshold": report["self"]["threshold"],
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = {"balance_and_retrieval": balance_and_retrieval(args), "deduplication": deduplication(args)}
    settings = {**vars(args), "work_dir": str(args.work_dir)}
    result = {"environment": environment(torch.device("cpu")), "args": settings, **result}
    (args.work_dir / "demo_report.json").write_text(json.dumps(result, indent=2) + "\n")
    for part in ("balance_and_retrieval", "deduplication"):
        print(part)
        for key, value in result[part].items():
            print(f"  {key:32s} {value}")
    print(f"wrote {args.work_dir / 'demo_report.json'}")
    return result


if __name__ == "__main__":
    main()
