"""Patch streams for the DataLoader: lazy region reads, class-balanced positions, augmentation.

An IterableDataset, because the balanced sampler is stateful (its accumulator steers the next
draw). Each DataLoader worker runs its own stream, seeded from (seed, epoch, worker id), and
emits whole batches, so with N workers batch b comes from worker b mod N and two runs with the
same seed yield identical batches in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from thinseg.errors import ThinSegError
from thinseg.inference.resample import nearest_index
from thinseg.training.augment import PatchAugment, apply_geometry, draw_augment, turn, turned_window
from thinseg.training.config import AugmentConfig
from thinseg.training.sampler import BalancedSampler
from thinseg.training.targets import PreparedSection

#: One training sample: image uint8 (C, P, P), target uint8 (P, P), colour jitter (n_images, 6).
Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class StreamStats:
    """Per-stream record of what was emitted (used by tests and the sampler report)."""

    class_pixels: np.ndarray
    drawn_for: np.ndarray  # how many patches were drawn for each class (index 0 = uniform)


class PatchStream(IterableDataset[Sample]):
    """Yields (image uint8 (C, P, P), target uint8 (P, P), jitter float32 (n_images, 6)) with
    C = 3 x len(roles); the jitter is applied batch-wise by `augment.colour_jitter`."""

    def __init__(
        self,
        sections: Sequence[PreparedSection],
        roles: Sequence[str],
        n_classes: int,
        *,
        patch_size: int,
        batch_size: int,
        steps: int,
        balancing_strength: float,
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for s in sections:
            if s.index is None:
                raise ValueError(f"section {s.name!r} was prepared without a patch index")
            for role in roles:
                if s.section.source(role) is None:
                    raise ThinSegError(
                        f"training section {s.name!r} has no {role} image (the model needs {', '.join(roles)})"
                    )
        self.sections = list(sections)
        self.roles = tuple(roles)
        self.n_classes = n_classes
        self.patch_size = int(patch_size)
        self.batch_size = int(batch_size)
        self.steps = int(steps)
        self.strength = float(balancing_strength)
        self.augment = augment or AugmentConfig.none()
        self.seed = int(seed)
        self.epoch = 0
        self.last_stats: StreamStats | None = None

    def set_epoch(self, epoch: int) -> None:
        """Each epoch draws a new, but reproducible, stream."""
        self.epoch = int(epoch)

    def worker_batches(self, worker: int, n_workers: int) -> int:
        return len(range(worker, self.steps, n_workers))

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from self.stream(worker, n_workers)

    def stream(self, worker: int = 0, n_workers: int = 1) -> Iterator[Sample]:
        rng = np.random.default_rng([self.seed, self.epoch, worker])
        indexes = [s.index for s in self.sections if s.index is not None]  # all of them: checked in __init__
        sampler = BalancedSampler(indexes, self.strength, rng)
        drawn = np.zeros(self.n_classes + 1, np.int64)
        try:
            for _ in range(self.worker_batches(worker, n_workers) * self.batch_size):
                s, y, x, c = sampler.draw()
                drawn[c] += 1
                aug = draw_augment(rng, self.augment, len(self.roles))
                image, target = self.read_patch(self.sections[s], y, x, aug)
                sampler.update(target)
                yield torch.from_numpy(image), torch.from_numpy(target), torch.from_numpy(aug.jitter)
        finally:
            self.last_stats = StreamStats(sampler.emitted.copy(), drawn)

    def read_patch(self, prepared: PreparedSection, y: int, x: int, aug: PatchAugment) -> tuple[np.ndarray, np.ndarray]:
        """Read the window at (y, x) (zoomed, and turned when drawn so, about its centre), resize to the
        patch size, rotate/flip."""
        p = self.patch_size
        h, w = prepared.target.shape
        assert prepared.index is not None  # checked in __init__
        footprint = prepared.index.footprint
        size = int(round(footprint * aug.zoom))
        size = max(8, min(size, h, w))
        window = min(turned_window(size, aug.angle), h, w) if aug.angle else size
        cy, cx = y + footprint / 2.0, x + footprint / 2.0
        y0 = int(min(max(round(cy - window / 2.0), 0), h - window))
        x0 = int(min(max(round(cx - window / 2.0), 0), w - window))
        target = np.asarray(prepared.target[y0 : y0 + window, x0 : x0 + window])
        images = []
        for role in self.roles:
            source = prepared.section.source(role)
            assert source is not None  # checked in __init__
            images.append(source.read(y0, y0 + window, x0, x0 + window))
        # to the patch's scale first, then turned (when drawn so): the turn resamples only p x p pixels
        side = max(p, int(round(window * p / size))) if aug.angle else p
        if window != side:
            index = nearest_index(side, window)
            target = target[index][:, index]
            images = [_resize(im, side) for im in images]
        if aug.angle:
            target = turn(target, aug.angle, p, labels=True)
            images = [turn(im, aug.angle, p, labels=False) for im in images]
        target = np.ascontiguousarray(apply_geometry(target, aug))
        out = np.empty((3 * len(images), p, p), np.uint8)
        for i, im in enumerate(images):
            out[3 * i : 3 * i + 3] = apply_geometry(im, aug).transpose(2, 0, 1)
        return out, target


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a uint8 (h, w, 3) image to size x size (PIL widens the filter when
    shrinking, i.e. antialiases, and works on uint8 directly: ~10x faster than float torch)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def make_loader(stream: PatchStream, num_workers: int = 0, pin_memory: bool = False) -> DataLoader[Sample]:
    """Batches of `stream`; each batch comes whole from one worker (reproducible order)."""
    if num_workers == 0:  # torch < 2.0 refuses any prefetch_factor without workers, even None
        return DataLoader(stream, batch_size=stream.batch_size, pin_memory=pin_memory)
    return DataLoader(
        stream,
        batch_size=stream.batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2,
    )
