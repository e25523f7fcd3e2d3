"""Strip-wise sliding-window segmentation of whole thin sections with bounded memory.

Why strips: a 20k x 30k section as float logits would need tens of GB. Tiles are processed one
tile-row at a time. Pixels that only one tile covers (most of them) become labels straight
from that tile; the overlaps are blended in a ring buffer one tile high and become labels as
soon as no later tile can touch them; each finished band of rows goes to a row sink (the
output file, or whole maps for callers that want them in memory). Peak memory is therefore
O(classes x tile x width) whatever the section's height, and the blending costs only the overlaps.
"""

from __future__ import annotations

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


DEFAULT_OVERLAP = 64
#: Tile pixels per forward pass when no batch size is given: CPU throughput no longer rises
#: beyond this, and activation memory grows with it.
BATCH_PIXELS = 1024 * 1024
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
    """Receives the finished rows of a section, top to bottom, each row exactly once: (h, W)
    uint8 labels from row `y0`, and their confidence (max softmax x 255) when it was asked for.
    The arrays are the engine's band buffers, valid only during the call: copy what is kept."""

    def write_rows(self, y0: int, labels: npt.NDArray[np.uint8], confidence: npt.NDArray[np.uint8] | None) -> None: ...


class ArraySink:
    """Keeps whole (H, W) maps: for callers that want the section's labels in memory."""

    def __init__(self, height: int, width: int, with_confidence: bool) -> None:
        self.labels = np.zeros((height, width), np.uint8)
        self.confidence = np.zeros((height, width), np.uint8) if with_confidence else None

    def write_rows(self, y0: int, labels: npt.NDArray[np.uint8], confidence: npt.NDArray[np.uint8] | None) -> None:
        self.labels[y0 : y0 + labels.shape[0]] = labels
        if self.confidence is not None and confidence is not None:
            self.confidence[y0 : y0 + confidence.shape[0]] = confidence


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
    ) -> RunStats:
        """Segment one section and hand its rows to `sink` as they are finished (one band of at
        most a tile's height at a time), so no map of the whole section is ever held."""
        if len(sources) != len(self.bundle.input_names):
            raise ThinSegError(
                f"the model needs {len(self.bundle.input_names)} images "
                f"({', '.join(self.bundle.input_names)}) but {len(sources)} were given"
            )
        height, width = sources[0].shape
        start = time.perf_counter()
        plan = self.plan_for(height, width)
        out = _LabelWriter(plan, self.bundle.first_label, self.options.with_confidence, sink, self.device)
        done = 0
        order = self._fused[0] if self._fused is not None else list(range(len(sources)))
        reader = _BandReader([sources[i] for i in order], plan, prefetch=self.options.prefetch)
        try:
            blend = _BlendRing(plan, self._n_outputs(), self.device)
            for row, bands in reader:
                out.begin(row)
                for batch in plan.batches(self.batch_size):
                    if cancel is not None and cancel():
                        raise Cancelled()
                    logits = self._forward(bands, batch, plan.tile_w)
                    for tile_logits, col in zip(logits, batch):
                        self._place_tile(tile_logits, plan, row, col, blend, out)
                    done += len(batch)
                    if progress is not None:
                        progress(done, plan.n_tiles)
                for (y0, y1), (x0, x1) in plan.shared_regions_final_after(row):
                    out.write(blend.take(y0, y1, x0, x1), y0, x0)
                out.finish()
        finally:
            reader.close()
        return RunStats(
            shape=(height, width),
            tiles=plan.n_tiles,
            seconds=time.perf_counter() - start,
            device=str(self.device),
            messages=list(self.messages),
            confidence_histogram=out.histogram.cpu().numpy(),
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
        column offsets `cols` of this tile row (`bands`: one (th, W, c) uint8 band per input).
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
        self, logits: torch.Tensor, plan: _Plan, row: int, col: int, blend: _BlendRing, out: _LabelWriter
    ) -> None:
        """Pixels only this tile covers become labels now; the rest, weighted, go to the blend."""
        y, x = plan.ys[row], col
        (r0, r1), (c0, c1) = plan.row_own[row], plan.col_own[col]
        th, tw = plan.tile_h, plan.tile_w
        if r1 > r0 and c1 > c0:
            out.write(logits[:, r0:r1, c0:c1], y + r0, x + c0)
        window = blend.window
        for (a0, a1), (b0, b1) in (((0, r0), (0, tw)), ((r1, th), (0, tw)), ((r0, r1), (0, c0)), ((r0, r1), (c1, tw))):
            if a1 > a0 and b1 > b0:
                blend.add(logits[:, a0:a1, b0:b1].float(), window[a0:a1, b0:b1], y + a0, x + b0)


class _LabelWriter:
    """Turns logits of any region into labels (+ confidence) in uint8 band buffers and hands
    each band to the sink once it is complete.

    Everything written while tile row `row` is processed (its own pixels and the blended
    regions that become final after it) lies in the section rows [ys[row], ys[row + 1]), so one
    buffer a tile high holds the open band, whatever the section's height.
    """

    def __init__(
        self, plan: _Plan, first_label: int, with_confidence: bool, sink: RowSink, device: torch.device | None = None
    ) -> None:
        self.plan, self.sink = plan, sink
        self.height, self.width = plan.height, plan.width
        rows = max(1, min(plan.tile_h, plan.height))
        self._labels = np.zeros((rows, plan.width), np.uint8)
        self._confidence = np.zeros((rows, plan.width), np.uint8) if with_confidence else None
        self.histogram = torch.zeros(CONFIDENCE_BINS, dtype=torch.int64, device=device)
        self.first_label = first_label
        self._labels_t = torch.from_numpy(self._labels)
        self._confidence_t = torch.from_numpy(self._confidence) if self._confidence is not None else None
        self.band = (0, 0)

    def begin(self, row: int) -> None:
        """Open the band of section rows that tile row `row` finishes."""
        ys = self.plan.ys
        y0 = min(ys[row], self.height)
        y1 = min(ys[row + 1], self.height) if row + 1 < len(ys) else self.height
        if y1 - y0 > self._labels.shape[0]:
            raise AssertionError(f"band {y0}:{y1} is higher than the {self._labels.shape[0]}-row buffer")
        self.band = (y0, y1)
        self._labels[: y1 - y0] = 0  # every pixel is written; zero as the whole-section maps were
        if self._confidence is not None:
            self._confidence[: y1 - y0] = 0

    def finish(self) -> None:
        """Hand the open band, now complete, to the sink."""
        y0, y1 = self.band
        if y1 > y0:
            n = y1 - y0
            self.sink.write_rows(y0, self._labels[:n], self._confidence[:n] if self._confidence is not None else None)
        self.band = (y1, y1)

    def write(self, logits: torch.Tensor, y0: int, x0: int) -> None:
        """`logits` (C, h, w) for the pixels from (y0, x0), inside the open band; parts outside
        the section are dropped."""
        height, width = self.height, self.width
        h, w = min(logits.shape[1], height - y0), min(logits.shape[2], width - x0)
        if h <= 0 or w <= 0:
            return
        b0, b1 = self.band
        if y0 < b0 or y0 + h > b1:
            raise AssertionError(f"rows {y0}:{y0 + h} written outside the open band {b0}:{b1}")
        logits = logits[:, :h, :w]
        target = self._labels_t[y0 - b0 : y0 - b0 + h, x0 : x0 + w]
        target.copy_(logits.argmax(dim=0))  # int64 -> uint8 in the copy (classes < 256: checked at load)
        if self.first_label:
            target.add_(self.first_label)
        self._sample_confidence(logits, y0, x0)
        if self._confidence_t is not None:
            # max softmax probability = 1 / sum(exp(l - lmax)), a few rows at a time: the
            # temporaries of a whole strip (C x rows x section width, float) would be about 1 GB
            # for a 16k-wide section
            for a in range(0, h, CONFIDENCE_ROWS):
                b = min(h, a + CONFIDENCE_ROWS)
                part = logits[:, a:b].float()
                prob = 1.0 / (part - part.amax(dim=0, keepdim=True)).exp_().sum(dim=0)
                self._confidence_t[y0 - b0 + a : y0 - b0 + b, x0 : x0 + w] = (
                    (prob * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).cpu()
                )

    def _sample_confidence(self, logits: torch.Tensor, y0: int, x0: int) -> None:
        """Add the confidence of the pixels of `logits` (C, h, w at (y0, x0)) on the section's
        STATS_STRIDE grid to the histogram (every region is written once, so none counts twice)."""
        part = logits[:, (-y0) % STATS_STRIDE :: STATS_STRIDE, (-x0) % STATS_STRIDE :: STATS_STRIDE]
        if part.numel() == 0:
            return
        part = part.float()
        prob = 1.0 / (part - part.amax(dim=0, keepdim=True)).exp_().sum(dim=0)
        bins = (prob * (CONFIDENCE_BINS - 1) + 0.5).clamp(0, CONFIDENCE_BINS - 1).long().flatten()
        self.histogram += torch.bincount(bins, minlength=CONFIDENCE_BINS).to(self.histogram.device)


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

    def shared_regions_final_after(self, row: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """((y0, y1), (x0, x1)) regions covered by several tiles that no tile after tile row
        `row` touches: whole shared rows, and the shared column runs of the other rows."""
        y0 = self.ys[row]
        y1 = self.ys[row + 1] if row + 1 < len(self.ys) else max(self.height, y0 + self.tile_h)
        full = (0, max(self.width, self.tile_w))
        regions = []
        for a, b in _runs(self.shared_rows[y0:y1]):
            regions.append(((y0 + a, y0 + b), full))
        for a, b in _runs(~self.shared_rows[y0:y1]):
            regions.extend(((y0 + a, y0 + b), cols) for cols in self.shared_cols)
        return regions


class _BlendRing:
    """Weighted logit sums of the pixels several tiles cover, for the rows that are still open.

    Rows live at (row mod tile height): the open rows always lie within one tile height, so
    nothing is ever shifted, and only regions that were added to are read and cleared.
    """

    def __init__(self, plan: _Plan, n_classes: int, device: torch.device) -> None:
        self.rows = plan.tile_h
        width = max(plan.width, plan.tile_w)
        # (C, rows, width) with the classes innermost in memory, like the network's channels-last
        # output: adding tiles is then a contiguous copy, and argmax over the classes is fast
        # (over a planar layout it is about 10x slower)
        self.logits = torch.zeros((self.rows, width, n_classes), dtype=torch.float32, device=device).permute(2, 0, 1)
        self.weights = torch.zeros((self.rows, width), dtype=torch.float32, device=device)
        self.window = blend_weights(plan.tile_h, plan.tile_w, plan.ramp).to(device)

    def _chunks(self, y0: int, y1: int) -> list[tuple[int, int, int]]:
        """(ring row start, ring row end, offset from y0) pieces of section rows [y0, y1)."""
        pieces, y = [], y0
        while y < y1:
            r = y % self.rows
            n = min(y1 - y, self.rows - r)
            pieces.append((r, r + n, y - y0))
            y += n
        return pieces

    def add(self, logits: torch.Tensor, window: torch.Tensor, y0: int, x0: int) -> None:
        """Add `logits` (C, h, w) float weighted by `window` (h, w) at section position (y0, x0)."""
        x1 = x0 + logits.shape[2]
        for r0, r1, off in self._chunks(y0, y0 + logits.shape[1]):
            w = window[off : off + r1 - r0]
            self.logits[:, r0:r1, x0:x1].addcmul_(logits[:, off : off + r1 - r0], w)
            self.weights[r0:r1, x0:x1].add_(w)

    def take(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """Blended logits (C, y1-y0, x1-x0) of a finished region, which is then cleared."""
        parts = []
        for r0, r1, _ in self._chunks(y0, y1):
            parts.append(self.logits[:, r0:r1, x0:x1] / self.weights[r0:r1, x0:x1].unsqueeze(0))
            self.logits[:, r0:r1, x0:x1] = 0
            self.weights[r0:r1, x0:x1] = 0
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class _BandReader:
    """Yields (tile row index, one (tile_h, W, c) uint8 band per input) and reads the next band
    in a background thread while the network works on the current one."""

    def __init__(self, sources: Sequence[Source], plan: _Plan, prefetch: bool) -> None:
        for s in sources[1:]:
            if tuple(s.shape) != tuple(sources[0].shape):
                raise ThinSegError(
                    f"images differ in size: {tuple(sources[0].shape)} vs {tuple(s.shape)} "
                    "(PP and XP must be the same size)"
                )
        self.sources = sources
        self.plan = plan
        self.pool = ThreadPoolExecutor(max_workers=1) if prefetch else None

    def _read(self, row: int) -> list[torch.Tensor]:
        """The bands of tile row `row`: one (tile_h, W, c) uint8 tensor per input."""
        plan = self.plan
        y0 = plan.ys[row]
        y1 = min(y0 + plan.tile_h, plan.height)
        bands = []
        for source in self.sources:
            band = np.asarray(source.read(y0, y1, 0, plan.width))
            pad_h, pad_w = plan.tile_h - band.shape[0], max(plan.tile_w - plan.width, 0)
            if pad_h > 0 or pad_w > 0:  # only when the whole image is smaller than a tile
                mode: Literal["reflect", "edge"] = (
                    "reflect" if pad_h < band.shape[0] and pad_w < band.shape[1] else "edge"
                )
                band = np.pad(band, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)
            bands.append(torch.from_numpy(np.ascontiguousarray(band)))
        return bands

    def __iter__(self) -> Iterator[tuple[int, list[torch.Tensor]]]:
        n = len(self.plan.ys)
        if self.pool is None:
            for row in range(n):
                yield row, self._read(row)
            return
        pending: Future[list[torch.Tensor]] = self.pool.submit(self._read, 0)
        for row in range(n):
            band = pending.result()
            if row + 1 < n:
                pending = self.pool.submit(self._read, row + 1)
            yield row, band

    def close(self) -> None:
        """Stop the background reader (a pending read is cancelled or waited for)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
