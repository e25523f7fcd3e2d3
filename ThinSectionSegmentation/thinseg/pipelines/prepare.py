"""Build a GeoSlicer netCDF training section from PP, XP and a label image on the PP grid.

The work behind `thinseg prepare`. The label image holds codes; a class file (`value,name,color`,
see `thinseg.classes.files`) names them. XP is checked against PP and aligned when the two
photographs are offset (a stage shift, or a small stage rotation), so that the six input
channels show the same grain at each pixel. The section file and a preview picture (label
outlines over PP and over the aligned XP) are written together or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

import thinseg
from thinseg.classes.files import read_value_classes
from thinseg.classes.table import ClassTable
from thinseg.data.section_images import PpXpImages, output_stem, read_ppxp
from thinseg.data.sections import read_label_image
from thinseg.errors import ThinSegError, failures_named
from thinseg.io.netcdf import NetcdfWriter
from thinseg.limits import path_text
from thinseg.pipelines.outputs import OutputSet, safe_file_name
from thinseg.registration.output import boundary_overlay
from thinseg.registration.ppxp import XpAlignment, estimate_xp_alignment

#: Longest side of the preview picture's panels.
PREVIEW_SIDE = 800


@dataclass
class PrepareOptions:
    """What to build; the defaults are those of `thinseg prepare`.

    `xp` None: the XP image is found beside PP by `xp_pattern`. `pp_only`: a section without
    XP. `align`: check XP against PP and move it onto PP when offset. `name` None: the PP file
    name without its affix. `mm_per_pixel` None: from a netCDF file, else the default.
    """

    pp: Path
    labels: Path
    classes: Path
    output: Path = Path("results")
    xp: Path | None = None
    pp_pattern: str = "PP"
    xp_pattern: str = "XP"
    pp_only: bool = False
    align: bool = True
    name: str | None = None
    mm_per_pixel: float | None = None
    overwrite: bool = False


@dataclass
class PreparedFiles:
    """A written training section: its name, labels and classes, the XP alignment (None when
    not checked or no XP) and the files written."""

    name: str
    labels: npt.NDArray[np.uint8]
    table: ClassTable
    alignment: XpAlignment | None
    has_xp: bool
    written: list[Path]
    notes: list[str] = field(default_factory=list)  # e.g. temporaries of interrupted runs swept


def prepare_files(
    options: PrepareOptions, *, on_inputs: Callable[[PpXpImages, bool], None] | None = None
) -> PreparedFiles:
    """Check, read, align and write (see the module doc). Existing outputs are refused before any
    work unless overwrite. `on_inputs(images, has_xp)` sees PP/XP before XP is aligned. Any
    failure is a ThinSegError (naming the PP image when nothing more precise is known)."""
    with failures_named(options.pp):
        return _prepare_files(options, on_inputs)


def _prepare_files(options: PrepareOptions, on_inputs: Callable[[PpXpImages, bool], None] | None) -> PreparedFiles:
    if options.mm_per_pixel is not None and not options.mm_per_pixel > 0:
        raise ThinSegError(f"--mm-per-pixel must be > 0, got {options.mm_per_pixel}")
    classes = read_value_classes(options.classes)
    # text: bytes of a file name that are not UTF-8 become \\xNN in the variable names
    name = path_text(options.name or output_stem(options.pp, options.pp_pattern))
    stem = safe_file_name(name)
    outputs = OutputSet(options.output, options.overwrite)
    nc_tmp, png_tmp = outputs.add(f"{stem}.nc"), outputs.add(f"{stem}_prepared.png")
    outputs.check()

    if options.pp_only and options.xp is not None:
        raise ThinSegError("--pp-only builds a section without XP: leave out --xp")
    images = read_ppxp(
        options.pp,
        options.xp,
        pp_pattern=options.pp_pattern,
        xp_pattern=options.xp_pattern,
        mm_per_pixel=options.mm_per_pixel,
    )
    codes = read_label_image(options.labels)
    if codes.shape != images.pp.shape[:2]:
        raise ThinSegError(
            f"label image is {codes.shape[1]}x{codes.shape[0]} px but PP is "
            f"{images.pp.shape[1]}x{images.pp.shape[0]} px: it must be on the PP grid "
            "(for a QEMSCAN map use `thinseg register`)",
            options.labels,
        )
    labels = classes.apply(codes, options.labels)
    pp, xp = images.pp, (None if options.pp_only else images.xp)
    if xp is None and not options.pp_only:
        raise ThinSegError(
            f"no XP image found ({images.xp_note}); give --xp, or --pp-only for a PP-only section", options.pp
        )

    alignment = None
    if on_inputs is not None:
        on_inputs(images, xp is not None)
    if xp is not None and images.xp_note and options.align:
        alignment = estimate_xp_alignment(pp, xp)
        xp = alignment.apply(xp)
    try:
        _write_section(nc_tmp, name, pp, xp, labels, classes.table, images.mm_per_pixel, alignment, options)
        with failures_named(outputs.path(f"{stem}_prepared.png"), "cannot write the output"):
            _write_preview(png_tmp, pp, xp, labels, classes.table)
        written = outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    return PreparedFiles(name, labels, classes.table, alignment, xp is not None, written, outputs.notes)


def _write_section(
    path: Path,
    name: str,
    pp: npt.NDArray[np.uint8],
    xp: npt.NDArray[np.uint8] | None,
    labels: npt.NDArray[np.uint8],
    table: ClassTable,
    mm_per_pixel: float,
    alignment: XpAlignment | None,
    options: PrepareOptions,
) -> None:
    record = {
        "pp": str(options.pp),
        "xp": str(options.xp) if options.xp else None,
        "labels": str(options.labels),
        "classes": str(options.classes),
        "xp_alignment": alignment.as_dict() if alignment else None,
    }
    attrs = {"thinseg_version": thinseg.__version__, "thinseg_prepare": json.dumps(record)}
    shown_as = options.output / f"{safe_file_name(name)}.nc"  # what a failed write names: not the temporary
    with NetcdfWriter(path, attrs=attrs, shown_as=shown_as) as writer:
        pp_var = writer.add_rgb_image(f"{name}_PP", pp, mm_per_pixel)
        if xp is not None:
            writer.add_rgb_image(f"{name}_XP", xp, mm_per_pixel)
        writer.add_labelmap(f"{name}_labels", labels, table, mm_per_pixel, reference=pp_var)


def _write_preview(
    path: Path,
    pp: npt.NDArray[np.uint8],
    xp: npt.NDArray[np.uint8] | None,
    labels: npt.NDArray[np.uint8],
    table: ClassTable,
) -> None:
    """Label outlines over PP and over the aligned XP, side by side: misalignment shows at a glance."""
    step = max(1, int(np.ceil(max(pp.shape[:2]) / PREVIEW_SIDE)))
    small = labels[::step, ::step]
    panels = [boundary_overlay(np.ascontiguousarray(pp[::step, ::step]), small, table)]
    if xp is not None:
        panels.append(boundary_overlay(np.ascontiguousarray(xp[::step, ::step]), small, table))
    gap = np.full((small.shape[0], 8, 3), 255, np.uint8)
    row = panels[0] if len(panels) == 1 else np.concatenate([panels[0], gap, panels[1]], axis=1)
    Image.fromarray(row).save(path, format="PNG")
