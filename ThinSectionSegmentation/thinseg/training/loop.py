"""`train(config)`: the whole run, from sections to an exported GeoSlicer bundle.

Order of work per epoch: train `steps_per_epoch` batches -> validate on whole sections ->
append to the history (CSV + PNG) -> export the bundle if the validation mean IoU improved ->
checkpoint. The checkpoint is the last step, so a run killed at any point resumes from the
last finished epoch and redoes at most one.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from thinseg import limits
from thinseg.data.sections import Section, canonical_role, open_sections
from thinseg.errors import ThinSegError
from thinseg.inference.device import cpu_has_amx, select_device
from thinseg.inference.engine import size_multiple
from thinseg.io.atomic import sweep_stale_temporaries
from thinseg.io.locks import run_folder_lock
from thinseg.jsonio import finite, write_json
from thinseg.model.bundle import load_bundle
from thinseg.training.augment import class_mix, colour_jitter
from thinseg.training.averaging import averaged_state, exponential_average, mean_state
from thinseg.training.cache import ArrayCache
from thinseg.training.calibration import fit_temperature, fold_temperature, sample_logits
from thinseg.training.checkpoint import CHECKPOINT_FILE, load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from thinseg.training.config import TrainConfig, TrainResult
from thinseg.training.curves import plot_curves, write_log_csv
from thinseg.training.dataset import PatchStream, make_loader
from thinseg.training.distributed import Ranks, current
from thinseg.training.export import bundle_input_names, export_bundle
from thinseg.training.losses import dice_ce_loss
from thinseg.training.model import ModelSpec, model_from_bundle, new_model
from thinseg.training.priors import fold_prior_correction, prior_weights, sampled_class_shares
from thinseg.training.sampler import rank_seed
from thinseg.training.split import SPLIT_FILE, apply_split, run_split, save_split
from thinseg.training.targets import PreparedSection, prepare_sections
from thinseg.training.validate import ValSection, make_val_sections, validate, validate_with_confidence

LOG_FILE = "training_log.csv"
CURVES_FILE = "training_curves.png"
TEST_METRICS_FILE = "test_metrics.json"
#: Seeds, with the run's seed and the epoch, the random choices of ClassMix (TrainConfig.class_mix).
CLASS_MIX_STREAM = 0xC1A55

Log = Callable[[str], None]
#: Called after each training batch with (batches done, batches per epoch).
StepHook = Callable[[int, int], None]
#: Called after each epoch with its history row and whether it is the best (exported) so far.
EpochHook = Callable[[dict[str, Any], bool], None]


def _quiet(_message: str) -> None:
    """The log of ranks other than 0."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_precision(precision: str, device: torch.device, network: str = "UNet") -> torch.dtype | None:
    """Autocast dtype (None = fp32). "auto": bf16/fp16 on CUDA; on CPUs bf16 only for MONAI UNets
    with AMX, else fp32. Training (backward passes included) in bf16 was never faster on the CPUs
    measured without AMX: 6.10 against 6.38 samples/s in fp32 on an AMD EPYC with AVX512-BF16, 1.7
    against 3.0 on a Xeon whose AMX the hypervisor hides; emulated bf16 is several times slower
    still. With AMX, a UNet trained 1.18x faster in bf16 but a LiteUNet, whose depthwise
    convolutions AMX does not serve, 1.14x slower (6.3 against 7.2 samples/s). Inference keeps
    bf16 on AVX512-BF16, where its forward pass ran 2.5x the fp32 one."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ThinSegError("fp16 training needs a CUDA GPU; use fp32 or bf16 on the CPU")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ThinSegError(f"unknown precision {precision!r} (auto, fp32, bf16, fp16)")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_amx() and network != "LiteUNet" else None


def _precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up, then cosine decay to 1 % (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t))


def class_pixel_totals(sections: Sequence[PreparedSection], classes: int) -> np.ndarray:
    """Labelled pixels of each class over `sections`: what the balanced sampler evens out, the
    prior correction restores and the bundle's meta records."""
    return sum((p.class_pixels for p in sections), np.zeros(classes, np.int64))


def candidate_kind(record: dict[str, Any]) -> str:
    """Which weights an export record describes: "ema", "average" (of the last epochs) or
    "best-epoch"; a moving average kept only for comparison, "ema-<decay>"."""
    if record.get("compared_only"):
        return f"ema-{record['ema_decay']:g}"
    if record.get("ema_decay"):
        return "ema"
    return "average" if record.get("averaged_epochs") else "best-epoch"


def make_optimizer(
    network: torch.nn.Module, lr: float, weight_decay: float, encoder_lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters, CPU and CUDA) where this torch has it. A
    pre-trained encoder (a network with `encoder_parameters()`) may learn at a scaled rate, so
    that the decoder catches up before the ImageNet features are disturbed much."""
    trained = [p for p in network.parameters() if p.requires_grad]  # frozen stages are left out
    groups: Any = trained
    encoder_of = getattr(network, "encoder_parameters", None)
    if callable(encoder_of) and encoder_lr_scale != 1.0:
        ids = {id(p) for p in encoder_of()}
        encoder = [p for p in trained if id(p) in ids]
        rest = [p for p in trained if id(p) not in ids]
        groups = [{"params": rest}, {"params": encoder, "lr": lr * encoder_lr_scale}]
        groups = [g for g in groups if g["params"]]  # a wholly frozen encoder has no group
    try:
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def _grad_scaler(enabled: bool) -> torch.amp.GradScaler:
    """fp16 loss scaling (CUDA only): torch.amp's scaler from torch 2.3, torch.cuda.amp's before."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3 (GeoSlicer 2.8 ships 1.12)


class TrainingRun:
    """State of one training run: `TrainingRun(config).fit()` is what `train(config)` does.

    Set-up (sections, split, targets, patch maps, model) happens in the constructor, the
    optimiser and data stream in `start()`, so benchmarks can drive single epochs.
    """

    def __init__(
        self, config: TrainConfig, log: Log, on_step: StepHook | None = None, on_epoch: EpochHook | None = None
    ) -> None:
        self.config = config
        self.ranks: Ranks = current()
        self.log = log if self.ranks.main else _quiet  # one voice: rank 0's
        self.on_step, self.on_epoch = on_step, on_epoch
        self.device, message = select_device(config.device)  # before anything is made or cleared
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.out / CHECKPOINT_FILE
        self._check_output()
        if message:
            log(message)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        self.spec = self._model()
        self.amp_dtype = resolve_precision(config.precision, self.device, self.spec.name)
        self._check_patch_size()
        self.roles = self.spec.roles
        self.class_table = self.spec.class_table
        self.parts = self._split()
        for part in ("train", "val", "test"):
            self._check_inputs(part)
        self.pixels_per_mm = self._pixels_per_mm()
        self.cache = ArrayCache(Path(config.cache_dir) if config.cache_dir else self.out / "cache")
        self.train_sections = self._prepare_train()
        self.val_sections = self._prepare_val()

    # -- set-up --------------------------------------------------------------------------------

    def _check_output(self) -> None:
        c = self.config
        if self.checkpoint_path.exists() and not c.resume and not c.overwrite:
            raise ThinSegError(
                "a training run already exists here: continue it with --resume or start again with --overwrite",
                self.out,
            )
        if c.overwrite and not c.resume and self.ranks.main:
            for name in (CHECKPOINT_FILE, LOG_FILE, CURVES_FILE):
                (self.out / name).unlink(missing_ok=True)

    def _model(self) -> ModelSpec:
        c = self.config
        if c.init_from is not None:
            spec = model_from_bundle(c.init_from)
            self.log(
                f"fine-tuning {c.init_from}: inputs {'+'.join(spec.roles)}, classes {', '.join(spec.class_table.names)}"
            )
            return spec
        roles = tuple(canonical_role(r) for r in c.inputs)
        if not roles or roles[0] != "PP" or len(set(roles)) != len(roles):
            raise ThinSegError(f"inputs must be ('PP',) or ('PP', 'XP'), not {tuple(c.inputs)}")
        return new_model(
            roles,
            c.class_table,
            name=c.network,
            base_channels=c.base_channels,
            depth=c.depth,
            num_res_units=c.num_res_units,
            norm=c.norm,
            pretrained=c.pretrained,
            decoder_channels=tuple(c.decoder_channels),
            encoder=c.encoder,
            shared_encoder=c.shared_encoder,
        )

    def _check_patch_size(self) -> None:
        """U-Net skips need sides divisible by the product of the strides (16 for depth 5)."""
        multiple = size_multiple(self.spec.network)
        size = self.config.patch_size
        if size < multiple or size % multiple:
            raise ThinSegError(f"patch size {size} (--patch-size) must be a multiple of {multiple} for this network")
        # sizes and pixels per pass in bounds, whoever set them (command line or job file)
        limits.check_tiling((size, size), multiple, self.config.batch_size, "patch size (--patch-size)")
        val_tile = (self.config.val_tile, self.config.val_tile)
        limits.check_tiling(val_tile, multiple, self.config.val_batch_size, "validation tile (--val-tile)")

    def _check_inputs(self, part: str) -> None:
        for section in self.parts[part]:
            missing = [r for r in self.roles if section.source(r) is None]
            if missing:
                raise ThinSegError(
                    f"{part} section {section.name!r} has no {'/'.join(missing)} image "
                    f"(the model needs {'+'.join(self.roles)})"
                )

    def _split(self) -> dict[str, list[Section]]:
        """Sections per part; a pooled list is split by section and the split saved/reused."""
        c = self.config
        split_path = self.out / SPLIT_FILE
        if c.sections:
            pooled = open_sections(c.sections)
            split = run_split([s.name for s in pooled], c, split_path)
            parts = apply_split(pooled, split)
        else:
            parts = {
                "train": open_sections(c.train_sections),
                "val": open_sections(c.val_sections),
                "test": open_sections(c.test_sections),
            }
        if not parts["train"]:
            raise ThinSegError("no training sections given")
        names = [s.name for p in parts.values() for s in p]
        if len(set(names)) != len(names):
            raise ThinSegError("section names must be unique across train/val/test")
        if not self.ranks.main:  # rank 0 wrote the same split
            return parts
        save_split(
            split_path,
            {p: [s.name for s in parts[p]] for p in parts},
            seed=c.seed,
            val_fraction=c.val_fraction,
            test_fraction=c.test_fraction,
        )
        return parts

    def _pixels_per_mm(self) -> float:
        c = self.config
        if c.pixels_per_mm:
            return float(c.pixels_per_mm)
        if self.spec.pixels_per_mm:
            return float(self.spec.pixels_per_mm)
        spacings = [s.mm_per_pixel for s in self.parts["train"] if s.mm_per_pixel]
        if not spacings:
            raise ThinSegError("the training sections carry no pixel size: give the model's with --model-mm-per-pixel")
        return 1.0 / float(np.median(spacings))

    def _prepare_train(self) -> list[PreparedSection]:
        c = self.config
        t = time.perf_counter()
        prepared = prepare_sections(
            self.parts["train"],
            self.class_table,
            patch_size=c.patch_size,
            model_mm_per_pixel=1.0 / self.pixels_per_mm,
            mapping_csv=c.mapping_csv,
            void_px=c.void_border_px,
            cell=c.sampler_cell,
            cache=self.cache,
        )
        total = class_pixel_totals(prepared, len(self.class_table))
        if not np.any(total):
            raise ThinSegError("the training label maps hold no pixel of any model class (check the mapping table)")
        absent = [n for n, k in zip(self.class_table.names, total) if k == 0]
        if absent:
            self.log(f"warning: no training pixels of {', '.join(absent)}")
        self.log(f"prepared {len(prepared)} training sections in {time.perf_counter() - t:.1f} s")
        return prepared

    def _prepare_whole(self, part: str) -> list[PreparedSection]:
        """Targets of whole sections (no patch maps, no void) for scoring: validation or test."""
        return prepare_sections(
            self.parts[part],
            self.class_table,
            patch_size=None,
            model_mm_per_pixel=1.0 / self.pixels_per_mm,
            mapping_csv=self.config.mapping_csv,
            void_px=0.0,
            cache=self.cache,
        )

    def _prepare_val(self) -> list[ValSection]:
        return make_val_sections(self._prepare_whole("val"), self.config.void_border_px)

    # -- training ------------------------------------------------------------------------------

    def start(self) -> None:
        """Network on its device, optimiser, schedule, data stream; restore a checkpoint if resuming."""
        c = self.config
        net = self.spec.network.to(self.device)
        if c.frozen_encoder_stages:
            freeze = getattr(net, "freeze_stages", None)
            if not callable(freeze):
                raise ThinSegError("frozen encoder stages need a pre-trained encoder: use the small-data recipe")
            freeze(c.frozen_encoder_stages)
        if c.channels_last:
            net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from torch's stub
        self.network = net.train()
        self.optimizer = make_optimizer(net, c.lr, c.weight_decay, c.encoder_lr_scale)
        total = c.epochs * c.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, total, c.warmup_steps, c.schedule)
        )
        self.scaler = _grad_scaler(enabled=self.amp_dtype == torch.float16)
        self.stream = PatchStream(
            self.train_sections,
            self.roles,
            len(self.class_table),
            patch_size=c.patch_size,
            batch_size=c.batch_size,
            steps=c.steps_per_epoch,
            balancing_strength=c.balancing_strength,
            augment=c.augment,
            seed=rank_seed(c.seed, self.ranks.rank),  # each rank its own patches
        )
        self.loader = make_loader(self.stream, c.num_workers, pin_memory=self.device.type == "cuda")
        state = self._resume() if c.resume and self.checkpoint_path.exists() else None
        self.epoch = state["epoch"] if state else 0
        self.history: list[dict[str, Any]] = list(state["history"]) if state else []
        self.best = state["best"] if state else {"epoch": None, "mean_iou": None, "metrics": None}
        self.bad_epochs = int(state["bad_epochs"]) if state else 0
        self.recent: list[dict[str, torch.Tensor]] = []  # the last epochs' weights, for averaging
        self.kept: dict[Path, dict[str, Any]] = {}  # candidates written under their own names
        if not 0.0 <= c.ema_decay < 1.0:
            raise ThinSegError(f"the moving average's decay must be in [0, 1) (0: off), not {c.ema_decay}")
        self.ema = exponential_average(net, c.ema_decay) if c.ema_decay > 0 else None
        if self.ema is not None and state and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.compared_emas = self._compared_emas(net, state)
        self.stopped = bool(state["stopped_early"]) if state else False
        self.model_dir: Path | None = (
            (self.out / c.model_name) if (self.out / c.model_name).exists() and state else None
        )
        self.trainer = self.ranks.wrap(net, self.device)  # after the resume: every rank starts equal
        if self.ranks.distributed:
            self.log(
                f"training on {self.ranks.world} processes ({self.ranks.backend}): {c.batch_size} patches per "
                f"process and step, {c.batch_size * self.ranks.world} in all"
                + (f", {torch.get_num_threads()} thread(s) each" if self.device.type == "cpu" else "")
            )

    def fit(self) -> TrainResult:
        """Train until `epochs`, early stop or Ctrl-C (the last finished epoch stays checkpointed)."""
        c = self.config
        self.start()
        stopped = self.stopped
        started, epochs_here, out_of_time = time.monotonic(), 0, False
        self.checkpointed = self.epoch
        try:
            while self.epoch < c.epochs and not stopped and not out_of_time:
                row = self.train_epoch()
                epochs_here += 1
                decided = (False, False)
                if self.ranks.main:
                    with self.ranks.main_work():
                        decided = self._end_epoch(row, started, epochs_here)
                stopped, out_of_time = self.ranks.from_main(decided)  # every rank goes on, or stops, with rank 0
                self.epoch = self.checkpointed = int(row["epoch"])
        except KeyboardInterrupt:
            self.log(
                f"interrupted: {self.checkpointed} finished epoch(s) are checkpointed in {self.checkpoint_path}; "
                "continue with --resume"
            )
            raise
        if not self.ranks.distributed:
            return self._finish(stopped, out_of_time)
        result = None
        if self.ranks.main:
            with self.ranks.main_work():
                result = self._finish(stopped, out_of_time)
        shared = self.ranks.from_main(result)
        assert shared is not None  # rank 0's result
        return shared

    def _end_epoch(self, row: dict[str, Any], started: float, epochs_here: int) -> tuple[bool, bool]:
        """Validate, export if better, checkpoint, log (rank 0's work); returns (stop early, out of time)."""
        c = self.config
        self._remember_weights()
        row.update(self._validate())
        self.epoch += 1
        self.history.append(row)
        stopped = self._keep_best(row)
        out_of_time = False
        if not stopped and c.max_minutes is not None and self.epoch < c.epochs:
            elapsed = time.monotonic() - started
            if elapsed + elapsed / epochs_here > 60 * c.max_minutes:  # the next epoch would not fit
                self.log(
                    f"time budget of {c.max_minutes:g} min reached after {elapsed / 60:.1f} min: stopping "
                    f"after epoch {self.epoch} of {c.epochs} (--resume continues)"
                )
                out_of_time = True
        self._checkpoint(stopped)  # a run stopped by the clock can be resumed; an early stop cannot
        self.checkpointed = self.epoch
        # the log and curves follow the checkpoint, so they never show an epoch a resume would redo
        write_log_csv(self.out / LOG_FILE, self.history)
        plot_curves(self.out / CURVES_FILE, self.history)
        if self.on_epoch is not None:
            self.on_epoch(row, self.best["epoch"] == row["epoch"])
        return stopped, out_of_time

    def _finish(self, stopped: bool, out_of_time: bool) -> TrainResult:
        """After the last epoch: the averaged weights, the calibration, the test scores."""
        c = self.config
        if self.ema is None or c.keep_candidates:  # the moving average is exported regardless
            self._offer_average()
        self._export_ema()
        self._keep_compared_emas()
        self._calibrate()
        self._correct_prior()
        self._finish_kept()
        test_metrics = self._evaluate_test()
        return TrainResult(
            output_dir=self.out,
            model_dir=self.model_dir,
            best_epoch=self.best["epoch"],
            best_mean_iou=self.best["mean_iou"],
            epochs_run=self.epoch,
            stopped_early=stopped,
            history=self.history,
            metrics=self.best["metrics"],
            checkpoint=self.checkpoint_path,
            log_csv=self.out / LOG_FILE,
            curves_png=self.out / CURVES_FILE if self.history else None,
            split_file=self.out / SPLIT_FILE,
            test_metrics=test_metrics,
            epochs_planned=c.epochs,
            stopped_by_time=out_of_time,
        )

    # -- averaged weights --------------------------------------------------------------------

    def _remember_weights(self) -> None:
        keep = self.config.average_last
        if keep >= 2:
            self.recent.append({k: v.detach().to("cpu", copy=True) for k, v in self.network.state_dict().items()})
            del self.recent[:-keep]

    def _offer_average(self) -> None:
        """The mean of the last epochs' weights as a candidate for export."""
        if len(self.recent) < 2:
            return
        first = self.epoch - len(self.recent) + 1
        self._offer_candidate(
            mean_state(self.recent), f"average of epochs {first}-{self.epoch}", {"averaged_epochs": [first, self.epoch]}
        )

    def _export_ema(self) -> None:
        """Export the moving average of the weights, whatever the validation says of it (and with
        no validation sections too): an epoch picked by one or two validation sections is a noisy
        choice, and an early one is an undertrained network."""
        if self.ema is None:
            return
        weights = averaged_state(self.ema, self.network)
        decay = self.config.ema_decay
        self._offer_candidate(weights, f"moving average (decay {decay:g})", {"ema_decay": decay}, always=True)

    def _compared_emas(self, network: torch.nn.Module, state: dict[str, Any] | None) -> dict[float, AveragedModel]:
        """Moving averages with other decays, kept beside the exported one so that decays can be
        compared on the very same training (`candidate_ema_decays`, with `keep_candidates`)."""
        c = self.config
        decays = tuple(float(d) for d in c.candidate_ema_decays)
        if decays and not c.keep_candidates:
            raise ThinSegError("candidate moving averages are only kept for comparison: they need keep_candidates")
        if any(not 0.0 < d < 1.0 for d in decays) or len(set(decays)) != len(decays) or c.ema_decay in decays:
            raise ThinSegError(
                f"candidate decays must be distinct, in (0, 1) and not the exported {c.ema_decay:g}, not {decays}"
            )
        averages = {d: exponential_average(network, d) for d in decays}
        saved = (state or {}).get("compared_emas", {})
        for decay, average in averages.items():
            if f"{decay:g}" in saved:
                average.load_state_dict(saved[f"{decay:g}"])
        return averages

    def _keep_compared_emas(self) -> None:
        """Write each compared moving average as a candidate, calibrated later like the export."""
        for decay, average in self.compared_emas.items():
            record = {"ema_decay": decay, "compared_only": True}
            self._offer_candidate(averaged_state(average, self.network), f"moving average (decay {decay:g})", record)

    def _offer_candidate(
        self, weights: dict[str, torch.Tensor], label: str, record: dict[str, Any], *, always: bool = False
    ) -> None:
        """Validate averaged `weights` (their batch-norm statistics re-estimated on training
        patches) and export them instead of the current model when they validate no worse (or
        `always`): an average of nearby points of a noisy descent usually generalises better than
        any one. With `keep_candidates` each candidate is also written under its own name; one
        whose record says `compared_only` is only written so."""
        compared_only = bool(record.get("compared_only"))
        if not (always or compared_only) and (not self.val_sections or self.best["mean_iou"] is None):
            return
        current = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        self.network.load_state_dict(weights)
        self._reestimate_norms()
        row = self._validate()  # empty without validation sections
        iou = row.get("val_mean_iou")
        candidate = {
            **{k: v for k, v in self.best.items() if k not in ("averaged_epochs", "ema_decay", "compared_only")},
            **record,
            "epoch": self.epoch,
            "mean_iou": iou,
            "metrics": self._validation_record(row, self.epoch, **record) if row else None,
            "confidence_reference": self._last_confidence if row else None,
        }
        if self.config.keep_candidates:
            self._keep_candidate(candidate)
        shown = f"{iou:.4f}" if iou is not None else "none"
        if compared_only:
            self.log(f"{label}: val mean IoU {shown}: kept for comparison only")
            self.network.load_state_dict(current)
            return
        exported = self.best["mean_iou"]
        no_worse = iou is not None and math.isfinite(iou) and exported is not None and iou >= exported
        if always or no_worse:
            before = f" (exported so far {exported:.4f})" if exported is not None else ""
            self.log(f"{label}: val mean IoU {shown}{before}: exported")
            self.best = candidate
            self.model_dir = self._export()
        else:
            self.log(f"{label}: val mean IoU {shown}: the model exported so far is kept")
            self.network.load_state_dict(current)

    def _keep_candidate(self, record: dict[str, Any]) -> None:
        """Write the network as `<model>-<kind>` (its weights as `record` describes them), and
        the best epoch too the first time, so that every candidate can be scored as exported."""
        if not self.kept and self.model_dir is not None:
            first = self.out / f"{self.config.model_name}-{candidate_kind(self.best)}"
            shutil.rmtree(first, ignore_errors=True)
            shutil.copytree(self.model_dir, first)
            self.kept[first] = dict(self.best)
        exported = self.best
        self.best = record
        folder = self._export(self.out / f"{self.config.model_name}-{candidate_kind(record)}")
        self.best = exported
        self.kept[folder] = record

    def _finish_kept(self) -> None:
        """Calibrate and correct each kept candidate as the exported model was."""
        exported = (self.model_dir, self.best)
        for folder, record in self.kept.items():
            self.model_dir, self.best = folder, record
            self.log(f"kept candidate {folder.name}:")
            self._calibrate()
            self._correct_prior()
        self.model_dir, self.best = exported

    def _calibrate(self) -> None:
        """Fit the confidence's temperature on the validation sections and export the exported
        model again with it folded in (its labels do not change)."""
        c = self.config
        if not c.calibrate_temperature or not self.val_sections or self.model_dir is None:
            return
        exported = load_bundle(self.model_dir).network.state_dict()
        self.network.load_state_dict(exported)
        logits, target = sample_logits(
            self.network,
            self.val_sections,
            self.roles,
            first_label=self.spec.first_label,
            multiple=size_multiple(self.network),
            device=self.device,
            seed=c.seed,
        )
        temperature = fit_temperature(logits, target)
        fold_temperature(self.network, temperature)
        self._validate()  # the same labels; the confidence reference moves with the temperature
        self.best = {**self.best, "temperature": temperature, "confidence_reference": self._last_confidence}
        self.model_dir = self._export()
        self.log(f"confidence calibrated on the validation sections: temperature {temperature:.2f}")

    def _correct_prior(self) -> None:
        """Fold the training sections' natural class shares over those the balanced sampler fed
        the network into the exported model's logits (after its temperature), so that its map
        answers under the rock's class prior, and export it again, validated once more."""
        c = self.config
        if not c.prior_correction or self.model_dir is None:
            return
        indexes = [p.index for p in self.train_sections if p.index is not None]
        n = len(self.class_table)
        sampled = sampled_class_shares(
            indexes,
            [p.target for p in self.train_sections if p.index is not None],
            n,
            balancing_strength=c.balancing_strength,
            patches_per_epoch=c.steps_per_epoch * c.batch_size,
            epochs=c.epochs,
            seed=c.seed,
        )
        weights = prior_weights(class_pixel_totals(self.train_sections, n), sampled)
        self.network.load_state_dict(load_bundle(self.model_dir).network.state_dict())
        fold_prior_correction(self.network, weights)
        correction = {name: round(float(w), 4) for name, w in zip(self.class_table.names, weights)}
        row = self._validate()
        self.best = {**self.best, "prior_correction": correction}
        if row:
            self.best["mean_iou"] = row.get("val_mean_iou", self.best["mean_iou"])
            averaged = self.best.get("averaged_epochs")
            extra = {"averaged_epochs": averaged} if averaged else {}
            self.best["metrics"] = self._validation_record(row, int(self.best["epoch"] or 0), **extra)
            self.best["confidence_reference"] = self._last_confidence
        self.model_dir = self._export()
        shown = ", ".join(f"{name} x{w:.2f}" for name, w in correction.items())
        self.log(f"class shares of the training sections restored (natural / sampled): {shown}")

    def _reestimate_norms(self, batches: int = 16) -> None:
        """Batch-norm running statistics of the averaged weights, measured on training batches.
        Only norms that learn their statistics are reset (a frozen pre-trained encoder keeps
        ImageNet's), which torch.optim.swa_utils.update_bn cannot be told."""
        norms = [m for m in self.network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self.network.train()
        live = [m for m in norms if m.training and m.track_running_stats]
        momenta = [m.momentum for m in live]
        for m in live:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        self.stream.set_epoch(self.epoch)
        with torch.no_grad():
            for done, (images, _target, jitter) in enumerate(self.loader):
                if done >= batches:
                    break
                with self._autocast():
                    self.network(self._network_input(images, jitter))
        for m, momentum in zip(live, momenta):
            m.momentum = momentum

    def _network_input(self, images: torch.Tensor, jitter: torch.Tensor | None) -> torch.Tensor:
        """A uint8 batch as the network sees it: colour-jittered, 0..1, channels-last if asked."""
        x = images.to(self.device, non_blocking=True).float()
        if jitter is not None:
            x = colour_jitter(x, jitter)
        x = x.div_(255.0)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self) -> AbstractContextManager[Any]:
        """Mixed precision around the forward pass when a reduced precision was chosen."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_epoch(self) -> dict[str, Any]:
        c = self.config
        self.stream.set_epoch(self.epoch)
        self.network.train()
        losses: list[float] = []
        seen = 0
        start = time.perf_counter()
        bar = tqdm(
            total=c.steps_per_epoch,
            desc=f"epoch {self.epoch + 1}/{c.epochs}",
            unit="batch",
            disable=not c.progress or not self.ranks.main,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )
        # its own stream, so that mixing leaves the patches drawn unchanged
        mixing = np.random.default_rng([rank_seed(c.seed, self.ranks.rank), self.epoch, CLASS_MIX_STREAM])
        try:
            for done, (images, target, jitter) in enumerate(self.loader, 1):
                if c.class_mix > 0:
                    images, target = class_mix(images, target, c.class_mix, mixing, edge=math.ceil(c.void_border_px))
                loss = self.step(images, target, jitter)
                if math.isfinite(loss):
                    losses.append(loss)
                seen += images.shape[0]
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(done, c.steps_per_epoch)
                bar.set_postfix(
                    loss=f"{np.mean(losses[-20:]) if losses else float('nan'):.4f}",
                    samples_s=f"{seen / (time.perf_counter() - start):.1f}",
                )
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        # the loss of all ranks' batches, the samples per second of all ranks together
        loss_sum, loss_count, rate = self.ranks.sums([float(np.sum(losses)), len(losses), seen / max(seconds, 1e-9)])
        return {
            "epoch": self.epoch + 1,
            "train_loss": loss_sum / loss_count if loss_count else float("nan"),
            "lr": float(self.scheduler.get_last_lr()[0]),
            "train_seconds": seconds,
            "train_samples_per_s": rate,
        }

    def step(self, images: torch.Tensor, target: torch.Tensor, jitter: torch.Tensor | None = None) -> float:
        """One optimisation step on a uint8 batch (+ its colour jitter); returns the loss."""
        c = self.config
        x = self._network_input(images, jitter)
        y = target.to(self.device, non_blocking=True)
        with self._autocast():
            logits = self.trainer(x)
        loss = dice_ce_loss(
            logits,
            y,
            dice_weight=c.dice_weight,
            ce_weight=c.ce_weight,
            first_label=self.spec.first_label,
            focal_gamma=c.focal_gamma,
            label_smoothing=c.label_smoothing,
            lovasz_weight=c.lovasz_weight,
        )
        self.optimizer.zero_grad(set_to_none=True)
        if not self.ranks.all_true(bool(torch.isfinite(loss))):  # every rank skips, or none
            self.scheduler.step()
            return float("nan")
        self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
        if c.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), c.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.network)
        for average in self.compared_emas.values():
            average.update_parameters(self.network)
        return float(loss.detach())

    def _validate(self) -> dict[str, Any]:
        if not self.val_sections:
            return {}
        c = self.config
        start = time.perf_counter()
        metrics, confidence = validate_with_confidence(
            self.network,
            self.val_sections,
            self.roles,
            self.class_table,
            tile=c.val_tile,
            overlap=c.val_overlap,
            batch_size=c.val_batch_size,
            device=str(self.device),
            precision=_precision_name(self.amp_dtype),
            first_label=self.spec.first_label,
        )
        row: dict[str, Any] = {
            "val_mean_iou": metrics.mean_iou,
            "val_pixel_accuracy": metrics.pixel_accuracy,
            "val_mean_f1": metrics.mean_f1,
        }
        for name, iou in zip(self.class_table.names, metrics.iou):
            row[f"val_iou_{name}"] = float(iou)
        row["val_seconds"] = time.perf_counter() - start
        self._last_metrics = metrics.to_dict()
        self._last_confidence = confidence.to_meta() if confidence is not None else None
        return row

    def _keep_best(self, row: dict[str, Any]) -> bool:
        """Export when validation improved (or every epoch without validation); True = stop early."""
        c = self.config
        value = row.get("val_mean_iou")
        iou = float(value) if value is not None and math.isfinite(value) else None
        has_val = iou is not None
        best = self.best["mean_iou"]
        improved = iou is None or best is None or iou > best + c.min_delta
        summary = (
            f"epoch {row['epoch']}/{c.epochs}: loss {row['train_loss']:.4f}, {row['train_samples_per_s']:.1f} samples/s"
        )
        if has_val:
            summary += f", val mean IoU {iou:.4f}"
        if improved:
            metrics = self._validation_record(row, row["epoch"]) if has_val else None
            self.best = {
                "epoch": row["epoch"],
                "mean_iou": iou,
                "metrics": metrics,
                "confidence_reference": self._last_confidence if has_val else None,
            }
            self.bad_epochs = 0
            self.model_dir = self._export()
            summary += " (best: exported)"
        else:
            self.bad_epochs += 1
        self.log(summary)
        return bool(has_val and c.patience is not None and self.bad_epochs >= c.patience)

    def _validation_record(self, row: dict[str, Any], epoch: int, **extra: Any) -> dict[str, Any]:
        """The exported model's validation scores (meta.json `metrics`) from the last validation."""
        record: dict[str, Any] = finite(
            {
                "epoch": epoch,
                **extra,
                "sections": [v.prepared.name for v in self.val_sections],
                **self._last_metrics,
                "per_class_iou": {n: row[f"val_iou_{n}"] for n in self.class_table.names},
            }
        )
        return record

    def _export(self, folder: Path | None = None) -> Path:
        """Write the network as a bundle: the run's model, or another `folder`."""
        c = self.config
        parts = self.parts
        class_pixels = class_pixel_totals(self.train_sections, len(self.class_table))
        training = finite(
            {
                "data": {
                    "train_sections": [s.name for s in parts["train"]],
                    "val_sections": [s.name for s in parts["val"]],
                    "test_sections": [s.name for s in parts["test"]],
                    "train_sources": [str(getattr(s, "origin", s.name)) for s in parts["train"]],
                    "train_class_pixels": {n: int(k) for n, k in zip(self.class_table.names, class_pixels)},
                    "void_border_px": c.void_border_px,
                    "mapping_csv": str(c.mapping_csv) if c.mapping_csv else "QEMSCAN default",
                },
                "epoch": self.best["epoch"],
                "averaged_epochs": self.best.get("averaged_epochs"),
                **({"ema_decay": self.best["ema_decay"]} if self.best.get("ema_decay") else {}),
                "temperature": self.best.get("temperature"),
                "prior_correction": self.best.get("prior_correction"),
                "recipe": c.recipe,
                "epochs_planned": c.epochs,
                "patch_size": c.patch_size,
                "batch_size": c.batch_size,
                "steps_per_epoch": c.steps_per_epoch,
                "balancing_strength": c.balancing_strength,
                "precision": _precision_name(self.amp_dtype),
                "seed": c.seed,
                **({"processes": self.ranks.world} if self.ranks.distributed else {}),
                "fine_tuned_from": None if self.spec.source == "new" else self.spec.source,
                "channels": list(bundle_input_names(self.roles)),
                "pixels_per_mm": self.pixels_per_mm,
                "config": c.to_dict(),
            }
        )
        description = c.description or (
            f"U-Net trained with thinseg on {len(parts['train'])} section(s) "
            f"({'+'.join(bundle_input_names(self.roles))}, {self.pixels_per_mm:.1f} px/mm)"
        )
        return export_bundle(
            folder or self.model_dir or self.out / c.model_name,
            self.network,
            network_name=self.spec.name,
            network_params=self.spec.params,
            class_table=self.class_table,
            roles=self.roles,
            pixels_per_mm=self.pixels_per_mm,
            roi_shape=(c.val_tile, c.val_tile),
            title=c.title,
            description=description,
            training=training,
            metrics=self.best["metrics"],
            confidence_reference=self.best.get("confidence_reference"),  # absent in older checkpoints
            test_time_augmentation=c.test_time_augmentation,
            min_region_px=c.min_region_px,
        )

    def _evaluate_test(self) -> dict[str, Any] | None:
        """Score the exported best model once on the held-out test sections (test_metrics.json)."""
        if not self.parts["test"] or self.model_dir is None:
            return None
        c = self.config
        prepared = self._prepare_whole("test")
        bundle = load_bundle(self.model_dir)
        metrics = validate(
            bundle.network,
            make_val_sections(prepared, c.void_border_px),
            self.roles,
            self.class_table,
            tile=c.val_tile,
            overlap=c.val_overlap,
            batch_size=c.val_batch_size,
            device=str(self.device),
            precision=_precision_name(self.amp_dtype),
            first_label=bundle.first_label,
        )
        record: dict[str, Any] = finite(
            {
                "model": str(self.model_dir),
                "epoch": self.best["epoch"],
                "sections": [s.name for s in self.parts["test"]],
                **metrics.to_dict(),
            }
        )
        write_json(self.out / TEST_METRICS_FILE, record)
        self.log(f"test mean IoU {metrics.mean_iou:.4f} on {len(prepared)} held-out section(s)")
        return record

    # -- checkpoints ---------------------------------------------------------------------------

    def _checkpoint(self, stopped: bool) -> None:
        save_checkpoint(
            self.checkpoint_path,
            {
                "epoch": self.epoch,
                "model": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "history": finite(self.history),
                "best": finite(self.best),
                "bad_epochs": self.bad_epochs,
                "stopped_early": stopped,
                "rng": rng_state(),
                "identity": self._identity(),
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                **(
                    {"compared_emas": {f"{d:g}": a.state_dict() for d, a in self.compared_emas.items()}}
                    if self.compared_emas
                    else {}
                ),
            },
        )

    def _identity(self) -> dict[str, Any]:
        """What must not change between a run and its resumption."""
        return {
            "network": self.spec.name,
            "params": self.spec.params,
            "classes": self.class_table.names,
            "roles": list(self.roles),
            "patch_size": self.config.patch_size,
        }

    def _resume(self) -> dict[str, Any]:
        state = load_checkpoint(self.checkpoint_path)
        if state.get("identity") != finite(self._identity()):
            raise ThinSegError(
                "cannot resume: the network, classes, inputs or patch size differ from the checkpoint",
                self.checkpoint_path,
            )
        self.network.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state.get("rng", {}))
        self.log(f"resuming after epoch {state['epoch']} from {self.checkpoint_path}")
        return state


def train(
    config: TrainConfig, log: Log | None = None, on_step: StepHook | None = None, on_epoch: EpochHook | None = None
) -> TrainResult:
    """Train (or resume) a run described by `config`; the best model is exported as a GeoSlicer
    bundle at config.output_dir / config.model_name. The run folder belongs to this run until it
    returns (`run_folder_lock`): a second run into it is refused, a killed run's lock and
    temporaries are cleared."""
    logger = log or (_stderr if config.progress else (lambda _m: None))
    if config.members > 1:
        from thinseg.training.ensemble import train_ensemble  # deferred: only ensembles need it

        def member(c: TrainConfig, log: Log, index: int) -> TrainResult:
            """Member `index` (from 0); its epochs are reported after the earlier members' ones."""

            def epoch_done(row: dict[str, Any], best: bool) -> None:
                if on_epoch is not None:
                    on_epoch({**row, "epoch": int(row["epoch"]) + index * config.epochs}, best)

            return train(c, log, on_step, epoch_done)

        return train_ensemble(config, config.members, logger, member)
    out = Path(config.output_dir)
    ranks = current()
    if not ranks.main:  # rank 0 holds the folder for all ranks and sweeps it before they start
        with ranks.main_first():
            run = TrainingRun(config, logger, on_step, on_epoch)
        return run.fit()
    with run_folder_lock(out, log=logger):
        for folder in (out, Path(config.cache_dir) if config.cache_dir else out / "cache"):
            for note in sweep_stale_temporaries(folder).notes(folder):
                logger(note)
        with ranks.main_first():  # the others then read the prepared sections from the cache
            run = TrainingRun(config, logger, on_step, on_epoch)
        return run.fit()
