"""Training throughput: the full loop (balanced sampling, lazy patch reads from GeoSlicer netCDF
sections on disk, augmentation, optimizer step) against bare forward+backward on the SAME
batches, already in memory as float tensors on the device (and, for reference, bare
forward+backward+optimizer step).

The data path must keep the full loop at >= 80 % of the bare figure. The two are measured
interleaved, batch by batch: fetch a batch from the real DataLoader and run the real
`TrainingRun.step` on it (full), then run a bare step on that same batch, prepared outside
the timer (bare). Pairing makes the ratio fair on a shared machine where other processes come
and go; a plain `train_epoch` figure is printed too. Times are wall-clock and also CPU seconds
of this process (robust to other processes; meaningful with --workers 0 only, since worker
processes' CPU time is not counted).

    .venv/bin/python bench/bench_training.py [--steps 8] [--repeats 2] [--patch 256] [--batch 8] [--workers 0]
        [--recipe small-data] [--encoder efficientnet-lite2] [--precision auto|fp32|bf16] [--default-allocator]

The process keeps freed memory for reuse, as `thinseg train` does (`thinseg.allocator`);
`--default-allocator` measures glibc's default instead.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ThinSectionSegmentation"))

import torch  # noqa: E402

from thinseg.allocator import retain_freed_memory  # noqa: E402
from thinseg.data.sections import ArraySection  # noqa: E402
from thinseg.io.images import ArraySource  # noqa: E402
from thinseg.io.netcdf import NetcdfWriter  # noqa: E402
from thinseg.training import TrainConfig, synthetic_sections  # noqa: E402
from thinseg.training.augment import colour_jitter  # noqa: E402
from thinseg.training.loop import TrainingRun  # noqa: E402
from thinseg.training.losses import dice_ce_loss  # noqa: E402
from thinseg.training.recipes import RECIPE_NAMES, recipe_settings  # noqa: E402

#: Recipe settings this benchmark sets itself (a step's cost depends on the patch and batch, not on
#: the schedule or on the pixel size the generated sections are resampled to).
SIZED_HERE = (
    "epochs",
    "steps_per_epoch",
    "patch_size",
    "batch_size",
    "warmup_steps",
    "patience",
    "pixels_per_mm",
    "average_last",
    "calibrate_temperature",
)


class Timer:
    """Accumulated wall and CPU seconds."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.samples = 0

    def __enter__(self) -> Timer:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="batches per repeat")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--recipe",
        default="unet",
        choices=RECIPE_NAMES,
        help="the recipe's network and training settings (sizes and schedule still from the options here)",
    )
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--sections", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--encoder", default=None, help="small-data recipe: another ImageNet encoder (efficientnet-lite2)")
    ap.add_argument("--in-memory", action="store_true", help="generated sections in memory instead of netCDF files")
    ap.add_argument(
        "--ema-decay", type=float, default=None, help="the moving average's decay (0: none; default: the recipe's)"
    )
    ap.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc handing freed memory back (figures before `thinseg train` kept it, 2026-12-06)",
    )
    args = ap.parse_args()
    if not args.default_allocator:
        retain_freed_memory()  # as `thinseg train` does

    out = Path(tempfile.mkdtemp(prefix="bench_training_"))
    generated = synthetic_sections(args.sections, args.size, seed=0)
    sections: Sequence[ArraySection | Path] = (
        generated if args.in_memory else write_netcdf_sections(generated, out / "sections")
    )
    settings = recipe_settings(args.recipe)
    for sized_here in SIZED_HERE:  # this benchmark's own sizes, schedule and pixels
        settings.pop(sized_here, None)
    if args.encoder:
        settings["encoder"] = args.encoder
    if args.ema_decay is not None:
        settings["ema_decay"] = args.ema_decay
    try:
        config = TrainConfig(
            output_dir=out,
            train_sections=sections,
            epochs=args.repeats + 2,
            steps_per_epoch=args.steps,
            patch_size=args.patch,
            batch_size=args.batch,
            base_channels=args.base,
            depth=args.depth,
            num_workers=args.workers,
            warmup_steps=1,
            progress=False,
            device=args.device,
            precision=args.precision,
            patience=None,
            **settings,
        )
        run = TrainingRun(config, log=lambda _m: None)
        run.start()
        run.train_epoch()  # warm-up: allocator, first batches, worker start
        run.epoch += 1
        epoch_rate = run.train_epoch()["train_samples_per_s"]
        run.epoch += 1
        full, bare, bare_opt = Timer(), Timer(), Timer()
        for _ in range(args.repeats):
            paired_epoch(run, full, bare, bare_opt)
            run.epoch += 1
        ema_ms = moving_average_update_ms(run)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(
        f"recipe {args.recipe}{f' ({args.encoder})' if args.encoder else ''}, device {run.device}, "
        f"precision {run.amp_dtype or 'fp32'}, "
        f"torch threads {torch.get_num_threads()}, "
        f"batch {args.batch} x {args.patch}^2, {args.steps} steps x {args.repeats} repeats, workers {args.workers}, "
        f"sections {'in memory' if args.in_memory else 'read lazily from netCDF files'}"
    )
    print(
        f"full loop (loader + step) : {full.samples / full.wall:7.2f} samples/s   "
        f"{full.samples / full.cpu:7.2f} samples/CPU-s"
    )
    print(
        f"bare forward+backward     : {bare.samples / bare.wall:7.2f} samples/s   "
        f"{bare.samples / bare.cpu:7.2f} samples/CPU-s"
    )
    print(f"bare fwd+bwd+optimizer    : {bare_opt.samples / bare_opt.wall:7.2f} samples/s   (reference)")
    print(
        f"full / bare fwd+bwd       : {100 * bare.wall / full.wall * full.samples / bare.samples:6.1f} % (wall)   "
        f"{100 * bare.cpu / full.cpu * full.samples / bare.samples:6.1f} % (CPU)   (target >= 80 %)"
    )
    print(f"full / bare fwd+bwd+opt   : {100 * bare_opt.wall / full.wall:6.1f} % (wall)")
    print(f"plain train_epoch         : {epoch_rate:7.2f} samples/s (one unpaired epoch, for reference)")
    if ema_ms is not None:
        step_ms = 1000 * full.wall / full.samples * args.batch
        print(
            f"moving-average update     : {ema_ms:7.2f} ms a step (median), {100 * ema_ms / step_ms:.2f} % of a "
            f"full step (included in the loop above)"
        )


def write_netcdf_sections(sections: Sequence[ArraySection], folder: Path) -> list[Path]:
    """The generated sections as GeoSlicer netCDF files, so patches are read from disk as in real runs."""
    folder.mkdir(parents=True)
    paths = []
    for s in sections:
        path = folder / f"{s.name}.nc"
        mm = s.mm_per_pixel
        if mm is None:
            raise ValueError(f"section {s.name} has no pixel size")
        with NetcdfWriter(path) as writer:
            ref = writer.add_rgb_image(f"{s.name}_PP", _pixels(s, "PP"), mm)
            writer.add_rgb_image(f"{s.name}_XP", _pixels(s, "XP"), mm)
            writer.add_labelmap(f"{s.name}_labels", s.read_labels(), s.class_table, mm, reference=ref)
        paths.append(path)
    return paths


def _pixels(section: ArraySection, role: str) -> npt.NDArray[np.uint8]:
    """The in-memory RGB image of a generated section."""
    source = section.source(role)
    if not isinstance(source, ArraySource):
        raise TypeError(f"section {section.name} has no in-memory {role} image")
    pixels: npt.NDArray[np.uint8] = source.array
    return pixels


def moving_average_update_ms(run: TrainingRun, repeats: int = 50) -> float | None:
    """Median wall time of one update of the run's moving average of the weights (None: it keeps none)."""
    if run.ema is None:
        return None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run.ema.update_parameters(run.network)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def paired_epoch(run: TrainingRun, full: Timer, bare: Timer, bare_opt: Timer) -> None:
    run.stream.set_epoch(run.epoch)
    run.network.train()
    batches = iter(run.loader)
    while True:
        with full:
            try:
                images, target, jitter = next(batches)
            except StopIteration:
                break
            run.step(images, target, jitter)
        full.samples += images.shape[0]
        x, y = prepare(run, images, target, jitter)
        with bare:
            bare_step(run, x, y, optimizer=False)
        bare.samples += images.shape[0]
        with bare_opt:
            bare_step(run, x, y, optimizer=True)
        bare_opt.samples += images.shape[0]


def prepare(
    run: TrainingRun, images: torch.Tensor, target: torch.Tensor, jitter: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch as `TrainingRun.step` feeds it to the network, on the device (outside any timer)."""
    x = colour_jitter(images.to(run.device).float(), jitter).div_(255.0)
    x = x.contiguous(memory_format=torch.channels_last)
    y = target.to(run.device)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return x, y


def bare_step(run: TrainingRun, x: torch.Tensor, y: torch.Tensor, optimizer: bool) -> None:
    """Forward, loss and backward (and the optimizer step) with no data path around them."""
    with run._autocast():
        logits = run.network(x)
    loss = dice_ce_loss(logits, y, first_label=run.spec.first_label)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
    if optimizer:
        torch.nn.utils.clip_grad_norm_(run.network.parameters(), run.config.grad_clip or 1e9)
        run.optimizer.step()
    if run.device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
