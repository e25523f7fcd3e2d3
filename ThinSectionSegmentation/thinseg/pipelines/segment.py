"""Segment sections end to end: open inputs, run the model, write GeoSlicer netCDF + reports.

This is the library call behind `thinseg segment` and the Slicer logic's batch mode. Each
section either produces all of its files or none (temporary names, renamed at the end).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import thinseg
from thinseg.errors import ThinSegError
from thinseg.inference.engine import CancelFn, InferenceOptions, Segmenter
from thinseg.inference.resample import ResampledSource, labels_to_grid, nearest_index, needs_resampling
from thinseg.io.atomic import atomic_output, free_output_path
from thinseg.io.images import open_image
from thinseg.io.netcdf import NetcdfWriter, find_image_variable, list_variables, open_netcdf_image
from thinseg.io.pairing import SectionInput, section_base_name
from thinseg.reports.mineralogy import ModalMineralogy, modal_mineralogy
from thinseg.reports.overlay import preview_shape, write_overlay_png

#: The seed tool's default pixel size for PNG/JPEG/TIFF inputs (no spacing in those files).
DEFAULT_MM_PER_PIXEL = 0.00132


@dataclass
class SegmentOptions:
    pp_pattern: str = "PP"
    xp_pattern: str | None = "XP"
    mm_per_pixel: float = DEFAULT_MM_PER_PIXEL
    overwrite: bool = False
    probabilities: bool = False
    overlay: bool = False
    inference: InferenceOptions = field(default_factory=InferenceOptions)


@dataclass
class SectionResult:
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


def check_thin_section_model(bundle) -> None:
    """Refuse, naming the model, a bundle whose inputs are not one RGB PP image and optionally one
    RGB XP image (what a thin section provides), before any section is read."""
    inputs = list(zip(bundle.input_names, bundle.input_channels))
    if 1 <= len(inputs) <= 2 and all(channels == 3 for _, channels in inputs):
        return
    described = ", ".join(f"{name} ({channels} channel{'' if channels == 1 else 's'})" for name, channels in inputs)
    raise ThinSegError(
        f"model {bundle.title!r} needs {described}; thin sections give an RGB (3-channel) PP image "
        "and optionally an RGB XP image",
        bundle.path,
    )


@dataclass
class _OpenedSection:
    sources: list  # in the model's input order
    mm_per_pixel: float
    origin_mm: tuple[float, float, float]
    netcdf_variables: list[str]  # variables to copy unchanged (netCDF inputs)


def open_section(section: SectionInput, bundle, options: SegmentOptions, stack: ExitStack) -> _OpenedSection:
    """Open the section's images in the model's input order, closing them via `stack`."""
    needs_xp = len(bundle.input_names) > 1
    if section.netcdf is not None:
        return _open_netcdf_section(section.netcdf, bundle, options, needs_xp, stack)
    assert section.pp is not None
    pp = stack.enter_context(_closing(open_image(section.pp, role="PP image")))
    sources = [pp]
    if needs_xp:
        if section.xp is None:
            raise ThinSegError("this model needs an XP image and none was found", section.pp)
        xp = stack.enter_context(_closing(open_image(section.xp, role="XP image")))
        if tuple(xp.shape) != tuple(pp.shape):
            raise ThinSegError(
                f"PP is {pp.shape[1]}x{pp.shape[0]} px but XP {section.xp.name} is {xp.shape[1]}x{xp.shape[0]} px; they must be the same size",
                section.pp,
            )
        sources.append(xp)
    return _OpenedSection(sources, options.mm_per_pixel, (0.0, 0.0, 0.0), [])


def _open_netcdf_section(
    path: Path, bundle, options: SegmentOptions, needs_xp: bool, stack: ExitStack
) -> _OpenedSection:
    variables = list_variables(path)
    pp_name = find_image_variable(path, options.pp_pattern)
    if pp_name is None:
        raise ThinSegError(f"no PP image: no RGB variable whose name contains '{options.pp_pattern}'", path)
    pp = stack.enter_context(_closing(open_netcdf_image(path, pp_name)))
    sources = [pp]
    if needs_xp:
        xp_name = find_image_variable(path, options.xp_pattern) if options.xp_pattern else None
        if xp_name is None or xp_name == pp_name:
            raise ThinSegError(f"no XP image: no RGB variable whose name contains '{options.xp_pattern}'", path)
        xp = stack.enter_context(_closing(open_netcdf_image(path, xp_name)))
        if tuple(xp.shape) != tuple(pp.shape):
            raise ThinSegError(f"PP variable {pp_name} and XP variable {xp_name} differ in size", path)
        sources.append(xp)
    spacing = pp.mm_per_pixel if pp.mm_per_pixel else options.mm_per_pixel
    origin = tuple(pp.origin_mm) if pp.origin_mm is not None else (0.0, 0.0, 0.0)
    keep = [v.name for v in variables if v.kind in ("rgb", "labelmap", "segmentation", "scalar")]
    return _OpenedSection(sources, float(spacing), origin, keep)  # type: ignore[arg-type]


class _closing:
    """Context manager calling .close() on sources that have it."""

    def __init__(self, obj) -> None:
        self.obj = obj

    def __enter__(self):
        return self.obj

    def __exit__(self, *exc) -> None:
        close = getattr(self.obj, "close", None)
        if close is not None:
            close()


def output_paths(section: SectionInput, output: Path, overwrite: bool, single_file: bool) -> Path:
    """Where this section's netCDF goes; an existing file gets a free numbered name unless overwrite."""
    target = output if single_file else output / f"{section.name}.nc"
    return target if overwrite else free_output_path(target)


def segment_section(
    section: SectionInput,
    segmenter: Segmenter,
    options: SegmentOptions,
    target: Path,
    progress: ProgressFactory | None = None,
    cancel: CancelFn | None = None,
) -> SectionResult:
    """Segment one section and write its netCDF (and overlay) atomically."""
    bundle = segmenter.bundle
    start = time.perf_counter()
    messages: list[str] = []
    with ExitStack() as stack:
        opened = open_section(section, bundle, options, stack)
        sources = opened.sources
        height, width = sources[0].shape
        base = section_base_name(section, options.pp_pattern)
        attrs = {"thinseg_version": thinseg.__version__, "thinseg_model": bundle.title}
        overlay_path = None
        if options.overlay:
            overlay_path = target.with_name(target.stem + "_overlay.png")
            if not options.overwrite:
                overlay_path = free_output_path(overlay_path)
        # Every file of the section is written under a temporary name and renamed only when all
        # are complete: an error or Ctrl-C while writing the overlay must not leave the netCDF.
        outputs = [atomic_output(target)] + ([atomic_output(overlay_path)] if overlay_path is not None else [])
        stack.callback(lambda: [output.discard() for output in outputs])  # no-op once committed
        with NetcdfWriter(outputs[0].tmp, attrs=attrs) as writer:
            reference, run_sources, tees = _start_images(writer, section, opened)
            model_spacing = 1.0 / bundle.pixels_per_mm if bundle.pixels_per_mm else None
            if model_spacing is not None and needs_resampling(opened.mm_per_pixel, model_spacing):
                factor = opened.mm_per_pixel / model_spacing
                run_sources = [ResampledSource(s, factor) for s in run_sources]
                messages.append(
                    f"{section.primary.name}: resampling from {opened.mm_per_pixel:g} to the model's "
                    f"{model_spacing:g} mm/px ({run_sources[0].shape[1]}x{run_sources[0].shape[0]} px) and back"
                )
            callback = progress(section.name, height * width) if progress is not None else None
            result = segmenter.segment(run_sources, progress=callback, cancel=cancel)
            for tee in tees:
                tee.finish()
            labels, confidence = result.labels, result.confidence
            if labels.shape != (height, width):
                labels = labels_to_grid(labels, (height, width))
                confidence = labels_to_grid(confidence, (height, width)) if confidence is not None else None
            _add_outputs(writer, bundle, opened, base, reference, labels, confidence)
        mineralogy = modal_mineralogy(section.name, labels, bundle.class_table, opened.mm_per_pixel)
        if overlay_path is not None:
            _write_overlay(outputs[1].tmp, sources[0], labels, bundle, mineralogy, section.name)
        for output in outputs:
            output.commit()
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


class _TeeSource:
    """Passes reads through and hands rows not seen before to a netCDF row writer.

    The engine reads overlapping full-width bands top to bottom, so every row passes by at
    least once: the input is decoded once for both segmentation and the netCDF copy.
    """

    def __init__(self, source, sink, band_rows: int = 512) -> None:
        self.source, self.sink = source, sink
        self.shape = tuple(source.shape)
        self.name = getattr(source, "name", None)
        self.next_row = 0
        self.band_rows = band_rows

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> np.ndarray:
        band = self.source.read(y0, y1, x0, x1)
        full_width = x0 == 0 and (x1 is None or x1 == self.shape[1])
        if full_width and y0 <= self.next_row < y1:
            self.sink.write_rows(self.next_row, np.asarray(band[self.next_row - y0 :]))
            self.next_row = y1
        return band

    def finish(self) -> None:
        """Copy whatever rows the engine did not read (only with unusual read patterns)."""
        height, width = self.shape
        while self.next_row < height:
            y1 = min(height, self.next_row + self.band_rows)
            self.sink.write_rows(self.next_row, np.asarray(self.source.read(self.next_row, y1, 0, width)))
            self.next_row = y1


def _start_images(writer: NetcdfWriter, section: SectionInput, opened: _OpenedSection):
    """Put the input images in the output: copies of a netCDF input's variables, or PP/XP
    variables filled while they are segmented. Returns (reference name, sources, tees)."""
    spacing, origin = opened.mm_per_pixel, opened.origin_mm
    if section.netcdf is not None:
        names = [writer.copy_variable(section.netcdf, name) for name in opened.netcdf_variables]
        return _reference_name(opened, names), list(opened.sources), []
    tees = []
    paths = [section.pp, section.xp]
    for source, path in zip(opened.sources, paths):
        image = writer.begin_rgb_image(path.stem, tuple(source.shape), spacing, origin)
        tees.append(_TeeSource(source, image))
    return tees[0].sink.name, list(tees), tees


def _add_outputs(
    writer: NetcdfWriter, bundle, opened: _OpenedSection, base: str, reference, labels, confidence
) -> None:
    spacing, origin = opened.mm_per_pixel, opened.origin_mm
    writer.add_labelmap(
        f"{base}_Segmentation",
        labels,
        bundle.class_table,
        spacing,
        origin,
        reference=reference,
        attrs={"thinseg_model": bundle.title},
    )
    if confidence is not None:
        writer.add_scalar_image(
            f"{base}_Confidence",
            confidence,
            spacing,
            origin,
            attrs={"description": "max softmax probability x 255", "reference": reference or ""},
        )


def _reference_name(opened: _OpenedSection, copied_names: list[str]) -> str | None:
    """The copied variable that is the PP image (its original name is the source's name)."""
    pp_name = getattr(opened.sources[0], "name", None)
    for original, copied in zip(opened.netcdf_variables, copied_names):
        if original == pp_name:
            return copied
    return copied_names[0] if copied_names else None


def _write_overlay(path: Path, pp_source, labels: np.ndarray, bundle, mineralogy: ModalMineralogy, title: str) -> None:
    shape = preview_shape(pp_source.shape)
    pp_preview = _preview(pp_source, shape)
    write_overlay_png(path, pp_preview, labels, bundle.class_table, [a.percent for a in mineralogy.areas], title)


def _preview(source, shape: tuple[int, int], band_rows: int = 2048) -> np.ndarray:
    """Downsampled RGB preview built band by band (never the whole gigapixel image at once)."""
    height, width = source.shape
    if (height, width) == shape:
        return np.asarray(source.read(0, height, 0, width))
    rows = nearest_index(shape[0], height)
    cols = nearest_index(shape[1], width)
    out = np.empty((shape[0], shape[1], 3), np.uint8)
    for y0 in range(0, height, band_rows):
        y1 = min(height, y0 + band_rows)
        sel = np.nonzero((rows >= y0) & (rows < y1))[0]
        if sel.size:
            band = source.read(y0, y1, 0, width)
            out[sel] = band[rows[sel] - y0][:, cols]
    return out


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
    """Segment many sections; a bad section is reported and the batch goes on."""
    single_file = output.suffix.lower() == ".nc"
    if single_file and len(sections) > 1:
        raise ThinSegError(f"--output is one file but {len(sections)} sections were given; give a folder", output)
    results: list[SectionResult] = []
    failures: list[tuple[SectionInput, ThinSegError]] = []
    for section in sections:
        try:
            target = output_paths(section, output, options.overwrite, single_file)
            result = segment_section(section, segmenter, options, target, progress, cancel)
        except (ThinSegError, OSError) as error:  # OSError: a full disk, a vanished folder, ...
            if isinstance(error, OSError):
                fallback = output if single_file else output / f"{section.name}.nc"
                error = ThinSegError.from_os_error(error, "cannot write the output", fallback)
            failures.append((section, error))
            if on_failure is not None:
                on_failure(section, error)
            continue
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results, failures
