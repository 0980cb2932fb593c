#!/usr/bin/env python
"""Data curation at pool scale: a synthetic embedding store, self-deduplication, hierarchical k-means
and the embedders' throughput; time and peak memory of each, one fresh process per measurement.

Synthetic pool: ``--num-vectors`` unit vectors of ``--dim`` drawn around ``--centres`` random unit
centres (``centre + spread * g / sqrt(dim)``, ``g`` standard normal, then normalised; with spread 1 a
point's cosine to its centre is about 0.71 and to another point of its cluster about 0.5). A planted
``--dup-fraction`` of the rows are near-copies of a random earlier non-copy row
(``source + eps * g / sqrt(dim)``, ``eps`` uniform in ``[0, --dup-noise]``, normalised: cosine about
``1 / sqrt(1 + eps^2)``; 0.965-1.0 measured at the default 0.25, fp16 storage included). The store
is written chunk by chunk in fp16, as the embed stage writes it, so at most one chunk (and the rows
that its copies copy) is in memory.

Rows, each measured in a new process (multiprocessing, spawn), so faiss's allocations, which Python
does not see, are counted: the peak RSS of the process (``ru_maxrss``, which also counts the resident
pages of memory-mapped chunks) and that peak minus the RSS after the imports (the baseline). Each row
also records the 1-minute load average at its start and end (other processes skew CPU figures).

* ``store``: writing the synthetic store.
* ``dedup``: ``dedup.self_deduplicate`` with the automatic index (``IVF<nlist>,PQ<m>`` above
  ``--exact-max-size`` vectors, else ``Flat``), with its parts timed (index training, adding,
  the k-NN search, the exact re-scoring, the connected components); recall of the planted
  (source, copy) pairs among the pairs it returns, and the number of pairs it flagged.
* ``kmeans``: ``clustering.hierarchical_kmeans`` for each ``--levels`` (e.g. ``1000`` and
  ``1000,50``) on every vector, with level-1 training and the chunk-by-chunk assignment timed apart.
* ``embed``: images/s of the embedders on random input: ``CONFIG:SIZE`` entries of ``--embed-archs``
  build a :class:`BackboneEmbedder` (random weights) at ``SIZE`` px, ``thumbnail:SIZE`` a
  :class:`ThumbnailEmbedder`. ``forward`` is the embedder alone on a tensor batch; ``with transform``
  also runs its transform on each PIL image of ``--image-size`` (the pipeline's per-image work).

Example (the CPU figures in docs/performance.md; the defaults are sized for a 2-core CPU, about
8.5 minutes there):

    python scripts/benchmark_curation.py

and ``--quick`` for a check that finishes in well under a minute. With faiss-gpu, deduplication and
k-means run on every GPU faiss sees (``index.gpu: auto``) and the backbones on CUDA (``--device auto``);
the RSS columns then count host memory only (``cuda_peak_mib``: the backbone's CUDA peak).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinov2.utils.benchmark import device_name, environment, write_report

SECTIONS = ("dedup", "kmeans", "embed")
DEFAULT_EMBED_ARCHS = ["vits14_pretrain:224", "vitt8_32px:32", "thumbnail:16"]
QUICK = {  # --quick: every section on a small pool (its index is Flat: 20k <= --exact-max-size)
    "num_vectors": 20_000,
    "dim": 64,
    "centres": 100,
    "chunk_size": 4096,
    "levels": ["50", "50,5"],
    "niter": 10,
    "embed_archs": ["vitt8_32px:32", "thumbnail:16"],
    "embed_iters": 3,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("synthetic pool")
    g.add_argument("--num-vectors", type=int, default=1_000_000)
    g.add_argument("--dim", type=int, default=384)
    g.add_argument("--centres", type=int, default=1000, help="mixture components on the sphere")
    g.add_argument("--spread", type=float, default=1.0, help="noise norm around a centre (relative)")
    g.add_argument("--dup-fraction", type=float, default=0.01, help="rows planted as near-copies")
    g.add_argument("--dup-noise", type=float, default=0.25, help="largest relative noise of a copy")
    g.add_argument("--chunk-size", type=int, default=65536, help="rows per store chunk (embed.chunk_size)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--work-dir", type=Path, help="keep the store here (reused when complete); default: a temp dir")
    g = p.add_argument_group("dedup (configs/curation/default.yaml's index and dedup sections)")
    g.add_argument(
        "--k", type=int, default=16, help="neighbours per vector (config and paper: 64; 16 keeps the CPU run short)"
    )
    g.add_argument("--threshold", type=float, default=0.95, help="cosine at and above which a pair is a copy")
    g.add_argument("--rerank-margin", type=float, default=0.05)
    g.add_argument("--nprobe", type=int, default=16, help="IVF lists visited per query (config default 32)")
    g.add_argument("--train-size", type=int, default=262144, help="vectors to train the IVF-PQ index")
    g.add_argument("--exact-max-size", type=int, default=100_000, help="Flat index up to this many vectors")
    g.add_argument("--index-factory", default=None, help="a faiss factory string instead of the automatic choice")
    g = p.add_argument_group("k-means (the clustering section)")
    g.add_argument("--levels", nargs="+", default=["1000", "1000,50"], help="one run per comma-separated level list")
    g.add_argument("--niter", type=int, default=10, help="k-means iterations per level (config default 20)")
    g.add_argument("--max-train-points", type=int, default=1_000_000, help="level-1 training sample")
    g.add_argument("--resampling-steps", type=int, default=0)
    g = p.add_argument_group("embedders")
    g.add_argument("--embed-archs", nargs="+", default=DEFAULT_EMBED_ARCHS, help="CONFIG:SIZE or thumbnail:SIZE")
    g.add_argument("--embed-batch", type=int, default=32)
    g.add_argument("--embed-warmup", type=int, default=1)
    g.add_argument("--embed-iters", type=int, default=5)
    g.add_argument("--image-size", nargs=2, type=int, default=[500, 375], metavar=("W", "H"))
    g.add_argument("--device", default="auto", help="backbone device: auto (CUDA when available) | cpu | cuda[:N]")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads per process (default: theirs)")
    p.add_argument(
        "--quick", action="store_true", help="a small run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
    )
    p.add_argument("--output", type=Path, default=Path("benchmark_curation.json"))
    if p.parse_known_args(argv)[0].quick:  # QUICK replaces the defaults; flags given still win
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    args.levels = [[int(k) for k in spec.split(",")] for spec in args.levels]
    return args


# ------------------------------------------------------------------------------ child processes
def _rss_mib() -> float:
    """Resident set size of this process now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(task: str, params: dict) -> dict:
    """Run one measurement in this (fresh) process: imports, baseline RSS, the task, peak RSS."""
    import faiss  # noqa: F401  (imported before the baseline, as every task needs it)

    import dinov2.curation.clustering  # noqa: F401
    import dinov2.curation.dedup  # noqa: F401
    import dinov2.curation.embed  # noqa: F401

    if params.get("threads"):
        torch.set_num_threads(params["threads"])
        faiss.omp_set_num_threads(params["threads"])
    baseline, load = _rss_mib(), os.getloadavg()[0]
    result = TASKS[task](params)
    peak = result.pop("_peak_mib", None) or _peak_rss_mib()
    memory = {"peak_rss_mib": peak, "baseline_rss_mib": baseline, "peak_minus_baseline_mib": peak - baseline}
    return {**result, **memory, "load_average_1min": [load, os.getloadavg()[0]]}  # at the start and the end


def in_child(task: str, **params: Any) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_child, task, params).result()


# ------------------------------------------------------------------------------ synthetic store
def plant_copies(num_vectors: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(copy ids sorted, source id of each)``: each source is a non-copy row with a lower id."""
    rng = np.random.default_rng([seed, 1])
    count = min(int(round(fraction * num_vectors)), num_vectors - 1)
    copies = np.sort(rng.choice(np.arange(1, num_vectors), size=count, replace=False))
    originals = np.setdiff1d(np.arange(num_vectors), copies, assume_unique=True)
    below = np.searchsorted(originals, copies)  # originals with a lower id (row 0 is one)
    sources = originals[(rng.random(count) * below).astype(np.int64)]
    return copies, sources


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def store_info(p: dict) -> dict:
    keys = ("num_vectors", "dim", "centres", "spread", "dup_fraction", "dup_noise", "seed")
    return {"source": "synthetic", "embedder": {"kind": "synthetic", **{k: p[k] for k in keys}}, "dtype": "float16"}


def task_store(p: dict) -> dict:
    from dinov2.curation.store import EmbeddingStore

    n, dim = p["num_vectors"], p["dim"]
    copies, sources = p["copies"], p["sources"]
    paths = [f"/synthetic/{i:08d}.jpg" for i in range(n)]
    store = EmbeddingStore.create(p["store_dir"], paths, p["chunk_size"], store_info(p))
    centres = _normalise(np.random.default_rng([p["seed"], 0]).standard_normal((p["centres"], dim), dtype=np.float32))
    todo = store.missing_chunks()
    start, written = time.perf_counter(), 0
    for c in todo:
        lo, hi = c * store.chunk_size, min((c + 1) * store.chunk_size, n)
        rng = np.random.default_rng([p["seed"], 2, c])
        x = centres[rng.integers(0, len(centres), hi - lo)]
        x += (p["spread"] / math.sqrt(dim)) * rng.standard_normal((hi - lo, dim), dtype=np.float32)
        x = _normalise(x)
        inside = (copies >= lo) & (copies < hi)
        rows, src = copies[inside], sources[inside]
        base = np.empty((len(rows), dim), dtype=np.float32)
        for sc in np.unique(src // store.chunk_size):  # sources in earlier chunks are read back (fp16)
            where = np.nonzero(src // store.chunk_size == sc)[0]
            block = x if sc == c else store.load_chunk(int(sc), mmap=True)
            base[where] = block[src[where] - sc * store.chunk_size]
        eps = rng.uniform(0.0, p["dup_noise"], (len(rows), 1)).astype(np.float32)
        noise = rng.standard_normal((len(rows), dim), dtype=np.float32) / math.sqrt(dim)
        x[rows - lo] = _normalise(base + eps * noise)
        store.write_chunk(c, x, paths[lo:hi], {})
        written += hi - lo
    seconds = time.perf_counter() - start
    return {"chunks_written": len(todo), "chunks": store.num_chunks, "vectors_written": written, "seconds": seconds,
            "vectors_per_s": written / seconds if written else None}  # fmt: skip


# ------------------------------------------------------------------------------ dedup
class Timer:
    """Wraps functions (module attributes or methods) to add up their wall time under a name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.last: dict[str, Any] = {}

    def wrap(self, owner, attr: str, name: str, keep_result: bool = False) -> None:
        inner = getattr(owner, attr)

        def timed(*a, **kw):
            start = time.perf_counter()
            out = inner(*a, **kw)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.calls[name] = self.calls.get(name, 0) + 1
            if keep_result:
                self.last[name] = out
            return out

        setattr(owner, attr, timed)


def curation_config(p: dict):
    from dinov2.curation.pipeline import load_curation_config

    overrides = [
        "pool=synthetic",
        f"index.nprobe={p['nprobe']}",
        f"index.train_size={p['train_size']}",
        f"index.exact_max_size={p['exact_max_size']}",
        f"dedup.k={p['k']}",
        f"dedup.threshold={p['threshold']}",
        f"dedup.rerank_margin={p['rerank_margin']}",
        f"clustering.niter={p['niter']}",
        f"clustering.max_train_points={p['max_train_points']}",
        f"clustering.resampling_steps={p['resampling_steps']}",
        f"clustering.seed={p['seed']}",
    ]
    if p.get("index_factory"):
        overrides.append(f"index.factory={p['index_factory']}")
    if p.get("levels"):
        overrides.append(f"clustering.levels=[{','.join(map(str, p['levels']))}]")
    return load_curation_config(None, overrides)


def task_dedup(p: dict) -> dict:
    import faiss

    from dinov2.curation import dedup, faiss_index
    from dinov2.curation.store import EmbeddingStore

    cfg, store = curation_config(p), EmbeddingStore(p["store_dir"])
    t = Timer()
    t.wrap(dedup, "build_index", "build_index", keep_result=True)
    t.wrap(faiss_index.VectorIndex, "train", "train")
    t.wrap(faiss_index.VectorIndex, "add", "add")
    t.wrap(faiss_index.VectorIndex, "search", "search")
    t.wrap(dedup, "_exact_similarities", "rerank")
    t.wrap(dedup, "duplicate_pairs", "pairs", keep_result=True)
    t.wrap(dedup, "duplicate_groups", "components")
    start = time.perf_counter()
    keep, report = dedup.self_deduplicate(store, cfg.index, cfg.dedup.k, cfg.dedup.threshold, cfg.dedup.rerank_margin)
    seconds = time.perf_counter() - start
    peak = _peak_rss_mib()  # before anything below can raise it
    n = len(store)
    i, j, _ = t.last["pairs"]
    copies, sources = p["copies"], p["sources"]
    planted = np.minimum(copies, sources) * n + np.maximum(copies, sources)
    found = np.isin(planted, i * n + j)
    group = np.arange(n)  # planted group of each id: its source's id (copies of one source share it)
    group[copies] = sources
    true_sims = np.einsum("nd,nd->n", store.read(copies), store.read(sources))
    index = t.last["build_index"]
    index_bytes = int(faiss.serialize_index(index.index).size)
    floor = report["candidates_from"]
    approx = {} if index.exact else planted_approximation(index, store, copies, sources, true_sims, cfg.dedup, floor)
    s = t.seconds
    parts = {"train_s": s.get("train", 0.0), "add_s": s.get("add", 0.0), "search_s": s.get("search", 0.0),
             "rerank_s": s.get("rerank", 0.0), "components_s": s.get("components", 0.0)}  # fmt: skip
    return {
        "_peak_mib": peak,
        **report,
        "nprobe": int(cfg.index.nprobe),
        "seconds": seconds,
        "vectors_per_s": n / seconds,
        **parts,
        "other_s": seconds - sum(parts.values()),
        "planted_pairs": int(len(planted)),
        "planted_pairs_above_threshold": int(np.count_nonzero(true_sims >= cfg.dedup.threshold)),
        "planted_min_similarity": float(true_sims.min()) if len(true_sims) else None,
        "planted_pairs_found": int(np.count_nonzero(found)),
        "planted_pair_recall": float(found.mean()) if len(found) else None,
        "planted_copies_removed": int(np.count_nonzero(~keep[copies])),
        "other_pairs_flagged": int(len(i) - np.count_nonzero(found)),  # e.g. two copies of one source
        "pairs_across_planted_groups": int(np.count_nonzero(group[i] != group[j])),  # false positives
        "non_copies_removed": int(np.count_nonzero(~keep) - np.count_nonzero(~keep[copies])),
        "index_bytes": index_bytes,
        "index_bytes_per_vector": index_bytes / max(len(index), 1),
        "flat_bytes_per_vector": 4 * store.dim,  # what an IndexFlat stores per vector (float32)
        **approx,
    }


def planted_approximation(index, store, copies, sources, true_sims, d, floor: float) -> dict:
    """How the approximate index scores the planted pairs: each copy searched as in ``duplicate_pairs``
    (``k + 1`` results), its source's approximate similarity against the exact one, and how many fall
    below the re-scoring floor that deduplication used (``candidates_from`` of its report)."""
    sims, ids = index.search(store.read(copies), d.k + 1)
    hit = ids == sources[:, None]
    present = hit.any(axis=1)
    approx = np.where(hit, sims, -np.inf).max(axis=1)[present]
    error = approx - true_sims[present]
    return {
        "planted_source_in_results": float(present.mean()),
        "planted_approx_minus_exact": {
            "mean": float(error.mean()),
            "sd": float(error.std()),
            "min": float(error.min()),
            "max": float(error.max()),
        },  # fmt: skip
        "planted_approx_below_floor": float(1 - np.count_nonzero(approx >= floor) / len(copies)),
    }


# ------------------------------------------------------------------------------ k-means
def task_kmeans(p: dict) -> dict:
    from dinov2.curation import clustering
    from dinov2.curation.faiss_index import num_gpus
    from dinov2.curation.store import EmbeddingStore

    cfg, store = curation_config(p), EmbeddingStore(p["store_dir"])
    n = len(store)
    events: list[tuple[str, float, int]] = []  # (what, seconds, rows); assign calls inside a level are not listed
    depth = [0]
    level_fn, assign_fn = clustering.kmeans_level, clustering.assign

    def kmeans_level(x, *a, **kw):
        depth[0] += 1
        start = time.perf_counter()
        try:
            return level_fn(x, *a, **kw)
        finally:
            depth[0] -= 1
            events.append(("level", time.perf_counter() - start, len(x)))

    def assign(x, centroids):
        start = time.perf_counter()
        out = assign_fn(x, centroids)
        if not depth[0]:
            events.append(("assign", time.perf_counter() - start, len(x)))
        return out

    clustering.kmeans_level, clustering.assign = kmeans_level, assign
    keep = np.ones(n, dtype=bool)
    start = time.perf_counter()
    h = clustering.hierarchical_kmeans(store, keep, cfg.clustering, num_gpus(cfg.index.gpu))
    seconds = time.perf_counter() - start
    peak = _peak_rss_mib()
    at = [pos for pos, e in enumerate(events) if e[0] == "level"]  # level 1, then each level above
    levels = [events[pos] for pos in at]
    chunk_assign = [e for e in events[at[0] + 1 : at[1] if len(at) > 1 else None] if e[0] == "assign"]
    assign_s = sum(e[1] for e in chunk_assign)
    sizes = h.sizes(1)
    return {
        "_peak_mib": peak,
        "levels": [int(k) for k in cfg.clustering.levels],
        "niter": int(cfg.clustering.niter),
        "init": str(cfg.clustering.get("init", "random")),
        "nredo": int(cfg.clustering.get("nredo", 1)),
        "train_points": int(levels[0][2]),
        "seconds": seconds,
        "vectors_per_s": n / seconds,
        "level1_train_s": levels[0][1],
        "assign_s": assign_s,
        "assign_vectors_per_s": sum(e[2] for e in chunk_assign) / assign_s if assign_s else None,
        "upper_levels_s": sum(e[1] for e in levels[1:]),
        "other_s": seconds - levels[0][1] - assign_s - sum(e[1] for e in levels[1:]),
        "level1_sizes": {
            "empty": int(np.count_nonzero(sizes == 0)),
            "min": int(sizes.min()),
            "median": float(np.median(sizes)),
            "max": int(sizes.max()),
        },  # fmt: skip
    }


# ------------------------------------------------------------------------------ embedders
def task_embed(p: dict) -> dict:
    from PIL import Image

    from dinov2.curation.embed import BackboneEmbedder, ThumbnailEmbedder
    from dinov2.curation.pipeline import load_curation_config

    name, size = p["spec"].rsplit(":", 1)
    size = int(size)
    start = time.perf_counter()
    info: dict[str, Any] = {}
    if name == "thumbnail":
        embedder = ThumbnailEmbedder(size)
        info["model"] = f"thumbnail {size}x{size}"
    else:
        from dinov2.utils.config import load_config

        overrides = ["pool=synthetic", f"embed.model.config_file={name}",
                     f"embed.model.resize_size={size}", f"embed.model.crop_size={size}"]  # fmt: skip
        embedder = BackboneEmbedder(load_curation_config(None, overrides).embed.model, device=p["device"])
        student = load_config(name).student
        params = sum(t.numel() for t in embedder.model.parameters())
        info["model"] = f"{student.arch}/{student.patch_size} (random weights)"
        info["params_m"] = params / 1e6
    info["build_s"] = time.perf_counter() - start
    batch = p["batch"]
    gen = torch.Generator().manual_seed(0)
    tensors = torch.randn(batch, 3, size, size, generator=gen)
    rng = np.random.default_rng(0)
    width, height = p["image_size"]
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(batch)]

    def forward():  # as the embed stage: a CPU batch in, float32 vectors back on the CPU (synchronises CUDA)
        return embedder(tensors).float().cpu()

    def with_transform():
        return embedder(torch.stack([embedder.transform(im) for im in images])).float().cpu()

    out = {"model": info.pop("model"), "size": size, "batch": batch, "device": str(embedder.device), **info}
    for key, fn in (("forward", forward), ("with_transform", with_transform)):
        times = []
        for it in range(p["warmup"] + p["iters"]):
            t0 = time.perf_counter()
            vectors = fn()
            if it >= p["warmup"]:
                times.append(time.perf_counter() - t0)
        out[f"{key}_img_per_s"] = batch / statistics.median(times)
        out[f"{key}_median_ms"] = 1e3 * statistics.median(times)
    out["dim"] = int(vectors.shape[1])
    cuda = embedder.device.type == "cuda"
    out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(embedder.device) / 2**20 if cuda else None
    return out


TASKS = {"store": task_store, "dedup": task_dedup, "kmeans": task_kmeans, "embed": task_embed}


# ------------------------------------------------------------------------------ the run
def _mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def print_tables(rows: list[dict]) -> None:
    from dinov2.eval.metrics import format_table

    def section(kind: str, headers: list[str], cells) -> None:
        chosen = [r for r in rows if r["kind"] == kind]
        if chosen:
            print(f"\n[{kind}]")
            print(format_table([cells(r) for r in chosen], headers))

    section("store", ["vectors", "dim", "chunks written", "s", "vectors/s", "peak RSS MiB", "peak-base MiB"],
            lambda r: [r["num_vectors"], r["dim"], r["chunks_written"], r["seconds"],
                       f"{r['vectors_per_s']:.0f}" if r["vectors_per_s"] else "n/a",
                       _mib(r["peak_rss_mib"]), _mib(r["peak_minus_baseline_mib"])])  # fmt: skip
    section("dedup", ["index", "nprobe", "k", "thr", "s", "vectors/s", "train s", "add s", "search s", "rerank s",
                      "pairs", "planted found", "recall", "false pairs", "copies removed", "other removed",
                      "index B/vec", "peak RSS MiB", "peak-base MiB"],
            lambda r: [r["index"], r["nprobe"] if "IVF" in r["index"] else "-", r["k"], r["threshold"],
                       r["seconds"], f"{r['vectors_per_s']:.0f}", r["train_s"], r["add_s"], r["search_s"],
                       r["rerank_s"], r["pairs_above_threshold"], f"{r['planted_pairs_found']}/{r['planted_pairs']}",
                       f"{r['planted_pair_recall']:.4f}", r["pairs_across_planted_groups"],
                       r["planted_copies_removed"], r["non_copies_removed"], f"{r['index_bytes_per_vector']:.1f}",
                       _mib(r["peak_rss_mib"]), _mib(r["peak_minus_baseline_mib"])])  # fmt: skip
    for r in rows:
        if "planted_approx_minus_exact" in r:
            e = r["planted_approx_minus_exact"]
            print(
                f"{r['index']}: a planted pair's approximate minus exact similarity: mean {e['mean']:.4f}, "
                f"sd {e['sd']:.4f}, min {e['min']:.4f}, max {e['max']:.4f}; source among the copy's results "
                f"{r['planted_source_in_results']:.4f}; below the re-scoring floor (candidates_from) "
                f"{r['planted_approx_below_floor']:.4f}"
            )
    section("kmeans", ["levels", "niter", "train pts", "s", "vectors/s", "L1 train s", "assign s", "assign vec/s",
                       "upper s", "empty", "min", "median", "max", "peak RSS MiB", "peak-base MiB"],
            lambda r: [",".join(map(str, r["levels"])), r["niter"], r["train_points"], r["seconds"],
                       f"{r['vectors_per_s']:.0f}", r["level1_train_s"], r["assign_s"],
                       f"{r['assign_vectors_per_s']:.0f}", r["upper_levels_s"], *r["level1_sizes"].values(),
                       _mib(r["peak_rss_mib"]), _mib(r["peak_minus_baseline_mib"])])  # fmt: skip
    section("embed", ["model", "device", "px", "batch", "dim", "forward img/s", "with transform img/s",
                      "peak RSS MiB", "peak-base MiB"],
            lambda r: [r["model"], r["device"], r["size"], r["batch"], r["dim"], r["forward_img_per_s"],
                       r["with_transform_img_per_s"], _mib(r["peak_rss_mib"]),
                       _mib(r["peak_minus_baseline_mib"])])  # fmt: skip


def settings(args: argparse.Namespace) -> dict:
    from dinov2.curation.faiss_index import factory_string, import_faiss, num_gpus
    from dinov2.curation.pipeline import load_curation_config

    index_cfg = load_curation_config(None, ["pool=synthetic", f"index.train_size={args.train_size}",
                                            f"index.exact_max_size={args.exact_max_size}"]).index  # fmt: skip
    if args.index_factory:
        index_cfg.factory = args.index_factory
    faiss = import_faiss()
    return {
        "num_vectors": args.num_vectors, "dim": args.dim, "centres": args.centres, "spread": args.spread,
        "dup_fraction": args.dup_fraction, "dup_noise": args.dup_noise, "chunk_size": args.chunk_size,
        "storage": "float16", "index": factory_string(args.num_vectors, args.dim, index_cfg), "nprobe": args.nprobe,
        "train_size": args.train_size, "k": args.k, "threshold": args.threshold, "rerank_margin": args.rerank_margin,
        "levels": args.levels, "niter": args.niter, "max_train_points": args.max_train_points,
        "resampling_steps": args.resampling_steps, "embed_archs": args.embed_archs, "embed_batch": args.embed_batch,
        "embed_iters": args.embed_iters, "image_size": args.image_size, "faiss": faiss.__version__,
        "faiss_threads": args.threads or faiss.omp_get_max_threads(), "faiss_gpus": num_gpus("auto"),
        "numpy": np.__version__, "quick": args.quick, "embed_device": device_name(embed_device(args.device)),
    }  # fmt: skip


def embed_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def run(args: argparse.Namespace, work_dir: Path) -> list[dict]:
    params = {k: v for k, v in vars(args).items() if k not in ("output", "work_dir", "sections", "quick")}
    params["threads"] = args.threads
    rows: list[dict] = []
    if {"dedup", "kmeans"} & set(args.sections):
        params["store_dir"] = str(work_dir / "store")
        params["copies"], params["sources"] = plant_copies(args.num_vectors, args.dup_fraction, args.seed)
        row = {"kind": "store", "num_vectors": args.num_vectors, "dim": args.dim, **in_child("store", **params)}
        rows.append(row)
        print(f"store: {row['chunks_written']} of {row['chunks']} chunks written in {row['seconds']:.1f} s", flush=True)
    if "dedup" in args.sections:
        rows.append({"kind": "dedup", **in_child("dedup", **{**params, "levels": None})})  # one list per k-means row
        print(f"dedup: {rows[-1]['seconds']:.1f} s", flush=True)
    if "kmeans" in args.sections:
        for levels in args.levels:
            rows.append({"kind": "kmeans", **in_child("kmeans", **{**params, "levels": levels})})
            print(f"kmeans {levels}: {rows[-1]['seconds']:.1f} s", flush=True)
    if "embed" in args.sections:
        for spec in args.embed_archs:
            embed = {"spec": spec, "batch": args.embed_batch, "warmup": args.embed_warmup, "iters": args.embed_iters,
                     "image_size": args.image_size, "threads": args.threads, "device": args.device}  # fmt: skip
            rows.append({"kind": "embed", "spec": spec, **in_child("embed", **embed)})
            print(f"embed {spec}: {rows[-1]['forward_img_per_s']:.1f} img/s forward", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = settings(args)
    print("settings: " + ", ".join(f"{k}={v}" for k, v in chosen.items()), flush=True)
    start = time.perf_counter()
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        rows = run(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="benchmark_curation_") as tmp:
            rows = run(args, Path(tmp))
    print_tables(rows)
    total = time.perf_counter() - start
    print(f"\ntotal {total:.1f} s")
    report = {"environment": environment(torch.device("cpu")), "settings": chosen, "total_s": total, "rows": rows}
    write_report(args.output, report)
    return rows


if __name__ == "__main__":
    main()
