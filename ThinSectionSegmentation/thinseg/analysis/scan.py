"""A whole labelmap analysed band by band, in bounded memory, on one or more processes.

Bands of rows are read from the source one at a time (a gigapixel netCDF never lies in memory
whole), each with a halo of extra rows below that grows until the regions the band owns lie
whole in it (`band_grains`), up to a read limit (`GrainOptions.max_read_pixels`): a band read
at the limit is analysed as read, its regions cut there. A later band starts with a halo that
fits the tallest region seen so far. Workers get the rows themselves, so any source works with
processes; at most workers + 1 bands are in flight. The bands' grains are merged into one table numbered in
raster order of their first pixels, which makes the result independent of band size and of
the number of workers.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
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
#: First halo (rows below a band's own rows); doubled while a region does not fit.
FIRST_HALO = 256

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


def band_rows(shape: tuple[int, int], band_pixels: int) -> int:
    """Own rows per band (even, so every band's every-second-row grid is the section's)."""
    rows = max(64, band_pixels // max(shape[1], 1))
    return min(rows + rows % 2, shape[0] + shape[0] % 2)


def _request(
    source: LabelmapSource, options: GrainOptions, roles: ClassRoles, y0: int, y1: int, halo: int
) -> BandRequest:
    height, width = source.shape
    first = max(0, y0 - 2)  # two rows above: regions reaching them started above (even: the seed grid)
    last = min(height, y1 + halo)
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
    if workers <= 1:
        return _Serial()
    # spawn: a fork of a process holding threads (Slicer, HDF5) can deadlock
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread_each
    )


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
    halos = {i: min(FIRST_HALO, most[i]) for i in range(len(bands))}
    final: set[int] = set()  # bands read with their largest halo: analysed as read
    growths = 0
    pending: dict[Future[BandGrains], int] = {}
    queue = list(range(len(bands)))
    done_rows = 0
    with _executor(options.workers) as pool:
        while queue or pending:
            while queue and len(pending) <= options.workers:
                if cancelled is not None and cancelled():
                    raise Cancelled()
                i = queue.pop(0)
                request = _request(source, options, roles, *bands[i], halos[i])
                pending[pool.submit(analyze_band, _as_section_end(request) if i in final else request)] = i
            future = next(iter(wait(pending, return_when=FIRST_COMPLETED).done))
            i = pending.pop(future)
            result = future.result()
            if result.needs_more_rows:
                if halos[i] >= min(most[i], height):
                    final.add(i)  # grains reach past the largest read: cut there, flagged
                else:
                    halos[i] = min(2 * halos[i], most[i])
                    growths += 1
                    for later in queue:  # the next bands start from the grown halo
                        halos[later] = min(max(halos[later], halos[i]), most[later])
                queue.insert(0, i)
                continue
            results[i] = result
            # grains are alike across a section: later bands start with a halo that fits the
            # tallest grain seen so far (a fifth more), instead of growing it again by retries
            fitting = int(1.2 * result.tallest) + 2
            for later in queue:
                halos[later] = min(max(halos[later], fitting + fitting % 2), most[later])
            done_rows += bands[i][1] - bands[i][0]
            if progress is not None:
                progress(done_rows, height)
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
