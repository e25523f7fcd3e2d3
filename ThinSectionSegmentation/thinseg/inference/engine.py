"""Strip-wise sliding-window segmentation of whole thin sections with bounded memory.

Why strips: a 20k x 30k section as float logits would need tens of GB. Tiles are processed one
tile-row at a time; logits are blended into a rolling buffer one tile high, and rows that no
later tile can touch are turned into labels immediately. Peak memory is therefore
O(classes x tile x width) plus the uint8 outputs, whatever the section's height.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, Sequence

import numpy as np
import torch

from thinseg.errors import ThinSegError
from thinseg.inference.device import auto_precision, select_device
from thinseg.inference.optimize import prepare_network
from thinseg.inference.tiling import blend_weights, padded_size, tile_starts
from thinseg.model.networks import network_channels

#: MONAI UNets with 4 stride-2 stages need sides divisible by 16.
SIZE_MULTIPLE = 16

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class Source(Protocol):
    """What the engine needs of an image: its size and region reads as uint8 (h, w, 3)."""

    shape: tuple[int, int]

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> np.ndarray: ...


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


DEFAULT_OVERLAP = 64
#: Tile pixels per forward pass when no batch size is given: CPU throughput no longer rises
#: beyond this, and activation memory grows with it.
BATCH_PIXELS = 1024 * 1024
#: Rows of a finished strip turned into confidence at once (bounds the softmax temporaries).
CONFIDENCE_ROWS = 64
#: Tile side used for networks whose output does not depend on the tile (see default_tile).
LARGE_TILE = 1024
_TILE_DEPENDENT_NORMS = (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d,
                         torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.LocalResponseNorm)


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


def default_overlap(tile: int) -> int:
    """The default overlap for `tile` px tiles: 64 px, but at most a quarter of the tile, so that
    models with small input_roi_shape (e.g. 64 or 128) run without tuning options."""
    return max(0, min(DEFAULT_OVERLAP, int(tile) // 4))


@dataclass
class SegmentationResult:
    labels: np.ndarray  # (H, W) uint8, class values 1..N (0 = not classified)
    confidence: np.ndarray | None  # (H, W) uint8, max softmax probability x 255
    tiles: int
    seconds: float
    device: str
    messages: list[str] = field(default_factory=list)

    @property
    def mpix_per_s(self) -> float:
        return self.labels.size / 1e6 / max(self.seconds, 1e-9)


ProgressFn = Callable[[int, int], None]  # (tiles done, tiles total)
CancelFn = Callable[[], bool]


class Segmenter:
    """Runs one model bundle over any number of sections; build once, call `segment` per section."""

    def __init__(self, bundle, options: InferenceOptions | None = None) -> None:
        self.bundle = bundle
        self.options = options or InferenceOptions()
        self.device, message = select_device(self.options.device)
        self.messages: list[str] = [message] if message else []
        self.precision = self.options.precision
        if self.precision == "auto":
            self.precision = auto_precision(self.device)
            if self.precision != "fp32":
                self.messages.append(f"running in {self.precision} on this {self.device.type} (--precision fp32 for exact fp32)")
        if self.precision == "fp16" and self.device.type == "cpu":
            raise ThinSegError("fp16 inference needs a CUDA GPU; use fp32 or bf16 on the CPU")
        self.network = prepare_network(
            bundle.network,
            self.device,
            channels_last=self.options.channels_last,
            fold_bn=self.options.fold_batchnorm,
        )
        if self.options.tile is None:
            roi = default_tile(bundle.network, tuple(bundle.roi_shape))
        else:
            roi = (self.options.tile, self.options.tile)
        self.tile = (int(roi[0]), int(roi[1]))
        self.overlap = self.options.overlap if self.options.overlap is not None else default_overlap(min(self.tile))
        self.batch_size = self.options.batch_size or max(1, BATCH_PIXELS // (self.tile[0] * self.tile[1]))
        if min(self.tile) <= 2 * self.overlap:
            raise ThinSegError(f"overlap {self.overlap} px is too large for {self.tile[0]} px tiles")

    # -- public -------------------------------------------------------------------------------

    def segment(
        self,
        sources: Sequence[Source],
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> SegmentationResult:
        """Segment one section given one source per model input (e.g. PP then XP), same size."""
        if len(sources) != len(self.bundle.input_names):
            raise ThinSegError(
                f"the model needs {len(self.bundle.input_names)} images "
                f"({', '.join(self.bundle.input_names)}) but {len(sources)} were given"
            )
        height, width = sources[0].shape
        start = time.perf_counter()
        plan = _Plan.make(height, width, self.tile, self.overlap)
        labels = np.zeros((height, width), np.uint8)
        confidence = np.zeros((height, width), np.uint8) if self.options.with_confidence else None
        done = 0
        reader = _BandReader(sources, plan, prefetch=self.options.prefetch)
        try:
            accumulator = _RollingAccumulator(plan, self._n_outputs(), self.device)
            for row, band in reader:
                for batch in plan.batches(self.batch_size):
                    if cancel is not None and cancel():
                        raise Cancelled()
                    logits = self._forward(band, batch, plan.tile_w)
                    accumulator.add(logits, batch)
                    done += len(batch)
                    if progress is not None:
                        progress(done, plan.n_tiles)
                y0, y1, final = accumulator.finish_row(row)
                self._write_rows(final, labels, confidence, y0, y1)
        finally:
            reader.close()
        return SegmentationResult(
            labels=labels,
            confidence=confidence,
            tiles=plan.n_tiles,
            seconds=time.perf_counter() - start,
            device=str(self.device),
            messages=list(self.messages),
        )

    # -- internals ----------------------------------------------------------------------------

    def _n_outputs(self) -> int:
        """Network output channels: one per class, plus output 0 = not classified in our bundles."""
        return network_channels(self.bundle.network)[1]

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _forward(self, band: list[torch.Tensor], batch: list[int], tw: int) -> torch.Tensor:
        """Logits (B, C, th, tw) float32 for the tiles at column offsets `batch` of this band."""
        per_input = [torch.stack([b[:, :, x : x + tw] for x in batch]) for b in band]
        x = self.bundle.prepare([t.to(self.device, non_blocking=True) for t in per_input])
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            out = self.network(x)
        if isinstance(out, (list, tuple)):  # deep-supervision style networks: first head
            out = out[0]
        return out.float()

    def _write_rows(
        self, logits: torch.Tensor, labels: np.ndarray, confidence: np.ndarray | None, y0: int, y1: int
    ) -> None:
        """Turn finished blended logits (C, h, W) into labels (+ confidence) for rows y0..y1."""
        width = labels.shape[1]
        logits = logits[:, : y1 - y0, :width]
        values, index = logits.max(dim=0)
        labels[y0:y1] = (index + self.bundle.first_label).to(torch.uint8).cpu().numpy()
        if confidence is not None:
            # max softmax probability = 1 / sum(exp(l - lmax)), a few rows at a time: the
            # temporaries of a whole strip (C x tile height x section width, float) would be
            # about 1 GB for a 16k-wide section
            for r0 in range(0, y1 - y0, CONFIDENCE_ROWS):
                r1 = min(y1 - y0, r0 + CONFIDENCE_ROWS)
                shifted = logits[:, r0:r1] - values[r0:r1].unsqueeze(0)
                prob = 1.0 / shifted.exp_().sum(dim=0)
                confidence[y0 + r0 : y0 + r1] = (prob * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


@dataclass
class _Plan:
    """Where the tiles go for one section."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    ys: list[int]
    xs: list[int]
    ramp: int

    @classmethod
    def make(cls, height: int, width: int, tile: tuple[int, int], overlap: int) -> "_Plan":
        th = padded_size(height, tile[0], SIZE_MULTIPLE)
        tw = padded_size(width, tile[1], SIZE_MULTIPLE)
        return cls(
            height=height,
            width=width,
            tile_h=th,
            tile_w=tw,
            ys=tile_starts(max(height, th), th, overlap),
            xs=tile_starts(max(width, tw), tw, overlap),
            ramp=overlap,
        )

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    def batches(self, size: int) -> list[list[int]]:
        return [self.xs[i : i + size] for i in range(0, len(self.xs), size)]


class _RollingAccumulator:
    """Blended logits for the rows covered by the current tile row, shifted as rows finish."""

    def __init__(self, plan: _Plan, n_classes: int, device: torch.device) -> None:
        self.plan = plan
        width = max(plan.width, plan.tile_w)
        self.logits = torch.zeros((n_classes, plan.tile_h, width), dtype=torch.float32, device=device)
        self.weights = torch.zeros((plan.tile_h, width), dtype=torch.float32, device=device)
        self.window = blend_weights(plan.tile_h, plan.tile_w, plan.ramp).to(device)

    def add(self, logits: torch.Tensor, xs: list[int]) -> None:
        tw = self.plan.tile_w
        for tile_logits, x in zip(logits, xs):
            self.logits[:, :, x : x + tw].addcmul_(tile_logits, self.window)
            self.weights[:, x : x + tw].add_(self.window)

    def finish_row(self, row: int) -> tuple[int, int, torch.Tensor]:
        """Rows no later tile touches: [ys[row], ys[row+1]) (or to the end). Returns them blended."""
        plan = self.plan
        y0 = plan.ys[row]
        y1 = plan.ys[row + 1] if row + 1 < len(plan.ys) else min(plan.height, y0 + plan.tile_h)
        n = y1 - y0
        finished = self.logits[:, :n] / self.weights[:n].unsqueeze(0)
        # shift the remaining rows up and clear the rest for the next tile row
        keep = plan.tile_h - n
        if keep > 0:
            self.logits[:, :keep] = self.logits[:, n:].clone()
            self.weights[:keep] = self.weights[n:].clone()
        self.logits[:, keep:] = 0
        self.weights[keep:] = 0
        return y0, y1, finished


class _BandReader:
    """Yields (tile row index, per-input uint8 tensors (3, tile_h, W)) and reads the next band
    in a background thread while the network works on the current one."""

    def __init__(self, sources: Sequence[Source], plan: _Plan, prefetch: bool) -> None:
        for s in sources[1:]:
            if tuple(s.shape) != tuple(sources[0].shape):
                raise ThinSegError(
                    f"images differ in size: {tuple(sources[0].shape)} vs {tuple(s.shape)} (PP and XP must be the same size)"
                )
        self.sources = sources
        self.plan = plan
        self.pool = ThreadPoolExecutor(max_workers=1) if prefetch else None

    def _read(self, row: int) -> list[torch.Tensor]:
        plan = self.plan
        y0 = plan.ys[row]
        y1 = min(y0 + plan.tile_h, plan.height)
        bands = []
        for source in self.sources:
            band = np.asarray(source.read(y0, y1, 0, plan.width))
            pad_h, pad_w = plan.tile_h - band.shape[0], max(plan.tile_w - plan.width, 0)
            if pad_h > 0 or pad_w > 0:  # only when the whole image is smaller than a tile
                mode = "reflect" if pad_h < band.shape[0] and pad_w < band.shape[1] else "edge"
                band = np.pad(band, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)
            bands.append(torch.from_numpy(np.ascontiguousarray(band)).permute(2, 0, 1))
        return bands

    def __iter__(self):
        n = len(self.plan.ys)
        if self.pool is None:
            for row in range(n):
                yield row, self._read(row)
            return
        pending: Future = self.pool.submit(self._read, 0)
        for row in range(n):
            band = pending.result()
            if row + 1 < n:
                pending = self.pool.submit(self._read, row + 1)
            yield row, band

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
