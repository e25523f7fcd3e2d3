"""Volume nodes <-> numpy arrays with GeoSlicer's thin-section geometry (no Qt).

GeoSlicer keeps a thin section as a single-slice volume:
- PP/XP: vtkMRMLVectorVolumeNode, uint8, array (1, H, W, 3) (slicer.util.arrayFromVolume order
  K, J, I, C), isotropic spacing in mm;
- labelmaps: vtkMRMLLabelMapVolumeNode, uint8 (1, H, W);
- IJK-to-RAS directions diag(-1, -1, 1) (identity in LPS), so pixel (i, j) lies at
  RAS = origin + (-i * s, -j * s, 0).

These helpers copy data in and out exactly (deep copies, no resampling) and refuse volumes the
core cannot use with one clear message (`ThinSegError`), never a VTK warning.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class NodeGeometry:
    """Spacing (x, y, z) in mm, RAS origin, 3x3 IJK-to-RAS directions of a volume node."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    directions: np.ndarray

    @property
    def mm_per_pixel(self) -> float:
        return float(self.spacing[0])

    @property
    def is_isotropic_xy(self) -> bool:
        return abs(self.spacing[0] - self.spacing[1]) <= _TOLERANCE * max(self.spacing[0], 1e-12)

    @property
    def is_thin_section_oriented(self) -> bool:
        return bool(np.allclose(self.directions, THIN_SECTION_DIRECTIONS, atol=1e-9))


def node_geometry(node) -> NodeGeometry:
    directions = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(directions)
    m = np.array([[directions.GetElement(r, c) for c in range(3)] for r in range(3)])
    return NodeGeometry(tuple(float(v) for v in node.GetSpacing()), tuple(float(v) for v in node.GetOrigin()), m)


def require_thin_section_geometry(node, what: str = "volume") -> NodeGeometry:
    """The node's geometry, if it is a GeoSlicer-style single-slice image (else ThinSegError)."""
    geometry = node_geometry(node)
    name = node.GetName()
    if not geometry.is_isotropic_xy:
        raise ThinSegError(
            f"{what} '{name}' has different x and y pixel sizes ({geometry.spacing[0]:g} and "
            f"{geometry.spacing[1]:g} mm); thin sections need square pixels"
        )
    if not geometry.is_thin_section_oriented:
        raise ThinSegError(
            f"{what} '{name}' is rotated or flipped (IJK-to-RAS directions are not diag(-1, -1, 1)); "
            "harden or reset its orientation first"
        )
    return geometry


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


def _single_slice(array: np.ndarray, node, what: str) -> np.ndarray:
    if array.shape[0] != 1:
        raise ThinSegError(f"{what} '{node.GetName()}' has {array.shape[0]} slices; a thin section is a single slice")
    return array[0]


def rgb_array(node, what: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 of an RGB(A) vector volume (alpha dropped)."""
    array = _single_slice(volume_array(node), node, what)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ThinSegError(
            f"{what} '{node.GetName()}' is not an RGB image (it has {1 if array.ndim == 2 else array.shape[2]} "
            "component(s)); load the photograph as a colour (vector) volume"
        )
    if array.dtype != np.uint8:
        raise ThinSegError(f"{what} '{node.GetName()}' is {array.dtype}; 8-bit RGB is expected")
    return np.ascontiguousarray(array[..., :3])


def label_array(node, what: str = "labelmap") -> np.ndarray:
    """(H, W) uint8 of a labelmap volume (values 0..255)."""
    array = _single_slice(volume_array(node), node, what)
    if array.ndim != 2:
        raise ThinSegError(f"{what} '{node.GetName()}' has {array.shape[-1]} components; a labelmap has one")
    if array.dtype != np.uint8:
        if array.dtype.kind not in "iub" or (array.size and (array.min() < 0 or array.max() > 255)):
            raise ThinSegError(f"{what} '{node.GetName()}' has values outside 0..255 ({array.dtype})")
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def scalar_array(node, what: str = "image") -> np.ndarray:
    """(H, W) of a single-component volume, dtype kept."""
    array = _single_slice(volume_array(node), node, what)
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


def create_rgb_volume(scene, name: str, rgb: np.ndarray, mm_per_pixel: float, origin_mm=(0.0, 0.0, 0.0)):
    """A vtkMRMLVectorVolumeNode (1, H, W, 3) uint8 with GeoSlicer geometry and a display node."""
    data = _as_slices(rgb, 3)
    if data.dtype != np.uint8:
        raise ValueError(f"RGB images must be uint8, got {data.dtype}")
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", name)
    set_thin_section_geometry(node, mm_per_pixel, origin_mm)
    update_volume(node, data)
    node.CreateDefaultDisplayNodes()
    return node


def create_scalar_volume(scene, name: str, array: np.ndarray, mm_per_pixel: float, origin_mm=(0.0, 0.0, 0.0)):
    """A vtkMRMLScalarVolumeNode (1, H, W) with GeoSlicer geometry and a grey display."""
    data = _as_slices(array, None)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    set_thin_section_geometry(node, mm_per_pixel, origin_mm)
    update_volume(node, data)
    display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
    grey = scene.GetNodeByID("vtkMRMLColorTableNodeGrey")
    if grey is not None:
        display.SetAndObserveColorNodeID(grey.GetID())
    display.AutoWindowLevelOn()
    node.SetAndObserveDisplayNodeID(display.GetID())
    return node


def is_rgb_volume(node) -> bool:
    """True for volumes whose voxels have 3 or 4 uint8 components (PP/XP photographs)."""
    if node is None or not node.IsA("vtkMRMLVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        return False
    image = node.GetImageData()
    if image is None:
        return False
    return image.GetNumberOfScalarComponents() in (3, 4) and image.GetScalarType() == vtk.VTK_UNSIGNED_CHAR
