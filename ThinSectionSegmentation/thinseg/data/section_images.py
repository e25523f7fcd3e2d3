"""The PP and XP photographs of one thin section, opened from an image pair or a GeoSlicer netCDF file.

Segmentation, evaluation, registration and section preparation all start from the same two
images: the plane-polarised (PP) one, which fixes the pixel grid, and optionally the
cross-polarised (XP) one. They come either as two image files (PNG/JPEG/TIFF) or as two RGB
variables of a netCDF file, found by their affixes ("S12_PP", "S12_XP") or named outright.
`open_ppxp` is the one way to open them: lazily, for region reads, with the grid (pixel size,
origin, axis directions) a netCDF file records. `read_ppxp` reads both whole for registration,
which works on complete images, and finds an XP image file beside its PP image by affix.

A netCDF file may hold several sections ("S1_PP", "S1_XP", "S2_PP", ...): `netcdf_sections`
lists them, so that none is left out because another came first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

from thinseg.errors import ThinSegError
from thinseg.io.images import RasterSource, open_image
from thinseg.io.netcdf import (
    Geometry,
    NetcdfImageSource,
    Window,
    find_image_variable,
    list_variables,
    open_netcdf_image,
)
from thinseg.io.pairing import NETCDF_SUFFIXES, SectionInput, find_affix, pair_inputs, section_base_name
from thinseg.limits import check_mm_per_pixel

#: Pixel size (mm) assumed for PNG/JPEG/TIFF inputs, which record none: the default of the
#: GeoSlicer thin-section tools the bundled model was trained with.
DEFAULT_MM_PER_PIXEL = 0.00132


def is_netcdf(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a netCDF file (by its suffix)."""
    return Path(path).suffix.lower() in NETCDF_SUFFIXES


@dataclass
class PpXpSources:
    """A section's PP image and optional XP image, open for region reads until `close()`.

    `pp_variable`/`xp_variable` name the netCDF variables they came from (None for image
    files). The grid (pixel size, RAS origin, axes) is the PP image's: known for netCDF
    variables only.
    """

    path: Path
    pp: RasterSource
    xp: RasterSource | None
    pp_variable: str | None = None
    xp_variable: str | None = None

    @property
    def mm_per_pixel(self) -> float | None:
        return self.pp.mm_per_pixel

    @property
    def origin_mm(self) -> tuple[float, float, float] | None:
        return self.pp.origin_mm

    @property
    def geometry(self) -> Geometry | None:
        """The PP image's IJK-to-RAS grid (netCDF variables only): what outputs lie on."""
        return self.pp.geometry if isinstance(self.pp, NetcdfImageSource) else None

    @property
    def pp_window(self) -> Window | None:
        """Where the PP image lies in its stored array (netCDF only; smaller when padding was cropped)."""
        return self.pp.window if isinstance(self.pp, NetcdfImageSource) else None

    def close(self) -> None:
        for source in (self.xp, self.pp):
            if source is not None:
                source.close()

    def __enter__(self) -> PpXpSources:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_ppxp(
    pp: str | os.PathLike[str],
    xp: str | os.PathLike[str] | None = None,
    *,
    pp_pattern: str = "PP",
    xp_pattern: str | None = "XP",
    variables: Mapping[str, str] | None = None,
    with_xp: bool = True,
    crop_padding: bool = False,
) -> PpXpSources:
    """Open the PP image `pp` (an image file or a netCDF file) and, if `with_xp`, its XP image.

    The XP image is the file `xp` when given; otherwise, in a netCDF file, the RGB variable named
    `variables["XP"]` or, without `variables`, the one whose name carries `xp_pattern` (and is
    not the PP variable). It is None when there is none: whether that is an error is the
    caller's to say. The PP variable is `variables["PP"]` or found by `pp_pattern`; a netCDF
    file without one is refused. Sizes are not compared here (callers word that themselves).

    `crop_padding` reads a netCDF PP image the way GeoSlicer imports it: without a `transform`
    (a "same coordinate system" export) its padding rows and columns are left out and its grid
    starts at the first pixel kept (see `padding_window`). An XP image stored on the same grid
    is read over the same rows and columns, so it stays on the PP grid pixel for pixel.
    """
    path = Path(pp)
    pp_var = xp_var = None
    if is_netcdf(path):
        named = dict(variables or {})
        pp_var = named.get("PP") or find_image_variable(path, pp_pattern)
        if pp_var is None:
            raise ThinSegError(f"no PP image: no RGB variable whose name contains '{pp_pattern}'", path)
        if with_xp and xp is None:
            if variables is not None:
                xp_var = named.get("XP")
            elif xp_pattern:
                xp_var = find_image_variable(path, xp_pattern)
            if xp_var == pp_var:
                xp_var = None
    with ExitStack() as stack:
        pp_source: RasterSource
        if pp_var is not None:
            pp_nc = open_netcdf_image(path, pp_var, crop_padding=crop_padding)
            stack.callback(pp_nc.close)
            pp_source = pp_nc
        else:
            pp_source = open_image(path, role="PP image")
            stack.callback(pp_source.close)
        xp_source: RasterSource | None = None
        if with_xp and xp is not None:
            xp_source = open_image(xp, role="XP image")
        elif xp_var is not None:
            shared = crop_padding and _same_stored_grid(path, pp_var, xp_var)
            window = pp_nc.window if shared else None
            xp_source = open_netcdf_image(path, xp_var, window=window, crop_padding=crop_padding)
        stack.pop_all()  # opened: the caller closes them
    return PpXpSources(path, pp_source, xp_source, pp_var, xp_var)


def _same_stored_grid(path: Path, first: str | None, second: str) -> bool:
    """Whether two variables share one stored grid without `transform` (the shared z/y/x of a
    "same coordinate system" export): then the same rows and columns are the same place."""
    infos = {v.name: v for v in list_variables(path)}
    a, b = infos.get(first or ""), infos.get(second)
    if a is None or b is None or not (a.on_shared_grid and b.on_shared_grid):
        return False
    return a.dims[:3] == b.dims[:3] and a.shape[:3] == b.shape[:3]


@dataclass(frozen=True)
class NetcdfSection:
    """One thin section stored in a netCDF file: its PP image variable and XP one, if any.

    `name` is the PP variable without its affix ("S2_PP" -> "S2")."""

    name: str
    pp: str
    xp: str | None


@dataclass(frozen=True)
class NetcdfLayout:
    """The sections of a netCDF file and the XP images none of them takes ("S2_XP" without an
    "S2_PP"): those cannot be segmented, and saying so spares the user looking for them."""

    sections: list[NetcdfSection]
    spare_xp: list[str]


def netcdf_sections(
    path: str | os.PathLike[str], pp_pattern: str = "PP", xp_pattern: str | None = "XP"
) -> list[NetcdfSection]:
    """Every section of a netCDF file, in file order (see `netcdf_layout`)."""
    return netcdf_layout(path, pp_pattern, xp_pattern).sections


def netcdf_layout(path: str | os.PathLike[str], pp_pattern: str = "PP", xp_pattern: str | None = "XP") -> NetcdfLayout:
    """Every section of a netCDF file, in file order, and the XP images left over.

    Each RGB variable carrying `pp_pattern` as a token ("S1_PP", not "APPLE") is a section; its
    XP image is the RGB variable named the same with `xp_pattern` instead ("S1_XP"). When
    exactly one PP image has no such counterpart, it takes the first XP image left over if it
    is the file's only PP image or that XP image is the only one left. Other XP images carrying
    `xp_pattern` that no section takes are `spare_xp`. Without any token match, the first RGB
    variable containing `pp_pattern` is the only section. No sections when the file has no PP
    image.
    """
    path = Path(path)
    rgb = [v.name for v in list_variables(path) if v.kind == "rgb"]
    pps = [name for name in rgb if find_affix(name, pp_pattern) is not None]
    if not pps:
        pp = find_image_variable(path, pp_pattern)
        if pp is None:
            return NetcdfLayout([], [])
        xp = find_image_variable(path, xp_pattern) if xp_pattern else None
        return NetcdfLayout([NetcdfSection(_section_name(pp, pp_pattern), pp, xp if xp != pp else None)], [])
    xps = [name for name in rgb if name not in pps and xp_pattern and find_affix(name, xp_pattern) is not None]
    by_lower = {name.lower(): name for name in xps}
    paired: dict[str, str | None] = {}
    for pp in pps:
        match = find_affix(pp, pp_pattern)
        wanted = pp[: match.start()] + xp_pattern + pp[match.end() :] if match is not None and xp_pattern else None
        paired[pp] = by_lower.get(wanted.lower()) if wanted is not None else None
    left = [name for name in xps if name not in paired.values()]
    unpaired = [pp for pp in pps if paired[pp] is None]
    if left and len(unpaired) == 1 and (len(pps) == 1 or len(left) == 1):
        paired[unpaired[0]] = left.pop(0)
    sections = [NetcdfSection(_section_name(pp, pp_pattern), pp, paired[pp]) for pp in pps]
    return NetcdfLayout(sections, left)


def _section_name(variable: str, pp_pattern: str) -> str:
    return section_base_name(SectionInput(name=variable), pp_pattern)


def output_stem(pp_path: str | os.PathLike[str], pp_pattern: str) -> str:
    """'ABC_3200.5_PP.tif' -> 'ABC_3200.5': the section name that output files start with."""
    path = Path(pp_path)
    return section_base_name(SectionInput(name=path.stem, pp=path), pp_pattern)


@dataclass
class PpXpImages:
    """A section's PP and optional XP read whole (registration works on complete images).

    `mm_per_pixel` is the pixel size to use (given, else the file's, else the default);
    `origin_mm` the PP image's RAS origin when a netCDF file records it; `xp_note` one line
    saying where the XP image came from, or why there is none.
    """

    pp: npt.NDArray[np.uint8]
    xp: npt.NDArray[np.uint8] | None
    mm_per_pixel: float
    origin_mm: tuple[float, float, float] | None
    xp_note: str | None


def read_ppxp(
    pp: str | os.PathLike[str],
    xp: str | os.PathLike[str] | None = None,
    *,
    pp_pattern: str = "PP",
    xp_pattern: str = "XP",
    mm_per_pixel: float | None = None,
) -> PpXpImages:
    """Read PP and XP whole. Without `xp`, the XP is the netCDF variable carrying `xp_pattern`,
    or the image file named like PP with `xp_pattern` for its affix, beside it; a section
    without one is read with PP alone (`xp_note` says why). XP must be the size of PP. A given
    `mm_per_pixel` outside the sane range is refused before anything is read."""
    path = Path(pp)
    if mm_per_pixel is not None:
        check_mm_per_pixel(mm_per_pixel, "--mm-per-pixel")
    if not path.exists():
        raise ThinSegError("PP image file not found", path)
    xp_path = Path(xp) if xp is not None else None
    note = None
    if xp_path is None and not is_netcdf(path):
        xp_path, why = _xp_beside(path, pp_pattern, xp_pattern)
        if xp_path is None:
            note = f"XP: none found ({why}); registering with PP alone"
    with open_ppxp(path, xp_path, pp_pattern=pp_pattern, xp_pattern=xp_pattern) as images:
        if xp_path is not None:
            note = f"XP: {xp_path}"
        elif images.xp_variable is not None:
            note = f"XP: variable {images.xp_variable} of {path.name}"
        elif is_netcdf(path):
            note = f"XP: none (no RGB variable of {path.name} contains '{xp_pattern}'); registering with PP alone"
        if images.xp is not None and tuple(images.xp.shape) != tuple(images.pp.shape):
            (h, w), (hx, wx) = images.pp.shape, images.xp.shape
            raise ThinSegError(f"PP is {w}x{h} px but XP is {wx}x{hx} px; they must be the same size", xp_path or path)
        pp_array = _read_whole(images.pp)
        xp_array = _read_whole(images.xp) if images.xp is not None else None
        file_mm, origin = images.mm_per_pixel, images.origin_mm
    return PpXpImages(pp_array, xp_array, float(mm_per_pixel or file_mm or DEFAULT_MM_PER_PIXEL), origin, note)


def _xp_beside(path: Path, pp_pattern: str, xp_pattern: str) -> tuple[Path | None, str]:
    """The XP image file paired with the PP image `path` by affix, or (None, why not)."""
    sections, problems = pair_inputs([path], pp_pattern=pp_pattern, xp_pattern=xp_pattern, needs_xp=True)
    found = sections[0] if sections else None
    if found is not None and found.pp is not None and found.xp is not None and found.pp.resolve() == path.resolve():
        return found.xp, ""
    return None, problems[0].problem if problems else f"{path.name} is not named as a PP image"


def _read_whole(source: RasterSource) -> npt.NDArray[np.uint8]:
    return np.asarray(source.read(0, source.shape[0], 0, source.shape[1]), dtype=np.uint8)
