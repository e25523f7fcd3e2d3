"""Minimum-region sieve: predicted regions smaller than any real grain give way to the runner-up.

A network trained on a few sections leaves specks: a few dozen pixels of plagioclase inside a
K-feldspar grain, or of a mineral the section does not hold at all. Every pixel of a connected
region (8-connectivity) of one class smaller than `min_pixels` takes its runner-up class, the
second most probable, and as confidence the runner-up's probability renormalised without the
removed class, p2 / (1 - p1). Where that leaves a region still too small (a speck of matrix
whose runner-up is a mineral the grain around it is not), the region takes the class most of the
pixels around it have. Both rounds are decided on whole regions of the map before them, so the
outcome does not depend on the order in which regions are visited, nor on how the map is cut
into bands.

`RegionSieve` does it on the engine's stream of bands: a region of fewer than n pixels spans
at most n rows, so the two rounds depend on nothing more than 2n rows away; rows are handed on
once 2n rows below them are known, and each band is judged within a window reaching 2n rows
above and below it, exactly as on the whole map. Where the stream itself is cut (the edges of a
column stripe of a very wide section, the ends of one part of a section shared by several
processes), what lies beyond is unknown, so regions touching such a seam are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Seams:
    """Sides of a stream beyond which the map goes on unseen (regions touching them are kept)."""

    top: bool = False
    bottom: bool = False
    left: bool = False
    right: bool = False


def runner_up_confidence(
    confidence: npt.NDArray[np.uint8], runner_up_probability: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    """p2 / (1 - p1) x 255, from p1 and p2 stored as uint8 x 255: the runner-up's probability
    once the removed class is taken out."""
    p1 = confidence.astype(np.float32)
    p2 = runner_up_probability.astype(np.float32)
    out: npt.NDArray[np.uint8] = np.clip(p2 * 255.0 / np.maximum(255.0 - p1, 1.0) + 0.5, 0, 255).astype(np.uint8)
    return out


def small_regions(labels: npt.NDArray[np.uint8], min_pixels: int, seams: Seams = Seams()) -> npt.NDArray[np.bool_]:
    """Pixels of 8-connected single-class regions with fewer than `min_pixels` pixels, regions
    touching a seam excepted."""
    from skimage.measure import label as connected  # deferred: slow to import, and only sieving models need it

    regions, count = connected(  # type: ignore[no-untyped-call]
        labels.astype(np.int16) + 1, background=0, connectivity=2, return_num=True
    )
    sizes = np.bincount(regions.ravel(), minlength=count + 1)
    small = sizes < min_pixels
    small[0] = False
    keep_seam_regions(small, regions, seams)
    mask: npt.NDArray[np.bool_] = small[regions]
    return mask


def keep_seam_regions(small: npt.NDArray[np.bool_], regions: npt.NDArray[np.integer], seams: Seams) -> None:
    """Mark (in place) the regions of `regions` (numbered as `small` is indexed) that touch a seam as not small."""
    for side, edge in (
        (seams.top, regions[0]),
        (seams.bottom, regions[-1]),
        (seams.left, regions[:, 0]),
        (seams.right, regions[:, -1]),
    ):
        if side:
            small[edge] = False


def sieve(
    labels: npt.NDArray[np.uint8],
    runner_up: npt.NDArray[np.uint8],
    min_pixels: int,
    confidence: npt.NDArray[np.uint8] | None = None,
    runner_up_probability: npt.NDArray[np.uint8] | None = None,
    seams: Seams = Seams(),
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8] | None]:
    """The whole-map sieve: new (labels, confidence) with every small region's pixels given
    their runner-up class (and its renormalised probability)."""
    out = labels.copy()
    conf = confidence.copy() if confidence is not None else None
    if min_pixels <= 1 or labels.size == 0:
        return out, conf
    small = small_regions(labels, min_pixels, seams)
    if not small.any():
        return out, conf
    out[small] = runner_up[small]
    if conf is not None and confidence is not None and runner_up_probability is not None:
        conf[small] = runner_up_confidence(confidence[small], runner_up_probability[small])
    take_surroundings(out, still_small(out, small, min_pixels, seams))
    return out, conf


def still_small(
    labels: npt.NDArray[np.uint8], changed: npt.NDArray[np.bool_], min_pixels: int, seams: Seams = Seams()
) -> npt.NDArray[np.bool_]:
    """After the first round: the pixels of regions of `labels` still under `min_pixels`, as
    `small_regions` finds them, but labelling only the (few) changed pixels. A region holding an
    unchanged pixel was kept, so it is large or on a seam; a region of changed pixels alone is a
    component of them that no unchanged pixel of its class touches."""
    from skimage.measure import label as connected  # deferred: slow to import, and only sieving models need it

    mask = np.zeros(labels.shape, bool)
    ys, xs = np.nonzero(changed)
    if ys.size == 0:
        return mask
    components, count = connected(  # type: ignore[no-untyped-call]
        np.where(changed, labels.astype(np.int16) + 1, 0), background=0, connectivity=2, return_num=True
    )
    ids, own = components[ys, xs], labels[ys, xs]
    small = np.bincount(ids, minlength=count + 1) < min_pixels
    small[0] = False
    height, width = labels.shape
    for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
        ny, nx = ny[inside], nx[inside]
        joins = ~changed[ny, nx] & (labels[ny, nx] == own[inside])
        small[ids[inside][joins]] = False
    keep_seam_regions(small, components, seams)
    mask[ys, xs] = small[ids]
    return mask


def take_surroundings(labels: npt.NDArray[np.uint8], regions_mask: npt.NDArray[np.bool_]) -> None:
    """Each 8-connected region of `regions_mask` takes (in place) the most common class among the
    pixels bordering it outside the mask (ties: the lower label); one with no such pixel stays."""
    from scipy import ndimage as ndi  # deferred: only sieving models need it

    if not regions_mask.any():
        return
    eight = np.ones((3, 3), bool)
    regions, _ = ndi.label(regions_mask, structure=eight)
    height, width = labels.shape
    for index, box in enumerate(ndi.find_objects(regions), start=1):
        if box is None:
            continue
        ys = slice(max(box[0].start - 1, 0), min(box[0].stop + 1, height))
        xs = slice(max(box[1].start - 1, 0), min(box[1].stop + 1, width))
        region = regions[ys, xs] == index
        ring = ndi.binary_dilation(region, structure=eight) & ~regions_mask[ys, xs]
        around = labels[ys, xs][ring]
        if around.size:
            labels[ys, xs][region] = np.bincount(around).argmax()


class BandSink(Protocol):
    """What a RegionSieve hands its sieved bands to (the engine's RowSink)."""

    def write_rows(
        self, y0: int, labels: npt.NDArray[np.uint8], confidence: npt.NDArray[np.uint8] | None, x0: int = 0
    ) -> None: ...


class RegionSieve:
    """Sieves one stream of bands (whole rows of one stripe, top to bottom) on its way to `sink`,
    holding about 2 x `min_pixels` rows more than a band: the output equals `sieve` on the whole
    stream's map. `finish` hands on what is still held once the stream's last band is in."""

    def __init__(self, sink: BandSink, min_pixels: int, seams: Seams = Seams()) -> None:
        self.sink, self.min_pixels, self.seams = sink, int(min_pixels), seams
        self.reach = 2 * self.min_pixels  # rows the two rounds look across
        self._bands: list[tuple[npt.NDArray[np.uint8], ...]] = []
        self._start = 0  # the stream's first row
        self._y0 = 0  # the first row held
        self._sent = 0  # the first row not yet handed on
        self._received = 0  # one past the last row received
        self._x0 = 0
        self._started = False

    def write_band(
        self,
        y0: int,
        labels: npt.NDArray[np.uint8],
        runner_up: npt.NDArray[np.uint8],
        confidence: npt.NDArray[np.uint8] | None = None,
        runner_up_probability: npt.NDArray[np.uint8] | None = None,
        x0: int = 0,
    ) -> None:
        """Take the next band (copied: the engine reuses its buffers) and hand on every row that
        no later band can change."""
        if not self._started:
            self._start = self._y0 = self._sent = self._received = y0
            self._x0, self._started = x0, True
        if y0 != self._received or x0 != self._x0:
            raise AssertionError(f"band at row {y0}, column {x0}: expected row {self._received}, column {self._x0}")
        arrays = [labels, runner_up]
        if confidence is not None and runner_up_probability is not None:
            arrays += [confidence, runner_up_probability]
        self._bands.append(tuple(a.copy() for a in arrays))
        self._received += labels.shape[0]
        ready = self._received - self.reach
        if ready > self._sent:
            self._send(ready, last=False)

    def finish(self) -> None:
        """Hand on the rows still held: the stream has ended."""
        if self._started and self._received > self._sent:
            self._send(self._received, last=True)
        self._bands, self._started = [], False

    def _send(self, end: int, last: bool) -> None:
        """Sieve the held rows and hand on rows [sent, end)."""
        held = [np.concatenate(parts) for parts in zip(*self._bands)]
        labels, runner_up = held[0], held[1]
        confidence = held[2] if len(held) > 2 else None
        probability = held[3] if len(held) > 3 else None
        first = self._y0 == self._start
        seams = Seams(
            top=self.seams.top if first else True,
            bottom=self.seams.bottom if last else True,
            left=self.seams.left,
            right=self.seams.right,
        )
        out, conf = sieve(labels, runner_up, self.min_pixels, confidence, probability, seams)
        a, b = self._sent - self._y0, end - self._y0
        self.sink.write_rows(self._sent, out[a:b], conf[a:b] if conf is not None else None, self._x0)
        self._sent = end
        keep_from = max(self._y0, end - self.reach)  # the rows the next window reaches back to
        cut = keep_from - self._y0
        self._bands = [tuple(x[cut:] for x in held)] if cut < labels.shape[0] else []
        self._y0 = keep_from
