"""Segment sections end to end: open inputs, run the model, write GeoSlicer netCDF + reports.

This is the library call behind `thinseg segment` and the Slicer logic's batch mode. Each
section either produces all of its files or none (temporary names, renamed at the end).

Outputs lie on the input's grid exactly as GeoSlicer would show the input: the PP image's
IJK-to-RAS matrix (spacing per axis, directions, flips) is written with the labels; padding of a
"same coordinate system" export is left out as GeoSlicer's importer crops it; non-square pixels
are resampled to the model's square ones and the labels brought back. Every section of a
netCDF file holding several is segmented into its own output.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from scipy import ndimage

import thinseg
from thinseg.data.section_images import DEFAULT_MM_PER_PIXEL, NetcdfSection, netcdf_layout, open_ppxp
from thinseg.errors import ThinSegError
from thinseg.inference.confidence import ConfidenceReference, out_of_depth_warning
from thinseg.inference.engine import (
    READ_WIDTH,
    CancelFn,
    InferenceOptions,
    ProgressFn,
    RowSink,
    RunStats,
    Segmenter,
    Source,
)
from thinseg.inference.resample import (
    Factor,
    nearest_index,
    picked_window,
    resampled_shape,
    resampling_factors,
    stream_at_model_resolution,
)
from thinseg.io.atomic import (
    AtomicOutput,
    atomic_output,
    commit_unique,
    ensure_writable_dir,
    numbered,
    sweep_stale_temporaries,
)
from thinseg.io.images import RasterSource, check_region
from thinseg.io.locks import file_lock
from thinseg.io.netcdf import (
    BandRowWriter,
    Geometry,
    NetcdfImageSource,
    NetcdfWriter,
    RgbRowWriter,
    VariableInfo,
    Window,
    labels_problem,
    list_variables,
    padding_window,
)
from thinseg.io.pairing import PairingProblem, SectionInput, pair_inputs, section_base_name
from thinseg.limits import check_mm_per_pixel, path_text
from thinseg.metrics.fractions import class_pixel_counts
from thinseg.model.bundle import ModelBundle, load_bundle
from thinseg.registration.ppxp import MIN_SCORE, WINDOW, XpAlignment, estimate_xp_alignment, estimate_xp_offset
from thinseg.reports.mineralogy import (
    ModalMineralogy,
    mineralogy_from_counts,
    update_mineralogy_table,
    write_mineralogy_csv,
)
from thinseg.reports.overlay import MAX_OVERLAY_SIDE, write_overlay_png
from thinseg.reports.preview import preview_shape, read_preview
from thinseg.resources import default_model_dir

#: Name of a batch's modal mineralogy table in an output folder.
MINERALOGY_CSV = "modal_mineralogy.csv"
#: Global netCDF attribute naming the run that wrote an output (cluster runs only).
RUN_ATTRIBUTE = "thinseg_run"


@dataclass
class SegmentOptions:
    """How sections are found, segmented and written (the options of `thinseg segment`).

    `sections` names the sections (or their PP variables) to segment in netCDF files holding
    several; empty: every section. `xp` pairs the one PP image input with this XP image whatever
    their names; `xp_dir` is where XP images are looked for when not beside their PP image.
    `align_xp` checks XP against PP first (`check_xp_alignment`): an offset or turned XP is
    segmented, and written, on the PP grid; a pair that does not match is refused.
    `mm_per_pixel` is the pixel size of image files; None: the one an OME-TIFF records, else
    DEFAULT_MM_PER_PIXEL (netCDF files keep their own grid). `cluster`: run each section as one
    task on a Dask cluster ("local:N", "tcp://HOST:PORT" or a scheduler file; see
    `thinseg.pipelines.cluster`), the same outputs as without. `band_rows`, on a cluster: a
    section is shared by several tasks of about this many rows each, written into its one file
    in order (None: when the batch has fewer sections than the cluster has worker threads, each
    section split evenly over them; 0: never)."""

    pp_pattern: str = "PP"
    xp_pattern: str | None = "XP"
    xp: Path | None = None
    xp_dir: Path | None = None
    mm_per_pixel: float | None = None
    overwrite: bool = False
    probabilities: bool = False
    overlay: bool = False
    inference: InferenceOptions = field(default_factory=InferenceOptions)
    sections: tuple[str, ...] = ()
    align_xp: bool = True
    cluster: str | None = None
    band_rows: int | None = None


@dataclass(frozen=True)
class NetcdfSectionInput(SectionInput):
    """A section of a netCDF file, pinned to its PP (and XP) variables; `notes` are lines for
    the user about the file's other PP images (e.g. one left out for want of an XP image)."""

    pp_variable: str | None = None
    xp_variable: str | None = None
    notes: tuple[str, ...] = ()
    one_of_several: bool = False


@dataclass
class SectionResult:
    """One segmented section: its files, modal mineralogy, timing and messages."""

    section: SectionInput
    netcdf: Path
    overlay: Path | None
    mineralogy: ModalMineralogy
    seconds: float
    tiles: int
    megapixels: float
    messages: list[str]


ProgressFactory = Callable[[str, int], Callable[[int, int], None]]
"""Given (section name, pixel count), returns the per-tile progress callback (done, total)."""


@runtime_checkable
class CopyingSource(Protocol):
    """A source that also copies the rows read through it into the output."""

    def copy_ahead(self) -> bool: ...


class SectionStreamer(Protocol):
    """Runs the segmenter over a section's sources (on the model's grid when `factor` is given)
    and hands the finished rows to `sink` in order: `stream_at_model_resolution` in this process,
    or the cluster's tasks sharing one section."""

    def __call__(
        self,
        segmenter: Segmenter,
        sources: Sequence[Source],
        factor: Factor | None,
        sink: RowSink,
        *,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> RunStats: ...


def check_thin_section_model(bundle: ModelBundle) -> None:
    """Refuse, naming the model, a bundle whose inputs are not one RGB PP image and optionally one
    RGB XP image (what a thin section provides), or whose class names GeoSlicer would misread in
    a labelmap's `labels` attribute, before any section is read."""
    problem = labels_problem(bundle.class_table)
    if problem is not None:
        meta = bundle.path / "meta.json" if bundle.path.is_dir() else bundle.path
        raise ThinSegError(f"model {bundle.title!r}: {problem}", meta)
    inputs = list(zip(bundle.input_names, bundle.input_channels))
    if 1 <= len(inputs) <= 2 and all(channels == 3 for _, channels in inputs):
        return
    described = ", ".join(f"{name} ({channels} channel{'' if channels == 1 else 's'})" for name, channels in inputs)
    raise ThinSegError(
        f"model {bundle.title!r} needs {described}; thin sections give an RGB (3-channel) PP image "
        "and optionally an RGB XP image",
        bundle.path,
    )


def model_mm_per_pixel(bundle: ModelBundle) -> float | None:
    """The pixel size (mm) the model was trained at, if its bundle records one."""
    return 1.0 / bundle.pixels_per_mm if bundle.pixels_per_mm else None


@dataclass
class _OpenedSection:
    sources: list[RasterSource]  # in the model's input order
    geometry: Geometry  # the PP image's grid: every output lies on it
    copies: list[tuple[str, Window | None]]  # netCDF variables to copy (rows/columns kept)
    notes: list[str]  # what the user should know about how the input was read
    xp_alignment: XpAlignment | None = None  # where XP sat on the PP grid (None: not checked)

    @property
    def mm_per_pixel(self) -> float:
        return self.geometry.mm_per_pixel

    @property
    def origin_mm(self) -> tuple[float, float, float]:
        return self.geometry.origin


def _open_inputs(
    section: SectionInput, bundle: ModelBundle, options: SegmentOptions, stack: ExitStack
) -> _OpenedSection:
    """Open the section's images in the model's input order, closing them via `stack`."""
    needs_xp = len(bundle.input_names) > 1
    if section.netcdf is not None:
        path = section.netcdf
        variables = list_variables(path)
        named = None
        if isinstance(section, NetcdfSectionInput) and section.pp_variable is not None:
            named = {"PP": section.pp_variable, **({"XP": section.xp_variable} if section.xp_variable else {})}
        images = stack.enter_context(
            open_ppxp(
                path,
                pp_pattern=options.pp_pattern,
                xp_pattern=options.xp_pattern,
                variables=named,
                with_xp=needs_xp,
                crop_padding=True,
            )
        )
        if needs_xp and images.xp is None:
            raise ThinSegError(f"no XP image: no RGB variable whose name contains '{options.xp_pattern}'", path)
        if images.xp is not None and tuple(images.xp.shape) != tuple(images.pp.shape):
            raise ThinSegError(
                f"PP variable {images.pp_variable} and XP variable {images.xp_variable} differ in size", path
            )
        geometry = images.geometry or Geometry.thin_section(options.mm_per_pixel or DEFAULT_MM_PER_PIXEL)
        copies = _netcdf_copies(section, variables, images.pp, images.xp)
        notes = _padding_notes(path, images.pp, images.pp_variable, images.xp, images.xp_variable)
    else:
        assert section.pp is not None
        images = stack.enter_context(open_ppxp(section.pp, section.xp, with_xp=needs_xp))
        if needs_xp and section.xp is None:
            raise ThinSegError("this model needs an XP image and none was found", section.pp)
        if images.xp is not None and section.xp is not None and tuple(images.xp.shape) != tuple(images.pp.shape):
            (h, w), (hx, wx) = images.pp.shape, images.xp.shape
            raise ThinSegError(
                f"PP is {w}x{h} px but XP {section.xp.name} is {wx}x{hx} px; they must be the same size",
                section.pp,
            )
        mm_per_pixel = options.mm_per_pixel or images.mm_per_pixel or DEFAULT_MM_PER_PIXEL  # given, file's, default
        geometry, copies, notes = Geometry.thin_section(mm_per_pixel), [], []
    # a spacing far from the model's is refused here, before any pixel is read or written
    _model_resolution(section.primary.name, geometry, images.pp.shape, bundle, section.primary)
    sources = [images.pp] + ([images.xp] if images.xp is not None else [])
    if isinstance(section, NetcdfSectionInput):
        notes = list(section.notes) + notes
    alignment = None
    if options.align_xp and needs_xp and images.xp is not None:
        alignment = check_xp_alignment(images.pp, images.xp, section.primary)
        if alignment is None:
            notes.append(f"{section.name}: under {MIN_CHECK_SIDE} px a side: XP not checked against PP")
        elif not alignment.is_identity:
            sources[1] = AlignedXpSource(images.xp, alignment)
    return _OpenedSection(sources, geometry, copies, notes, alignment)


def _netcdf_copies(
    section: SectionInput, variables: Sequence[VariableInfo], pp: RasterSource, xp: RasterSource | None
) -> list[tuple[str, Window | None]]:
    """The input variables an output carries, each over the rows and columns GeoSlicer keeps
    when it imports them (see `padding_window`), so that GeoSlicer shows the copies as it shows
    the input. A section of a file holding several carries its own images and the variables
    that name them as `reference`; otherwise every image, labelmap and segmentation."""
    assert section.netcdf is not None
    kinds = ("rgb", "labelmap", "segmentation", "scalar")
    keep = [v for v in variables if v.kind in kinds]
    if isinstance(section, NetcdfSectionInput) and section.one_of_several:
        own = {s.name for s in (pp, xp) if s is not None}
        keep = [v for v in keep if v.name in own or str(v.attrs.get("reference", "")) in own]
    copies: list[tuple[str, Window | None]] = []
    for v in keep:
        shape = v.image_shape
        window = padding_window(section.netcdf, v.name) if v.on_shared_grid and shape is not None else None
        copies.append((v.name, None if window is None or window == Window.whole(shape or (0, 0)) else window))
    return copies


def _padding_notes(
    path: Path, pp: RasterSource, pp_variable: str | None, xp: RasterSource | None, xp_variable: str | None
) -> list[str]:
    """What the padding crop of a "same coordinate system" export left out, and whether the XP
    image has padding inside the PP field (the model then sees white there)."""
    if not isinstance(pp, NetcdfImageSource) or pp.window == Window.whole(pp.full_shape):
        return []
    (h, w), (full_h, full_w) = pp.shape, pp.full_shape
    notes = [
        f"{path.name}: {pp_variable}: {full_h * full_w - h * w} pixels of padding (a 'same coordinate system' "
        f"export) left out as GeoSlicer does on import; {w}x{h} px of {full_w}x{full_h} segmented"
    ]
    if isinstance(xp, NetcdfImageSource) and xp_variable is not None:
        own, field = padding_window(path, xp_variable), pp.window
        if not (own.y0 <= field.y0 and own.x0 <= field.x0 and own.y1 >= field.y1 and own.x1 >= field.x1):
            notes.append(
                f"{path.name}: {xp_variable} does not cover all of {pp_variable}: where it is padding the model "
                "sees white XP pixels"
            )
    return notes


def output_paths(section: SectionInput, output: Path, overwrite: bool, single_file: bool) -> Path:
    """The name this section's netCDF is wanted under. Unless overwrite, a taken name gives the
    first free numbered one (S_1.nc, ...) when the section is committed (`segment_section`), so
    runs in parallel never write over each other."""
    return output if single_file else output / f"{section.name}.nc"


def segment_section(
    section: SectionInput,
    segmenter: Segmenter,
    options: SegmentOptions,
    target: Path,
    progress: ProgressFactory | None = None,
    cancel: CancelFn | None = None,
    run_id: str | None = None,
    streamer: SectionStreamer = stream_at_model_resolution,
) -> SectionResult:
    """Segment one section and write its netCDF (and overlay) atomically. `run_id`, stored as the
    netCDF's `thinseg_run` attribute, lets a retried cluster task recognise its own output;
    `streamer` makes the labels (here, or on a cluster)."""
    bundle = segmenter.bundle
    start = time.perf_counter()
    messages: list[str] = []
    with ExitStack() as stack:
        opened = _open_inputs(section, bundle, options, stack)
        sources = opened.sources
        height, width = sources[0].shape
        # names inside the files are text: bytes of a file name that are not UTF-8 become \\xNN
        base = path_text(section_base_name(section, options.pp_pattern))
        attrs: dict[str, str | int] = {"thinseg_version": thinseg.__version__, "thinseg_model": bundle.title}
        attrs["thinseg_test_time_augmentation"] = segmenter.tta  # what the labels were averaged over
        attrs["thinseg_min_region_px"] = segmenter.min_region  # the sieve the labels went through (0: none)
        if run_id is not None:
            attrs[RUN_ATTRIBUTE] = run_id
        overlay_path = _overlay_name(target) if options.overlay else None
        # Every file of the section is written under a temporary name and renamed only when all
        # are complete: an error or Ctrl-C while writing the overlay must not leave the netCDF.
        outputs = [atomic_output(target)] + ([atomic_output(overlay_path)] if overlay_path is not None else [])
        stack.callback(_discard_all, outputs)  # no-op once committed
        with NetcdfWriter(outputs[0].tmp, attrs=attrs, shown_as=target) as writer:
            reference, run_sources, tees = _start_images(writer, section, opened)
            messages.extend(opened.notes)
            if opened.xp_alignment is not None:
                messages.append(f"{section.name}: {opened.xp_alignment.describe()}")
            factor, note = _model_resolution(
                section.primary.name, opened.geometry, (height, width), bundle, section.primary
            )
            if note:
                messages.append(note)
            callback = progress(section.name, height * width) if progress is not None else None
            sink = _begin_outputs(writer, bundle, opened, base, reference, segmenter.options.with_confidence)
            if overlay_path is not None:
                sink.keep_preview(preview_shape((height, width), MAX_OVERLAY_SIDE))
            result = streamer(segmenter, run_sources, factor, sink, progress=callback, cancel=cancel)
            for tee in tees:
                tee.finish()
            sink.finish()
            warning = out_of_depth_warning(
                section.name, result.confidence_histogram, ConfidenceReference.from_meta(bundle.meta)
            )
            if warning:
                messages.append(warning)
        # the geometric mean pixel size: exact areas also for non-square pixels
        mineralogy = mineralogy_from_counts(
            path_text(section.name), sink.counts, height * width, bundle.class_table, opened.mm_per_pixel
        )
        if overlay_path is not None and sink.preview is not None:
            _write_overlay(outputs[1].tmp, sources[0], sink.preview, bundle, mineralogy, path_text(section.name))
        target, overlay_path = _commit_section(outputs, target, options.overwrite)
    return SectionResult(
        section=section,
        netcdf=target,
        overlay=overlay_path,
        mineralogy=mineralogy,
        seconds=time.perf_counter() - start,
        tiles=result.tiles,
        megapixels=height * width / 1e6,
        messages=segmenter.messages + messages,
    )


def _model_resolution(
    what: str, geometry: Geometry, shape: tuple[int, int], bundle: ModelBundle, path: Path | None = None
) -> tuple[tuple[float, float] | None, str | None]:
    """(rows, columns) resampling factors to the model's pixel size, and the line that says so
    (both spacings when pixels are not square); a factor beyond the resampling bound is
    refused naming `path` (a wrong spacing, not a scan to resample hundreds of times)."""
    sx, sy, _ = geometry.spacing
    model_spacing = model_mm_per_pixel(bundle)
    factors = resampling_factors((sx, sy), model_spacing, path)
    if model_spacing is None:
        if geometry.is_square:
            return None, None
        return None, (
            f"{what}: pixels are {sx:g} x {sy:g} mm (width x height), not square, and the model records no "
            "pixel size: it sees them as they are"
        )
    if factors is None:
        return None, None
    run_h, run_w = resampled_shape(shape, factors)
    if geometry.is_square:
        return factors, (
            f"{what}: resampling from {sx:g} to the model's {model_spacing:g} mm/px ({run_w}x{run_h} px) and back"
        )
    return factors, (
        f"{what}: pixels are {sx:g} x {sy:g} mm (width x height), not square: resampling to the model's "
        f"{model_spacing:g} x {model_spacing:g} mm ({run_w}x{run_h} px) and the labels back onto the "
        f"{shape[1]}x{shape[0]} px input grid"
    )


def _overlay_name(netcdf: Path) -> Path:
    return netcdf.with_name(netcdf.stem + "_overlay.png")


def _commit_section(outputs: Sequence[AtomicOutput], target: Path, overwrite: bool) -> tuple[Path, Path | None]:
    """Give a section's files their final names, together: the netCDF and its overlay keep
    matching names (S_2.nc, S_2_overlay.png). Without overwrite nothing is replaced: the first
    number whose names are all free is taken, atomically against other runs."""
    if overwrite:
        names = [output.commit() for output in outputs]
    else:
        names = commit_unique(
            outputs, lambda n: [numbered(target, n), _overlay_name(numbered(target, n))][: len(outputs)]
        )
    return names[0], (names[1] if len(names) > 1 else None)


def _discard_all(outputs: Sequence[AtomicOutput]) -> None:
    for output in outputs:
        output.discard()


#: Columns resampled at a time when a turned XP is read (bounds the memory of one read).
_ALIGN_COLUMNS = 512
#: Smallest image side (px) on which the PP/XP check is made: on smaller images chance
#: correlation peaks are as strong as real ones.
MIN_CHECK_SIDE = 256


def check_xp_alignment(pp: RasterSource, xp: RasterSource, where: Path | None = None) -> XpAlignment | None:
    """Where XP sits on the PP grid (`estimate_xp_alignment`), measured on the central window
    (at most `WINDOW` px square) of both images so that a gigapixel section is never read whole;
    None for images under `MIN_CHECK_SIDE` px a side, too small for the check to tell.

    A pair whose match is too weak to trust, or whose two halves disagree once aligned, is
    refused, naming `where`: an XP photograph of another section (a pairing slip) would
    otherwise be segmented in silence."""
    (h, w), (hx, wx) = pp.shape, xp.shape
    if (h, w) != (hx, wx):
        raise ThinSegError(f"PP is {w}x{h} px but XP {xp.name} is {wx}x{hx} px; they must be the same size", where)
    if min(h, w) < MIN_CHECK_SIDE:
        return None
    sh, sw = min(h, WINDOW), min(w, WINDOW)
    y0, x0 = (h - sh) // 2, (w - sw) // 2
    pp_window, xp_window = pp.read(y0, y0 + sh, x0, x0 + sw), xp.read(y0, y0 + sh, x0, x0 + sw)
    found = estimate_xp_alignment(pp_window, xp_window)
    why = None
    if not found.reliable:
        why = f"score {found.score:.1f}, below {MIN_SCORE:g}"
    elif not _halves_agree(pp_window, found.apply(xp_window)):
        why = f"score {found.score:.1f}, but the left and right halves do not line up alike"
    if why is not None:
        raise ThinSegError(
            f"PP {pp.name} and XP {xp.name} do not match ({why}): is this XP image of the same section? "
            "(--no-align segments them as they are)",
            where,
        )
    if found.angle_deg == 0 or (sh, sw) == (h, w):
        return found
    # the window's turn is about its own centre: move it to the image centre c (see XpAlignment)
    rot = _rotation(found.angle_deg)
    centre = (np.array([h, w], float) - 1) / 2
    window_centre = np.array([y0, x0], float) + (np.array([sh, sw], float) - 1) / 2
    dy, dx = np.array([found.dy, found.dx]) + (rot - np.eye(2)) @ (centre - window_centre)
    return replace(found, dy=round(float(dy), 2), dx=round(float(dx), 2))


def _halves_agree(pp: np.ndarray, aligned_xp: np.ndarray) -> bool:
    """Whether the left and right halves of an aligned XP each sit on PP within a pixel: a real
    match holds everywhere, a chance correlation peak of unrelated images does not."""
    half = pp.shape[1] // 2
    for cols in (slice(0, half), slice(half, None)):
        dy, dx, _peak = estimate_xp_offset(pp[:, cols], aligned_xp[:, cols])
        if abs(dy) > 1 or abs(dx) > 1:
            return False
    return True


def _rotation(angle_deg: float) -> np.ndarray:
    """The (y, x) rotation matrix of `XpAlignment`."""
    theta = np.deg2rad(angle_deg)
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


class AlignedXpSource:
    """An XP image read onto the PP grid region by region: what `XpAlignment.apply` gives for
    the whole image (uncovered pixels black), without holding the whole XP in memory. A shift
    reads the shifted region; a turn reads, per block of columns, the bounding box of the
    turned region and resamples it bilinearly."""

    def __init__(self, source: RasterSource, alignment: XpAlignment) -> None:
        self.source, self.alignment = source, alignment
        self.shape: tuple[int, int] = (int(source.shape[0]), int(source.shape[1]))
        self.name = source.name
        self.mm_per_pixel = source.mm_per_pixel
        self.origin_mm = source.origin_mm

    @property
    def path(self) -> Path | None:
        return self.source.path

    def close(self) -> None:
        self.source.close()

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> npt.NDArray[np.uint8]:
        y0, y1, x0, x1 = check_region(self.shape, y0, y1, x0, x1)
        a = self.alignment
        out = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        if a.angle_deg == 0:
            self._shifted(out, y0, x0, int(a.dy), int(a.dx))
            return out
        for cx0 in range(x0, x1, _ALIGN_COLUMNS):
            cx1 = min(x1, cx0 + _ALIGN_COLUMNS)
            out[:, cx0 - x0 : cx1 - x0] = self._turned(y0, y1, cx0, cx1)
        return out

    def _shifted(self, out: np.ndarray, y0: int, x0: int, dy: int, dx: int) -> None:
        h, w = self.shape
        th, tw = out.shape[:2]
        sy0, sy1 = max(0, y0 + dy), min(h, y0 + th + dy)
        sx0, sx1 = max(0, x0 + dx), min(w, x0 + tw + dx)
        if sy0 < sy1 and sx0 < sx1:
            out[sy0 - y0 - dy : sy1 - y0 - dy, sx0 - x0 - dx : sx1 - x0 - dx] = self.source.read(sy0, sy1, sx0, sx1)

    def _turned(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """out[p] = xp[R (p - c) + c + d] over rows y0:y1, columns x0:x1 (p, c, d in (y, x))."""
        a, (h, w) = self.alignment, self.shape
        rot = _rotation(a.angle_deg)
        centre = (np.array([h, w], float) - 1) / 2
        shift = centre - rot @ centre + np.array([a.dy, a.dx])
        corners = np.array([[y, x] for y in (y0, y1 - 1) for x in (x0, x1 - 1)], float)
        mapped = corners @ rot.T + shift
        sy0, sx0 = (max(0, int(np.floor(v)) - 1) for v in mapped.min(axis=0))
        sy1, sx1 = min(h, int(np.ceil(mapped[:, 0].max())) + 2), min(w, int(np.ceil(mapped[:, 1].max())) + 2)
        out = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        if sy0 >= sy1 or sx0 >= sx1:
            return out
        region = self.source.read(sy0, sy1, sx0, sx1)
        # out[q] = region[R q + offset] with q local to the target block
        offset = rot @ np.array([y0, x0], float) + shift - np.array([sy0, sx0], float)
        for c in range(3):
            out[..., c] = ndimage.affine_transform(
                region[..., c], rot, offset, output_shape=out.shape[:2], order=1, mode="constant", cval=0
            )
        return out


class _TeeSource:
    """Passes reads through and hands the pixels not seen before to a netCDF image writer.

    The engine reads overlapping bands top to bottom (a wide band in windows from left to
    right; a wide section in column stripes, each top to bottom), so every pixel passes by at
    least once: the input is decoded once for both segmentation and the netCDF copy. Each
    column remembers how far down it has been copied.
    """

    def __init__(self, source: RasterSource, sink: RgbRowWriter, band_rows: int = 512) -> None:
        self.source, self.sink = source, sink
        self.shape: tuple[int, int] = (int(source.shape[0]), int(source.shape[1]))
        self.name = source.name
        self.band_rows = band_rows
        self._copied = np.zeros(self.shape[1], np.int64)  # per column: rows above this are copied

    @property
    def next_row(self) -> int:
        """Rows above this one are copied in every column."""
        return int(self._copied.min()) if self.shape[1] else self.shape[0]

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> np.ndarray:
        band = self.source.read(y0, y1, x0, x1)
        self._copy(np.asarray(band), y0, x0)
        return band

    def _copy(self, band: np.ndarray, y0: int, x0: int) -> None:
        """Copy the pixels of `band` (read at (y0, x0)) that continue their column's copy."""
        y1, x1 = y0 + band.shape[0], x0 + band.shape[1]
        copied = self._copied[x0:x1]
        go_on = (copied >= y0) & (copied < y1)
        if not go_on.any():
            return
        # runs of columns copied down to the same row: one window each
        marks = np.where(go_on, copied, -1)
        edges = np.flatnonzero(np.diff(marks)) + 1
        for a, b in zip([0, *edges.tolist()], [*edges.tolist(), len(marks)]):
            start = int(marks[a])
            if start >= 0:
                self.sink.write_window(start, x0 + a, np.ascontiguousarray(band[start - y0 :, a:b]))
        copied[go_on] = y1

    def copy_ahead(self) -> bool:
        """Copy the next rows not yet seen (`band_rows` of them, in windows of at most
        READ_WIDTH columns); False once every row is copied. For a section whose labels are made
        elsewhere (on a cluster): the copy is then done while waiting for them, not after."""
        height, width = self.shape
        y0 = self.next_row
        if y0 >= height:
            return False
        y1 = min(height, y0 + self.band_rows)
        for x0 in range(0, width, READ_WIDTH):
            x1 = min(width, x0 + READ_WIDTH)
            if (self._copied[x0:x1] < y1).any():
                self._copy(np.asarray(self.source.read(y0, y1, x0, x1)), y0, x0)
        return True

    def finish(self) -> None:
        """Copy whatever rows the engine did not read (only with unusual read patterns)."""
        while self.copy_ahead():
            pass


def _start_images(
    writer: NetcdfWriter, section: SectionInput, opened: _OpenedSection
) -> tuple[str | None, list[Source], list[_TeeSource]]:
    """Put the input images in the output: copies of a netCDF input's variables, or PP/XP
    variables filled while they are segmented. Returns (reference name, sources, tees)."""
    aligned = opened.sources[-1] if isinstance(opened.sources[-1], AlignedXpSource) else None
    if section.netcdf is not None:
        # an aligned XP replaces the input's XP variable (same name) on the PP grid
        names: list[str] = []
        sources: list[Source] = list(opened.sources)
        tees: list[_TeeSource] = []
        for name, window in opened.copies:
            if aligned is not None and name == aligned.name:
                tees.append(_TeeSource(aligned, _begin_aligned_xp(writer, name, aligned, opened.geometry)))
                names.append(tees[-1].sink.name)
            else:
                names.append(writer.copy_variable(section.netcdf, name, window=window))
        if aligned is not None and not tees:
            tees.append(_TeeSource(aligned, _begin_aligned_xp(writer, aligned.name, aligned, opened.geometry)))
        if tees:
            sources[-1] = tees[0]
        return _reference_name(opened, names), sources, tees
    tees = []
    paths = [section.pp, section.xp]
    for source, path in zip(opened.sources, paths):
        assert path is not None  # an image section has a file for each opened source
        if isinstance(source, AlignedXpSource):
            image = _begin_aligned_xp(writer, path_text(path.stem), source, opened.geometry)
        else:
            image = writer.begin_rgb_image(path_text(path.stem), source.shape, geometry=opened.geometry)
        tees.append(_TeeSource(source, image))
    return tees[0].sink.name, list(tees), tees


def _begin_aligned_xp(writer: NetcdfWriter, name: str, xp: AlignedXpSource, geometry: Geometry) -> RgbRowWriter:
    """The output's XP variable: the XP image as the model saw it, moved onto the PP grid, with
    an attribute saying how far it was moved."""
    a = xp.alignment
    moved = f"dy {a.dy:+g}, dx {a.dx:+g} px, angle {a.angle_deg:+g} deg, score {a.score:.1f}"
    attrs = {"thinseg_xp_alignment": f"{moved}: resampled onto the PP grid (uncovered pixels black)"}
    return writer.begin_rgb_image(name, xp.shape, attrs=attrs, geometry=geometry)


class _SectionSink:
    """Where a section's finished rows go while it is segmented: the labelmap (and confidence)
    variables of the output, the class counts of the modal mineralogy, and, for the overlay,
    the rows and columns its preview picks. Nothing the size of the section is kept."""

    def __init__(
        self, labels: BandRowWriter, confidence: BandRowWriter | None, n_classes: int, shape: tuple[int, int]
    ) -> None:
        self.labels, self.confidence, self.n_classes, self.shape = labels, confidence, n_classes, shape
        self.counts = np.zeros(n_classes + 1, np.int64)
        self.preview: npt.NDArray[np.uint8] | None = None
        self._rows = self._cols = np.zeros(0, np.int64)

    def keep_preview(self, shape: tuple[int, int]) -> None:
        """Also keep the labels at `shape`, picked as `labels_to_grid` picks them (nearest)."""
        self.preview = np.zeros(shape, np.uint8)
        self._rows = nearest_index(shape[0], self.shape[0])
        self._cols = nearest_index(shape[1], self.shape[1])

    def write_rows(
        self, y0: int, labels: npt.NDArray[np.uint8], confidence: npt.NDArray[np.uint8] | None, x0: int = 0
    ) -> None:
        self.labels.write_rows(y0, labels, x0)
        if self.confidence is not None and confidence is not None:
            self.confidence.write_rows(y0, confidence, x0)
        self.counts += class_pixel_counts(labels, self.n_classes)
        if self.preview is not None:
            picked = picked_window(self._rows, self._cols, y0, x0, labels.shape)
            if picked is not None:
                part = picked.take(labels)
                self.preview[picked.y0 : picked.y0 + part.shape[0], picked.x0 : picked.x0 + part.shape[1]] = part

    def finish(self) -> None:
        """Check that every row arrived."""
        self.labels.finish()
        if self.confidence is not None:
            self.confidence.finish()


def _begin_outputs(
    writer: NetcdfWriter,
    bundle: ModelBundle,
    opened: _OpenedSection,
    base: str,
    reference: str | None,
    with_confidence: bool,
) -> _SectionSink:
    """The labelmap (and confidence) variables, created now and filled as rows are finished."""
    shape = (int(opened.sources[0].shape[0]), int(opened.sources[0].shape[1]))
    labels = writer.begin_labelmap(
        f"{base}_Segmentation",
        shape,
        bundle.class_table,
        reference=reference,
        attrs={"thinseg_model": bundle.title},
        geometry=opened.geometry,
    )
    confidence = None
    if with_confidence:
        confidence = writer.begin_scalar_image(
            f"{base}_Confidence",
            shape,
            np.uint8,
            attrs={"description": "max softmax probability x 255", "reference": reference or ""},
            geometry=opened.geometry,
        )
    return _SectionSink(labels, confidence, len(bundle.class_table), shape)


def _reference_name(opened: _OpenedSection, copied_names: list[str]) -> str | None:
    """The copied variable that is the PP image (its original name is the source's name)."""
    pp_name = opened.sources[0].name
    for (original, _window), copied in zip(opened.copies, copied_names):
        if original == pp_name:
            return copied
    return copied_names[0] if copied_names else None


def _write_overlay(
    path: Path,
    pp_source: RasterSource,
    labels: np.ndarray,
    bundle: ModelBundle,
    mineralogy: ModalMineralogy,
    title: str,
) -> None:
    pp_preview = read_preview(pp_source, MAX_OVERLAY_SIDE)
    write_overlay_png(path, pp_preview, labels, bundle.class_table, [a.percent for a in mineralogy.areas], title)


def segment_sections(
    sections: Sequence[SectionInput],
    segmenter: Segmenter,
    options: SegmentOptions,
    output: Path,
    progress: ProgressFactory | None = None,
    cancel: CancelFn | None = None,
    on_result: Callable[[SectionResult], None] | None = None,
    on_failure: Callable[[SectionInput, ThinSegError], None] | None = None,
) -> tuple[list[SectionResult], list[tuple[SectionInput, ThinSegError]]]:
    """Segment many sections; a bad section is reported and the batch goes on. A netCDF file
    holding several sections gives one output per section (see `plan_sections`)."""
    planned, failures = plan_batch(sections, options, segmenter.bundle, output, on_failure)
    results: list[SectionResult] = []
    for section in planned:
        result, failure = run_section(section, segmenter, options, output, progress, cancel)
        if failure is not None:
            failures.append((section, failure))
            if on_failure is not None:
                on_failure(section, failure)
        elif result is not None:
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results, failures


def plan_batch(
    sections: Sequence[SectionInput],
    options: SegmentOptions,
    bundle: ModelBundle,
    output: Path,
    on_failure: Callable[[SectionInput, ThinSegError], None] | None = None,
) -> tuple[list[SectionInput], list[tuple[SectionInput, ThinSegError]]]:
    """The sections a batch segments (`plan_sections` of each input) and the inputs that could
    not be planned (reported, the batch goes on); an output file given for several sections is
    refused."""
    single_file = is_single_file(output)
    if single_file and len(sections) > 1:
        raise ThinSegError(f"--output is one file but {len(sections)} sections were given; give a folder", output)
    failures: list[tuple[SectionInput, ThinSegError]] = []
    planned: list[SectionInput] = []
    for section in sections:
        try:
            planned.extend(plan_sections(section, options, bundle))
        except Exception as error:  # the section boundary: whatever one section raises
            failure = _with_cause(ThinSegError.from_exception(error, section.primary), error)
            failures.append((section, failure))
            if on_failure is not None:
                on_failure(section, failure)
    if single_file and len(planned) > 1:
        names = ", ".join(s.name for s in planned)
        raise ThinSegError(
            f"--output is one file but {planned[0].primary.name} holds {len(planned)} sections ({names}); "
            "give a folder, or choose one with --section",
            output,
        )
    return planned, failures


def run_section(
    section: SectionInput,
    segmenter: Segmenter,
    options: SegmentOptions,
    output: Path,
    progress: ProgressFactory | None = None,
    cancel: CancelFn | None = None,
    run_id: str | None = None,
    streamer: SectionStreamer = stream_at_model_resolution,
) -> tuple[SectionResult | None, ThinSegError | None]:
    """One planned section of a batch into `output` (a folder, or the one .nc file): its result,
    or the one-line failure that stopped it (the section boundary: the batch goes on)."""
    target = output_paths(section, output, options.overwrite, is_single_file(output))
    try:
        return segment_section(section, segmenter, options, target, progress, cancel, run_id, streamer), None
    except Exception as error:  # the section boundary: the batch goes on without it
        # (its files were written under temporary names, removed on the way out)
        return None, _with_cause(_section_failure(error, section, target), error)


def _with_cause(failure: ThinSegError, error: Exception) -> ThinSegError:
    """`failure` remembering the exception it stands for (its traceback, for THINSEG_DEBUG)."""
    if failure is not error:
        failure.__cause__ = error
    return failure


def _section_failure(error: Exception, section: SectionInput, target: Path) -> ThinSegError:
    """One line for whatever stopped a section, naming a file: a system error while writing
    names the output, any other failure the section's input."""
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
        filename = getattr(error, "filename", None)
        if filename is None or Path(filename).parent == target.parent:
            return ThinSegError.from_os_error(error, "cannot write the output", target)
    return ThinSegError.from_exception(error, section.primary)


def plan_sections(section: SectionInput, options: SegmentOptions, bundle: ModelBundle) -> list[SectionInput]:
    """The sections to segment for one input: an image pair as it is; a netCDF file once per
    section it holds (`netcdf_layout`), or the ones `options.sections` names.

    A file with one section keeps the file's name for its output; with several, each section
    is named after itself ("S2" for "S2_PP"). For a model that needs XP, a PP image without an
    XP image is left out with a note when the file has other, complete sections; so is an XP
    image that no PP image is named like."""
    path = section.netcdf
    if path is None:
        return [section]
    try:
        layout = netcdf_layout(path, options.pp_pattern, options.xp_pattern)
    except ThinSegError:
        return [section]  # opening it again fails with the same message, reported for this section
    found = layout.sections
    needs_xp = len(bundle.input_names) > 1
    complete = [s for s in found if s.xp is not None] if needs_xp else list(found)
    several = len(complete) > 1
    names = dict(zip([s.pp for s in complete], _unique_names([s.name for s in complete])))
    notes = tuple(
        f"{path.name}: {s.pp} not segmented: model {bundle.title!r} needs an XP image and none is named like it"
        for s in found
        if s not in complete
    ) + tuple(f"{path.name}: {xp} not segmented: no PP image is named like it" for xp in layout.spare_xp)
    if options.sections:
        wanted = set(options.sections)
        chosen = [s for s in found if s.name in wanted or s.pp in wanted]
        if not chosen:
            every = ", ".join(f"{s.name} ({s.pp})" for s in found)
            raise ThinSegError(f"no section named {', '.join(sorted(wanted))} here (sections: {every or 'none'})", path)
        found, complete, notes = chosen, [s for s in complete if s in chosen], ()
    if not found:
        return [section]
    if not complete or not several:
        first: NetcdfSection = complete[0] if complete else found[0]
        return [_pinned(section.name, path, first, notes, False)]
    return [_pinned(names[s.pp], path, s, notes if k == 0 else (), True) for k, s in enumerate(complete)]


def _pinned(name: str, path: Path, found: NetcdfSection, notes: tuple[str, ...], several: bool) -> NetcdfSectionInput:
    return NetcdfSectionInput(
        name=name, netcdf=path, pp_variable=found.pp, xp_variable=found.xp, notes=notes, one_of_several=several
    )


def _unique_names(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in out:
            candidate, n = f"{name}_{n}", n + 1
        out.append(candidate)
    return out


def is_single_file(output: Path) -> bool:
    """Whether `output` names one netCDF file (one section) rather than a folder."""
    return output.suffix.lower() == ".nc"


def write_modal_mineralogy(results: Sequence[SectionResult], output: Path, overwrite: bool = False) -> Path:
    """The batch's modal mineralogy CSV. A folder keeps one table, OUTPUT/modal_mineralogy.csv,
    that every run updates (`update_mineralogy_table`), one row block per netCDF written, named
    after it: a section written again with `overwrite` replaces its rows; without, its new
    numbered netCDF (S_1.nc) adds rows "S_1". A single .nc output gets <file>_fractions.csv
    beside it (an existing one a free numbered name unless `overwrite`). Returns the path written."""
    if is_single_file(output):
        netcdf = results[0].netcdf
        path = netcdf.with_name(netcdf.stem + "_fractions.csv")
        return write_mineralogy_csv(path, [r.mineralogy for r in results], overwrite=overwrite)
    named = [dataclasses.replace(r.mineralogy, section=path_text(r.netcdf.stem)) for r in results]
    with file_lock(output / MINERALOGY_CSV):  # runs in parallel each add their rows
        return update_mineralogy_table(output / MINERALOGY_CSV, named, overwrite=overwrite)


@dataclass
class SegmentRun:
    """A batch run of `segment_files`: the model, what pairing refused, and what was made.

    `segmenter` is None when pairing left nothing to segment (then nothing was written)."""

    bundle: ModelBundle
    model_dir: Path
    sections: list[SectionInput]
    problems: list[PairingProblem]
    segmenter: Segmenter | None = None
    results: list[SectionResult] = field(default_factory=list)
    failures: list[tuple[SectionInput, ThinSegError]] = field(default_factory=list)
    mineralogy_csv: Path | None = None

    @property
    def failed(self) -> list[tuple[Path, str]]:
        """(file, problem) for every input that produced nothing: refused by pairing or failed."""
        refused = [(p.path, p.problem) for p in self.problems]
        return refused + [(section.primary, error.problem) for section, error in self.failures]


def segment_files(
    inputs: Sequence[str | Path],
    options: SegmentOptions,
    output: Path,
    model_dir: Path | None = None,
    *,
    on_start: Callable[[SegmentRun], None] | None = None,
    progress: ProgressFactory | None = None,
    cancel: CancelFn | None = None,
    on_result: Callable[[SectionResult], None] | None = None,
    on_failure: Callable[[SectionInput, ThinSegError], None] | None = None,
) -> SegmentRun:
    """Segment image/netCDF files or folders with a model (the bundled one by default): the use
    case behind `thinseg segment` and the Slicer logic's batch call. Pairs the inputs, builds one
    segmenter, segments every section (a bad one is reported and the batch goes on) and writes
    the batch's modal mineralogy table. `on_start` sees the run once the segmenter is built,
    before the first section. With `options.cluster` every section runs as one task on that Dask
    cluster (`thinseg.pipelines.cluster.segment_on_cluster`), with the same callbacks."""
    if options.cluster is not None:
        # deferred: the cluster path needs dask (an optional extra) and imports this module
        from thinseg.pipelines.cluster import segment_on_cluster

        return segment_on_cluster(
            inputs,
            options,
            output,
            model_dir,
            on_start=on_start,
            progress=progress,
            cancel=cancel,
            on_result=on_result,
            on_failure=on_failure,
        )
    run = prepare_run(inputs, options, output, model_dir)
    if not run.sections:
        return run
    run.segmenter = Segmenter(run.bundle, options.inference)
    folder = output.parent if is_single_file(output) else output
    run.segmenter.messages.extend(sweep_stale_temporaries(folder).notes(folder))
    if on_start is not None:
        on_start(run)
    run.results, run.failures = segment_sections(
        run.sections, run.segmenter, options, output, progress, cancel, on_result, on_failure
    )
    if run.results:
        run.mineralogy_csv = write_modal_mineralogy(run.results, output, options.overwrite)
    return run


def prepare_run(
    inputs: Sequence[str | Path], options: SegmentOptions, output: Path, model_dir: Path | None = None
) -> SegmentRun:
    """What a batch starts from: the model (the bundled one by default) loaded and checked, the
    output folder proven writable, and the inputs paired into sections (no segmenter yet)."""
    model_dir = model_dir or default_model_dir()
    if options.mm_per_pixel is not None:
        check_mm_per_pixel(options.mm_per_pixel, "--mm-per-pixel")  # image files' pixel size, before any work
    bundle = load_bundle(model_dir)
    check_thin_section_model(bundle)
    ensure_writable_dir(output.parent if is_single_file(output) else output)
    sections, problems = pair_inputs(
        inputs,
        pp_pattern=options.pp_pattern,
        xp_pattern=options.xp_pattern,
        needs_xp=len(bundle.input_names) > 1,
        xp=options.xp,
        xp_dir=options.xp_dir,
    )
    return SegmentRun(bundle, Path(model_dir), sections, problems)
