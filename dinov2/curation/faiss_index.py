"""faiss, imported lazily and sized automatically: exact search for small pools, IVF-PQ for large ones.

Every index here ranks by inner product, which on the stores' L2-normalised vectors is the cosine
similarity. ``gpu: auto`` moves indexes and k-means to all GPUs when faiss sees any (faiss-gpu on a
cluster) and stays on the CPU otherwise (faiss-cpu on laptops and CI). Indexes are trained on a
seeded sample and filled one store chunk at a time, so the pool never has to fit in memory: an
IVF-PQ index keeps ``m`` bytes per vector (64 by default) instead of ``4 * dim``.
"""

from __future__ import annotations

import logging
import math
import re

import numpy as np

logger = logging.getLogger("dinov2")

PQ_BYTES = (64, 48, 32, 24, 16, 12, 8, 4, 2, 1)
MIN_POINTS_PER_CENTROID = 39  # faiss warns (and clusters badly) below this many training points per list


def import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "data curation needs faiss: pip install faiss-cpu (laptops, CI) or faiss-gpu (clusters)"
        ) from error
    return faiss


def num_gpus(setting) -> int:
    """GPUs faiss should use for ``index.gpu`` = ``auto`` (all it sees), ``false`` (none) or ``true`` (all; error if none)."""
    faiss = import_faiss()
    available = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    if setting == "auto":
        return available
    if setting is False or str(setting).lower() in ("false", "0", "cpu", "none"):
        return 0
    if available == 0:
        raise RuntimeError("index.gpu is true, but faiss sees no GPU (install faiss-gpu, or set index.gpu=auto)")
    return available


def factory_string(num_vectors: int, dim: int, cfg) -> str:
    """``cfg.factory`` when set; else ``Flat`` up to ``cfg.exact_max_size`` vectors, ``IVF<nlist>,PQ<m>`` above.

    A factory that needs more training vectors than the store holds (``IVF65536`` for a 50,000-image
    evaluation set) gives way to the automatic choice; one that ``cfg.train_size`` is too small for
    is an error. The automatic IVF-PQ needs 256 training vectors (else ``Flat``).

    ``nlist`` is the power of two nearest ``4 sqrt(n)``, at most ``train_size / 39``; ``m`` (bytes
    per vector) is the largest of 64, 48, 32, ... that divides ``dim`` and leaves at least 4
    dimensions per sub-quantiser (fewer train slowly and gain little). ``np``: no polysemous
    training, which only serves a Hamming pre-filter that these searches never use (measured: it
    more than halves the training time of IVF4096,PQ64 on 1M x 384, same pairs; docs/performance.md).
    """
    num_train = min(int(cfg.train_size), num_vectors)
    if cfg.factory:
        if _trainable(str(cfg.factory), num_vectors, cfg):
            return str(cfg.factory)
        logger.info("index.factory %r needs more training vectors than a store of %d holds: automatic choice",
                    str(cfg.factory), num_vectors)  # fmt: skip
    if num_vectors <= int(cfg.exact_max_size):
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(num_vectors)))
    cap = max(1, num_train // MIN_POINTS_PER_CENTROID)
    nlist = max(1, min(nlist, 2 ** int(math.log2(cap))))
    m = next((b for b in PQ_BYTES if dim % b == 0 and 4 * b <= dim), 1)
    spec = f"IVF{nlist},PQ{m}np"
    return spec if _trainable(spec, num_vectors, cfg) else "Flat"


def _trainable(spec: str, num_vectors: int, cfg) -> bool:
    """Whether ``spec`` can be trained on this store's sample; False when the store is too small,
    an error when it is ``cfg.train_size`` that is."""
    need = training_points_needed(spec)
    if min(int(cfg.train_size), num_vectors) >= need:
        return True
    if num_vectors >= need:
        raise ValueError(f"index {spec!r} needs at least {need} training vectors, but index.train_size is "
                         f"{int(cfg.train_size)}; raise index.train_size")  # fmt: skip
    return False


def training_points_needed(spec: str) -> int:
    """The fewest training vectors faiss accepts for ``spec``: k-means needs at least one per centroid,
    the ``IVF<n>`` lists and the ``2 ** nbits`` codes of each PQ sub-quantiser (8 bits unless ``PQ<m>x<nbits>``)."""
    needs = [int(n) for n in re.findall(r"IVF(\d+)", spec)]
    needs += [2 ** int(bits or 8) for bits in re.findall(r"PQ\d+(?:x(\d+))?", spec)]
    return max(needs, default=1)


class VectorIndex:
    """A faiss inner-product index and the ids of its rows (search returns ids, -1 where none)."""

    def __init__(self, dim: int, spec: str = "Flat", gpus: int = 0, nprobe: int = 32) -> None:
        faiss = import_faiss()
        self.spec, self.dim = spec, int(dim)
        index = faiss.index_factory(self.dim, spec, faiss.METRIC_INNER_PRODUCT)
        if "IVF" in spec:  # on the CPU index: every GPU copy (one, or the replicas of several) inherits it
            try:
                faiss.extract_index_ivf(index).nprobe = int(nprobe)
            except RuntimeError as error:
                raise ValueError(f"index.factory {spec!r} names IVF but faiss finds no IVF index in it") from error
        if gpus:
            options = faiss.GpuMultipleClonerOptions()
            # PQ: float16 lookup tables; float32 ones of 64 8-bit sub-quantisers take 64 KiB, more shared
            # memory than a GPU block has (48 KiB), and faiss refuses the index. Flat: float32 storage (exact)
            options.useFloat16 = re.search(r"(^|,)PQ\d", spec) is not None
            index = faiss.index_cpu_to_all_gpus(index, co=options, ngpu=gpus)
        self.index = index
        self._ids: list[np.ndarray] = []
        self._all: np.ndarray | None = None

    @property
    def exact(self) -> bool:
        """True when similarities are exact (a flat index), not approximated by quantisation."""
        return self.spec.strip().startswith("Flat")

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(vectors) != len(ids):
            raise ValueError(f"{len(vectors)} vectors for {len(ids)} ids")
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self._ids.append(np.asarray(ids, dtype=np.int64))
        self._all = None

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities, ids)``, each (Q, k), best first; ids -1 (similarity -inf) past the index's size."""
        if self._all is None:
            self._all = np.concatenate(self._ids) if self._ids else np.zeros(0, dtype=np.int64)
        k = int(k)
        sims, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        found = rows >= 0
        ids = np.where(found, self._all[np.where(found, rows, 0)], -1)
        return np.where(found, sims, -np.inf).astype(np.float32), ids


def build_index(store, cfg, keep: np.ndarray | None = None, seed: int = 0) -> VectorIndex:
    """An index over the store's vectors (those where ``keep`` is true), trained on a seeded sample
    of at most ``cfg.train_size`` and filled chunk by chunk."""
    count = len(store) if keep is None else int(np.count_nonzero(keep))
    spec = factory_string(count, store.dim, cfg)
    index = VectorIndex(store.dim, spec, num_gpus(cfg.gpu), int(cfg.nprobe))
    if not index.is_trained:
        sample = store.sample_ids(int(cfg.train_size), seed, keep)
        index.train(store.read(sample))
    for ids, vectors in store.iter_chunks(keep):
        index.add(vectors, ids)
    logger.info("faiss index %s over %d vectors of dim %d", spec, len(index), store.dim)
    return index
