"""Strip-wise sliding-window segmentation of whole thin sections with bounded memory.

Why strips: a 20k x 30k section as float logits would need tens of GB. Tiles are processed one
tile-row at a time, the input read in windows of at most READ_WIDTH columns. Pixels that only
one tile covers (most of them) become labels straight from that tile; the overlaps are blended
in storage for the overlaps alone (the rows two tile rows share, the column seams of the open
tile row) and become labels as soon as no later tile can touch them; each finished band of rows
goes to a row sink (the output file, or whole maps for callers that want them in memory).

Sections wider than STRIPE_WIDTH are run in column stripes, left to right, each from top to
bottom; a stripe also runs the tile that straddles its edge, so every pixel is blended from the
same tiles in the same order as in one pass. Peak memory is therefore a fixed part (model, a
batch) plus O(overlap x stripe width x classes) and a uint8 band of labels a stripe wide,
whatever the section's height and width, for about one extra tile per tile row and stripe edge.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol

import numpy as np
import numpy.typing as npt
import torch
from typing_extensions import TypeVar  # a default for the bundle type (typing has it from Python 3.13)

from thinseg import limits
from thinseg.errors import ThinSegError
from thinseg.inference.device import auto_precision, select_device
from thinseg.inference.regions import RegionSieve, Seams
from thinseg.inference.rewrites import prepare_network
from thinseg.inference.tiling import blend_weights, padded_size, tile_starts
from thinseg.inference.tta import average_probabilities, describe, log_probabilities, resolve_mode
from thinseg.model.bundle import ModelBundle
from thinseg.model.networks import network_channels

if TYPE_CHECKING:
    from thinseg.model.transforms import MinMaxTransform

#: MONAI UNets with 4 stride-2 stages need sides divisible by 16.
SIZE_MULTIPLE = 16

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class Source(Protocol):
    """What the engine needs of an image: its size and region reads as uint8 (h, w, 3)."""

    shape: tuple[int, int]

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> npt.NDArray[np.uint8]: ...


class Bundle(Protocol):
    """What the engine needs of a model: a loaded `ModelBundle`, or a network being trained."""

    @property
    def network(self) -> torch.nn.Module: ...
    @property
    def input_names(self) -> list[str]: ...
    @property
    def roi_shape(self) -> tuple[int, int]: ...
    @property
    def first_label(self) -> int: ...

    def prepare(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """One (B, c, H, W) tensor per input -> the float network input (B, C, H, W)."""
        ...

    def fused_pre_processing(self) -> tuple[list[int], list[MinMaxTransform]] | None:
        """The pre-processing as (input order along the channels, in-place rescales), or None."""
        ...


#: The bundle a Segmenter runs: a loaded ModelBundle unless said otherwise (`Segmenter[Bundle]`: any).
BundleT = TypeVar("BundleT", bound=Bundle, default=ModelBundle, covariant=True)


class Cancelled(Exception):
    """Raised when the caller's cancel check returns True; nothing has been written."""


@dataclass
class InferenceOptions:
    """How to run the network. precision "auto": bf16 where the hardware runs it natively (it
    changes under 0.5% of labels, see bench/bench_segment.py), else exact fp32."""

    tile: int | None = None  # None: default_tile() (the model's input_roi_shape, or larger when exact)
    overlap: int | None = None  # px shared by neighbouring tiles (blended); None: default_overlap(tile)
    batch_size: int | None = None  # tiles per forward pass; None: about 1 MPix per pass
    precision: Precision = "auto"
    device: str = "auto"
    channels_last: bool = True
    fold_batchnorm: bool = True
    with_confidence: bool = False
    prefetch: bool = True
    #: test-time augmentation (thinseg.inference.tta): "none", "flips", "dihedral", or "auto": what
    #: the model bundle recommends (meta.json `test_time_augmentation`; "none" for other bundles)
    tta: str = "auto"
    #: minimum-region sieve (thinseg.inference.regions): regions of one class under this many
    #: pixels of the model's grid take their runner-up class; 0 turns it off; "auto": what the
    #: model bundle recommends (meta.json `min_region_px`; 0 for other bundles)
    min_region: int | Literal["auto"] = "auto"


DEFAULT_OVERLAP = 64
#: Tile pixels per forward pass when no batch size is given: CPU throughput no longer rises
#: beyond this, and activation memory grows with it.
BATCH_PIXELS = 1024 * 1024
#: Columns of input read at once (whole forward passes, at least one): wider sections are read
#: in windows of the tile rows, so the input held (PP and XP, current and next window) is the
#: same for any width; narrower ones are read in whole rows as before.
READ_WIDTH = 8192
#: Columns of the section one stripe owns (a multiple of 512, so that the outputs' compressed
#: 512 x 512 chunks are each written whole): wider sections are run stripe by stripe, and what
#: the engine and the output writers hold is then about as wide as a stripe, not the section.
STRIPE_WIDTH = 8192
#: Stripe edges fall on multiples of this (the outputs' chunk side).
STRIPE_ALIGN = 512
#: Rows of a finished strip turned into confidence at once (bounds the softmax temporaries).
CONFIDENCE_ROWS = 64
#: Confidence statistics (mean, low-confidence share) come from every STATS_STRIDE-th row and
#: column of the section, on a grid fixed to the section: 1/16 of the softmax work of a full
#: confidence map, and a sample of ~60,000 pixels per MPix, so the statistics are the same with
#: or without the map and cost a few percent of the run.
STATS_STRIDE = 4
#: Bins of the confidence histogram: max softmax probability x 255, rounded (as the map stores it).
CONFIDENCE_BINS = 256
#: Tile side used for networks whose output does not depend on the tile (see default_tile).
LARGE_TILE = 1024
_TILE_DEPENDENT_NORMS = (
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)


def default_tile(network: torch.nn.Module, roi: tuple[int, int]) -> tuple[int, int]:
    """The model's own tile, or LARGE_TILE px when that cannot change what the network computes.

    A convolutional network with eval-mode BatchNorm gives each pixel the same answer on any
    tile, up to border effects that the blending removes; larger tiles then mean less overlap
    to recompute (1.13x instead of 1.31x the section's pixels at 64 px overlap). Normalisation
    over the tile itself (InstanceNorm, as in GeoSlicer's UNetAct) makes the answer depend on
    the tile, so such models keep the tile they were trained and validated with.
    """
    if any(isinstance(m, _TILE_DEPENDENT_NORMS) for m in network.modules()):
        return roi
    return (max(roi[0], LARGE_TILE), max(roi[1], LARGE_TILE))


def size_multiple(network: torch.nn.Module) -> int:
    """What a tile side must be a multiple of for `network`: the product of its U-Net's strides
    (each stride-2 level halves the tile, and the skips need the halves to add up again)."""
    for module in network.modules():
        strides = getattr(module, "strides", None)
        if isinstance(strides, (list, tuple)) and strides:
            multiple = 1
            for stride in strides:
                multiple *= int(max(stride) if isinstance(stride, (list, tuple)) else stride)
            return multiple
    return 1


def default_overlap(tile: int) -> int:
    """The default overlap for `tile` px tiles: 64 px, but at most a quarter of the tile, so that
    models with small input_roi_shape (e.g. 64 or 128) run without tuning options."""
    return max(0, min(DEFAULT_OVERLAP, int(tile) // 4))


@dataclass
class SegmentationResult:
    """The labels (and confidence) of one section and how the run went."""

    labels: npt.NDArray[np.uint8]  # (H, W), class values 1..N (0 = not classified)
    confidence: npt.NDArray[np.uint8] | None  # (H, W), max softmax probability x 255
    tiles: int
    seconds: float
    device: str
    messages: list[str] = field(default_factory=list)
    #: (CONFIDENCE_BINS,) pixel counts of the sampled confidence (see STATS_STRIDE): what
    #: thinseg.inference.confidence compares with the model's validation sections
    confidence_histogram: npt.NDArray[np.int64] | None = None

    @property
    def mpix_per_s(self) -> float:
        """Throughput in megapixels of the section per second."""
        return self.labels.size / 1e6 / max(self.seconds, 1e-9)


@dataclass
class RunStats:
    """How a streamed run went (`Segmenter.stream`): everything of a SegmentationResult but the maps."""

    shape: tuple[int, int]  # (H, W) of the section the engine saw
    tiles: int
    seconds: float
    device: str
    messages: list[str] = field(default_factory=list)
    confidence_histogram: npt.NDArray[np.int64] | None = None


class RowSink(Protocol):
    """Receives the finished pixels of a section, each exactly once: (h, w) uint8 labels at row
    `y0`, column `x0`, and their confidence (max softmax x 255) when it was asked for. A section
    at most STRIPE_WIDTH wide comes in bands of whole rows, top to bottom; a wider one in column
    stripes, left to right, each stripe's bands top to bottom. The arrays are the engine's band
    buffers, valid only during the call: copy what is kept."""

    def write_rows(
        self, y0: int, labels: npt.NDArray[np.uint8], confidence: npt.NDArray[np.uint8] | None, x0: int = 0
    ) -> None: ...


class ArraySink:
    """Keeps whole (H, W) maps: for callers that want the section's labels in memory."""

    def __init__(self, height: int, width: int, with_confidence: bool) -> None:
        self.labels = np.zeros((height, width), np.uint8)
        self.confidence = np.zeros((height, width), np.uint8) if with_confidence else None

    def write_rows(
        self, y0: int, labels: npt.NDArray[np.uint8], confidence: npt.NDArray[np.uint8] | None, x0: int = 0
    ) -> None:
        h, w = labels.shape
        self.labels[y0 : y0 + h, x0 : x0 + w] = labels
        if self.confidence is not None and confidence is not None:
            self.confidence[y0 : y0 + h, x0 : x0 + w] = confidence


ProgressFn = Callable[[int, int], None]  # (tiles done, tiles total)
CancelFn = Callable[[], bool]


class Segmenter(Generic[BundleT]):
    """Runs one model bundle over any number of sections; build once, call `segment` per section."""

    def __init__(self, bundle: BundleT, options: InferenceOptions | None = None) -> None:
        self.bundle = bundle
        self.options = options or InferenceOptions()
        self.device, message = select_device(self.options.device)
        self.messages: list[str] = [message] if message else []
        self.precision: Precision = self.options.precision
        if self.precision == "auto":
            self.precision = auto_precision(self.device)
            if self.precision != "fp32":
                self.messages.append(
                    f"running in {self.precision} on this {self.device.type}, where it is faster (under 0.5% of "
                    "labels differ; --precision fp32 for exact fp32 on the command line)"
                )
        if self.precision == "fp16" and self.device.type == "cpu":
            raise ThinSegError("fp16 inference needs a CUDA GPU; use fp32 or bf16 on the CPU")
        self.network = prepare_network(
            bundle.network,
            self.device,
            channels_last=self.options.channels_last,
            fold_bn=self.options.fold_batchnorm,
        )
        self._shrinkable = False
        if self.options.tile is None:
            roi = default_tile(bundle.network, (bundle.roi_shape[0], bundle.roi_shape[1]))
            self._shrinkable = tuple(roi) != tuple(bundle.roi_shape)  # the large tile, not the model's own
        else:
            roi = (self.options.tile, self.options.tile)
        self.tile = (int(roi[0]), int(roi[1]))
        what = "tile (--tile)" if self.options.tile is not None else "the model's tile (input_roi_shape)"
        limits.check_tiling(self.tile, size_multiple(bundle.network), self.options.batch_size or 1, what)
        #: what a tile cut to a small section is padded to: 16, or more for a deeper network
        self.multiple = math.lcm(SIZE_MULTIPLE, size_multiple(bundle.network))
        self.overlap = self.options.overlap if self.options.overlap is not None else default_overlap(min(self.tile))
        self.batch_size = self.options.batch_size or max(1, BATCH_PIXELS // (self.tile[0] * self.tile[1]))
        self._fused = bundle.fused_pre_processing()
        recommended = bundle.test_time_augmentation if isinstance(bundle, ModelBundle) else "none"
        #: the test-time augmentation this segmenter runs ("auto" resolved)
        self.tta = resolve_mode(self.options.tta, recommended)
        self._stride = size_multiple(bundle.network)  # what a turned (transposed) tile's sides must be multiples of
        if self.tta != "none":
            self.messages.append(describe(self.tta))
        #: the minimum-region sieve this segmenter runs, in pixels of the model's grid ("auto" resolved)
        self.min_region = resolve_min_region(self.options.min_region, bundle)
        if self.min_region > 1:
            self.messages.append(
                f"regions under {self.min_region} px of one class take their runner-up class (--min-region 0: off)"
            )
        if min(self.tile) <= 2 * self.overlap:
            raise ThinSegError(f"overlap {self.overlap} px is too large for {self.tile[0]} px tiles")

    # -- public -------------------------------------------------------------------------------

    def segment(
        self,
        sources: Sequence[Source],
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> SegmentationResult:
        """Segment one section given one source per model input (e.g. PP then XP), same size;
        the labels (and confidence) come back as whole maps (`stream` hands them on by rows)."""
        height, width = sources[0].shape
        sink = ArraySink(height, width, self.options.with_confidence)
        stats = self.stream(sources, sink, progress, cancel)
        return SegmentationResult(
            labels=sink.labels,
            confidence=sink.confidence,
            tiles=stats.tiles,
            seconds=stats.seconds,
            device=stats.device,
            messages=stats.messages,
            confidence_histogram=stats.confidence_histogram,
        )

    def stream(
        self,
        sources: Sequence[Source],
        sink: RowSink,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
        tile_rows: tuple[int, int] | None = None,
    ) -> RunStats:
        """Segment one section and hand its rows to `sink` as they are finished (one band of at
        most a tile's height at a time, a column stripe wide for sections wider than
        STRIPE_WIDTH), so no map of the whole section is ever held.

        `tile_rows` (a, b): only the rows that tile rows a..b-1 of `plan_for` finish, i.e. section
        rows [ys[a], ys[b]) (to the bottom when b is the last), for one part of a section that
        several processes share. Tile row a-1 is run too, unreported: the rows tile row a shares
        with it are then blended from the same two tiles in the same order as in a whole run, so
        every label equals the whole run's."""
        if len(sources) != len(self.bundle.input_names):
            raise ThinSegError(
                f"the model needs {len(self.bundle.input_names)} images "
                f"({', '.join(self.bundle.input_names)}) but {len(sources)} were given"
            )
        height, width = sources[0].shape
        start = time.perf_counter()
        plan = self.plan_for(height, width)
        first, last = _tile_row_range(tile_rows, len(plan.ys))
        run_from = max(0, first - 1)
        stripes = column_stripes(plan, STRIPE_WIDTH, STRIPE_ALIGN)
        progress_of = _Progress(progress, (last - run_from) * sum(s.end - s.first for s in stripes))
        histogram = torch.zeros(CONFIDENCE_BINS, dtype=torch.int64, device=self.device)
        order = self._fused[0] if self._fused is not None else list(range(len(sources)))
        for stripe in stripes:
            part = plan if len(stripes) == 1 else plan.columns(stripe.first, stripe.end)
            offset = plan.xs[stripe.first]
            views: list[Source] = [
                sources[i] if part is plan else _ColumnView(sources[i], offset, part.width) for i in order
            ]
            out = _LabelWriter(
                part,
                self.bundle.first_label,
                self.options.with_confidence,
                sink,
                self.device,
                owned=(stripe.x0 - offset, stripe.x1 - offset),
                x_offset=offset,
            )
            out.report_from = first
            if self.min_region > 1:  # what lies beyond a stripe's or a part's edge is not seen
                seams = Seams(first > 0, last < len(plan.ys), stripe.x0 > 0, stripe.x1 < plan.width)
                out.sieve = RegionSieve(sink, self.min_region, seams)
            self._run_stripe(part, views, (run_from, last), out, progress_of, cancel)
            out.close()
            histogram += out.histogram
        return RunStats(
            shape=(height, width),
            tiles=progress_of.total,
            seconds=time.perf_counter() - start,
            device=str(self.device),
            messages=list(self.messages),
            confidence_histogram=histogram.cpu().numpy(),
        )

    def plan_for(self, height: int, width: int) -> _Plan:
        """The tiles for a height x width section. With the automatic large tile, each axis gets
        the smallest tile (multiple of 16, at most LARGE_TILE) that covers it with as many tiles
        as before, so that tiles overlap by about `overlap` px, not by whatever is left over
        (8192 px: 9 tiles of 976 px overlapping by 74 px instead of 1024 px by 128 px, 9% less
        to compute). A tile given by the user, or the model's own tile, is kept as it is."""
        tile = self.tile
        if self._shrinkable:
            tile = (
                _snug_tile(height, tile[0], self.overlap, self.multiple),
                _snug_tile(width, tile[1], self.overlap, self.multiple),
            )
        return _Plan.make(height, width, tile, self.overlap, self.multiple)

    # -- internals ----------------------------------------------------------------------------

    def _run_stripe(
        self,
        plan: _Plan,
        sources: Sequence[Source],
        rows: tuple[int, int],
        out: _LabelWriter,
        progress: _Progress,
        cancel: CancelFn | None,
    ) -> None:
        """Tile rows [a, b) of `plan` (a section, or one stripe of it seen through column views)."""
        reader = _BandReader(sources, plan, self.options.prefetch, rows, self.batch_size, READ_WIDTH)
        try:
            blend = _Blend(plan, self._n_outputs(), self.device)
            index = {x: i for i, x in enumerate(plan.xs)}
            for window, bands in reader:
                if window.first:
                    out.begin(window.row)
                for batch in window.batches:
                    if cancel is not None and cancel():
                        raise Cancelled()
                    logits = self._forward(bands, [x - window.x0 for x in batch], plan.tile_w)
                    for tile_logits, col in zip(logits, batch):
                        self._place_tile(tile_logits, plan, window.row, col, blend, out)
                        for blended, y0, x0 in blend.finished_by(window.row, index[col]):
                            out.write(blended, y0, x0)
                    progress.add(len(batch))
                if window.last:
                    out.finish()
        finally:
            reader.close()

    def _n_outputs(self) -> int:
        """Network output channels: one per class, plus output 0 = not classified in our bundles."""
        return network_channels(self.bundle.network)[1]

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _forward(self, bands: list[torch.Tensor], cols: list[int], tw: int) -> torch.Tensor:
        """Logits (B, C, th, tw), in the network's output dtype, for the tiles starting at the
        column offsets `cols` of `bands` (one (th, w, c) uint8 window of the tile row per input).
        With test-time augmentation: float32 log-probabilities of the augmentations' averaged
        probabilities (so argmax and max softmax downstream are those of the average)."""
        if self._fused is not None:
            x = self._fused_input(bands, cols, tw)
        else:
            per_input = [
                torch.stack([b[:, c : c + tw] for c in cols]).to(self.device).permute(0, 3, 1, 2) for b in bands
            ]
            x = self.bundle.prepare(per_input)
        if self.tta != "none":
            with torch.inference_mode():
                return log_probabilities(average_probabilities(self._run_network, x, self.tta, self._stride))
        return self._run_network(x)

    def _run_network(self, x: torch.Tensor) -> torch.Tensor:
        """The network's logits for the float batch `x` (B, C, H, W)."""
        x = x.contiguous(memory_format=torch.channels_last if self.options.channels_last else torch.contiguous_format)
        with torch.inference_mode(), self._autocast():
            out = self.network(x)
        if isinstance(out, (list, tuple)):  # deep-supervision style networks: first head
            out = out[0]
        logits: torch.Tensor = out
        return logits

    def _fused_input(self, bands: list[torch.Tensor], cols: list[int], tw: int) -> torch.Tensor:
        """The network input in one pass: uint8 tiles copied straight into a channels-last float
        batch (no concatenated or planar copies), then rescaled in place (only for bundles whose
        pre-processing `fused_pre_processing` can express)."""
        rescales: list[MinMaxTransform] = self._fused[1] if self._fused is not None else []
        th = bands[0].shape[0]
        channels = sum(b.shape[2] for b in bands)
        x = torch.empty(
            (len(cols), channels, th, tw), dtype=torch.float32, device=self.device, memory_format=torch.channels_last
        )
        c0 = 0
        for band in bands:
            c1 = c0 + band.shape[2]
            if self.device.type == "cpu":
                for i, col in enumerate(cols):
                    x[i, c0:c1].copy_(band[:, col : col + tw].permute(2, 0, 1))
            else:  # move uint8 (4x less than float) and convert on the device
                tiles = torch.stack([band[:, col : col + tw] for col in cols]).to(self.device, non_blocking=True)
                x[:, c0:c1].copy_(tiles.permute(0, 3, 1, 2))
            c0 = c1
        for rescale in rescales:
            x = rescale.apply_(x)
        return x

    def _place_tile(
        self, logits: torch.Tensor, plan: _Plan, row: int, col: int, blend: _Blend, out: _LabelWriter
    ) -> None:
        """Pixels only this tile covers become labels now; the rest, weighted, go to the blend."""
        y, x = plan.ys[row], col
        (r0, r1), (c0, c1) = plan.row_own[row], plan.col_own[col]
        th, tw = plan.tile_h, plan.tile_w
        if r1 > r0 and c1 > c0:
            out.write(logits[:, r0:r1, c0:c1], y + r0, x + c0)
        window = blend.window
        for (a0, a1), (b0, b1) in (((0, r0), (0, tw)), ((r1, th), (0, tw))):  # rows another tile row shares
            if a1 > a0:
                blend.add_rows(logits[:, a0:a1, b0:b1], window[a0:a1, b0:b1], y + a0, x + b0, row)
        for (a0, a1), (b0, b1) in (((r0, r1), (0, c0)), ((r0, r1), (c1, tw))):  # seams with the neighbours
            if a1 > a0 and b1 > b0:
                blend.add_seam(logits[:, a0:a1, b0:b1].float(), window[a0:a1, b0:b1], y + a0, x + b0)


class _LabelWriter:
    """Turns logits of any region into labels (+ confidence) in uint8 band buffers and hands
    each band to the sink once it is complete.

    Everything written while tile row `row` is processed (its own pixels and the blended
    regions that become final after it) lies in the section rows [ys[row], ys[row + 1]), so one
    buffer a tile high holds the open band, whatever the section's height.
    """

    def __init__(
        self,
        plan: _Plan,
        first_label: int,
        with_confidence: bool,
        sink: RowSink,
        device: torch.device | None = None,
        owned: tuple[int, int] | None = None,
        x_offset: int = 0,
    ) -> None:
        self.plan, self.sink = plan, sink
        #: set before the run: bands go through this minimum-region sieve, with runner-up classes
        self.sieve: RegionSieve | None = None
        self.height = plan.height
        #: the columns of `plan` whose labels are handed on (a stripe's own), and where column 0
        #: of `plan` lies in the section
        self.owned = owned if owned is not None else (0, plan.width)
        self.x_offset = x_offset
        rows = max(1, min(plan.tile_h, plan.height))
        columns = self.owned[1] - self.owned[0]
        self._labels = np.zeros((rows, columns), np.uint8)
        self._confidence = np.zeros((rows, columns), np.uint8) if with_confidence else None
        self._shape = (rows, columns)
        self._runner_up: npt.NDArray[np.uint8] | None = None  # made on first use (only with a sieve)
        self._runner_up_p: npt.NDArray[np.uint8] | None = None
        self.histogram = torch.zeros(CONFIDENCE_BINS, dtype=torch.int64, device=device)
        self.first_label = first_label
        self._labels_t = torch.from_numpy(self._labels)
        self._confidence_t = torch.from_numpy(self._confidence) if self._confidence is not None else None
        self.band = (0, 0)
        #: bands of tile rows before this one are computed only for the blend: not reported
        self.report_from = 0
        self._reporting = True

    def begin(self, row: int) -> None:
        """Open the band of section rows that tile row `row` finishes."""
        ys = self.plan.ys
        y0 = min(ys[row], self.height)
        y1 = min(ys[row + 1], self.height) if row + 1 < len(ys) else self.height
        if y1 - y0 > self._labels.shape[0]:
            raise AssertionError(f"band {y0}:{y1} is higher than the {self._labels.shape[0]}-row buffer")
        self.band = (y0, y1)
        self._reporting = row >= self.report_from
        self._labels[: y1 - y0] = 0  # every pixel is written; zero as the whole-section maps were
        if self._confidence is not None:
            self._confidence[: y1 - y0] = 0

    def finish(self) -> None:
        """Hand the open band, now complete, to the sink."""
        y0, y1 = self.band
        if y1 > y0 and self._reporting:
            n = y1 - y0
            confidence = self._confidence[:n] if self._confidence is not None else None
            x0 = self.x_offset + self.owned[0]
            if self.sieve is not None:
                self._runner_up_buffers()
                assert self._runner_up is not None
                p2 = self._runner_up_p[:n] if self._runner_up_p is not None else None
                self.sieve.write_band(y0, self._labels[:n], self._runner_up[:n], confidence, p2, x0)
            else:
                self.sink.write_rows(y0, self._labels[:n], confidence, x0)
        self.band = (y1, y1)

    def close(self) -> None:
        """The stripe is done: the sieve hands on the rows it still holds."""
        if self.sieve is not None:
            self.sieve.finish()

    def _runner_up_buffers(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._runner_up is None:
            self._runner_up = np.zeros(self._shape, np.uint8)
            if self._confidence is not None:
                self._runner_up_p = np.zeros(self._shape, np.uint8)
        p = torch.from_numpy(self._runner_up_p) if self._runner_up_p is not None else None
        return torch.from_numpy(self._runner_up), p

    def write(self, logits: torch.Tensor, y0: int, x0: int) -> None:
        """`logits` (C, h, w) for the pixels from (y0, x0), inside the open band; parts outside
        the section, or outside the owned columns, are dropped."""
        height, (o0, o1) = self.height, self.owned
        h = min(logits.shape[1], height - y0)
        a, b = max(x0, o0), min(x0 + logits.shape[2], o1)  # the owned columns of the region
        if h <= 0 or b <= a:
            return
        b0, b1 = self.band
        if y0 < b0 or y0 + h > b1:
            raise AssertionError(f"rows {y0}:{y0 + h} written outside the open band {b0}:{b1}")
        if not self._reporting:
            return
        logits = logits[:, :h, a - x0 : b - x0]
        x0, w = a - o0, b - a  # from here on: columns of the band buffers
        target = self._labels_t[y0 - b0 : y0 - b0 + h, x0 : x0 + w]
        runner_p: torch.Tensor | None = None
        if self.sieve is None:
            target.copy_(logits.argmax(dim=0))  # int64 -> uint8 in the copy (classes < 256: checked at load)
        else:  # the sieve needs each pixel's second class too
            runner, runner_p = self._runner_up_buffers()
            top = logits.topk(2, dim=0).indices
            target.copy_(top[0])
            runner_up = runner[y0 - b0 : y0 - b0 + h, x0 : x0 + w]
            runner_up.copy_(top[1])
            if self.first_label:
                runner_up.add_(self.first_label)
        if self.first_label:
            target.add_(self.first_label)
        self._sample_confidence(logits, y0, a + self.x_offset)
        if self._confidence_t is not None:
            # max softmax probability = 1 / sum(exp(l - lmax)), a few rows at a time: the
            # temporaries of a whole strip (C x rows x section width, float) would be about 1 GB
            # for a 16k-wide section
            for a in range(0, h, CONFIDENCE_ROWS):
                b = min(h, a + CONFIDENCE_ROWS)
                part = logits[:, a:b].float()
                rows = slice(y0 - b0 + a, y0 - b0 + b)
                if runner_p is None:
                    prob = 1.0 / (part - part.amax(dim=0, keepdim=True)).exp_().sum(dim=0)
                else:
                    two = part.topk(2, dim=0).values
                    prob = 1.0 / (part - two[:1]).exp_().sum(dim=0)
                    second = (two[1] - two[0]).exp_() * prob
                    runner_p[rows, x0 : x0 + w] = (second * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).cpu()
                self._confidence_t[rows, x0 : x0 + w] = (prob * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).cpu()

    def _sample_confidence(self, logits: torch.Tensor, y0: int, x0: int) -> None:
        """Add the confidence of the pixels of `logits` (C, h, w at section position (y0, x0)) on
        the section's STATS_STRIDE grid to the histogram (every region is written once, so none counts twice)."""
        part = logits[:, (-y0) % STATS_STRIDE :: STATS_STRIDE, (-x0) % STATS_STRIDE :: STATS_STRIDE]
        if part.numel() == 0:
            return
        part = part.float()
        prob = 1.0 / (part - part.amax(dim=0, keepdim=True)).exp_().sum(dim=0)
        bins = (prob * (CONFIDENCE_BINS - 1) + 0.5).clamp(0, CONFIDENCE_BINS - 1).long().flatten()
        self.histogram += torch.bincount(bins, minlength=CONFIDENCE_BINS).to(self.histogram.device)


def resolve_min_region(value: int | str, bundle: object) -> int:
    """The sieve's minimum region in pixels: `value`, or for "auto" what a ModelBundle recommends."""
    if value == "auto":
        return bundle.min_region_px if isinstance(bundle, ModelBundle) else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ThinSegError(f"minimum region {value!r}: give a whole number of pixels, 0 (off) or auto")
    return value


def _tile_row_range(tile_rows: tuple[int, int] | None, n_rows: int) -> tuple[int, int]:
    """The checked (first, end) tile rows of a run: all of them unless a part is asked for."""
    if tile_rows is None:
        return 0, n_rows
    first, last = int(tile_rows[0]), int(tile_rows[1])
    if not 0 <= first < last <= n_rows:
        raise ValueError(f"tile rows {first}:{last} are not a part of the section's 0:{n_rows}")
    return first, last


def tile_row_groups(plan_rows: int, rows_per_group: int) -> list[tuple[int, int]]:
    """(first, end) tile rows of consecutive parts of at most `rows_per_group` tile rows."""
    step = max(1, int(rows_per_group))
    return [(a, min(a + step, plan_rows)) for a in range(0, plan_rows, step)]


def _snug_tile(length: int, tile: int, overlap: int, multiple: int = SIZE_MULTIPLE) -> int:
    """The smallest tile (a multiple of `multiple`, at most `tile`) that covers `length` with
    as many tiles as `tile` needs, overlapping by at least `overlap`."""
    if length <= tile:
        return tile
    n = math.ceil((length - tile) / (tile - overlap)) + 1
    snug = math.ceil((length + (n - 1) * overlap) / n / multiple) * multiple
    return max(min(tile, snug), math.ceil((2 * overlap + multiple) / multiple) * multiple)


def _coverage(starts: list[int], tile: int, length: int) -> npt.NDArray[np.int32]:
    """How many tiles cover each position along one axis."""
    count = np.zeros(max(length, tile), np.int32)
    for s in starts:
        count[s : s + tile] += 1
    return count


def _runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _own_span(count: npt.NDArray[np.int32], start: int, tile: int) -> tuple[int, int]:
    """Tile-local [start, end) covered by this tile alone (one interval: earlier tiles reach in
    from the start, later ones from the end); (0, 0) if none."""
    runs = _runs(count[start : start + tile] == 1)
    return runs[0] if runs else (0, 0)


@dataclass
class _Plan:
    """Where the tiles go for one section, and which pixels more than one tile covers."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    ys: list[int]
    xs: list[int]
    ramp: int
    row_own: list[tuple[int, int]]  # per tile row: rows only it covers
    col_own: dict[int, tuple[int, int]]  # per column start: columns only it covers
    shared_rows: npt.NDArray[np.bool_]  # per section row: covered by more than one tile row
    shared_cols: list[tuple[int, int]]  # column runs covered by more than one tile

    @classmethod
    def make(cls, height: int, width: int, tile: tuple[int, int], overlap: int, multiple: int = SIZE_MULTIPLE) -> _Plan:
        th = padded_size(height, tile[0], multiple)
        tw = padded_size(width, tile[1], multiple)
        ys = tile_starts(max(height, th), th, overlap)
        xs = tile_starts(max(width, tw), tw, overlap)
        cy, cx = _coverage(ys, th, height), _coverage(xs, tw, width)
        return cls(
            height=height,
            width=width,
            tile_h=th,
            tile_w=tw,
            ys=ys,
            xs=xs,
            ramp=overlap,
            row_own=[_own_span(cy, y, th) for y in ys],
            col_own={x: _own_span(cx, x, tw) for x in xs},
            shared_rows=cy > 1,
            shared_cols=_runs(cx[: max(width, tw)] > 1),
        )

    @property
    def n_tiles(self) -> int:
        """Tiles in the whole section."""
        return len(self.ys) * len(self.xs)

    def batches(self, size: int) -> list[list[int]]:
        """The column starts of one tile row in groups of at most `size` (one forward pass each)."""
        return [self.xs[i : i + size] for i in range(0, len(self.xs), size)]

    def columns(self, first: int, end: int) -> _Plan:
        """The plan of tile columns [first, end) alone, in the columns of a view of the section
        from xs[first]: the same tiles, with what only they cover (a pixel the plan's other
        tiles also cover comes out different, so only pixels no other tile covers are used)."""
        x0 = self.xs[first]
        xs = [x - x0 for x in self.xs[first:end]]
        width = min(self.width, self.xs[end - 1] + self.tile_w) - x0
        cx = _coverage(xs, self.tile_w, width)
        return dataclasses.replace(
            self,
            width=width,
            xs=xs,
            col_own={x: _own_span(cx, x, self.tile_w) for x in xs},
            shared_cols=_runs(cx[: max(width, self.tile_w)] > 1),
        )


@dataclass(frozen=True)
class _Stripe:
    """Section columns [x0, x1) and the tile columns [first, end) that cover them."""

    first: int
    end: int
    x0: int
    x1: int


def column_stripes(plan: _Plan, stripe_width: int, align: int = STRIPE_ALIGN) -> list[_Stripe]:
    """The stripes a section is run in: one for a section at most `stripe_width` wide, else
    about equal ones whose edges fall on multiples of `align`, where one tile covers them if a
    multiple nearby allows (an edge in a seam has both of its tiles run twice)."""
    if plan.width <= stripe_width:
        return [_Stripe(0, len(plan.xs), 0, plan.width)]
    n = math.ceil(plan.width / stripe_width)

    def edge(ideal: float) -> int:
        candidates = [a for a in range(0, plan.width, align) if abs(a - ideal) <= align] or [round(ideal)]
        return min(candidates, key=lambda a: (any(s <= a < e for s, e in plan.shared_cols), abs(a - ideal)))

    edges = sorted({0, plan.width, *(edge(k * plan.width / n) for k in range(1, n))})
    stripes = []
    for x0, x1 in zip(edges, edges[1:]):
        tiles = [i for i, x in enumerate(plan.xs) if x < x1 and x + plan.tile_w > x0]
        stripes.append(_Stripe(tiles[0], tiles[-1] + 1, x0, x1))
    return stripes


class _ColumnView:
    """Columns [x0, x0 + width) of a source, as a source of their own (one stripe's input)."""

    def __init__(self, source: Source, x0: int, width: int) -> None:
        self.source, self.x0 = source, x0
        self.shape = (int(source.shape[0]), int(width))

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> npt.NDArray[np.uint8]:
        x1 = self.shape[1] if x1 is None else x1
        return self.source.read(y0, y1, self.x0 + x0, self.x0 + x1)


class _Progress:
    """Tiles done out of `total`, over every stripe of a run, handed to a progress callback."""

    def __init__(self, callback: ProgressFn | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def add(self, tiles: int) -> None:
        self.done += tiles
        if self.callback is not None:
            self.callback(self.done, self.total)


class _Sums:
    """Weighted logit sums (C, h, w) and summed weights (h, w) of one rectangle of the section
    from (y0, x0), the classes innermost in memory like the network's channels-last output:
    adding a tile is then a contiguous copy, and argmax over the classes is fast (over a planar
    layout it is about 10x slower)."""

    def __init__(self, y0: int, x0: int, h: int, w: int, n_classes: int, device: torch.device) -> None:
        self.y0, self.x0 = y0, x0
        self.logits = torch.zeros((h, w, n_classes), dtype=torch.float32, device=device).permute(2, 0, 1)
        self.weights = torch.zeros((h, w), dtype=torch.float32, device=device)

    def add(self, logits: torch.Tensor, window: torch.Tensor, y0: int, x0: int) -> None:
        """Add `logits` (C, h, w) float weighted by `window` (h, w) at section position (y0, x0)."""
        a, b = y0 - self.y0, x0 - self.x0
        h, w = logits.shape[1], logits.shape[2]
        self.logits[:, a : a + h, b : b + w].addcmul_(logits, window)
        self.weights[a : a + h, b : b + w].add_(window)

    def take(self, y0: int, y1: int) -> torch.Tensor:
        """Blended logits of section rows [y0, y1), all columns."""
        a, b = y0 - self.y0, y1 - self.y0
        return self.logits[:, a:b] / self.weights[a:b].unsqueeze(0)


class _Pending:
    """What one tile row added to a block of shared rows, kept as the network gave it (bf16 under
    autocast: under half the bytes of float sums and their weights) until the next tile row adds
    to the block; it is then summed in the order it came, exactly as if summed at once."""

    def __init__(self, row: int) -> None:
        self.row = row
        self.parts: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []

    def add(self, logits: torch.Tensor, window: torch.Tensor, y0: int, x0: int) -> None:
        """Keep a copy of `logits` (C, h, w) (a view would keep the whole batch's output) and
        its weights `window` (a view of the fixed tile weights) for (y0, x0)."""
        c, h, w = logits.shape
        kept = torch.empty((h, w, c), dtype=logits.dtype, device=logits.device).permute(2, 0, 1)
        self.parts.append((kept.copy_(logits), window, y0, x0))


class _Blend:
    """Weighted logit sums of the pixels several tiles cover, held only where tiles overlap.

    Two kinds of overlap: rows that consecutive tile rows share (full width, kept from one tile
    row to the next, stored in column blocks [xs[i], xs[i+1]) so that a block is released as
    soon as tile i of the later tile row has been placed), and column seams within the rows only
    one tile row covers (released as soon as the last tile over them is placed). Memory is thus
    about classes x overlap rows x width, not classes x tile height x width. Every pixel gets its
    tiles' weighted logits added in the order the tiles are placed, then one division by the
    summed weights, as a buffer over the whole strip would: the labels are the same bit for bit.
    """

    def __init__(self, plan: _Plan, n_classes: int, device: torch.device) -> None:
        self.plan, self.n_classes, self.device = plan, n_classes, device
        self.width = max(plan.width, plan.tile_w)
        self.window = blend_weights(plan.tile_h, plan.tile_w, plan.ramp).to(device)
        self._row_runs = _runs(plan.shared_rows)
        self._blocks = [(x, plan.xs[i + 1] if i + 1 < len(plan.xs) else self.width) for i, x in enumerate(plan.xs)]
        #: per shared column run: the index of the last tile (left to right) that covers it
        self._seam_last = [max(i for i, x in enumerate(plan.xs) if x < b) for _a, b in plan.shared_cols]
        self._rows: dict[tuple[int, int], _Pending | _Sums] = {}  # (row run, block) -> what it has had
        self._seams: dict[int, _Sums] = {}  # shared column run -> sums over the open tile row's own rows

    def _row_run(self, y: int) -> int:
        """The shared row run that holds section row `y`."""
        for k, (a, b) in enumerate(self._row_runs):
            if a <= y < b:
                return k
        raise AssertionError(f"row {y} is not shared by two tile rows")

    def _col_run(self, x: int) -> int:
        """The shared column run that holds section column `x`."""
        for k, (a, b) in enumerate(self.plan.shared_cols):
            if a <= x < b:
                return k
        raise AssertionError(f"column {x} is not shared by two tiles")

    def add_rows(self, logits: torch.Tensor, window: torch.Tensor, y0: int, x0: int, row: int) -> None:
        """Add a strip of rows that tile row `row` shares with another (`logits` (C, h, w), in
        the network's dtype, at (y0, x0))."""
        k = self._row_run(y0)
        x1 = x0 + logits.shape[2]
        for i, (b0, b1) in enumerate(self._blocks):
            a, b = max(x0, b0), min(x1, b1)
            if a >= b:
                continue
            piece, weights = logits[:, :, a - x0 : b - x0], window[:, a - x0 : b - x0]
            entry = self._rows.get((k, i))
            if entry is None:
                entry = self._rows[(k, i)] = _Pending(row)
            elif isinstance(entry, _Pending) and entry.row != row:
                entry = self._rows[(k, i)] = self._summed(entry, k, i)
            if isinstance(entry, _Pending):
                entry.add(piece, weights, y0, a)
            else:
                entry.add(piece.float(), weights, y0, a)

    def _summed(self, pending: _Pending, k: int, i: int) -> _Sums:
        """The sums of block `i` of shared row run `k` from the contributions kept so far."""
        (run0, run1), (b0, b1) = self._row_runs[k], self._blocks[i]
        sums = _Sums(run0, b0, run1 - run0, b1 - b0, self.n_classes, self.device)
        for logits, window, y0, x0 in pending.parts:
            sums.add(logits.float(), window, y0, x0)
        return sums

    def add_seam(self, logits: torch.Tensor, window: torch.Tensor, y0: int, x0: int) -> None:
        """Add a piece of a column seam in the open tile row's own rows (`logits` at (y0, x0))."""
        k = self._col_run(x0)
        sums = self._seams.get(k)
        if sums is None:
            c0, c1 = self.plan.shared_cols[k]
            sums = self._seams[k] = _Sums(y0, c0, logits.shape[1], c1 - c0, self.n_classes, self.device)
        sums.add(logits, window, y0, x0)

    def finished_by(self, row: int, index: int) -> Iterator[tuple[torch.Tensor, int, int]]:
        """(blended logits, y0, x0) of every region that tile `index` (left to right) of tile row
        `row` was the last to touch; their sums are released."""
        plan = self.plan
        y0 = plan.ys[row]
        y1 = plan.ys[row + 1] if row + 1 < len(plan.ys) else max(plan.height, y0 + plan.tile_h)
        for k, (a, b) in enumerate(self._row_runs):
            a, b = max(a, y0), min(b, y1)
            entry = self._rows.get((k, index))
            if a < b and entry is not None:
                sums = self._summed(entry, k, index) if isinstance(entry, _Pending) else entry
                yield sums.take(a, b), a, sums.x0
                if self._row_runs[k][1] <= y1:  # the whole run is done
                    del self._rows[(k, index)]
                else:
                    self._rows[(k, index)] = sums
        for k, last in enumerate(self._seam_last):
            if last == index and k in self._seams:
                sums = self._seams.pop(k)
                yield sums.take(sums.y0, sums.y0 + sums.weights.shape[0]), sums.y0, sums.x0


@dataclass
class _Window:
    """Columns [x0, x1) of one tile row, read at once: whole forward passes (`batches`)."""

    row: int
    x0: int
    x1: int
    batches: list[list[int]]
    first: bool  # the tile row's first window
    last: bool  # the tile row's last window


def _windows(plan: _Plan, row: int, batch_size: int, read_width: int) -> list[_Window]:
    """The windows tile row `row` is read in: consecutive forward passes, as many as fit in
    `read_width` columns (at least one pass each)."""
    groups: list[list[list[int]]] = []
    for batch in plan.batches(batch_size):
        if groups and batch[-1] + plan.tile_w - groups[-1][0][0] <= read_width:
            groups[-1].append(batch)
        else:
            groups.append([batch])
    return [
        _Window(row, g[0][0], g[-1][-1] + plan.tile_w, g, first=i == 0, last=i == len(groups) - 1)
        for i, g in enumerate(groups)
    ]


class _BandReader:
    """Yields (window, one (tile_h, x1 - x0, c) uint8 array per input) for the windows of the
    tile rows in order, and reads the next window in a background thread while the network works
    on the current one. Windows at most `read_width` wide (beyond the tiles of one pass) keep the
    input held in memory the same for any section width."""

    def __init__(
        self,
        sources: Sequence[Source],
        plan: _Plan,
        prefetch: bool,
        rows: tuple[int, int] | None = None,
        batch_size: int = 1,
        read_width: int | None = None,
    ) -> None:
        for s in sources[1:]:
            if tuple(s.shape) != tuple(sources[0].shape):
                raise ThinSegError(
                    f"images differ in size: {tuple(sources[0].shape)} vs {tuple(s.shape)} "
                    "(PP and XP must be the same size)"
                )
        self.sources = sources
        self.plan = plan
        self.rows = rows if rows is not None else (0, len(plan.ys))
        width = read_width if read_width is not None else max(plan.width, plan.tile_w)
        self.windows = [w for row in range(*self.rows) for w in _windows(plan, row, batch_size, width)]
        self.pool = ThreadPoolExecutor(max_workers=1) if prefetch else None

    def _read(self, window: _Window) -> list[torch.Tensor]:
        """One (tile_h, x1 - x0, c) uint8 tensor per input: the window, padded where the whole
        image is smaller than a tile."""
        plan = self.plan
        y0 = plan.ys[window.row]
        y1 = min(y0 + plan.tile_h, plan.height)
        x0, x1 = window.x0, min(window.x1, plan.width)
        bands = []
        for source in self.sources:
            band = np.asarray(source.read(y0, y1, x0, x1))
            pad_h, pad_w = plan.tile_h - band.shape[0], window.x1 - x1
            if pad_h > 0 or pad_w > 0:  # only when the whole image is smaller than a tile
                mode: Literal["reflect", "edge"] = (
                    "reflect" if pad_h < band.shape[0] and pad_w < band.shape[1] else "edge"
                )
                band = np.pad(band, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)
            bands.append(torch.from_numpy(np.ascontiguousarray(band)))
        return bands

    def __iter__(self) -> Iterator[tuple[_Window, list[torch.Tensor]]]:
        windows = self.windows
        if self.pool is None:
            for window in windows:
                yield window, self._read(window)
            return
        if not windows:
            return
        pending: Future[list[torch.Tensor]] = self.pool.submit(self._read, windows[0])
        for i, window in enumerate(windows):
            bands = pending.result()
            if i + 1 < len(windows):
                pending = self.pool.submit(self._read, windows[i + 1])
            yield window, bands

    def close(self) -> None:
        """Stop the background reader (a pending read is cancelled or waited for)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
