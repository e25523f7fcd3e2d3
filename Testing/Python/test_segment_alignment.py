"""`thinseg segment` checks XP against PP before the model sees them: an XP photograph offset
or turned by the microscope stage is moved onto the PP grid (and written so), one that does not
match is refused, `--no-align` segments as before.

The model is a tiny random UNet that sees XP only (its PP weights are zeroed), so a misplaced XP
changes its labels: agreement with the labels of the unshifted pair then means the XP was put
back where it belongs. Shifted and turned XP images are cut from a larger synthetic section,
so that they hold real section content everywhere, as a second photograph does.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    MM_PER_PIXEL,
    TINY_ROI,
    data_variables,
    error_lines,
    make_bundle,
    open_nc,
    read_rgb,
    real_field,
    run_main,
    tiny_network,
    write_geoslicer_netcdf,
    write_image,
)
from scipy import ndimage

from thinseg.classes.files import default_class_table
from thinseg.errors import ThinSegError
from thinseg.inference.engine import InferenceOptions, Segmenter
from thinseg.io.images import ArraySource
from thinseg.model.bundle import load_bundle, save_bundle
from thinseg.pipelines.segment import AlignedXpSource, check_xp_alignment
from thinseg.registration.ppxp import XpAlignment, shift_image
from thinseg.synth import generate_section

N, MARGIN = 1024, 64  # the section, and the extra content around it the moved XP images are cut from
SHIFT = (3, -5)  # a stage shift: xp[y, x] shows pp[y - 3, x + 5]
#: Where the shifted XP photograph covers the PP field once aligned (it ends 3 rows early and
#: starts 5 columns late): out[y, x] = xp[y + 3, x - 5].
COVERED = (slice(0, N - SHIFT[0]), slice(-SHIFT[1], None))
TURN_DEG, TURN_SHIFT = 3.0, (4, -6)  # a turned stage: 3 degrees, then (4, -6) px in the turned frame
FP32 = ("--device", "cpu", "--precision", "fp32", "-q")


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def big():
    return generate_section(N + 2 * MARGIN, N + 2 * MARGIN, seed=0)


@pytest.fixture(scope="module")
def pair(big):
    """(PP, XP) of the section, aligned as rendered."""
    return big.pp[MARGIN:-MARGIN, MARGIN:-MARGIN].copy(), big.xp[MARGIN:-MARGIN, MARGIN:-MARGIN].copy()


def shifted_xp(big, dy: int, dx: int) -> np.ndarray:
    """XP photographed after a stage shift: shifted[y, x] = xp[y - dy, x - dx]."""
    return big.xp[MARGIN - dy : MARGIN - dy + N, MARGIN - dx : MARGIN - dx + N].copy()


def rotation(angle_deg: float) -> np.ndarray:
    t = np.deg2rad(angle_deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def turned_xp(big, angle_deg: float, turned_shift: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """XP photographed after a stage turn, and the (dy, dx) that `XpAlignment` should report:
    XpAlignment(dy, dx, angle).apply(turned) is the section's XP again."""
    rot = rotation(angle_deg)
    d = rot @ np.array(turned_shift, float)
    centre = np.full(2, (N - 1) / 2)
    # turned[r] = xp[R^T (r - c - d) + c]: the inverse of aligned[q] = turned[R (q - c) + c + d]
    offset = -rot.T @ (centre + d) + centre + MARGIN
    channels = [ndimage.affine_transform(big.xp[..., c], rot.T, offset, output_shape=(N, N), order=1) for c in range(3)]
    return np.stack(channels, axis=-1), d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A PP+XP model whose labels depend on XP only, and a PP-only model."""
    root = tmp_path_factory.mktemp("models")
    net, params = tiny_network(6, len(default_class_table()) + 1, seed=2)
    with torch.no_grad():
        for weight in net.parameters():
            if weight.ndim == 4 and weight.shape[1] == 6:  # the convolutions that read the input
                weight[:, :3] = 0
    xp_only = save_bundle(
        root / "xp-only",
        net,
        network_name="UNet",
        network_params=params,
        class_table=default_class_table(),
        input_names=("PP", "PX"),
        pixels_per_mm=1 / MM_PER_PIXEL,
        roi_shape=(TINY_ROI, TINY_ROI),
        title="tiny XP-driven",
        description="test model",
    )
    return {"xp": xp_only, "pp": make_bundle(root / "pp-only", inputs=("PP",), seed=1, title="tiny PP only")}


def direct_labels(model: Path, pp: np.ndarray, xp: np.ndarray, precision: str = "fp32") -> np.ndarray:
    """The engine run on these pixels as the command builds it (on the CPU)."""
    options = InferenceOptions(overlap=16, device="cpu", precision=precision)
    segmenter = Segmenter(load_bundle(model), options)
    return segmenter.segment([ArraySource(np.ascontiguousarray(a)) for a in (pp, xp)]).labels


def segment(capsys, folder: Path, pp: np.ndarray, xp: np.ndarray, model: Path, *extra: str):
    """Write S_PP.png/S_XP.png into `folder`, segment it into folder/out: (code, stderr, labels, XP written)."""
    write_image(folder / "S_PP.png", pp)
    write_image(folder / "S_XP.png", xp)
    out = folder / "out"
    code, _out, err = run_main(capsys, "segment", folder / "S_PP.png", "--model", model, "-o", out, *FP32, *extra)
    if not (out / "S_PP.nc").exists():
        return code, err, None, None
    with open_nc(out / "S_PP.nc") as ds:
        assert data_variables(ds) == ["S_PP", "S_XP", "S_Segmentation"]
        labels, written_xp = np.array(ds.variables["S_Segmentation"][0]), np.array(ds.variables["S_XP"][0])
        attrs = ds.variables["S_XP"].ncattrs()
        note = ds.variables["S_XP"].getncattr("thinseg_xp_alignment") if "thinseg_xp_alignment" in attrs else None
    return code, err, labels, (written_xp, note)


def reported(err: str) -> tuple[float, float, float]:
    """(dy, dx, angle) from the one alignment line."""
    lines = [line for line in err.splitlines() if "XP offset from PP" in line]
    assert len(lines) == 1, err
    m = re.search(r"dy ([-+][\d.]+), dx ([-+][\d.]+) px(?:, rotated ([-+][\d.]+) deg)? \(score [\d.]+\)", lines[0])
    assert m, lines[0]
    return float(m[1]), float(m[2]), float(m[3] or 0.0)


@pytest.fixture(scope="module")
def reference(pair, models):
    """Labels of the unshifted pair (no check: exactly what the model makes of these pixels)."""
    return direct_labels(models["xp"], *pair)


# ---------------------------------------------------------------------------------------------


def test_the_rendered_pair_is_left_as_it_is(tmp_path, capsys, pair, models, reference):
    code, err, labels, (written_xp, note) = segment(capsys, tmp_path, *pair, models["xp"])
    assert code == 0
    assert "thinseg: S_PP: XP is aligned with PP (score" in err
    assert np.array_equal(labels, reference) and np.array_equal(written_xp, pair[1]) and note is None


def test_a_stage_shift_is_reported_undone_and_kept(tmp_path, capsys, big, pair, models, reference):
    pp, xp = pair
    code, err, labels, (written_xp, note) = segment(capsys, tmp_path, pp, shifted_xp(big, *SHIFT), models["xp"])
    assert code == 0
    assert reported(err) == (*SHIFT, 0.0)
    assert "aligned to PP" in err
    # the output's XP variable is the XP the model saw: the section's XP, black where the photograph ends
    covered = COVERED
    assert np.array_equal(written_xp[covered], xp[covered])
    assert not written_xp[N - SHIFT[0] :].any() and not written_xp[:, : -SHIFT[1]].any()
    assert note.startswith("dy +3, dx -5 px, angle +0 deg, score ")
    assert np.mean(labels == reference) >= 0.99
    assert np.mean(labels[covered] == reference[covered]) >= 0.998  # differences only next to the black strips


def test_no_align_segments_the_xp_as_it_is(tmp_path, capsys, big, pair, models, reference):
    pp, moved = pair[0], shifted_xp(big, *SHIFT)
    code, err, labels, (written_xp, note) = segment(capsys, tmp_path, pp, moved, models["xp"], "--no-align")
    assert code == 0 and "XP offset" not in err and "aligned with PP" not in err
    assert np.array_equal(labels, direct_labels(models["xp"], pp, moved))  # the result before the check existed
    assert np.array_equal(written_xp, moved) and note is None
    assert np.mean(labels == reference) < 0.95  # what the check is for: this model's labels follow XP


def test_a_turned_stage_is_reported_and_undone(tmp_path, capsys, big, pair, models, reference):
    pp, xp = pair
    turned, d = turned_xp(big, TURN_DEG, TURN_SHIFT)
    code, err, labels, (written_xp, note) = segment(capsys, tmp_path, pp, turned, models["xp"])
    assert code == 0
    dy, dx, angle = reported(err)
    assert abs(dy - d[0]) <= 0.5 and abs(dx - d[1]) <= 0.5 and angle == TURN_DEG, (dy, dx, angle, d)
    # read band by band as the engine reads it, the XP is what the whole-image resampling gives
    whole = XpAlignment(dy, dx, angle, 0.0, True).apply(turned)
    assert np.abs(written_xp.astype(int) - whole).max() <= 1
    covered = whole.any(axis=-1)
    assert covered.mean() > 0.96  # the turned photograph leaves the corners of the PP field uncovered
    error = np.abs(written_xp.astype(int) - xp)[covered]
    assert error.mean() < 6 < 20 < np.abs(turned.astype(int) - xp)[covered].mean()  # bilinear, not identical
    # XP resampled twice (turned here, back by the check) is smoother than the rendered one, and this
    # random model follows XP texture pixel by pixel: nearly all labels still come back
    agree = np.mean(labels[covered] == reference[covered])
    unaligned = np.mean(direct_labels(models["xp"], pp, turned)[covered] == reference[covered])
    assert agree >= 0.98 and unaligned < 0.93, (agree, unaligned)
    assert np.mean(labels == reference) >= 0.95  # the uncovered corners are black XP
    assert "angle +3 deg" in note


def test_an_unrelated_xp_is_refused_and_nothing_written(tmp_path, capsys, pair, models):
    other = generate_section(N, N, seed=7).xp
    code, err, labels, _ = segment(capsys, tmp_path, pair[0], other, models["xp"])
    assert code == 2 and labels is None
    (line,) = error_lines(err)
    assert line.startswith(f"thinseg: error: {tmp_path / 'S_PP.png'}: PP S_PP and XP S_XP do not match (score ")
    assert "--no-align" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_other_sections_still_run(tmp_path, capsys, big, pair, models):
    pp, xp = pair
    write_image(tmp_path / "A_PP.png", pp)
    write_image(tmp_path / "A_XP.png", shifted_xp(big, *SHIFT))
    write_image(tmp_path / "B_PP.png", pp)
    write_image(tmp_path / "B_XP.png", generate_section(N, N, seed=7).xp)
    out = tmp_path / "out"
    code, _out, err = run_main(capsys, "segment", tmp_path, "--model", models["xp"], "-o", out, *FP32)
    assert code == 1  # some sections failed
    assert sorted(p.name for p in out.glob("*.nc")) == ["A_PP.nc"]
    (line,) = error_lines(err)
    assert f"{tmp_path / 'B_PP.png'}: PP B_PP and XP B_XP do not match" in line
    assert "thinseg: A_PP: XP offset from PP by dy +3, dx -5 px" in err


def test_a_pp_only_model_skips_the_check(tmp_path, capsys, pair, models):
    other = generate_section(N, N, seed=7).xp
    write_image(tmp_path / "S_PP.png", pair[0])
    write_image(tmp_path / "S_XP.png", other)
    code, _out, err = run_main(capsys, "segment", tmp_path, "--model", models["pp"], "-o", tmp_path / "out", *FP32)
    assert code == 0 and "XP" not in err.replace("S_XP", "")


def test_a_netcdf_section_gets_its_xp_variable_replaced_by_the_aligned_one(tmp_path, capsys, big, pair, models):
    pp, xp = pair
    path = write_geoslicer_netcdf(tmp_path / "S.nc", {"S_PP": pp, "S_XP": shifted_xp(big, *SHIFT)})
    out = tmp_path / "out"
    code, _out, err = run_main(capsys, "segment", path, "--model", models["xp"], "-o", out, *FP32)
    assert code == 0 and "XP offset from PP by dy +3, dx -5 px" in err
    with open_nc(out / "S.nc") as ds:
        assert data_variables(ds) == ["S_PP", "S_XP", "S_Segmentation"]
        written = np.array(ds.variables["S_XP"][0])
        assert ds.variables["S_XP"].getncattr("thinseg_xp_alignment").startswith("dy +3, dx -5 px")
        assert np.array_equal(np.array(ds.variables["S_PP"][0]), pp)
    assert np.array_equal(written[COVERED], xp[COVERED])


@pytest.mark.parametrize("band", [37, 256])
def test_aligned_reads_match_the_whole_image_resampling(big, band):
    """Region reads (as the engine makes them, any band height and column range) give what
    `XpAlignment.apply` gives for the whole image: the whole XP is never needed in memory."""
    turned, _d = turned_xp(big, -2.5, (7, 2))
    for alignment in (XpAlignment(-4.0, 6.0, 0.0, 50.0, True), XpAlignment(3.2, -1.7, -2.5, 50.0, True)):
        source = AlignedXpSource(ArraySource(turned, name="XP"), alignment)
        bands = np.concatenate([source.read(y, min(N, y + band), 100, 900) for y in range(0, N, band)])
        whole = alignment.apply(turned)[:, 100:900]
        assert np.abs(bands.astype(int) - whole).max() <= 1
        assert np.mean(bands == whole) > 0.999


def test_the_check_reads_only_a_central_window(big):
    """On a section larger than the window the check reads a window of each image, and a turn
    measured there is expressed about the whole image's centre."""
    turned, d = turned_xp(big, TURN_DEG, TURN_SHIFT)
    reads: list[tuple[int, int, int, int | None]] = []

    class Recording(ArraySource):
        def read(self, y0, y1, x0=0, x1=None):
            reads.append((y0, y1, x0, x1))
            return super().read(y0, y1, x0, x1)

    pp = big.pp[MARGIN:-MARGIN, MARGIN:-MARGIN].copy()
    import thinseg.pipelines.segment as segment_module

    window = 768
    original = segment_module.WINDOW
    segment_module.WINDOW = window
    try:
        found = check_xp_alignment(Recording(pp, name="PP"), Recording(turned, name="XP"))
    finally:
        segment_module.WINDOW = original
    assert found is not None and found.angle_deg == TURN_DEG
    assert abs(found.dy - d[0]) <= 0.5 and abs(found.dx - d[1]) <= 0.5, (found, d)
    lo, hi = (N - window) // 2, (N - window) // 2 + window
    assert reads == [(lo, hi, lo, hi)] * 2


def test_a_real_field_already_aligned_is_left_as_it_is(tmp_path, capsys, models):
    """Field 10a with its stage shift taken out beforehand (the correction the data's README
    quotes, XP read 4 rows down and 9 columns right): reported aligned, labels as without the check."""
    files = real_field("10a")
    pp, xp = read_rgb(files["pp"]), read_rgb(files["xp"])
    pp, xp = pp[:-4, :-9], shift_image(xp, 4, 9)[:-4, :-9]
    code, err, labels, (written_xp, _note) = segment(capsys, tmp_path / "a", pp, xp, models["xp"])
    assert code == 0 and re.search(r"S_PP: XP is aligned with PP \(score \d+", err), err
    assert np.array_equal(written_xp, xp)
    _code, _err, unchecked, _xp = segment(capsys, tmp_path / "c", pp, xp, models["xp"], "--no-align")
    assert np.array_equal(labels, unchecked)
    # the photographs as taken: the shift is found and reported
    code, err, _labels, _xp = segment(
        capsys, tmp_path / "b", read_rgb(files["pp"]), read_rgb(files["xp"]), models["xp"]
    )
    assert code == 0 and reported(err)[2] == 0.0 and 3 <= reported(err)[0] <= 4 and 8 <= reported(err)[1] <= 10


def test_the_slicer_logic_aligns_xp_with_the_same_check(big, pair, models):
    """The MRML logic's in-process segment runs the same check on the scene's volumes (a real
    scene from slicer-core): same labels as the command on the shifted pair, a refused
    unrelated XP, and `alignXp=False` as before."""
    slicer = pytest.importorskip("slicer")
    from ThinSectionSegmentationLib import ThinSectionSegmentationLogic, volumes  # deferred: needs the host

    pp = pair[0]
    scene = slicer.vtkMRMLScene()
    pp_node = volumes.create_rgb_volume(scene, "S_PP", pp, MM_PER_PIXEL)
    xp_node = volumes.create_rgb_volume(scene, "S_XP", shifted_xp(big, *SHIFT), MM_PER_PIXEL)
    logic = ThinSectionSegmentationLogic(scene)
    out = logic.segment(pp_node, xp_node, models["xp"], device="cpu", show=False)
    assert "S_PP: XP offset from PP by dy +3, dx -5 px (score" in " ".join(logic.messages)
    aligned_xp = XpAlignment(3.0, -5.0, 0.0, 50.0, True).apply(shifted_xp(big, *SHIFT))
    assert np.array_equal(volumes.label_array(out.labelmap), direct_labels(models["xp"], pp, aligned_xp, "auto"))
    unaligned = logic.segment(pp_node, xp_node, models["xp"], device="cpu", show=False, alignXp=False)
    assert np.array_equal(
        volumes.label_array(unaligned.labelmap), direct_labels(models["xp"], pp, shifted_xp(big, *SHIFT), "auto")
    )
    other = volumes.create_rgb_volume(scene, "O_XP", generate_section(N, N, seed=7).xp, MM_PER_PIXEL)
    with pytest.raises(ThinSegError, match="PP S_PP and XP O_XP do not match"):
        logic.segment(pp_node, other, models["xp"], device="cpu", show=False)
