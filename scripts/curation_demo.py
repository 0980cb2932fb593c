#!/usr/bin/env python
"""Curation at laptop scale, measured against ground truth: a skewed pool of Synthetic images with
planted copies, evaluation-set leaks and an unreadable file, curated by the pipeline.

The pool has the 12 Synthetic classes in geometric proportions (each class ``--skew`` times as
frequent as the next); ``--copies`` re-encoded / resized / cropped copies of pool images and
``--leaked`` images of the evaluation set are added. Seeds are ``--seeds`` VAL images of one rare
class. Labels are known to this script only (the pipeline never sees them), so it can report how
many planted copies and leaks were removed, how many distinct images were lost, how balanced the
balanced sample is, and how many nearest-neighbour retrievals belong to the seeds' class.

    python dinov2/train/train.py --config quickstart --output-dir runs/quickstart
    python scripts/curation_demo.py --weights runs/quickstart/eval/training_299/teacher_checkpoint.pth \\
        --work-dir runs/curation_demo

writes ``WORK/demo_report.json`` (and the pipeline's directory ``WORK/out``). The image-writing
and the scoring are this script's; everything between them is ``python -m dinov2.curation run``.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from dinov2.curation.__main__ import main as curate
from dinov2.data.datasets.synthetic import Synthetic
from dinov2.utils.benchmark import environment


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="backbone weights for the quickstart architecture")
    p.add_argument("--work-dir", type=Path, default=Path("runs/curation_demo"))
    p.add_argument("--pool-size", type=int, default=3000, help="distinct pool images")
    p.add_argument("--skew", type=float, default=1.35, help="ratio between the frequencies of consecutive classes")
    p.add_argument("--copies", type=int, default=150, help="planted near-duplicates of pool images")
    p.add_argument("--leaked", type=int, default=25, help="evaluation images also put in the pool")
    p.add_argument("--seeds", type=int, default=20, help="seed images (VAL split) of --seed-class")
    p.add_argument("--seed-class", type=int, default=10)
    p.add_argument("--balanced-size", type=int, default=600)
    p.add_argument("--levels", default="[36,12]", help="clustering.levels")
    return p.parse_args(argv)


def altered(image: Image.Image, kind: str) -> Image.Image:
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=60)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "resized":
        return image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.BILINEAR)
    w, h = image.size  # cropped: a few pixels off two sides
    return image.crop((w // 16, 0, w, h - h // 16))


def write_inputs(args) -> dict:
    """The pool, the evaluation set and the seeds as image folders; returns each pool file's truth."""
    rng = random.Random(0)
    weights = np.array([args.skew**-c for c in range(12)])
    per_class = np.maximum(1, np.round(weights / weights.sum() * args.pool_size)).astype(int)
    source = Synthetic(split="TRAIN", num_images=40 * args.pool_size, image_size=64, seed=1)
    by_class = {c: [i for i in range(len(source)) if source.get_target(i) == c][: per_class[c]] for c in range(12)}
    val = Synthetic(split="VAL", num_images=2000, image_size=64, seed=1)
    pool, evals, seeds = (args.work_dir / name for name in ("pool", "eval", "seeds"))
    for folder in (pool, evals, seeds):
        folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for c, indices in by_class.items():
        for i in indices:
            path = pool / f"train_{i:06d}.png"
            source.get_image(i).save(path)
            truth[str(path.resolve())] = {"class": c, "original": f"train_{i}", "kind": "original"}
    originals = [p for p in truth]
    for n in range(args.copies):
        original = rng.choice(originals)
        kind = ("jpeg", "resized", "cropped")[n % 3]
        path = pool / f"copy_{n:04d}_{kind}.png"
        altered(Image.open(original).convert("RGB"), kind).save(path)
        truth[str(path.resolve())] = {**truth[original], "kind": kind}
    for i in range(200):
        val.get_image(i).save(evals / f"val_{i:04d}.png")
        if i < args.leaked:
            path = pool / f"leak_{i:04d}.png"
            val.get_image(i).save(path)
            truth[str(path.resolve())] = {"class": val.get_target(i), "original": f"val_{i}", "kind": "leak"}
    (pool / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    seed_ids = [i for i in range(200, len(val)) if val.get_target(i) == args.seed_class][: args.seeds]
    for i in seed_ids:
        val.get_image(i).save(seeds / f"seed_{i:04d}.png")
    return truth


def score(args, truth: dict, out: Path) -> dict:
    curated = (out / "curated.txt").read_text().splitlines()
    kept = set(np.load(out / "dedup" / "keep.npy").nonzero()[0])
    from dinov2.curation.store import EmbeddingStore

    pool_store = EmbeddingStore(out / "embeddings" / "pool")
    kept_paths = set(pool_store.paths(np.array(sorted(kept))))
    planted = [p for p, t in truth.items() if t["kind"] not in ("original", "leak")]
    leaks = [p for p, t in truth.items() if t["kind"] == "leak"]
    originals = {t["original"] for t in truth.values() if t["kind"] != "leak"}
    surviving = {truth[p]["original"] for p in kept_paths if truth[p]["kind"] != "leak"}
    pool_classes = Counter(t["class"] for p, t in truth.items() if t["kind"] == "original")
    retrieved = json.loads((out / "report.json").read_text())["stages"]["retrieve"]
    nn_ids = _nn_retrievals(out, pool_store)
    balanced = _balanced_classes(out, pool_store, truth)
    return {
        "pool_images": len(truth) + 1,
        "planted_copies": len(planted),
        "planted_copies_removed": sum(p not in kept_paths for p in planted),
        "leaks": len(leaks),
        "leaks_removed": sum(p not in kept_paths for p in leaks),
        "distinct_images": len(originals),
        "distinct_images_lost": len(originals - surviving),
        "pool_class_counts": [pool_classes[c] for c in range(12)],
        "balanced_class_counts": [balanced[c] for c in range(12)],
        "seed_class": args.seed_class,
        "nn_retrieved": len(nn_ids),
        "nn_retrieved_in_seed_class": sum(truth[p]["class"] == args.seed_class for p in nn_ids),
        "curated": len(curated),
        "retrieve_report": retrieved,
    }


def _nn_retrievals(out: Path, pool_store) -> list[str]:
    """Re-run the seed retrieval alone (the curated list is its union with the balanced sample)."""
    from omegaconf import OmegaConf

    from dinov2.curation import retrieve
    from dinov2.curation.faiss_index import build_index
    from dinov2.curation.store import EmbeddingStore

    cfg = OmegaConf.load(out / "config.yaml")
    keep = np.load(out / "dedup" / "keep.npy")
    index = build_index(pool_store, cfg.index, keep=keep)
    seeds = EmbeddingStore(out / "embeddings" / "seeds" / "rare")
    return pool_store.paths(retrieve.nearest_neighbours(index, seeds, 4))


def _balanced_classes(out: Path, pool_store, truth: dict) -> Counter:
    from omegaconf import OmegaConf

    from dinov2.curation import clustering

    cfg = OmegaConf.load(out / "config.yaml")
    h = clustering.Hierarchy.load(out / "cluster")
    ids = clustering.balanced_sample(h, int(cfg.retrieval.balanced_size), int(cfg.retrieval.seed))
    return Counter(truth[p]["class"] for p in pool_store.paths(ids))


def main(argv=None) -> dict:
    args = parse_args(argv)
    truth = write_inputs(args)
    out = args.work_dir / "out"
    curate([
        "run", "--config", "quickstart", "--output-dir", str(out), f"pool={args.work_dir / 'pool'}",
        f"embed.model.pretrained_weights={args.weights}", f"dedup.eval_datasets=[{args.work_dir / 'eval'}]",
        f"retrieval.seeds=[{{name: rare, dataset: {args.work_dir / 'seeds'}, mode: nn, per_seed: 4}}]",
        f"retrieval.balanced_size={args.balanced_size}", f"clustering.levels={args.levels}",
    ])  # fmt: skip
    result = {
        "environment": environment(__import__("torch").device("cpu")),
        "args": vars(args),
        **score(args, truth, out),
    }
    result["args"]["work_dir"] = str(args.work_dir)
    (args.work_dir / "demo_report.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [(k, v) for k, v in result.items() if k not in ("environment", "args", "retrieve_report")]
    for key, value in rows:
        print(f"{key:32s} {value}")
    return result


if __name__ == "__main__":
    main()
