"""Volume nodes <-> numpy arrays, for thin sections placed anywhere in the scene (no Qt).

A thin section is a single-slice volume: a PP/XP photograph (RGB vector volume, uint8), a
labelmap (uint8) or a scalar image. GeoSlicer builds them as arrays (1, H, W[, 3]) (order K, J,
I[, C], as slicer.util.arrayFromVolume) with IJK-to-RAS directions diag(-1, -1, 1), so that
pixel (i, j) lies at RAS origin + (-i * s, -j * s, 0) and the axial view shows the array as it
is. Volumes made otherwise (slicer.util.addVolumeFromArray gives identity directions; a
GeoSlicer image may be a single slice along J) show the same photograph flipped, transposed or
in another view.

The core works on the *picture*: the photograph as Slicer shows it in the view looking at the
slice (axial, coronal or sagittal), rows going down the screen and columns to the right. A
`SectionGrid` maps a node's voxels to that picture and back exactly (a transpose and flips,
no resampling), so results written back with `write_picture` land voxel for voxel on the
node's own grid (same IJK-to-RAS, same extent). A volume turned off the R/A/S axes gives the
picture of the slice view nearest to it, and its results too lie on its own voxels. Volumes
that are not single slices are refused with one clear message (`ThinSegError`), never a VTK
warning.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import vtk
from vtk.util import numpy_support

from thinseg.errors import ThinSegError

#: IJK-to-RAS directions of GeoSlicer thin-section nodes (rows = RAS axes, columns = IJK axes).
THIN_SECTION_DIRECTIONS = np.diag([-1.0, -1.0, 1.0])
#: Slicer gives image files without a pixel size a spacing of exactly 1 mm.
UNKNOWN_SPACING_MM = 1.0
_TOLERANCE = 1e-6

#: Slicer's default slice views by the RAS axis (0 = R, 1 = A, 2 = S) a slice is normal to:
#: (view name, RAS direction of the screen's right, RAS direction of the screen's down). These
#: are the columns of vtkMRMLSliceNode's Axial/Coronal/Sagittal slice-to-RAS presets (x to the
#: right, y up), so a section looks here as it looks in Slicer.
SLICE_VIEWS = {
    2: ("axial", (-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    1: ("coronal", (-1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    0: ("sagittal", (0.0, -1.0, 0.0), (0.0, 0.0, -1.0)),
}
_RAS = "RAS"


def _vtk_to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras_matrix(node) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return _vtk_to_numpy(m)


# -- the picture of a single-slice volume -------------------------------------------------------


@dataclass(frozen=True)
class SectionGrid:
    """How a single-slice volume's voxels form the picture Slicer shows (rows down, columns right).

    `row_axis`, `column_axis`, `slice_axis` are IJK axes (0 = I, 1 = J, 2 = K); `flip_rows` /
    `flip_columns` say whether picture rows/columns run against them. `picture_to_ras` maps
    (column, row, 0, 1) of the picture to RAS, like an IJK-to-RAS matrix of the picture.
    """

    name: str
    dimensions: tuple[int, int, int]  # I, J, K sizes
    ijk_to_ras: np.ndarray
    view: str  # "axial" | "coronal" | "sagittal"
    row_axis: int
    column_axis: int
    slice_axis: int
    flip_rows: bool
    flip_columns: bool

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the picture."""
        return self.dimensions[self.row_axis], self.dimensions[self.column_axis]

    @property
    def picture_to_ijk(self) -> np.ndarray:
        m = np.zeros((4, 4))
        m[self.column_axis, 0] = -1.0 if self.flip_columns else 1.0
        m[self.column_axis, 3] = self.dimensions[self.column_axis] - 1.0 if self.flip_columns else 0.0
        m[self.row_axis, 1] = -1.0 if self.flip_rows else 1.0
        m[self.row_axis, 3] = self.dimensions[self.row_axis] - 1.0 if self.flip_rows else 0.0
        m[self.slice_axis, 2] = 1.0
        m[3, 3] = 1.0
        return m

    @property
    def picture_to_ras(self) -> np.ndarray:
        return self.ijk_to_ras @ self.picture_to_ijk

    @property
    def spacing_yx(self) -> tuple[float, float]:
        """Pixel size (mm) down the rows and across the columns of the picture."""
        spacing = np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)
        return float(spacing[self.row_axis]), float(spacing[self.column_axis])

    @property
    def is_square(self) -> bool:
        sy, sx = self.spacing_yx
        return abs(sy - sx) <= _TOLERANCE * max(sx, sy, 1e-12)

    @property
    def mm_per_pixel(self) -> float:
        """The pixel size of square pixels (for others: the side of a square of the same area)."""
        sy, sx = self.spacing_yx
        return sx if self.is_square else math.sqrt(sx * sy)

    @property
    def origin(self) -> tuple[float, float, float]:
        """RAS position of the centre of picture pixel (0, 0)."""
        x, y, z = (float(v) for v in self.picture_to_ras[:3, 3])
        return x, y, z

    def _numpy_axes(self) -> tuple[int, int, int]:
        # arrays are (K, J, I[, C]): IJK axis a is numpy axis 2 - a
        return 2 - self.row_axis, 2 - self.column_axis, 2 - self.slice_axis

    def picture(self, voxels: np.ndarray) -> np.ndarray:
        """(K, J, I[, C]) voxels -> (H, W[, C]) picture (a copy)."""
        expected = tuple(reversed(self.dimensions))
        if tuple(voxels.shape[:3]) != expected:
            raise ValueError(f"'{self.name}': voxels {voxels.shape[:3]} do not match the grid {expected}")
        picture = np.moveaxis(voxels, self._numpy_axes(), (0, 1, 2))[:, :, 0]
        if self.flip_rows:
            picture = picture[::-1]
        if self.flip_columns:
            picture = picture[:, ::-1]
        return np.ascontiguousarray(picture)

    def voxels(self, picture: np.ndarray) -> np.ndarray:
        """(H, W[, C]) picture -> (K, J, I[, C]) voxels of this grid (a copy)."""
        data = np.asarray(picture)
        if tuple(data.shape[:2]) != self.shape:
            raise ValueError(
                f"'{self.name}': a {data.shape[1]}x{data.shape[0]} picture does not fit its "
                f"{self.shape[1]}x{self.shape[0]} grid"
            )
        if self.flip_rows:
            data = data[::-1]
        if self.flip_columns:
            data = data[:, ::-1]
        return np.ascontiguousarray(np.moveaxis(data[:, :, np.newaxis], (0, 1, 2), self._numpy_axes()))


def _ras_axes(directions: np.ndarray, name: str, what: str) -> list[int]:
    """The RAS axis each IJK direction runs along, or runs closest to for a volume turned off the
    R/A/S axes: its picture is then the one Slicer's nearest slice view shows, and results still
    land on its own voxels. ThinSegError for degenerate directions."""
    magnitude = np.abs(directions)
    if np.linalg.matrix_rank(directions, tol=_TOLERANCE) < 3:
        raise ThinSegError(f"{what} '{name}' has degenerate IJK-to-RAS directions (two axes point the same way)")
    best = max(itertools.permutations(range(3)), key=lambda axes: sum(magnitude[r, c] for c, r in enumerate(axes)))
    return list(best)


def section_grid(node, what: str = "image") -> SectionGrid:
    """How `node`'s voxels form its picture; ThinSegError if it holds no image or several slices."""
    image = node.GetImageData() if node is not None else None
    name = node.GetName() if node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise ThinSegError(f"{what} '{name}' holds no image data")
    ni, nj, nk = (int(v) for v in image.GetDimensions())
    dims = (ni, nj, nk)
    matrix = ijk_to_ras_matrix(node)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if not np.all(spacing > 0) or not np.all(np.isfinite(matrix)):
        raise ThinSegError(f"{what} '{name}' has a zero or invalid pixel size ({', '.join(f'{v:g}' for v in spacing)})")
    ras_axes = _ras_axes(matrix[:3, :3] / spacing, name, what)
    flat = [a for a in (2, 1, 0) if dims[a] == 1]  # K first: GeoSlicer's usual single slice
    if not flat:
        raise ThinSegError(
            f"{what} '{name}' has {dims[2]} slices of {dims[0]}x{dims[1]} px; a thin section is a single slice"
        )
    slice_axis = flat[0]
    view, right, down = SLICE_VIEWS[ras_axes[slice_axis]]
    in_plane = [a for a in range(3) if a != slice_axis]
    column_axis = next(a for a in in_plane if ras_axes[a] == int(np.argmax(np.abs(right))))
    row_axis = next(a for a in in_plane if a != column_axis)
    column_sign = matrix[ras_axes[column_axis], column_axis] * sum(right)
    row_sign = matrix[ras_axes[row_axis], row_axis] * sum(down)
    return SectionGrid(
        name=name,
        dimensions=dims,
        ijk_to_ras=matrix,
        view=view,
        row_axis=row_axis,
        column_axis=column_axis,
        slice_axis=slice_axis,
        flip_rows=bool(row_sign < 0),
        flip_columns=bool(column_sign < 0),
    )


def require_square_pixels(grid: SectionGrid, what: str, purpose: str) -> SectionGrid:
    if not grid.is_square:
        sy, sx = grid.spacing_yx
        raise ThinSegError(
            f"{what} '{grid.name}' has {sx:g} x {sy:g} mm pixels (width x height); {purpose} needs square pixels"
        )
    return grid


def require_thin_section_geometry(node, what: str = "volume") -> SectionGrid:
    """The node's picture grid, if it is a single slice with square pixels (else ThinSegError);
    any flip, transposition, rotation, view and origin is accepted."""
    return require_square_pixels(section_grid(node, what), what, "this step")


def resampling_messages(
    name: str, spacing_y: float, spacing_x: float, model_mm_per_pixel: float | None, resampled: object
) -> list[str]:
    """What to tell the user about the pixel size a section is segmented at (`resampled`: the
    resampling factor(s), None when the picture is used as it is)."""
    square = abs(spacing_y - spacing_x) <= _TOLERANCE * max(spacing_x, spacing_y)
    if not square and model_mm_per_pixel:
        return [
            f"'{name}' has {spacing_x:g} x {spacing_y:g} mm pixels (width x height): resampled to the model's "
            f"square {model_mm_per_pixel:g} mm pixels and the labels mapped back onto its own grid"
        ]
    if not square:
        return [
            f"'{name}' has {spacing_x:g} x {spacing_y:g} mm pixels (width x height) and the model gives no pixel "
            "size: it sees them as square pixels, stretched"
        ]
    if resampled is not None and model_mm_per_pixel:
        return [f"resampled from {spacing_x:g} to the model's {model_mm_per_pixel:g} mm/px and back"]
    return []


def set_thin_section_geometry(
    node, mm_per_pixel: float, origin_mm=(0.0, 0.0, 0.0), z_spacing: float | None = None
) -> None:
    """Spacing, origin and directions as GeoSlicer sets them on a thin-section node."""
    s = float(mm_per_pixel)
    node.SetSpacing(s, s, s if z_spacing is None else float(z_spacing))
    node.SetOrigin(*(float(v) for v in origin_mm))
    node.SetIJKToRASDirections(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def copy_geometry(source, target) -> None:
    """Same grid placement (spacing, origin, directions) as `source`."""
    matrix = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(matrix)
    target.SetIJKToRASMatrix(matrix)


# -- arrays -------------------------------------------------------------------------------------


def volume_array(node) -> np.ndarray:
    """A copy of the voxels as (K, J, I) or (K, J, I, C), like slicer.util.arrayFromVolume."""
    image = node.GetImageData() if node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise ThinSegError(f"volume '{node.GetName() if node is not None else None}' holds no image data")
    i, j, k = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    comps = scalars.GetNumberOfComponents()
    data = numpy_support.vtk_to_numpy(scalars)
    shape = (k, j, i) if comps == 1 else (k, j, i, comps)
    return np.array(data.reshape(shape), copy=True)


def picture_array(node, what: str = "image") -> np.ndarray:
    """The node's picture (H, W) or (H, W, C), as Slicer shows it (a copy)."""
    grid = section_grid(node, what)
    return grid.picture(volume_array(node))


def rgb_array(node, what: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 picture of an RGB(A) volume (alpha dropped)."""
    array = picture_array(node, what)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ThinSegError(
            f"{what} '{node.GetName()}' is not an RGB image (it has {1 if array.ndim == 2 else array.shape[2]} "
            "component(s)); load the photograph as a colour (vector) volume"
        )
    if array.dtype != np.uint8:
        raise ThinSegError(f"{what} '{node.GetName()}' is {array.dtype}; 8-bit RGB is expected")
    return np.ascontiguousarray(array[..., :3])


def label_array(node, what: str = "labelmap") -> np.ndarray:
    """(H, W) uint8 picture of a labelmap (or integer scalar) volume (values 0..255)."""
    array = picture_array(node, what)
    if array.ndim != 2:
        raise ThinSegError(f"{what} '{node.GetName()}' has {array.shape[-1]} components; a labelmap has one")
    if array.dtype != np.uint8:
        if array.dtype.kind not in "iub" or (array.size and (array.min() < 0 or array.max() > 255)):
            raise ThinSegError(f"{what} '{node.GetName()}' has values outside 0..255 ({array.dtype})")
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def scalar_array(node, what: str = "image") -> np.ndarray:
    """(H, W) picture of a single-component volume, dtype kept."""
    array = picture_array(node, what)
    if array.ndim != 2:
        raise ThinSegError(f"{what} '{node.GetName()}' has several components; a single-channel image is expected")
    return np.ascontiguousarray(array)


def update_volume(node, array: np.ndarray) -> None:
    """Replace the node's voxels by a deep copy of `array` ((K, J, I) or (K, J, I, C));
    geometry (spacing, origin, directions) is left unchanged."""
    data = np.ascontiguousarray(array)
    if data.ndim not in (3, 4):
        raise ValueError(f"expected (K, J, I) or (K, J, I, C), got shape {data.shape}")
    comps = 1 if data.ndim == 3 else data.shape[3]
    k, j, i = data.shape[:3]
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    vtk_array = numpy_support.numpy_to_vtk(data.reshape(-1, comps) if comps > 1 else data.reshape(-1), deep=True)
    vtk_array.SetNumberOfComponents(comps)
    vtk_array.SetName("ImageScalars")
    image.GetPointData().SetScalars(vtk_array)
    node.SetAndObserveImageData(image)
    node.Modified()


def write_picture(node, picture: np.ndarray, reference) -> None:
    """Give `node` `reference`'s grid (IJK-to-RAS, extent, parent transform) and voxels holding
    `picture` ((H, W[, C]) as `reference` is shown), so that voxel (i, j, k) of `node` is the
    picture pixel that voxel (i, j, k) of `reference` shows."""
    grid = section_grid(reference, "reference image")
    data = np.asarray(picture)
    if tuple(data.shape[:2]) != grid.shape:
        raise ThinSegError(
            f"the result is {data.shape[1]}x{data.shape[0]} px but '{grid.name}' is {grid.shape[1]}x{grid.shape[0]} px"
        )
    copy_geometry(reference, node)
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    update_volume(node, grid.voxels(data))


def _as_slices(array: np.ndarray, components: int | None) -> np.ndarray:
    data = np.asarray(array)
    expected = 2 if components is None else 3
    if data.ndim == expected:
        data = data[np.newaxis]
    if data.ndim != expected + 1 or data.shape[0] != 1:
        raise ValueError(f"expected a single-slice array, got shape {data.shape}")
    if components is not None and data.shape[-1] != components:
        raise ValueError(f"expected {components} components, got shape {data.shape}")
    return data


def create_rgb_volume(
    scene, name: str, rgb: np.ndarray, mm_per_pixel: float | None = None, origin_mm=(0.0, 0.0, 0.0), reference=None
):
    """A vtkMRMLVectorVolumeNode, uint8 RGB, with a display node: on `reference`'s grid (`rgb`
    is then its picture) or, without one, (1, H, W, 3) with GeoSlicer geometry."""
    data = _as_slices(rgb, 3)
    if data.dtype != np.uint8:
        raise ValueError(f"RGB images must be uint8, got {data.dtype}")
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", name)
    _fill(node, data, mm_per_pixel, origin_mm, reference)
    node.CreateDefaultDisplayNodes()
    return node


def create_scalar_volume(
    scene, name: str, array: np.ndarray, mm_per_pixel: float | None = None, origin_mm=(0.0, 0.0, 0.0), reference=None
):
    """A vtkMRMLScalarVolumeNode with a grey display: on `reference`'s grid (`array` is then its
    picture) or, without one, (1, H, W) with GeoSlicer geometry."""
    data = _as_slices(array, None)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    _fill(node, data, mm_per_pixel, origin_mm, reference)
    display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
    grey = scene.GetNodeByID("vtkMRMLColorTableNodeGrey")
    if grey is not None:
        display.SetAndObserveColorNodeID(grey.GetID())
    display.AutoWindowLevelOn()
    node.SetAndObserveDisplayNodeID(display.GetID())
    return node


def _fill(node, slices: np.ndarray, mm_per_pixel: float | None, origin_mm, reference) -> None:
    """Voxels and geometry of a new node from a (1, H, W[, C]) array; the node is removed again
    if the array does not fit `reference`."""
    if reference is not None:
        try:
            write_picture(node, slices[0], reference)
        except BaseException:
            node.GetScene().RemoveNode(node)
            raise
        return
    if mm_per_pixel is None:
        node.GetScene().RemoveNode(node)
        raise ValueError("give mm_per_pixel or a reference volume")
    set_thin_section_geometry(node, mm_per_pixel, origin_mm)
    update_volume(node, slices)


def is_rgb_volume(node) -> bool:
    """True for volumes whose voxels have 3 or 4 uint8 components (PP/XP photographs)."""
    if node is None or not node.IsA("vtkMRMLVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        return False
    image = node.GetImageData()
    if image is None:
        return False
    return image.GetNumberOfScalarComponents() in (3, 4) and image.GetScalarType() == vtk.VTK_UNSIGNED_CHAR
