"""scripts/benchmark_curation.py, in this process on a tiny pool."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from dinov2.curation import dedup, faiss_index

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_curation.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_curation_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_dedup_section_runs_next_to_the_kmeans_level_lists(tmp_path, monkeypatch):
    """--levels holds one list per k-means row; the dedup row must not hand them to the config."""
    bench = load_benchmark()
    for owner, name in [(dedup, "build_index"), (dedup, "_exact_similarities"), (dedup, "duplicate_pairs"),
                        (dedup, "duplicate_groups"), (faiss_index.VectorIndex, "train"),
                        (faiss_index.VectorIndex, "add"), (faiss_index.VectorIndex, "search")]:  # fmt: skip
        monkeypatch.setattr(owner, name, getattr(owner, name))  # the benchmark's timers are undone afterwards
    monkeypatch.setattr(bench, "in_child", lambda task, **params: bench.TASKS[task](params))
    args = bench.parse_args(["--quick", "--num-vectors", "300", "--dim", "16", "--centres", "10", "--chunk-size", "128",
                             "--levels", "6", "6,2", "--sections", "dedup", "--threads", "1"])  # fmt: skip
    rows = bench.run(args, tmp_path)
    assert [r["kind"] for r in rows] == ["store", "dedup"]
    assert rows[1]["planted_pairs"] == 3 and rows[1]["index"] == "Flat"
