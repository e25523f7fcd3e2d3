"""MRML logic on a real scene: QEMSCAN maps as labelmaps, landmark point lists -> pixel pairs,
register() -> (transform node, QEMSCAN labelmap on the PP grid) with residuals, on the bundled
sample whose true QEMSCAN -> image transform is known; the background worker gives the same.
Every call returns its RegistrationOutput (transform, labelmap, residuals, warnings)."""

import json
import sys

import numpy as np
import pytest
import slicer
from helpers import REPO

from ThinSectionSegmentationLib import ThinSectionSegmentationLogic, hierarchy, labelmaps, volumes
from ThinSectionSegmentationLib.registration_nodes import ijk_to_ras, world_to_pixel
from thinseg.errors import ThinSegError
from thinseg.io.images import open_image
from thinseg.jobs import StageEvent, WarningEvent
from thinseg.registration import load_qemscan

SAMPLE = REPO / "Resources" / "Sample"
QEMSCAN_PX = np.array([[60, 60], [250, 50], [80, 200], [240, 210]], float)


@pytest.fixture(scope="module")
def truth():
    return json.loads((SAMPLE / "sample_truth_transform.json").read_text())


@pytest.fixture(scope="module")
def sample_images():
    out = []
    for role in ("PP", "XP"):
        source = open_image(SAMPLE / f"sample_{role}.jpg")
        out.append(np.asarray(source.read(0, source.shape[0])))
    return out


@pytest.fixture
def setup(sample_images, truth):
    """Scene with the sample PP/XP (origin off zero), the QEMSCAN map, and landmark lists."""
    scene = slicer.vtkMRMLScene()
    logic = ThinSectionSegmentationLogic(scene)
    folder = hierarchy.create_folder(scene, "sample")
    pp = volumes.create_rgb_volume(scene, "sample_PP", sample_images[0], truth["image_mm_per_pixel"], (3.0, -1.0, 0.0))
    xp = volumes.create_rgb_volume(scene, "sample_XP", sample_images[1], truth["image_mm_per_pixel"], (3.0, -1.0, 0.0))
    for node in (pp, xp):
        hierarchy.place(node, folder)
    qemscan = logic.loadQemscan(
        SAMPLE / "sample_QEMSCAN.tif", SAMPLE / "sample_QEMSCAN.csv", mmPerPixel=truth["qemscan_mm_per_pixel"]
    )
    qemscan.SetOrigin(10.0, 20.0, 0.0)  # somewhere else in RAS: only pixel positions matter
    a = np.array(truth["qemscan_to_image"])
    image_px = (a @ np.c_[QEMSCAN_PX, np.ones(len(QEMSCAN_PX))].T).T[:, :2]
    image_points = markups(scene, "PP points", pp, image_px)
    qemscan_points = markups(scene, "QEMSCAN points", qemscan, QEMSCAN_PX)
    return scene, logic, pp, xp, qemscan, image_points, qemscan_points, folder


def markups(scene, name, volume, pixels):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    to_ras = ijk_to_ras(volume)
    for x, y in pixels:
        node.AddControlPoint(*(to_ras @ [x, y, 0.0, 1.0])[:3])
    return node


def mapped_qemscan_px(transform_node, pp, qemscan, pixels):
    """Where the transform node sends PP pixels, in QEMSCAN pixels."""
    from_parent = transform_node.GetTransformFromParent()
    out = []
    for x, y in pixels:
        world = (ijk_to_ras(pp) @ [x, y, 0.0, 1.0])[:3]
        local = from_parent.TransformPoint(*world)
        out.append((np.linalg.inv(ijk_to_ras(qemscan)) @ [*local, 1.0])[:2])
    return np.array(out)


def test_qemscan_map_loads_with_its_colour_table(setup):
    _scene, logic, *_ = setup
    qemscan = setup[4]
    expected = load_qemscan(SAMPLE / "sample_QEMSCAN.tif", SAMPLE / "sample_QEMSCAN.csv")
    assert qemscan.GetName() == "sample_QEMSCAN"
    assert np.array_equal(volumes.label_array(qemscan), expected.labels)
    assert labelmaps.labelmap_class_table(qemscan) == expected.table
    assert qemscan.GetSpacing()[0] == pytest.approx(0.01)


def test_register_with_landmarks_gives_the_true_transform_and_the_map_on_the_pp_grid(setup, truth):
    scene, logic, pp, xp, qemscan, image_points, qemscan_points, folder = setup
    out = logic.register(pp, qemscan, (image_points, qemscan_points), refine=False, xpNode=xp)
    transform, registered = out.transform, out.labelmap
    assert transform.IsA("vtkMRMLLinearTransformNode")
    probe = np.array([[0.0, 0.0], [500.0, 700.0], [2047.0, 1535.0]])
    truth_px = (np.linalg.inv(np.array(truth["qemscan_to_image"])) @ np.c_[probe, np.ones(3)].T).T[:, :2]
    assert np.allclose(mapped_qemscan_px(transform, pp, qemscan, probe), truth_px, atol=1e-6)
    labels = volumes.label_array(registered)
    assert labels.shape == (1536, 2048)
    assert labelmaps.labelmap_class_table(registered) == labelmaps.labelmap_class_table(qemscan)
    assert np.allclose(ijk_to_ras(registered), ijk_to_ras(pp))
    assert registered.GetNodeReference(labelmaps.PP_REFERENCE) is pp
    # the core's resampling of the map, pixel for pixel
    from thinseg.registration import resample_labels
    from thinseg.registration.grids import Geometry
    from thinseg.registration.sitk_transforms import from_qemscan_to_image

    g = Geometry(
        (1536, 2048), truth["image_mm_per_pixel"], volumes.label_array(qemscan).shape, truth["qemscan_mm_per_pixel"]
    )
    expected = resample_labels(
        volumes.label_array(qemscan), from_qemscan_to_image(np.array(truth["qemscan_to_image"]), g)
    )
    assert (labels == expected).mean() > 0.999
    # residuals table: one row per landmark, ~0 for exact clicks
    residuals = out.residuals.GetTable()
    assert residuals.GetNumberOfRows() == 4
    assert [residuals.GetValue(r, 0).ToString() for r in range(4)] == [f"PP points-{k}" for k in range(1, 5)]
    assert max(residuals.GetValue(r, 1).ToDouble() for r in range(4)) < 1e-6
    for node in (transform, registered, out.residuals):
        assert hierarchy.parent_item(node) == folder


def test_thin_plate_spline_becomes_a_grid_transform_that_maps_like_the_core(setup, truth):
    scene, logic, pp, _xp, qemscan, image_points, qemscan_points, _ = setup
    transform = logic.register(pp, qemscan, (image_points, qemscan_points), refine=False, kind="tps").transform
    assert transform.IsA("vtkMRMLGridTransformNode")
    probe = np.array([[300.0, 400.0], [1000.0, 800.0], [1700.0, 1200.0]])
    truth_px = (np.linalg.inv(np.array(truth["qemscan_to_image"])) @ np.c_[probe, np.ones(3)].T).T[:, :2]
    assert np.allclose(mapped_qemscan_px(transform, pp, qemscan, probe), truth_px, atol=0.05)


def test_landmarks_follow_a_qemscan_map_moved_by_a_transform(setup):
    scene, _logic, _pp, _xp, qemscan, _ip, qemscan_points, _ = setup
    import vtk

    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 5.0)
    shift.SetMatrixTransformToParent(m)
    qemscan.SetAndObserveTransformNodeID(shift.GetID())
    moved = np.array([(ijk_to_ras(qemscan) @ [x, y, 0, 1])[:3] + [5.0, 0, 0] for x, y in QEMSCAN_PX])
    assert np.allclose(world_to_pixel(qemscan, moved), QEMSCAN_PX, atol=1e-9)


def test_landmark_problems_are_clear_before_any_work(setup):
    scene, logic, pp, _xp, qemscan, image_points, qemscan_points, _ = setup
    qemscan_points.RemoveNthControlPoint(3)
    with pytest.raises(ThinSegError, match="has 4 points but 'QEMSCAN points' has 3"):
        logic.register(pp, qemscan, (image_points, qemscan_points), refine=False)
    with pytest.raises(ThinSegError, match="automatic refinement is needed"):
        logic.prepareRegistration(pp, qemscan, None, refine=False)
    with pytest.raises(ThinSegError, match="choose a PP image and a QEMSCAN map"):
        logic.register(pp, None)


def test_background_registration_matches_the_in_process_one(setup):
    scene, logic, pp, xp, qemscan, image_points, qemscan_points, _ = setup
    before = scene.GetNumberOfNodes()
    job = logic.prepareRegistration(
        pp, qemscan, (image_points, qemscan_points), refine=False, xpNode=xp, python=sys.executable
    )
    try:
        proc = logic.startJob(job)
        events = proc.wait(timeout=180)
        result = proc.check()
        assert scene.GetNumberOfNodes() == before
        stages = [e.text for e in events if isinstance(e, StageEvent)]
        assert stages[0] == "reading the images" and "fitting the landmarks" in stages
        assert stages[-1] == "writing the results"
        out = logic.finishRegistration(job)
    finally:
        logic.discardJob(job)
    assert result.task == "register" and result.summary["kind"] == "similarity"
    assert result.summary["landmarks"] == out.summary["landmarks"]  # the event carries summary.json
    reference = logic.register(pp, qemscan, (image_points, qemscan_points), refine=False, xpNode=xp)
    assert np.array_equal(volumes.label_array(out.labelmap), volumes.label_array(reference.labelmap))
    probe = np.array([[10.0, 20.0], [1900.0, 1400.0]])
    assert np.allclose(
        mapped_qemscan_px(out.transform, pp, qemscan, probe),
        mapped_qemscan_px(reference.transform, pp, qemscan, probe),
        atol=1e-9,
    )
    assert out.residuals.GetTable().GetNumberOfRows() == 4


def test_refined_registration_of_an_offset_xp_gives_training_an_aligned_xp(setup, truth, sample_images):
    """The panel's default path (landmarks, then 'Refine automatically') in the background worker,
    with an XP photograph offset from PP by a stage shift, as on real microscopes: the scene
    gets an aligned XP volume, and the registered labelmap (what Train exports) refers to it."""
    scene, logic, pp, xp, qemscan, image_points, qemscan_points, folder = setup
    offset_xp = volumes.create_rgb_volume(
        scene,
        "offset_XP",
        np.roll(sample_images[1], (4, 9), axis=(0, 1)),
        truth["image_mm_per_pixel"],
        (3.0, -1.0, 0.0),
    )
    job = logic.prepareRegistration(
        pp, qemscan, (image_points, qemscan_points), refine=True, xpNode=offset_xp, python=sys.executable
    )
    try:
        proc = logic.startJob(job)
        events = proc.wait(timeout=300)
        proc.check()
        out = logic.finishRegistration(job)
    finally:
        logic.discardJob(job)
    transform, registered = out.transform, out.labelmap
    probe = np.array([[100.0, 100.0], [1000.0, 800.0], [1900.0, 1400.0]])
    truth_px = (np.linalg.inv(np.array(truth["qemscan_to_image"])) @ np.c_[probe, np.ones(3)].T).T[:, :2]
    assert np.abs(mapped_qemscan_px(transform, pp, qemscan, probe) - truth_px).max() < 0.5
    aligned = out.xpAligned
    assert aligned is not None and aligned.GetName() == "offset_XP_aligned"
    assert np.array_equal(volumes.rgb_array(aligned)[:-4, :-9], sample_images[1][:-4, :-9])
    assert np.allclose(ijk_to_ras(aligned), ijk_to_ras(pp))
    assert hierarchy.parent_item(aligned) == folder
    assert logic.trainingSectionNodes(registered) == (pp, aligned, registered)
    assert any("aligned to PP" in w for w in out.warnings)
    # the warnings came as warning events while the job ran, in the same words
    assert [e.text for e in events if isinstance(e, WarningEvent)] == out.warnings == proc.warnings
    # an XP that needs no alignment gets no copy
    plain = logic.register(pp, qemscan, (image_points, qemscan_points), refine=False, xpNode=xp)
    assert plain.xpAligned is None
    assert plain.labelmap.GetNodeReference(labelmaps.XP_REFERENCE) is xp


def test_residual_table_shows_the_fit_and_the_refined_transform(setup):
    """With one click 6 px off, the table gives each landmark's residual of the landmark fit and of
    the refined transform (px and um); the refined ones are recomputed here from the transform
    node in the scene: PP click -> QEMSCAN px, misfit brought back to PP px by its linear part."""
    scene, logic, pp, xp, qemscan, image_points, qemscan_points, _folder = setup
    moved = list(image_points.GetNthControlPointPositionWorld(1))
    image_points.SetNthControlPointPositionWorld(1, moved[0] + 6 * pp.GetSpacing()[0], moved[1], moved[2])
    fit = logic.register(pp, qemscan, (image_points, qemscan_points), refine=False, xpNode=xp).residuals.GetTable()
    out = logic.register(pp, qemscan, (image_points, qemscan_points), refine=True, xpNode=xp)
    table = out.residuals.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert names == [
        "Landmark",
        "Fit residual (px)",
        "Fit residual (um)",
        "Final residual (px)",
        "Final residual (um)",
        "Leave-one-out (px)",
        "Outlier",
    ]
    clicks = world_to_pixel(pp, np.array([image_points.GetNthControlPointPositionWorld(i) for i in range(4)]))
    mapped = mapped_qemscan_px(out.transform, pp, qemscan, clicks)
    base = mapped_qemscan_px(out.transform, pp, qemscan, np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    jacobian = np.stack([base[1] - base[0], base[2] - base[0]], axis=1)
    expected = np.linalg.norm((mapped - QEMSCAN_PX) @ np.linalg.inv(jacobian).T, axis=1)
    um = pp.GetSpacing()[0] * 1000
    value = lambda t, r, c: t.GetValue(r, c).ToDouble()  # noqa: E731
    for r in range(4):
        assert value(table, r, 1) == pytest.approx(value(fit, r, 1), abs=1e-9)  # the same landmark fit
        assert value(table, r, 2) == pytest.approx(value(fit, r, 1) * um, abs=1e-9)
        assert value(table, r, 3) == pytest.approx(expected[r], abs=1e-5)
        assert value(table, r, 4) == pytest.approx(expected[r] * um, abs=1e-5)
        assert value(fit, r, 3) == value(fit, r, 1)  # not refined: the final transform is the fit
    # the refinement goes back to the true map: away from the wrong click, onto the right ones
    assert value(table, 1, 3) > value(table, 1, 1) and value(table, 1, 3) > 4.0
