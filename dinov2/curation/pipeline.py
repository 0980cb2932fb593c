"""The curation pipeline: embed -> dedup -> cluster -> retrieve, each stage resumable and skipped once done.

Output directory::

    config.yaml                  the resolved config
    embeddings/pool/             the pool's embedding store (embed.model)
    embeddings/copy/             the pool again with dedup.copy_detection (when set)
    embeddings/eval/<i>/         each evaluation set, with the deduplication embedder
    embeddings/seeds/<name>/     each seed set, with embed.model
    <stage>/done.json            written last: the stage's settings, fingerprint and report
    dedup/keep.npy               pool ids that survive deduplication (bool per id)
    cluster/hierarchy.npz        centroids and labels of every level
    retrieve/selected.npy        the curated pool ids
    curated.txt                  the curated set as a FileList: train.dataset_path=FileList:path=OUT/curated.txt
    report.json                  sizes at each stage, thresholds, clusters, unreadable images

A stage whose ``done.json`` holds the current settings is skipped; one finished with other
settings is an error naming the keys that changed (``--redo STAGE`` redoes it and the later ones).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from dinov2 import distributed
from dinov2.checkpoint.training import atomic_write
from dinov2.curation import clustering, dedup, retrieve
from dinov2.curation.embed import agree_embedder_weights, embed_images, source_change
from dinov2.curation.faiss_index import build_index, num_gpus
from dinov2.curation.store import MANIFEST, EmbeddingStore, chunk_name, read_json, write_text_atomic
from dinov2.eval.metrics import write_json_atomic
from dinov2.utils.config import CURATION_DEFAULT_CONFIG, load_config

logger = logging.getLogger("dinov2")

STAGES = ("embed", "dedup", "cluster", "retrieve")
CURATED_LIST = "curated.txt"
REPORT = "report.json"
_RESULT_NEUTRAL = ("batch_size", "num_workers", "device")  # embed settings that do not change the vectors


class StageError(RuntimeError):
    """A stage that cannot run as asked: an earlier stage is missing, or it was finished with other settings."""


def load_curation_config(config: str | None, overrides=()) -> DictConfig:
    """configs/curation/default.yaml <- ``config`` (a name under configs/curation or a path) <- overrides."""
    cfg = load_config(config, list(overrides), default=CURATION_DEFAULT_CONFIG, kinds=("curation",))
    cfg.retrieval.seeds = retrieve.check_seed_sets(cfg.retrieval.seeds)
    if cfg.dedup.copy_detection is not None:
        extra = sorted(set(cfg.dedup.copy_detection) - set(cfg.embed.model))
        if extra:
            raise ValueError(f"unknown key dedup.copy_detection.{extra[0]}; valid keys: {', '.join(cfg.embed.model)}")
        cfg.dedup.copy_detection = OmegaConf.merge(cfg.embed.model, cfg.dedup.copy_detection)
    check_curation_config(cfg)
    return cfg


def check_curation_config(cfg: DictConfig) -> None:
    """Check every choice and range of the settings before any stage runs (a bad value found by a
    later stage would come after the pool's embedding, the longest part); errors name the key."""
    from dinov2.curation.embed import EMBEDDER_KINDS, POOLINGS

    models = ["embed.model"] + (["dedup.copy_detection"] if cfg.dedup.copy_detection is not None else [])
    unused = tuple(f"{m}." for m in models if OmegaConf.select(cfg, f"{m}.kind") == "thumbnail")  # needs no weights
    missing = [k for k in sorted(OmegaConf.missing_keys(cfg)) if not k.startswith(unused)]
    if missing:
        raise ValueError(f"no value for {', '.join(missing)} (the config leaves '???'); give it as key=value")

    def one_of(key: str, allowed) -> None:
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ValueError(f"{key} must be one of {tuple(allowed)}, got {value!r}")

    def at_least(key: str, low: float, nullable: bool = False, kind=int) -> None:
        value = OmegaConf.select(cfg, key)
        if nullable and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, kind) or value < low:
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"{key} must be {what} >= {low}{' or null' if nullable else ''}, got {value!r}")

    for model in models:
        one_of(f"{model}.kind", EMBEDDER_KINDS)
        if OmegaConf.select(cfg, f"{model}.kind") == "backbone":
            one_of(f"{model}.pooling", POOLINGS)
    one_of("embed.dtype", ("float16", "float32"))
    one_of("index.gpu", ("auto", True, False))
    one_of("clustering.init", tuple(clustering.INIT_METHODS))
    one_of("retrieval.sampling", clustering.SAMPLING_STRATEGIES)
    for key in ("embed.batch_size", "embed.chunk_size", "dedup.k", "index.nprobe", "index.train_size",
                "clustering.niter", "clustering.nredo", "clustering.max_train_points"):  # fmt: skip
        at_least(key, 1)
    for key in ("embed.num_workers", "index.exact_max_size"):
        at_least(key, 0)
    at_least("dedup.rerank_margin", 0, kind=int | float)
    at_least("clustering.resampling_steps", 0)
    at_least("clustering.resample_size", 1 if cfg.clustering.resampling_steps else 0)
    at_least("retrieval.balanced_size", 1, nullable=True)
    for key in ("dedup.threshold", "dedup.eval_threshold"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not -1 <= value <= 1:
            raise ValueError(f"{key} is a cosine similarity and must lie in [-1, 1], got {value!r}")
    clustering.check_levels(cfg.clustering.levels)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig | ListConfig) else node


def stage_settings(cfg: DictConfig, stage: str, legacy: bool = False) -> dict[str, Any]:
    """The config values a stage's result depends on (what its fingerprint covers). The embed stage's
    leave out the seed and evaluation sets: their stores are checked one by one (a new set is embedded
    alone, the pool's store kept), and the dedup and retrieve stages' settings name them. ``legacy``:
    as runs finished before 2026-12-02 recorded them (with those sets), so that they still resume."""
    embed = {k: v for k, v in _plain(cfg.embed).items() if k not in _RESULT_NEUTRAL}
    if stage == "embed":
        sources = {"pool": cfg.pool}
        if legacy:
            sources["eval_datasets"] = _plain(cfg.dedup.eval_datasets)
            sources["seeds"] = [s["dataset"] for s in _plain(cfg.retrieval.seeds)]
        return {**sources, "embed": embed, "copy_detection": _plain(cfg.dedup.copy_detection)}
    if stage == "dedup":
        return {"dedup": _plain(cfg.dedup), "index": _index_settings(cfg)}
    if stage == "cluster":
        return {"clustering": _plain(cfg.clustering)}
    return {"retrieval": _plain(cfg.retrieval), "index": _index_settings(cfg)}


def _index_settings(cfg: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in _plain(cfg.index).items() if k != "gpu"}


class Curation:
    """One pipeline run over ``output_dir``; ``run(stage)`` runs a stage (or skips it when done)."""

    def __init__(self, cfg: DictConfig, output_dir: str | Path) -> None:
        self.cfg, self.out = cfg, Path(output_dir)
        self._stores_checked = False

    # Bookkeeping ----------------------------------------------------------------------------------
    def fingerprint(self, stage: str, legacy: bool = False) -> str:
        position = STAGES.index(stage)
        chain = [stage_settings(self.cfg, s, legacy) for s in STAGES[: position + 1]]
        return hashlib.sha256(json.dumps(chain, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def done_file(self, stage: str) -> Path:
        return self.out / stage / "done.json"

    def is_done(self, stage: str) -> bool:
        path = self.done_file(stage)
        if not path.is_file():
            return False
        done = read_json(path)
        if done["fingerprint"] in (self.fingerprint(stage), self.fingerprint(stage, legacy=True)):
            return stage != "embed" or self._stores_current(done["report"])
        changed = _changed_keys(done["settings"], stage_settings(self.cfg, stage))
        why = f"settings changed: {', '.join(changed)}" if changed else "an earlier stage's settings changed"
        raise StageError(
            f"stage {stage!r} in {self.out} was finished with other settings ({why}); "
            f"pass --redo {stage} to redo it and the stages after it, or use another output directory"
        )

    def _stores_current(self, made: dict[str, Any]) -> bool:
        """Whether the finished embed stage (its report ``made``) made every store the settings ask for
        (False: it runs again for the missing ones: dedup.enabled turned true, a set added, a store
        deleted, unless a finished later stage read it) from sources that list the same images (else a
        StageError; a source is listed again only if its stamp moved). Checked once per run, by rank 0
        (:meth:`run` gives every rank its answer)."""
        if self._stores_checked:
            return True
        stores = self.store_dirs()
        missing = sorted(role for role, (_, directory, _) in stores.items()
                         if role not in made or not (directory / MANIFEST).is_file())  # fmt: skip
        for role in missing:  # a store deleted to embed it again: the finished stage that read it is stale
            reader = "retrieve" if role.startswith("seeds/") else "dedup"
            if self.done_file(reader).is_file() and read_json(self.done_file(reader))["fingerprint"] in (
                    self.fingerprint(reader), self.fingerprint(reader, legacy=True)):  # fmt: skip
                raise StageError(f"the {role} store in {self.out} is missing, but stage {reader!r}, which read it, "
                                 f"is finished: pass --redo {reader} to embed it again and redo {reader} onwards")  # fmt: skip
        if missing:
            logger.info("Stage embed: the settings now ask for stores not made yet (%s)", ", ".join(missing))
            return False
        for role, (source, directory, _) in stores.items():
            change = source_change(str(source), EmbeddingStore(directory), refresh=distributed.is_main_process())
            if change is not None:
                raise StageError(f"the {role} source {source!r} changed after the embed stage in {self.out}: "
                                 f"{change}; {_how_to_reembed(role, directory)}")  # fmt: skip
        self._stores_checked = True
        return True

    def redo(self, stage: str) -> None:
        """Forget ``stage`` and every later stage (their outputs are removed)."""
        for later in STAGES[STAGES.index(stage) :]:
            shutil.rmtree(self.out / later, ignore_errors=True)
            if later == "embed":
                shutil.rmtree(self.out / "embeddings", ignore_errors=True)
        for name in (CURATED_LIST, REPORT):
            (self.out / name).unlink(missing_ok=True)

    def _finish(self, stage: str, report: dict[str, Any], seconds: float) -> None:
        report = {"seconds": round(seconds, 2), **report}
        done = {"stage": stage, "fingerprint": self.fingerprint(stage), "settings": stage_settings(self.cfg, stage)}
        write_json_atomic(self.done_file(stage), {**done, "report": report})
        logger.info("Stage %s done in %.1f s: %s", stage, seconds, json.dumps(report, default=str)[:500])

    def report(self, stage: str) -> dict[str, Any]:
        return read_json(self.done_file(stage))["report"]

    def run(self, stage: str) -> bool:
        """Run ``stage`` unless it is done (returns False then). Every rank runs ``embed``; rank 0 the rest."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        for before in STAGES[: STAGES.index(stage)]:
            if not self.is_done(before):
                raise StageError(f"stage {stage!r} needs stage {before!r} first (run it, or 'run' for all stages)")
        if stage == "embed":
            # rank 0 alone decides (its error stops every rank) and every rank takes its answer: a node that
            # does not see done.json or a store yet (a stale shared file system) would embed alone and wait in
            # embed_images' collectives for ranks that skipped, or list a source again and find it changed
            done = distributed.on_every_rank(lambda: distributed.is_main_process() and self.is_done(stage),
                                             f"checking stage embed in {self.out}", StageError)  # fmt: skip
            done = distributed.rank_zero_says(done)
        else:
            done = self.is_done(stage)
        if done:
            logger.info("Stage %s already done in %s: skipping", stage, self.out / stage)
            return False
        start = time.perf_counter()
        (self.out / stage).mkdir(parents=True, exist_ok=True)
        report = getattr(self, f"_{stage}")()
        if distributed.is_main_process():
            self._finish(stage, report, time.perf_counter() - start)
        return True

    # Stores ---------------------------------------------------------------------------------------
    def store_dirs(self) -> dict[str, tuple[str, Path, Any]]:
        """``{role: (source, directory, model config)}`` of every store the embed stage makes."""
        cfg, base = self.cfg, self.out / "embeddings"
        dedup_model = cfg.dedup.copy_detection or cfg.embed.model
        stores = {"pool": (cfg.pool, base / "pool", cfg.embed.model)}
        if cfg.dedup.enabled and cfg.dedup.copy_detection is not None:
            stores["copy"] = (cfg.pool, base / "copy", dedup_model)
        if cfg.dedup.enabled:
            for i, dataset in enumerate(cfg.dedup.eval_datasets):
                stores[f"eval/{i}"] = (dataset, base / "eval" / str(i), dedup_model)
        for seeds in cfg.retrieval.seeds:
            stores[f"seeds/{seeds['name']}"] = (seeds["dataset"], base / "seeds" / seeds["name"], cfg.embed.model)
        return stores

    def store(self, role: str) -> EmbeddingStore:
        return EmbeddingStore(self.store_dirs()[role][1])

    # Stages ---------------------------------------------------------------------------------------
    def _embed(self) -> dict[str, Any]:
        e, agreed = self.cfg.embed, {}
        for role, (source, directory, model) in self.store_dirs().items():
            # a model whose weights name a training run is its latest checkpoint once for all stores: one
            # the run saves while the pool is embedded (days at scale) must not embed the other stores
            key = json.dumps(OmegaConf.to_container(model, resolve=True), sort_keys=True)
            if key not in agreed:
                agreed[key] = agree_embedder_weights(model)
            model, weights_from = agreed[key]
            embed_images(
                source, directory, model, e.batch_size, e.num_workers, e.chunk_size, e.dtype, e.device,
                for_file_list=role in ("pool", "copy"), weights_from=weights_from,
            )  # fmt: skip
        # rank 0 alone reads the stores back (its report is the one kept, and the later stages are its),
        # and every rank learns whether that worked: another node whose view of the shared file system is
        # stale would fail alone on a chunk it does not see yet; the others report nothing ({})
        reader = self._embed_report if distributed.is_main_process() else dict
        return distributed.on_every_rank(reader, f"reading the stores in {self.out}", StageError)

    def _embed_report(self) -> dict[str, Any]:
        report = {}
        for role, (source, directory, _) in self.store_dirs().items():
            store = EmbeddingStore(directory)
            failed = store.failed()
            report[role] = {"source": source, "images": store.num_images, "embedded": len(store),
                            "unreadable": len(failed), "unreadable_images": failed}  # fmt: skip
        for role, made in report.items():  # an empty store would retrieve nothing, or fail a later stage
            if made["embedded"] == 0:
                path, reason = min(made["unreadable_images"].items(), default=("?", "no reason recorded"))
                raise StageError(f"the {role} source {made['source']!r}: none of its {made['images']} images could be "
                                 f"read ({Path(path).name}: {reason}); fix them, delete {self.store(role).dir} "
                                 "and rerun")  # fmt: skip
        return report

    def _dedup(self) -> dict[str, Any]:
        cfg, pool = self.cfg, self.store("pool")
        keep = ~dedup.repeated_entries(pool)
        report: dict[str, Any] = {"before": len(pool), "repeated_paths": int(len(keep) - np.count_nonzero(keep))}
        if cfg.dedup.enabled:
            copies = self.store("copy") if "copy" in self.store_dirs() else pool
            d = cfg.dedup
            copy_keep, report["self"] = dedup.self_deduplicate(copies, cfg.index, d.k, d.threshold, d.rerank_margin)
            evals = {str(s): self.store(f"eval/{i}") for i, s in enumerate(d.eval_datasets)}
            removed, report["eval"] = dedup.eval_contamination(
                copies, evals, d.eval_threshold, cfg.index, copy_keep, d.rerank_margin
            )
            keep &= _to_pool_ids(pool, copies, copy_keep & ~removed)
        atomic_write(self.out / "dedup" / "keep.npy", lambda f: np.save(f, keep))
        report["after"] = int(np.count_nonzero(keep))
        return report

    def _cluster(self) -> dict[str, Any]:
        pool, keep = self.store("pool"), np.load(self.out / "dedup" / "keep.npy")
        h = clustering.hierarchical_kmeans(pool, keep, self.cfg.clustering, num_gpus(self.cfg.index.gpu))
        h.save(self.out / "cluster")
        levels = []
        for level in range(1, h.depth + 1):
            sizes = h.sizes(level)
            levels.append({"clusters": len(sizes), "empty": int(np.count_nonzero(sizes == 0)),
                           "min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())})  # fmt: skip
        return {"vectors": int(np.count_nonzero(keep)), "levels": levels}

    def _retrieve(self) -> dict[str, Any]:
        cfg, pool = self.cfg, self.store("pool")
        keep = np.load(self.out / "dedup" / "keep.npy")
        h = clustering.Hierarchy.load(self.out / "cluster")
        r, parts, report = cfg.retrieval, [], {"seeds": {}}
        index = None
        for seeds in r.seeds:
            seed_store = self.store(f"seeds/{seeds['name']}")
            if seeds["mode"] == "nn":
                index = index or build_index(pool, cfg.index, keep=keep, seed=int(r.seed))
                ids = retrieve.nearest_neighbours(index, seed_store, seeds["per_seed"])
            else:
                ids = retrieve.from_seed_clusters(h, seed_store, seeds["per_seed"], int(r.seed))
            report["seeds"][seeds["name"]] = {**seeds, "seed_images": len(seed_store), "retrieved": len(ids)}
            parts.append(ids)
        if r.balanced_size is not None:
            ids = clustering.balanced_sample(h, int(r.balanced_size), int(r.seed), r.sampling)
            report["balanced"] = {"requested": int(r.balanced_size), "sampled": len(ids)}
            parts.append(ids)
        if not parts:
            raise StageError(
                "nothing to retrieve: give retrieval.seeds, or retrieval.balanced_size for balanced sampling"
            )
        selected = np.unique(np.concatenate(parts))
        atomic_write(self.out / "retrieve" / "selected.npy", lambda f: np.save(f, selected))
        paths = pool.paths(selected)
        write_text_atomic(self.out / CURATED_LIST, "".join(p + "\n" for p in paths))
        report["curated"] = len(selected)
        return report

    def write_report(self) -> dict[str, Any]:
        """``report.json``: every finished stage's report, the final sizes and the thresholds."""
        stages = {s: self.report(s) for s in STAGES if self.done_file(s).is_file()}
        sizes = {}
        if "embed" in stages:
            pool = stages["embed"]["pool"]
            sizes.update(listed=pool["images"], embedded=pool["embedded"], unreadable=pool["unreadable"])
        if "dedup" in stages:
            d = stages["dedup"]
            sizes["after_dedup"], sizes["repeated_paths"] = d["after"], d.get("repeated_paths", 0)
            sizes["removed_as_copies"] = d.get("self", {}).get("removed", 0)
            sizes["removed_as_eval_copies"] = d.get("eval", {})
        if "retrieve" in stages:
            sizes["curated"] = stages["retrieve"]["curated"]
        thresholds = {"dedup": self.cfg.dedup.threshold, "eval": self.cfg.dedup.eval_threshold}
        report = {"output": str(self.out), "curated_list": str(self.out / CURATED_LIST), "sizes": sizes,
                  "thresholds": thresholds, "stages": stages}  # fmt: skip
        write_json_atomic(self.out / REPORT, report)
        return report


def _to_pool_ids(pool: EmbeddingStore, other: EmbeddingStore, other_keep: np.ndarray) -> np.ndarray:
    """A keep mask over ``other``'s ids carried to ``pool``'s ids: both stores embed the same image
    list in the same order, so the ``n``-th row of a path in one is its ``n``-th row in the other (a
    path listed twice is two entries, of which deduplication removes one, not both). When both hold
    the same path at every id (the usual case) that is the identity, found without listing the paths."""
    if other is pool or _same_paths(pool, other):
        return other_keep

    def entries(paths: list[str]) -> list[tuple[str, int]]:
        seen: dict[str, int] = {}
        out = []
        for path in paths:
            out.append((path, seen.get(path, 0)))
            seen[path] = out[-1][1] + 1
        return out

    removed = {entry for entry, kept in zip(entries(other.paths()), other_keep) if not kept}
    return np.array([entry not in removed for entry in entries(pool.paths())], dtype=bool)


def _same_paths(a: EmbeddingStore, b: EmbeddingStore, block: int = 1 << 20) -> bool:
    """Whether two stores hold the same path at every id: their chunks' path lists are the same files,
    compared block by block. The same ``sources.txt`` is not enough: an image that one embedding
    could not read and the other could (a read error, a file replaced in between) shifts the ids."""
    if (a.chunk_size, a.num_chunks) != (b.chunk_size, b.num_chunks):
        return False
    for c in range(a.num_chunks):
        x, y = ((s.dir / chunk_name(c)).with_suffix(".paths.txt") for s in (a, b))
        if x.stat().st_size != y.stat().st_size:
            return False
        with open(x, "rb") as fx, open(y, "rb") as fy:  # of one size: they end together
            while data := fx.read(block):
                if data != fy.read(block):
                    return False
    return True


def _how_to_reembed(role: str, directory: Path) -> str:
    """What to do about a store whose source changed: only the pool's needs the whole stage again."""
    if role in ("pool", "copy"):
        return "pass --redo embed to embed it again (and redo the later stages), or use another output directory"
    later = "dedup" if role.startswith("eval/") else "retrieve"
    return (f"delete {directory} and pass --redo {later}: that set alone is embedded again, the pool's "
            "embeddings are kept (or pass --redo embed to embed everything again)")  # fmt: skip


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [c for k in keys for c in _changed_keys(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)]
    return [] if old == new else [prefix]


def run_pipeline(cfg: DictConfig, output_dir: str | Path, stages=STAGES, redo: str | None = None) -> dict | None:
    """Run ``stages`` in order (finished ones are skipped; ``redo`` and the stages after it are redone);
    rank 0 returns the report, other ranks None."""
    curation = Curation(cfg, output_dir)

    def prepare() -> None:  # rank 0's alone; a failure there stops every rank at once, naming it
        if distributed.is_main_process():
            if redo:
                curation.redo(redo)
            curation.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(curation.out / "config.yaml", OmegaConf.to_yaml(cfg))

    distributed.on_every_rank(prepare, f"preparing {curation.out}", StageError)
    for stage in stages:
        if stage != "embed" and not distributed.is_main_process():
            return None
        curation.run(stage)
    return curation.write_report() if distributed.is_main_process() else None
