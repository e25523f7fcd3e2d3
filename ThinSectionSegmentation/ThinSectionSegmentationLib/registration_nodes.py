"""Registration in scene terms: landmark point lists -> pixel pairs, the core's transform ->
a transform node, landmark residuals -> a table node (no Qt).

The core's transform maps PP image mm to QEMSCAN mm, with mm = spacing * (column, row) from
the centre of pixel (0, 0) of each picture (the photograph as Slicer shows it). Scene nodes may
sit anywhere in RAS, flipped or transposed, so every conversion goes through each volume's
picture-to-RAS matrix (`volumes.SectionGrid`): origins, spacings and directions are honoured.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from thinseg.errors import ThinSegError

from .volumes import require_thin_section_geometry, section_grid


def _vtk_matrix(array: np.ndarray):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def ijk_to_ras(volume) -> np.ndarray:
    """Picture (column, row, 0, 1) -> RAS of a single-slice volume (its IJK-to-RAS matrix for
    GeoSlicer's thin-section nodes)."""
    return section_grid(volume).picture_to_ras


def world_to_pixel(volume, points_ras: np.ndarray) -> np.ndarray:
    """(n, 3) world RAS points -> (n, 2) (column, row) positions on `volume`'s picture (through
    its parent transform, if any)."""
    points = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
    parent = volume.GetParentTransformNode()
    if parent is not None:
        from_world = vtk.vtkGeneralTransform()
        parent.GetTransformFromWorld(from_world)
        points = np.array([from_world.TransformPoint(*p) for p in points]).reshape(-1, 3)
    ras_to_ijk = np.linalg.inv(ijk_to_ras(volume))
    ijk = (ras_to_ijk @ np.c_[points, np.ones(len(points))].T).T
    return ijk[:, :2]


def markup_points(markups) -> tuple[np.ndarray, list[str]]:
    """World positions (n, 3) and labels of a point list's control points."""
    n = markups.GetNumberOfControlPoints()
    points = np.zeros((n, 3))
    for i in range(n):
        markups.GetNthControlPointPositionWorld(i, points[i])
    return points, [markups.GetNthControlPointLabel(i) or str(i + 1) for i in range(n)]


def landmarks_from_markups(image_markups, qemscan_markups, pp_node, qemscan_node):
    """Pairs (k-th image point <-> k-th QEMSCAN point) in pixels, as the core's LandmarkPairs."""
    # deferred: thinseg.registration imports SimpleITK (~0.5 s), needed only once landmarks are used
    from thinseg.registration import LandmarkPairs

    if image_markups is None or qemscan_markups is None:
        raise ThinSegError("landmarks need two point lists: one on the PP image, one on the QEMSCAN map")
    image_ras, names = markup_points(image_markups)
    qemscan_ras, _ = markup_points(qemscan_markups)
    if len(image_ras) != len(qemscan_ras):
        raise ThinSegError(
            f"'{image_markups.GetName()}' has {len(image_ras)} points but '{qemscan_markups.GetName()}' has "
            f"{len(qemscan_ras)}: landmarks pair up by order, so both lists need the same number"
        )
    return LandmarkPairs(world_to_pixel(qemscan_node, qemscan_ras), world_to_pixel(pp_node, image_ras), names)


def ras_matrix(section_transform, pp_node, qemscan_node) -> np.ndarray:
    """4x4 PP RAS -> QEMSCAN RAS matrix of a linear core transform (Slicer's "from parent"
    matrix of a transform node put above the QEMSCAN volume). It sends the PP's plane onto the
    QEMSCAN map's plane, whatever way either is turned, tilted or placed, and a step off the PP's
    plane to the same step off the QEMSCAN map's, so that the map shows on the PP."""
    # deferred: SimpleITK is loaded only once a transform is shown
    from thinseg.registration.sitk_transforms import linear_matrix

    m = linear_matrix(section_transform.itk)
    if m is None:
        raise ValueError("the transform is not linear; use grid_transform_node")
    g = section_transform.geometry
    t4 = np.eye(4)
    t4[:2, :2], t4[:2, 3] = m[:2, :2], m[:2, 2]
    to_mm = np.diag([g.image_mm_per_pixel, g.image_mm_per_pixel, 1.0, 1.0])
    to_px = np.diag([1.0 / g.qemscan_mm_per_pixel, 1.0 / g.qemscan_mm_per_pixel, 1.0, 1.0])
    pp = _plane_frame(section_grid(pp_node, "PP image").picture_to_ras)
    qemscan = _plane_frame(section_grid(qemscan_node, "QEMSCAN map").picture_to_ras)
    return qemscan @ to_px @ t4 @ to_mm @ np.linalg.inv(pp)


def _unit_normal(picture_to_ras: np.ndarray) -> np.ndarray:
    """Unit normal of a picture's plane, on the viewer's side (right x down), in RAS."""
    normal = np.cross(picture_to_ras[:3, 0], picture_to_ras[:3, 1])
    return normal / np.linalg.norm(normal)


def _plane_frame(picture_to_ras: np.ndarray) -> np.ndarray:
    """(column, row, mm along the plane's unit normal, 1) -> RAS: the picture-to-RAS matrix with
    the slice axis replaced by the plane's true unit normal."""
    frame = picture_to_ras.copy()
    frame[:3, 2] = _unit_normal(picture_to_ras)
    return frame


def _same_plane(pp_node, qemscan_node) -> None:
    pp, qemscan = section_grid(pp_node, "PP image"), section_grid(qemscan_node, "QEMSCAN map")
    if pp.view != qemscan.view:
        raise ThinSegError(
            f"PP image '{pp.name}' is a {pp.view} slice but QEMSCAN map '{qemscan.name}' is a {qemscan.view} one; "
            "put both in the same plane"
        )


def create_transform_node(scene, name: str, section_transform, pp_node, qemscan_node, grid_points: int = 64):
    """A linear transform node for similarity/affine results, else a grid transform node sampled
    on the PP image (grid_points x grid_points). Put the QEMSCAN volume under it to see it on PP."""
    require_thin_section_geometry(pp_node, "PP image")
    require_thin_section_geometry(qemscan_node, "QEMSCAN map")
    _same_plane(pp_node, qemscan_node)
    if section_transform.is_linear:
        node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
        node.SetMatrixTransformFromParent(_vtk_matrix(ras_matrix(section_transform, pp_node, qemscan_node)))
        return node
    return _grid_transform_node(scene, name, section_transform, pp_node, qemscan_node, grid_points)


def _grid_transform_node(scene, name, section_transform, pp_node, qemscan_node, n: int):
    grid = section_grid(pp_node, "PP image")
    height, width = grid.shape
    nx, ny = max(2, min(n, width)), max(2, min(n, height))
    cols, rows = np.linspace(0, width - 1, nx), np.linspace(0, height - 1, ny)
    jj, ii = np.meshgrid(rows, cols, indexing="ij")
    pixels = np.stack([ii.ravel(), jj.ravel()], axis=1)
    q_px = section_transform.map_image_px(pixels)
    to_ras_pp, to_ras_q = grid.picture_to_ras, ijk_to_ras(qemscan_node)
    world = (to_ras_pp @ np.c_[pixels, np.zeros(len(pixels)), np.ones(len(pixels))].T).T[:, :3]
    local = (to_ras_q @ np.c_[q_px, np.zeros(len(q_px)), np.ones(len(q_px))].T).T[:, :3]
    # on the PP's plane each pixel goes exactly onto the QEMSCAN map's plane (any turn, tilt or
    # offset between the two); a step t off it goes t off the map's plane, as in ras_matrix.
    # Two slices, at t = -0.5 and +0.5 mm, so that interpolation across the plane is defined;
    # the grid's axes are the picture's (right, down, normal)
    displacement = local - world
    normal = _unit_normal(to_ras_pp)
    tilt = _unit_normal(to_ras_q) - normal
    field = np.concatenate([displacement - 0.5 * tilt, displacement + 0.5 * tilt]).astype(np.float64)
    sy, sx = grid.spacing_yx
    right, down = to_ras_pp[:3, 0] / sx, to_ras_pp[:3, 1] / sy
    origin = to_ras_pp[:3, 3] - 0.5 * normal
    image = vtk.vtkImageData()
    image.SetOrigin(*(float(v) for v in origin))
    image.SetSpacing(sx * (width - 1) / (nx - 1), sy * (height - 1) / (ny - 1), 1.0)
    image.SetDimensions(nx, ny, 2)
    vectors = numpy_support.numpy_to_vtk(field, deep=True)
    vectors.SetNumberOfComponents(3)
    image.GetPointData().SetScalars(vectors)
    transform = slicer.vtkOrientedGridTransform()
    directions = vtk.vtkMatrix4x4()
    for r in range(3):
        for c, axis in enumerate((right, down, normal)):
            directions.SetElement(r, c, float(axis[r]))
    transform.SetGridDirectionMatrix(directions)
    transform.SetDisplacementGridData(image)
    transform.SetInterpolationModeToCubic()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    node.SetAndObserveTransformFromParent(transform)
    return node


def residual_table(scene, name: str, report, mm_per_pixel: float, table_node=None):
    """A table of per-landmark residuals (image px and um) of the landmark fit and of the final
    (refined) transform side by side, so that a move away from the clicks shows, then leave-one-out
    and outlier flags. `report`: the rows of `thinseg.registration.output.landmark_residuals`,
    or LandmarkFit.report() rows (or the LandmarkFit), whose final residuals are the fit's."""
    rows = report.report() if hasattr(report, "report") else list(report)
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = table_node.GetTable()
    table.Initialize()
    columns = [
        ("Landmark", vtk.vtkStringArray()),
        ("Fit residual (px)", vtk.vtkDoubleArray()),
        ("Fit residual (um)", vtk.vtkDoubleArray()),
        ("Final residual (px)", vtk.vtkDoubleArray()),
        ("Final residual (um)", vtk.vtkDoubleArray()),
        ("Leave-one-out (px)", vtk.vtkDoubleArray()),
        ("Outlier", vtk.vtkStringArray()),
    ]
    for title, array in columns:
        array.SetName(title)
        table.AddColumn(array)
    um = mm_per_pixel * 1000.0
    for row in rows:
        loo = row["leave_one_out_px"]
        fit = float(row.get("residual_fit_px", row["residual_px"]))
        final = float(row.get("residual_final_px", fit))
        table.InsertNextBlankRow()
        r = table.GetNumberOfRows() - 1
        values = [str(row["name"]), fit, fit * um, final, final * um, float("nan") if loo is None else float(loo)]
        for c, value in enumerate(values):
            table.SetValue(r, c, vtk.vtkVariant(value))
        table.SetValue(r, 6, vtk.vtkVariant("yes" if row["outlier"] else ""))
    table.Modified()
    table_node.Modified()
    return table_node
