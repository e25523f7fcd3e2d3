"""Training settings and results as plain dataclasses: the CLI and scripts fill a TrainConfig,
`train(config)` returns a TrainResult. Every field has a default that trains a sensible model,
so a call only names the data and the output folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from thinseg.classes.files import default_class_table
from thinseg.classes.table import ClassTable

Precision = Literal["auto", "fp32", "bf16", "fp16"]
#: How ensemble members differ: "seeds" (every member trains and validates on the same sections,
#: each with its own seed) or "cross-fitted" (each member validates on other sections).
MemberSplit = Literal["seeds", "cross-fitted"]
MEMBER_SPLITS: tuple[str, ...] = get_args(MemberSplit)


@dataclass
class AugmentConfig:
    """Augmentations that respect the optics: PP and XP move together (same flips, rotation,
    scale), colour jitter is drawn per image because the two illuminations vary independently."""

    flips: bool = True
    rot90: bool = True
    brightness: float = 0.08  # +- fraction of 255 added
    contrast: float = 0.10  # +- relative contrast change around the patch mean
    saturation: float = 0.10  # +- relative saturation change
    channel_gain: float = 0.04  # +- per-channel gain (white balance)
    scale: float = 0.10  # patches are zoomed by a factor in [1 - scale, 1 + scale]
    gamma: float = 0.0  # +- relative gamma change per image (0: off)
    blur: float = 0.0  # largest Gaussian blur sigma (px) per image, drawn for half the images (0: off)
    # largest free turn (degrees) either side, on top of the 90-degree turns (0: off); 45 lost 0.041 mean
    # IoU on held-out real sandstone fields (plagioclase most), so no recipe uses it
    rotation: float = 0.0

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(flips=False, rot90=False, brightness=0.0, contrast=0.0, saturation=0.0, channel_gain=0.0, scale=0.0)


@dataclass
class TrainConfig:
    """Everything `train` needs. Sections are Section objects or paths (netCDF files/folders).

    Either give `train_sections` and `val_sections` explicitly, or `sections` with
    `val_fraction` / `test_fraction` to split by section (the split is saved as split.json).
    """

    output_dir: Path
    train_sections: Sequence[Any] = ()
    val_sections: Sequence[Any] = ()
    test_sections: Sequence[Any] = ()
    sections: Sequence[Any] = ()  # split by section into train/val/test
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    split_file: Path | None = None  # reuse a saved split.json (sections are matched by name)

    # classes and inputs
    class_table: ClassTable = field(default_factory=default_class_table)
    mapping_csv: Path | None = None  # mineral name -> target class; None: QEMSCAN default
    inputs: tuple[str, ...] = ("PP", "XP")  # ("PP",) for PP-only models
    pixels_per_mm: float | None = None  # None: from the training sections

    # sampling and augmentation
    patch_size: int = 256
    batch_size: int = 8
    steps_per_epoch: int = 200
    balancing_strength: float = 0.75  # 0: uniform random patches, 1: always class-driven
    void_border_px: float = 2.0  # band around class boundaries left out of the loss
    sampler_cell: int | None = None  # probability-map cell (px); None: patch_size // 8
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    class_mix: float = 0.0  # share of a batch's patches given half the classes of another patch (ClassMix)
    num_workers: int = 0
    cache_dir: Path | None = None  # None: output_dir / "cache"

    # model
    recipe: str = "unet"  # the preset these settings started from (recorded; see training.recipes)
    network: str = "UNet"  # or "LiteUNet": a pre-trained EfficientNet-Lite encoder (thinseg only)
    encoder: str = "efficientnet-lite0"  # LiteUNet: efficientnet-lite0, -lite1 or -lite2
    pretrained: bool = True  # LiteUNet: start the encoder from its ImageNet weights
    encoder_lr_scale: float = 1.0  # LiteUNet: the encoder's learning rate relative to `lr`
    frozen_encoder_stages: int = 0  # LiteUNet: the encoder's first N of 5 resolution stages keep ImageNet weights
    decoder_channels: tuple[int, ...] = (128, 64, 32, 24, 16)  # LiteUNet
    shared_encoder: bool = True  # LiteUNet: PP and XP through one encoder; False: one encoder each
    members: int = 1  # LiteUNet: > 1 trains an ensemble (training.ensemble)
    member_split: MemberSplit = "cross-fitted"  # members > 1: how they differ (MemberSplit)
    base_channels: int = 16
    depth: int = 5  # channels base * 2**i for i < depth
    num_res_units: int = 2
    norm: str = "batch"
    init_from: Path | None = None  # fine-tune from a GeoSlicer/thinseg bundle

    # optimisation
    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = 1.0
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    focal_gamma: float = 0.0  # > 0: focal cross-entropy, (1 - p_true) ** gamma down-weights easy pixels
    label_smoothing: float = 0.0  # > 0: that share of each pixel's target spread over the real classes
    lovasz_weight: float = 0.0  # > 0: add a Lovasz-softmax term (a surrogate of IoU) with this weight
    average_last: int = 0  # offer the average of the last N epochs' weights for export (it must validate no worse)
    ema_decay: float = 0.0  # in (0, 1): export a moving average of the weights, kept step by step, whatever validates
    keep_candidates: bool = False  # also write every candidate under its name: `<model>-best-epoch`, `-average`, `-ema`
    # with keep_candidates: more moving averages, written as `<model>-ema-<decay>` and never exported
    candidate_ema_decays: tuple[float, ...] = ()
    calibrate_temperature: bool = False  # fit a softmax temperature on the validation sections (LiteUNet)
    prior_correction: bool = False  # fold natural / sampled class shares into the logits (LiteUNet): priors.py
    test_time_augmentation: str = "none"  # none/flips/dihedral: used in validation, recorded in the bundle
    min_region_px: int = 0  # the minimum-region sieve recorded in the bundle for segment/evaluate (0: none)
    precision: Precision = "auto"
    channels_last: bool = True
    device: str = "auto"
    seed: int = 0

    # run control
    resume: bool = False
    patience: int | None = 10  # epochs without a better validation mean IoU; None: never stop
    max_minutes: float | None = None  # wall-clock budget: no epoch is started that would end past it
    min_delta: float = 1e-4
    val_tile: int = 512
    val_overlap: int = 32
    val_batch_size: int = 4
    progress: bool = True
    title: str = "Thin-section multiphase U-Net"
    description: str = ""
    model_name: str = "model"  # exported bundle folder: output_dir / model_name
    overwrite: bool = False  # replace an existing run in output_dir (without resume)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly record of the settings (sections by name) for checkpoints and meta."""
        out: dict[str, Any] = {}
        for f in fields(self):  # not asdict(): it would deep-copy every in-memory section
            key, value = f.name, getattr(self, f.name)
            if key in ("train_sections", "val_sections", "test_sections", "sections"):
                value = [_section_name(s) for s in value]
            elif key == "augment":
                value = asdict(value)
            elif key == "class_table":
                value = {"names": self.class_table.names, "colors": self.class_table.colors}
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out


def _section_name(section: Any) -> str:
    return str(getattr(section, "name", section))


@dataclass
class TrainResult:
    """What a run produced; `model_dir` is the exported GeoSlicer bundle of the best epoch."""

    output_dir: Path
    model_dir: Path | None
    best_epoch: int | None
    best_mean_iou: float | None
    epochs_run: int  # epochs completed in total (including those before a resume)
    stopped_early: bool
    history: list[dict[str, Any]]
    metrics: dict[str, Any] | None  # validation metrics of the best epoch
    checkpoint: Path
    log_csv: Path
    curves_png: Path | None
    split_file: Path
    test_metrics: dict[str, Any] | None = None  # best model on the held-out test sections
    epochs_planned: int = 0  # the `epochs` asked for
    stopped_by_time: bool = False  # `max_minutes` ran out before `epochs_planned`
    member_scores: list[float] | None = None  # an ensemble: each member's validation mean IoU, in order
    members_dir: Path | None = None  # an ensemble: the members' run folders (logs, curves, models)
