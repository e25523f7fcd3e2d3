"""A whole labelmap analysed band by band, in bounded memory, on one or more processes.

Bands of rows are read from the source one at a time (a gigapixel netCDF never lies in memory
whole), each with a halo of extra rows below that grows until the regions the band owns lie
whole in it (`band_grains`), up to a read limit (`GrainOptions.max_read_pixels`): a band read
at the limit is analysed as read, its regions cut there. A band's first halo is twice its own
rows (a band only reads and labels the halo rows its regions do not reach), and a later band
starts with a halo that fits the tallest region seen so far. Rows an earlier read holds are
reused, so each row is decoded about once. Workers get the rows themselves, so any source works with
processes. With N workers, N - 1 are spawned processes and this process is the N-th: it
analyses bands itself between handing them out (a spawned worker's start, loading scipy,
scikit-image and SimpleITK, costs about as much CPU as a band; the rows it analyses are not
copied). At most N + 1 bands are in flight. The bands' grains are merged into one table
numbered in raster order of their first pixels, which makes the result independent of band
size and of the number of workers.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from thinseg.analysis.band_grains import BandGrains, BandRequest, analyze_band, contact_lengths
from thinseg.analysis.labelmap_input import LabelmapSource
from thinseg.analysis.options import ClassRoles, GrainOptions, class_roles
from thinseg.errors import ThinSegError

#: Longest side of the report's overview picture (pixels).
OVERVIEW_SIDE = 1600
#: Blocks along the shorter side for the modal mineralogy's block bootstrap.
BLOCKS_ACROSS = 16
#: Least first halo (rows below a band's own rows); doubled while a region does not fit.
FIRST_HALO = 256
#: A band's first halo is this many times its own rows (at least FIRST_HALO): rows below the own
#: rows are only read and labelled unless a region the band owns reaches into them, which costs
#: far less than reading and labelling a band again with a grown halo.
FIRST_HALO_BANDS = 2

Progress = Callable[[int, int], None]


class Cancelled(Exception):
    """The caller asked to stop (its `cancelled()` returned True between bands)."""


@dataclass
class GrainScan:
    """Everything measured on a labelmap, in pixels of it (statistics convert to mm)."""

    shape: tuple[int, int]
    mm_per_pixel: float
    roles: ClassRoles
    grains: dict[str, npt.NDArray[np.float64]]  # one row per grain, raster order of first pixels
    neighbours: list[npt.NDArray[np.int64]]  # per grain, the row numbers (0-based) of grains it touches
    class_pixels: npt.NDArray[np.int64]  # per label value 0..N
    small_grain_pixels: npt.NDArray[np.int64]  # per label value, pixels of grains under the minimum size
    contacts_px: npt.NDArray[np.float64]  # (N+1, N+1) Crofton boundary length in pixels
    block_counts: npt.NDArray[np.int64]  # (blocks down, blocks across, N+1)
    block_px: int
    overview_labels: npt.NDArray[np.uint8]
    overview_outlines: npt.NDArray[np.bool_]
    overview_factor: int
    split_regions: int = 0
    halo_growths: int = 0
    cut_bands: int = 0  # bands analysed as read at the read limit (their tallest regions cut)
    notes: list[str] = field(default_factory=list)


def overview_factor(shape: tuple[int, int]) -> int:
    """How many times smaller the report's overview is than the labelmap."""
    return max(1, math.ceil(max(shape) / OVERVIEW_SIDE))


def block_size(shape: tuple[int, int]) -> int:
    """Side of the bootstrap's square blocks: BLOCKS_ACROSS along the shorter side."""
    side = max(8, math.ceil(min(shape) / BLOCKS_ACROSS))
    return side + side % 2  # even: counted on every second row and column


#: Pixels of a band's own rows, when the options leave it to the scan ...
AUTO_BAND_PIXELS = 12_000_000
#: ... and the fewest own rows a band then has: on a wide section a band of AUTO_BAND_PIXELS is
#: a few hundred rows, under the halo below it (as tall as the tallest region, 1,000 to 2,000 rows
#: in grain-supported rock), and the regions next to a band's own ones are split again by each
#: band above them that they touch. 768 rows hold a band's working memory under about 0.5 GB on a
#: 32k-pixel-wide section while making it a third faster per pixel than 366 rows.
AUTO_BAND_ROWS = 768


def band_rows(shape: tuple[int, int], band_pixels: int) -> int:
    """Own rows per band (even, so every band's every-second-row grid is the section's);
    `band_pixels` 0 picks them (AUTO_BAND_PIXELS, at least AUTO_BAND_ROWS)."""
    width = max(shape[1], 1)
    if band_pixels > 0:
        rows = max(64, band_pixels // width)
    else:
        rows = max(AUTO_BAND_PIXELS // width, AUTO_BAND_ROWS)
    return min(rows + rows % 2, shape[0] + shape[0] % 2)


class _RowReader:
    """Reads rows of the source, reusing those an earlier read holds: a band's halo is the next
    band's own rows, and a band read again with a grown halo starts with the rows it had, so each
    row is decoded about once."""

    def __init__(self, source: LabelmapSource) -> None:
        self.source = source
        self.last: tuple[int, npt.NDArray[np.uint8]] = (0, np.zeros((0, source.shape[1]), np.uint8))

    def read(
        self, first: int, last: int, earlier: tuple[int, npt.NDArray[np.uint8]] | None = None
    ) -> npt.NDArray[np.uint8]:
        for start, held in [self.last] + ([earlier] if earlier is not None else []):
            if start <= first < start + held.shape[0]:
                reused = held[first - start : min(last, start + held.shape[0]) - start]
                end = first + reused.shape[0]
                rows = np.concatenate([reused, self.source.read_rows(end, last)]) if end < last else reused
                break
        else:
            rows = np.ascontiguousarray(self.source.read_rows(first, last))
        self.last = (first, rows)
        return rows


def _request(
    source: LabelmapSource,
    options: GrainOptions,
    roles: ClassRoles,
    y0: int,
    y1: int,
    halo: int,
    reader: _RowReader | None = None,
    earlier: tuple[int, npt.NDArray[np.uint8]] | None = None,
) -> BandRequest:
    """The band's request; rows are read through `reader` (reusing rows read before, `earlier`
    among them) when one is given."""
    height, width = source.shape
    first = max(0, y0 - 2)  # two rows above: regions reaching them started above (even: the seed grid)
    last = min(height, y1 + halo)
    if reader is not None:
        labels = reader.read(first, last, earlier)
    else:
        labels = np.ascontiguousarray(source.read_rows(first, last))
    return BandRequest(
        labels=labels,
        first_row=first,
        own_rows=(y0, y1),
        section_shape=(height, width),
        grain_classes=roles.grains,
        n_classes=len(source.classes),
        neck_ratio=options.neck_ratio,
        split=options.split,
        min_pixels=options.min_pixels,
        block_px=block_size(source.shape),
        overlay_factor=overview_factor(source.shape),
    )


class _Serial(Executor):
    """Runs each band in this process (one worker; the Slicer logic)."""

    def submit(self, fn: Callable[..., BandGrains], /, *args: object, **kwargs: object) -> Future[BandGrains]:  # type: ignore[override]
        future: Future[BandGrains] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # handed to the caller through the future
            future.set_exception(error)
        return future


def _executor(workers: int) -> Executor:
    """`workers` spawned processes, or this process alone (0)."""
    if workers <= 0:
        return _Serial()
    # spawn: a fork of a process holding threads (Slicer, HDF5) can deadlock
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread_each
    )


@contextmanager
def _sitk_threads(n: int) -> Iterator[None]:
    """SimpleITK's default thread count set to `n` while a band is analysed here beside the
    workers, then given back (the host may be an application with its own setting)."""
    before = sitk.ProcessObject_GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(n)
    try:
        yield
    finally:
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(before)


def _one_thread_each() -> None:
    """Workers already fill the CPUs: SimpleITK's own threads would only contend."""
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)


def _band_starts(height: int, rows: int) -> Iterator[tuple[int, int]]:
    for y0 in range(0, height, rows):
        yield y0, min(height, y0 + rows)


def scan_labelmap(
    source: LabelmapSource,
    options: GrainOptions | None = None,
    *,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> GrainScan:
    """Find, split and measure every grain of `source` (see the module's docstring)."""
    options = options or GrainOptions()
    roles = class_roles(source.classes, options)
    height, width = source.shape
    if height < 1 or width < 1:
        raise ThinSegError("the labelmap is empty", source.path)
    rows = band_rows(source.shape, options.band_pixels)
    bands = list(_band_starts(height, rows))
    results: dict[int, BandGrains] = {}
    # the largest halo a band's read may have (rows below its own), and each band's next one
    most = {i: max(2, (options.max_read_pixels // width - (y1 - y0) - 2) // 2 * 2) for i, (y0, y1) in enumerate(bands)}
    halos = {i: min(max(FIRST_HALO, FIRST_HALO_BANDS * rows), most[i]) for i in range(len(bands))}
    short: dict[int, tuple[int, npt.NDArray[np.uint8]]] = {}  # rows read for a band whose halo was too small
    reader = _RowReader(source)
    final: set[int] = set()  # bands read with their largest halo: analysed as read
    growths = 0
    pending: dict[Future[BandGrains], int] = {}
    sent: dict[int, tuple[int, npt.NDArray[np.uint8]]] = {}  # the rows of each band in flight
    queue = list(range(len(bands)))
    done_rows = 0
    here = options.workers >= 2  # this process analyses bands too, beside workers - 1 spawned ones

    def next_request() -> tuple[int, BandRequest]:
        if cancelled is not None and cancelled():
            raise Cancelled()
        i = queue.pop(0)
        request = _request(source, options, roles, *bands[i], halos[i], reader, short.pop(i, None))
        sent[i] = (request.first_row, request.labels)
        return i, _as_section_end(request) if i in final else request

    def take(i: int, result: BandGrains) -> None:
        nonlocal growths, done_rows
        rows_read = sent.pop(i)
        if result.needs_more_rows:
            short[i] = rows_read
            if halos[i] >= min(most[i], height):
                final.add(i)  # grains reach past the largest read: cut there, flagged
            else:
                halos[i] = min(2 * halos[i], most[i])
                growths += 1
                for later in queue:  # the next bands start from the grown halo
                    halos[later] = min(max(halos[later], halos[i]), most[later])
            queue.insert(0, i)
            return
        results[i] = result
        # grains are alike across a section: later bands start with a halo that fits the
        # tallest grain seen so far (a fifth more), instead of growing it again by retries
        fitting = int(1.2 * result.tallest) + 2
        for later in queue:
            halos[later] = min(max(halos[later], fitting + fitting % 2), most[later])
        done_rows += bands[i][1] - bands[i][0]
        if progress is not None:
            progress(done_rows, height)

    spawned = options.workers - 1 if here else 0
    with _executor(spawned) as pool:
        while queue or pending:
            while queue and len(pending) <= spawned:  # one more than the spawned workers: none waits
                i, request = next_request()
                pending[pool.submit(analyze_band, request)] = i
            if here and queue:
                i, request = next_request()
                with _sitk_threads(1):
                    take(i, analyze_band(request))
            finished = [f for f in pending if f.done()]
            if not finished and pending and not (here and queue):
                finished = list(wait(pending, return_when=FIRST_COMPLETED).done)
            for future in finished:
                take(pending.pop(future), future.result())
    return _merge(source, roles, [results[i] for i in range(len(bands))], growths, len(final))


def _as_section_end(request: BandRequest) -> BandRequest:
    """The same band, told that its last row read is the section's last: analysed as read, the
    grains at that row flagged as cut (they leave the size statistics like grains at the
    section's edge)."""
    rows = request.labels.shape[0]
    return BandRequest(
        labels=request.labels,
        first_row=request.first_row,
        own_rows=request.own_rows,
        section_shape=(request.first_row + rows, request.section_shape[1]),
        grain_classes=request.grain_classes,
        n_classes=request.n_classes,
        neck_ratio=request.neck_ratio,
        split=request.split,
        min_pixels=request.min_pixels,
        block_px=request.block_px,
        overlay_factor=request.overlay_factor,
    )


def _merge(source: LabelmapSource, roles: ClassRoles, bands: list[BandGrains], growths: int, cut: int) -> GrainScan:
    # a section has at least one band, and every band has every column (`band_grains._measure`)
    columns = {k: np.concatenate([b.columns[k] for b in bands]) for k in bands[0].columns}
    order = np.argsort(columns["key"], kind="stable")
    columns = {k: v[order] for k, v in columns.items()}
    keys = columns["key"].astype(np.int64)
    pairs = np.concatenate([b.neighbour_pairs for b in bands])
    neighbours = _neighbour_lists(keys, pairs)
    block_px = block_size(source.shape)
    row_blocks = np.concatenate([b.block_counts for b in bands])  # every second row
    down = -(-source.shape[0] // block_px)
    blocks = np.add.reduceat(row_blocks, np.arange(0, row_blocks.shape[0], block_px // 2), axis=0)
    assert blocks.shape[0] == down
    factor = overview_factor(source.shape)
    outlines_rows = np.concatenate([b.overlay_outlines for b in bands])
    outlines = np.logical_or.reduceat(outlines_rows, np.arange(0, outlines_rows.shape[0], factor), axis=0)
    notes = []
    if cut:
        notes.append(
            f"{cut} band(s) held regions (touching grains of one class) taller than the largest read allows: "
            "they were cut there, their grains at the cut are flagged as cut and those below it are not listed"
        )
    return GrainScan(
        shape=source.shape,
        mm_per_pixel=source.mm_per_pixel,
        roles=roles,
        grains=columns,
        neighbours=neighbours,
        class_pixels=np.sum([b.class_pixels for b in bands], axis=0).astype(np.int64),
        small_grain_pixels=np.sum([b.small_grains for b in bands], axis=0).astype(np.int64),
        contacts_px=contact_lengths(np.sum([b.contacts for b in bands], axis=0)),
        block_counts=blocks,
        block_px=block_px,
        overview_labels=np.concatenate([b.overlay_labels for b in bands]),
        overview_outlines=outlines,
        overview_factor=factor,
        split_regions=sum(b.split_regions for b in bands),
        halo_growths=growths,
        cut_bands=cut,
        notes=notes,
    )


def _neighbour_lists(keys: npt.NDArray[np.int64], pairs: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
    """Per grain, the sorted row numbers of the grains it touches (pairs name grains by key)."""
    if keys.size == 0:
        return []
    both = np.concatenate([pairs, pairs[:, ::-1]]) if pairs.size else np.zeros((0, 2), np.int64)
    a = np.searchsorted(keys, both[:, 0])
    b = np.searchsorted(keys, both[:, 1])
    a_ok = (a < keys.size) & (keys[np.minimum(a, keys.size - 1)] == both[:, 0])
    b_ok = (b < keys.size) & (keys[np.minimum(b, keys.size - 1)] == both[:, 1])
    ok = a_ok & b_ok
    links = np.unique(np.stack([a[ok], b[ok]], axis=1), axis=0) if ok.any() else np.zeros((0, 2), np.int64)
    splits = np.searchsorted(links[:, 0], np.arange(keys.size + 1))
    return [links[splits[i] : splits[i + 1], 1].astype(np.int64) for i in range(keys.size)]
