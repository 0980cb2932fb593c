"""Image folders for the curation tests: distinct random pictures and planted copies of some of them
(:mod:`dinov2.curation.planted`)."""

from __future__ import annotations

from pathlib import Path

from dinov2.curation.planted import COPY_KINDS, altered_copy, random_picture

__all__ = ["COPY_KINDS", "write_pool"]


def write_pool(root: Path, num_distinct: int, copies: dict[int, tuple[str, ...]] | None = None, first_seed: int = 0):
    """Write ``num_distinct`` pictures (``img_NNNN.png``) and, for each ``{original: kinds}``, its copies
    (``copy_NNNN_kind.png``). Returns ``{path: group}``: the seed each file was made from."""
    root.mkdir(parents=True, exist_ok=True)
    groups = {}
    for i in range(num_distinct):
        path = root / f"img_{i:04d}.png"
        random_picture(first_seed + i).save(path)
        groups[str(path)] = first_seed + i
    for original, kinds in (copies or {}).items():
        for kind in kinds:
            path = root / f"copy_{original:04d}_{kind}.png"
            altered_copy(random_picture(first_seed + original), kind).save(path)
            groups[str(path)] = first_seed + original
    return groups
