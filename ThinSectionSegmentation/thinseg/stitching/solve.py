"""All tile positions at once from the pairwise shifts: spanning tree, then weighted least squares.

Pairwise shifts disagree (noise, featureless glass, a repeated texture): MIST and ASHLAR keep the
most reliable ones by a maximum spanning tree over the NCC weights; here that tree gives the
first positions, every pair that disagrees with it by more than `tolerance` pixels is set aside,
and the positions are then fitted to all remaining pairs by weighted least squares (scipy's
LSQR), dropping the worst disagreeing pair and fitting again while one is left. With a known
layout (a grid, a stage-position file) each tile is also tied to its nominal place by a weight
far below any pair's: tiles that share no reliable overlap (blank glass around the rock) keep
their layout place, and linked groups of tiles move only as rigid wholes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components, minimum_spanning_tree
from scipy.sparse.linalg import lsqr

from thinseg.stitching.pairwise import PairShift

#: Weight tying a tile to its layout place, against NCC weights of 0.3-1 for measured pairs.
LAYOUT_WEIGHT = 1e-3


@dataclass
class Placement:
    """Top-left (y, x) of every tile (panorama pixels, the top-left tile at 0), which tiles are
    linked to the main group by reliable overlaps, and which pairs were used or set aside."""

    positions: npt.NDArray[np.float64]
    linked: npt.NDArray[np.bool_]
    used: list[PairShift] = field(default_factory=list)
    rejected: list[PairShift] = field(default_factory=list)

    @property
    def residuals(self) -> npt.NDArray[np.float64]:
        """How far each used pair's measured offset is from the fitted positions (pixels)."""
        return np.array([_residual(self.positions, p) for p in self.used], dtype=np.float64)


def _residual(positions: npt.NDArray[np.float64], pair: PairShift) -> float:
    return float(np.max(np.abs(positions[pair.j] - positions[pair.i] - np.asarray(pair.offset))))


def _components(n: int, pairs: Sequence[PairShift]) -> npt.NDArray[np.int32]:
    graph = coo_matrix((np.ones(len(pairs)), ([p.i for p in pairs], [p.j for p in pairs])), shape=(n, n))
    return np.asarray(connected_components(graph, directed=False)[1], dtype=np.int32)


def _tree_positions(n: int, pairs: Sequence[PairShift]) -> npt.NDArray[np.float64]:
    """Positions along the maximum spanning tree of NCC weights, each component from its first tile."""
    positions = np.zeros((n, 2))
    if not pairs:
        return positions
    cost = coo_matrix(
        ([2.0 - p.score for p in pairs], ([p.i for p in pairs], [p.j for p in pairs])), shape=(n, n)
    ).tocsr()
    tree = minimum_spanning_tree(cost)
    tree = tree + tree.T
    edge = {(p.i, p.j): np.asarray(p.offset) for p in pairs}
    done = np.zeros(n, dtype=bool)
    for start in range(n):
        if done[start]:
            continue
        order, parents = breadth_first_order(csr_matrix(tree), start, directed=False, return_predecessors=True)
        for node in order:
            done[node] = True
            parent = parents[node]
            if parent < 0:
                continue
            if (parent, node) in edge:
                positions[node] = positions[parent] + edge[(parent, node)]
            else:
                positions[node] = positions[parent] - edge[(node, parent)]
    return positions


def _least_squares(
    n: int,
    pairs: Sequence[PairShift],
    nominal: npt.NDArray[np.float64] | None,
    start: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    rows, cols, vals = [], [], []
    rhs: list[npt.NDArray[np.float64]] = []
    for r, pair in enumerate(pairs):
        w = max(pair.score, 0.05)
        rows += [r, r]
        cols += [pair.j, pair.i]
        vals += [w, -w]
        rhs.append(w * np.asarray(pair.offset, dtype=np.float64))
    r = len(pairs)
    if nominal is not None:
        for k in range(n):
            rows.append(r + k)
            cols.append(k)
            vals.append(LAYOUT_WEIGHT)
            rhs.append(LAYOUT_WEIGHT * nominal[k])
        r += n
    else:  # one anchor per group of linked tiles: its spanning-tree place
        labels = _components(n, pairs)
        for label in np.unique(labels):
            k = int(np.flatnonzero(labels == label)[0])
            rows.append(r)
            cols.append(k)
            vals.append(1.0)
            rhs.append(start[k])
            r += 1
    matrix = coo_matrix((vals, (rows, cols)), shape=(r, n)).tocsr()
    b = np.array(rhs, dtype=np.float64).reshape(r, 2)
    solved = np.zeros((n, 2))
    for axis in range(2):
        x0 = start[:, axis]
        delta = lsqr(matrix, b[:, axis] - matrix @ x0, atol=1e-12, btol=1e-12, iter_lim=20 * n + 100)[0]
        solved[:, axis] = x0 + delta
    return solved


def solve_positions(
    n: int,
    pairs: Sequence[PairShift],
    nominal: npt.NDArray[np.float64] | None = None,
    *,
    min_score: float = 0.3,
    tolerance: float = 3.0,
) -> Placement:
    """Fit the positions of `n` tiles to the pairs with NCC >= `min_score`; pairs that disagree
    with the fit by more than `tolerance` pixels are set aside. Tiles outside the largest linked
    group are `linked` False (placed by `nominal` when given)."""
    good = [p for p in pairs if p.score >= min_score]
    rejected = [p for p in pairs if p.score < min_score]
    tree = _tree_positions(n, good)
    if nominal is not None:
        tree = _align_groups(tree, good, nominal, n)
    consistent = [p for p in good if _residual(tree, p) <= tolerance]
    rejected += [p for p in good if _residual(tree, p) > tolerance]
    positions = _least_squares(n, consistent, nominal, tree)
    while consistent:
        worst = max(consistent, key=lambda p: _residual(positions, p))
        if _residual(positions, worst) <= tolerance:
            break
        consistent.remove(worst)
        rejected.append(worst)
        positions = _least_squares(n, consistent, nominal, positions)
    labels = _components(n, consistent)
    sizes = np.bincount(labels, minlength=int(labels.max()) + 1)
    linked = labels == int(np.argmax(sizes)) if n > 1 else np.ones(n, dtype=bool)
    if n > 1 and sizes.max() == 1:
        linked = np.zeros(n, dtype=bool)
    positions = positions - positions.min(axis=0)
    return Placement(positions, linked, consistent, rejected)


def _align_groups(
    tree: npt.NDArray[np.float64], pairs: Sequence[PairShift], nominal: npt.NDArray[np.float64], n: int
) -> npt.NDArray[np.float64]:
    """Move each spanning-tree group so that its mean lies on its tiles' mean layout place."""
    labels = _components(n, pairs)
    out: npt.NDArray[np.float64] = tree.copy()
    for label in np.unique(labels):
        members = labels == label
        out[members] += nominal[members].mean(axis=0) - tree[members].mean(axis=0)
    return out
