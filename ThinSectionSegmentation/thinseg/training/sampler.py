"""Class-balanced patch sampling, in the spirit of petroscope's self-balancing dataset.

Why: in a carbonate section calcite may cover 60 % of the pixels and clay 2 %; uniform random
patches teach the network to ignore the rare classes. Instead:
- for every class, a probability map over patch positions says how much of that class a patch
  at each position would hold (computed on a coarse grid of `cell`-pixel cells, cached);
- a running accumulator counts the class pixels emitted so far; the next balanced patch is
  drawn for the class with the fewest, at a position drawn from that class's map;
- with probability 1 - balancing_strength the patch is uniform random instead, which keeps the
  natural context (0 = plain random sampling, 1 = always balanced).
Everything is driven by one numpy Generator, so a seed reproduces the stream exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from thinseg.errors import ThinSegError

#: Rows of cells summed at once: bounds temporaries on gigapixel label maps.
_BAND_CELLS = 64


@dataclass
class PatchIndex:
    """Where patches of one section can start and how much of each class they would hold.

    Class fractions are stored per top-left cell as uint8 (1/255 steps; a non-zero fraction is
    kept at least 1 so no occurrence of a rare class is lost): a 20k x 30k section with 32 px
    cells costs ~3.5 MB for 6 classes. Draws are two-level (row by its total, then column within
    the row), so no full-size cumulative table is needed.
    """

    cell: int  # section pixels per grid cell
    footprint: int  # patch side in section pixels
    grid: tuple[int, int]  # valid top-left cells (rows, cols)
    shape: tuple[int, int]  # section (H, W)
    weights: np.ndarray  # (n_classes, rows, cols) uint8: class fraction x 255 of the patch there
    row_cdf: np.ndarray  # (n_classes, rows) float64: cumulative row sums of `weights`

    @property
    def totals(self) -> np.ndarray:
        """(n_classes,) the section's weight for each class (sum of its map)."""
        return self.row_cdf[:, -1]

    def to_arrays(self) -> dict[str, np.ndarray]:
        meta = np.array([self.cell, self.footprint, *self.grid, *self.shape], np.int64)
        return {"meta": meta, "weights": self.weights, "row_cdf": self.row_cdf}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PatchIndex:
        cell, footprint, gr, gc, h, w = (int(v) for v in arrays["meta"])
        return cls(cell, footprint, (gr, gc), (h, w), arrays["weights"], arrays["row_cdf"])

    def sample_cell(self, c: int, rng: np.random.Generator) -> tuple[int, int]:
        """A top-left cell drawn with probability proportional to class `c`'s map."""
        cdf = self.row_cdf[c]
        row = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)
        row_cdf = np.cumsum(self.weights[c, row], dtype=np.int64)
        col = min(int(np.searchsorted(row_cdf, rng.random() * row_cdf[-1], side="right")), len(row_cdf) - 1)
        return row, col

    def position(self, i: int, j: int, rng: np.random.Generator) -> tuple[int, int]:
        """Top-left pixel of the patch for cell (i, j), jittered within the cell."""
        y = min(i * self.cell + int(rng.integers(self.cell)), self.shape[0] - self.footprint)
        x = min(j * self.cell + int(rng.integers(self.cell)), self.shape[1] - self.footprint)
        return y, x


def class_cell_counts(target: np.ndarray, n_classes: int, cell: int) -> np.ndarray:
    """(n_classes, H//cell, W//cell) pixel counts of classes 1..n per cell, band by band."""
    h, w = target.shape
    gh, gw = h // cell, w // cell
    out = np.zeros((n_classes, gh, gw), np.int32)
    for r0 in range(0, gh, _BAND_CELLS):
        r1 = min(gh, r0 + _BAND_CELLS)
        band = np.asarray(target[r0 * cell : r1 * cell, : gw * cell]).reshape(r1 - r0, cell, gw, cell)
        for c in range(n_classes):
            out[c, r0:r1] = np.count_nonzero(band == c + 1, axis=(1, 3))
    return out


def build_patch_index(target: np.ndarray, n_classes: int, footprint: int, cell: int) -> PatchIndex:
    """Probability maps for patches of `footprint` px of a (H, W) target label map."""
    h, w = target.shape
    if footprint > min(h, w):
        raise ThinSegError(f"section {w}x{h} px is smaller than one training patch ({footprint} px)")
    cell = max(1, min(cell, footprint))
    counts = class_cell_counts(target, n_classes, cell)
    k = max(1, footprint // cell)
    gh = max(1, counts.shape[1] - k + 1)
    gw = max(1, counts.shape[2] - k + 1)
    # A patch starting anywhere in cell i always covers the whole cells i+1 .. i+k-1, so their
    # class pixels (a box sum via an integral image) are in every patch drawn for cell i: a
    # patch drawn for a class really holds it, whatever the jitter within the cell.
    lo, span = (1, k - 1) if k >= 2 else (0, 1)
    integral = np.zeros((n_classes, counts.shape[1] + 1, counts.shape[2] + 1), np.int64)
    integral[:, 1:, 1:] = counts.cumsum(1).cumsum(2)
    r0, c0 = lo, lo
    r1, c1 = min(lo + span, counts.shape[1]), min(lo + span, counts.shape[2])
    box = (
        integral[:, r1 : r1 + gh, c1 : c1 + gw]
        - integral[:, r0 : r0 + gh, c1 : c1 + gw]
        - integral[:, r1 : r1 + gh, c0 : c0 + gw]
        + integral[:, r0 : r0 + gh, c0 : c0 + gw]
    )
    fraction = box.astype(np.float64) / float(footprint * footprint)
    weights = np.rint(fraction * 255.0).astype(np.uint8)
    weights[(weights == 0) & (box > 0)] = 1
    row_cdf = np.cumsum(weights.sum(axis=2, dtype=np.int64), axis=1).astype(np.float64)
    return PatchIndex(cell, footprint, (gh, gw), (h, w), weights, row_cdf)


def rank_seed(seed: int, rank: int) -> int:
    """The patch stream seed of training process `rank` (of several): `seed` itself for rank 0,
    so one process draws what it always drew, and a different, reproducible seed for each other
    rank (hashed with numpy's SeedSequence), so ranks never draw the same patches."""
    if rank == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed), int(rank)]).generate_state(2, np.uint32)
    return int(state[0]) | int(state[1]) << 32


def index_cache_params(target_key: str, n_classes: int, footprint: int, cell: int) -> dict[str, Any]:
    """Everything a PatchIndex depends on (the target key covers section, classes, mapping, void)."""
    return {"target": target_key, "n_classes": n_classes, "footprint": footprint, "cell": cell}


class BalancedSampler:
    """One stream of patch positions over several sections (one per DataLoader worker)."""

    def __init__(self, indexes: Sequence[PatchIndex], balancing_strength: float, rng: np.random.Generator) -> None:
        if not 0.0 <= balancing_strength <= 1.0:
            raise ThinSegError(f"--balancing-strength must be in [0, 1], got {balancing_strength}")
        if not indexes:
            raise ThinSegError("no training sections to sample patches from")
        self.indexes = list(indexes)
        self.strength = float(balancing_strength)
        self.rng = rng
        self.class_totals = np.stack([ix.totals for ix in self.indexes])  # (sections, classes)
        self.available = self.class_totals.sum(0) > 0
        self.emitted = np.zeros(self.class_totals.shape[1], np.int64)
        areas = np.array([ix.grid[0] * ix.grid[1] * ix.footprint**2 for ix in self.indexes], np.float64)
        self.area_p = areas / areas.sum()

    def draw(self) -> tuple[int, int, int, int]:
        """(section index, y, x, class label it was drawn for or 0 if uniform)."""
        if self.available.any() and self.rng.random() < self.strength:
            c = self._next_class()
            weights = self.class_totals[:, c]
            s = int(self.rng.choice(len(self.indexes), p=weights / weights.sum()))
            ix = self.indexes[s]
            y, x = ix.position(*ix.sample_cell(c, self.rng), self.rng)
            return s, y, x, c + 1
        s = int(self.rng.choice(len(self.indexes), p=self.area_p))
        ix = self.indexes[s]
        y, x = ix.position(int(self.rng.integers(ix.grid[0])), int(self.rng.integers(ix.grid[1])), self.rng)
        return s, y, x, 0

    def _next_class(self) -> int:
        """The available class with the fewest pixels emitted so far (ties broken at random)."""
        emitted = np.where(self.available, self.emitted, np.iinfo(np.int64).max)
        lowest = np.flatnonzero(emitted == emitted.min())
        return int(lowest[self.rng.integers(len(lowest))]) if len(lowest) > 1 else int(lowest[0])

    def update(self, target_patch: np.ndarray) -> None:
        """Count the class pixels of the patch actually emitted (0 = ignored is not counted)."""
        counts = np.bincount(np.asarray(target_patch).reshape(-1), minlength=len(self.emitted) + 1)
        self.emitted += counts[1 : len(self.emitted) + 1]

    @property
    def shares(self) -> np.ndarray:
        total = self.emitted.sum()
        return self.emitted / total if total else np.zeros(len(self.emitted))
