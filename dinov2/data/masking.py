"""Block-wise (iBOT/BEiT-style) random masking of a patch grid."""

from __future__ import annotations

import math
import random

import numpy as np


class MaskingGenerator:
    """Boolean patch masks made of random rectangles.

    ``input_size`` is the patch grid (``int`` for square, or ``(height, width)``). Each rectangle has a
    random area in ``[min_num_patches, min(remaining budget, max_num_patches)]`` and an aspect ratio
    (height / width) drawn log-uniformly in ``[min_aspect, max_aspect]`` (``max_aspect`` defaults to
    ``1 / min_aspect``); a rectangle whose rounded sides reach the grid's height or width is rejected, so no
    single rectangle spans a full column or row (several together may). ``max_num_patches`` defaults to
    ``num_masking_patches``.

    ``rng`` (a ``random.Random``) makes masks reproducible; by default the ``random`` module is used (looked up at
    each call, so that the generator pickles into spawned DataLoader workers). A call's
    own ``rng`` overrides it: the training collate passes one seeded per batch
    (``dinov2.data.seeding.batch_random``). Avoid giving one here for use in ``DataLoader`` workers: it is
    copied into every worker with the same state, so the workers would draw the same masks.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = (int(s) for s in input_size)
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        if not 0.0 < min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = rng  # None: the ``random`` module, looked up per call (a module cannot be pickled into workers)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.height}x{self.width} -> [{self.min_num_patches} ~ {self.max_num_patches}], "
            f"max = {self.num_masking_patches}, log aspect ratio = {self.log_aspect_ratio})"
        )

    def get_shape(self) -> tuple[int, int]:
        """The mask's shape ``(height, width)``."""
        return self.height, self.width

    def _add_rectangle(self, mask: np.ndarray, budget: int, rng) -> int:
        """Try up to 10 rectangles strictly smaller than the grid in both directions; mask the first that
        newly covers 1..``budget`` cells. Returns how many."""
        for _ in range(10):
            area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width):
                continue  # as in BEiT/iBOT: a rectangle never spans a full row or column of the grid
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            window = mask[top : top + h, left : left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window[...] = True
                return new
        return 0

    def __call__(self, num_masking_patches: int = 0, rng: random.Random | None = None) -> np.ndarray:
        """A boolean ``(height, width)`` mask with at most ``num_masking_patches`` True cells.

        Rectangles are added until the count is reached or ten tries in a row add nothing, so the count can
        fall short (typically when the remaining budget is below ``min_num_patches``). ``rng``
        overrides the generator given at construction for this call.
        """
        rng = rng if rng is not None else self.rng if self.rng is not None else random
        mask = np.zeros(self.get_shape(), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = num_masking_patches - count
            if self.max_num_patches is not None:
                budget = min(budget, self.max_num_patches)
            added = self._add_rectangle(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask
