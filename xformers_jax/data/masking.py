"""BEiT's blockwise masking of image patches (Bao et al. 2021, Algorithm 1).

Rectangular blocks of patches are masked until `num_masking_patches` are masked: each block
has an area drawn uniformly from `[min_num_patches, remaining budget]` (capped by
`max_num_patches`) and a log-uniform aspect ratio from `[min_aspect, max_aspect]`. A block is
kept only if it adds new patches without exceeding the budget; 10 failed draws in a row end the
mask early, so the count is at most `num_masking_patches` (and almost always equal to it). All
randomness comes from a `numpy.random.Generator`: the same generator state gives the same mask.
"""

from __future__ import annotations

import math

import numpy as np


class MaskingGenerator:
    """Blockwise patch masks for a `height x width` patch grid.

    Args:
      input_size: the patch grid `(height, width)` (an int for a square grid).
      num_masking_patches: patches to mask per image (BEiT: 75 of 196, ~40%).
      min_num_patches: the smallest block area (BEiT: 16).
      max_num_patches: the largest block area; None = `num_masking_patches`.
      min_aspect: the smallest block aspect ratio (height / width); BEiT: 0.3.
      max_aspect: the largest; None = `1 / min_aspect`.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int,
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        self.height, self.width = int(h), int(w)
        self.num_patches = self.height * self.width
        if not 0 < num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches {num_masking_patches} not in [1, {self.num_patches}] for a "
                f"{self.height}x{self.width} patch grid"
            )
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if not 0 < min_aspect:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(max_num_patches or num_masking_patches)
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, mask {self.num_masking_patches}, "
            f"blocks of {self.min_num_patches}..{self.max_num_patches} patches, "
            f"log aspect {self.log_aspect_ratio[0]:.3f}..{self.log_aspect_ratio[1]:.3f})"
        )

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Masks one block of at most `budget` new patches; returns how many were added."""
        for _ in range(10):
            # As BEiT: with budget < min_num_patches the area is drawn from [budget, min].
            lo, hi = sorted((self.min_num_patches, budget))
            target_area = rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            # Strict inequalities as in BEiT: a block never spans the whole grid side.
            if 0 < h < self.height and 0 < w < self.width:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block[...] = True
                    return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """One mask.

        Args:
          rng: the source of all randomness (advanced in place).

        Returns:
          bool `[height, width]` with at most `num_masking_patches` True.
        """
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._add_block(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return mask
