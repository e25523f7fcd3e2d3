"""`thinseg register` end to end on generated sections (exact labels, known QEMSCAN transform):
PNG/TIFF/netCDF inputs, XP found by affix or given, QEMSCAN maps in every accepted form,
landmarks (CSV, Slicer markups) with per-click residuals and outliers, what is printed, the
output files (and that the registered netCDF is a training section), refusals and interrupts.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import error_lines, make_refinement_diverge, open_nc, run_main, write_image

from thinseg.synth import generate_section

SIZE = 384
STEM_FILES = {
    "registration.tfm",
    "registration.json",
    "qemscan_on_pp.tif",
    "registered.nc",
    "overlay_before.png",
    "overlay_after.png",
}


@pytest.fixture(scope="module")
def sec():
    return generate_section(SIZE, SIZE, seed=5)


@pytest.fixture(scope="module")
def other():
    return generate_section(SIZE, SIZE, seed=6)


def outputs(folder, stem="S1", refined=True) -> set[str]:
    names = set(STEM_FILES) if refined else (STEM_FILES - {"overlay_before.png", "overlay_after.png"}) | {"overlay.png"}
    return {f"{stem}_{n}" for n in names}


def files_in(folder) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def write_rgb_qemscan(path, s, background=(255, 255, 255)):
    lut = np.array(s.qemscan_table.lut(background=background), np.uint8)
    return write_image(path, lut[s.qemscan])


def write_paletted_qemscan(folder, s):
    """The bundled sample's form: paletted TIFF (index = label) + GeoSlicer colour CSV."""
    import tifffile

    cmap = np.zeros((3, 256), np.uint16)
    for k, c in enumerate(s.qemscan_table.classes, 1):
        cmap[:, k] = [v * 257 for v in c.rgb]
    tifffile.imwrite(folder / "S1_QEMSCAN.tif", s.qemscan, photometric="palette", colormap=cmap)
    rows = ["Mineral;R;G;B;English"] + [
        f"{c.name};{c.rgb[0]};{c.rgb[1]};{c.rgb[2]};{c.name}" for c in s.qemscan_table.classes
    ]
    (folder / "colors.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder / "S1_QEMSCAN.tif", folder / "colors.csv"


def write_netcdf_qemscan(path, s, extra_labelmap=False):
    from thinseg.io.netcdf import NetcdfWriter

    with NetcdfWriter(path) as writer:
        writer.add_labelmap("S1_QEMSCAN", s.qemscan, s.qemscan_table, s.qemscan_mm_per_pixel)
        if extra_labelmap:
            writer.add_labelmap("S1_other", s.qemscan, s.qemscan_table, s.qemscan_mm_per_pixel)
    return path


def write_pair(folder, s, pp="S1_PP.png", xp="S1_XP.png"):
    return write_image(folder / pp, s.pp), write_image(folder / xp, s.xp)


def agreement(s, labels, table) -> float:
    """Share of PP pixels whose registered QEMSCAN mineral is the true class (by mineral name)."""
    value_of = {name: v for v, name in enumerate(s.qemscan_table.names, 1)}
    lut = np.zeros(256, np.uint8)
    for k, name in enumerate(table.names, 1):
        lut[k] = s.image_to_class[value_of[name]]
    return float((lut[labels] == s.labels).mean())


def clicks(s, n=5, bad: int | None = None, offset=60.0):
    """n landmark pairs from the true transform (QEMSCAN px, image px); click `bad` is off by
    `offset` image px in the image."""
    h, w = s.pp.shape[:2]
    image = np.array([[0.15, 0.15], [0.85, 0.12], [0.88, 0.85], [0.12, 0.88], [0.5, 0.45], [0.3, 0.6]])[:n] * [w, h]
    inv = np.linalg.inv(s.qemscan_to_image)
    qemscan = image @ inv[:2, :2].T + inv[:2, 2]
    image = image.copy()
    if bad is not None:
        image[bad] += [offset, -offset / 2]
    return qemscan, image


def write_landmarks_csv(path, qemscan, image, names=None):
    names = names or [f"P{i + 1}" for i in range(len(image))]
    rows = ["name,qemscan_x,qemscan_y,image_x,image_y"]
    rows += [f"{n},{q[0]:.3f},{q[1]:.3f},{p[0]:.3f},{p[1]:.3f}" for n, q, p in zip(names, qemscan, image)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# ---------------------------------------------------------------------------------------------


def test_automatic_registration_of_a_png_pair(tmp_path, capsys, sec):
    pp, xp = write_pair(tmp_path / "in", sec)
    q = write_rgb_qemscan(tmp_path / "in" / "S1_QEMSCAN.png", sec)
    out = tmp_path / "out"
    code, stdout, stderr = run_main(capsys, "register", pp, q, "--background", "#ffffff", "--output", out)
    assert code == 0, stderr
    no_traceback(stderr)
    assert files_in(out) == outputs(out)
    assert f"XP: {xp}" in stderr and f"PP: {pp} ({SIZE}x{SIZE} px, 0.00132 mm/px)" in stderr
    assert "refining automatically" in stderr  # step messages
    record = json.loads((out / "S1_registration.json").read_text())["registration"]
    before, after = record["metric_initial"], record["metric_final"]
    assert after > before
    assert f"{before:.3f} -> {after:.3f} bits ({after - before:+.3f})" in stdout
    assert "automatic start (no landmarks)" in stdout and "refinement moved the map by" in stdout
    assert re.search(r"XP offset: (none|dy [+-]\d+, dx [+-]\d+ px)", stdout)
    assert "TRE" not in stdout and "registration error" not in stdout.lower()
    for name in outputs(out):
        assert f"-> {out / name}" in stdout
    with open_nc(out / "S1_registered.nc") as ds:
        assert {"S1_PP", "S1_XP", "S1_QEMSCAN"} <= set(ds.variables)
        assert np.array_equal(ds.variables["S1_PP"][0], sec.pp)
        labels = np.asarray(ds.variables["S1_QEMSCAN"][0])
        assert ds.variables["S1_QEMSCAN"].getncattr("reference") == "S1_PP"

    # the registered file is a training section: PP, XP and the labelmap on the PP grid
    from thinseg.training import open_section

    section = open_section(out / "S1_registered.nc")
    assert section.shape == (SIZE, SIZE) and section.source("XP") is not None
    assert agreement(sec, labels, section.class_table) > 0.9


def test_landmark_residuals_are_listed_and_the_wrong_click_is_flagged(tmp_path, capsys, sec):
    pp, _ = write_pair(tmp_path, sec)
    q, colors = write_paletted_qemscan(tmp_path, sec)
    lm = write_landmarks_csv(tmp_path / "clicks.csv", *clicks(sec, n=5, bad=4))
    out = tmp_path / "out"
    code, stdout, stderr = run_main(
        capsys, "register", pp, q, "--colors", colors, "--landmarks", lm, "--output", out, "-q"
    )
    assert code == 0, stderr
    assert "  checking" not in stderr  # -q: no step messages
    record = json.loads((out / "S1_registration.json").read_text())["registration"]
    rows = {r["name"]: r for r in record["landmarks"]}
    assert [n for n, r in rows.items() if r["outlier"]] == ["P5"]
    assert "landmarks: 5 pairs, similarity fit" in stdout
    for name, r in rows.items():
        line = next(line for line in stdout.splitlines() if line.strip().startswith(name + " "))
        assert f"{r['residual_px']:.2f}" in line and f"{r['leave_one_out_px']:.2f}" in line
        assert ("OUTLIER" in line) == (name == "P5")
    assert "1 outlier(s)" in stdout and "warning: landmark P5 disagrees" in stdout
    with open_nc(out / "S1_registered.nc") as ds:
        labels = np.asarray(ds.variables["S1_QEMSCAN"][0])
    from thinseg.registration import load_qemscan

    assert agreement(sec, labels, load_qemscan(q, colors).table) > 0.9  # refinement got past the bad click


def test_netcdf_inputs_markups_landmarks_and_no_refinement(tmp_path, capsys, sec):
    """PP and XP from one GeoSlicer netCDF (spacing and origin from the file), the QEMSCAN map
    as a netCDF labelmap, Slicer markups (LPS mm) as landmarks, an affine fit kept as it is."""
    from helpers import write_geoslicer_netcdf

    origin = (2.0, -1.5, 0.0)  # RAS; markups are in LPS: (s*col - 2.0, s*row + 1.5)
    src = write_geoslicer_netcdf(
        tmp_path / "S2.nc", {"S2_PP": sec.pp, "S2_XP": sec.xp}, mm_per_pixel=sec.mm_per_pixel, origin_mm=origin
    )
    q = write_netcdf_qemscan(tmp_path / "q.nc", sec)
    q_px, img_px = clicks(sec, n=4)
    img_mm = img_px * sec.mm_per_pixel - np.array(origin[:2])
    q_mm = q_px * sec.qemscan_mm_per_pixel

    def markups(points):
        return {
            "type": "Fiducial",
            "coordinateSystem": "LPS",
            "controlPoints": [
                {"label": f"F{i + 1}", "position": [float(x), float(y), 0.0]} for i, (x, y) in enumerate(points)
            ],
        }

    mrk = tmp_path / "clicks.mrk.json"
    mrk.write_text(json.dumps({"markups": [markups(img_mm), markups(q_mm)]}), encoding="utf-8")
    out = tmp_path / "out"
    code, stdout, stderr = run_main(
        capsys, "register", src, q, "--landmarks", mrk, "--transform", "affine", "--no-refine", "--output", out
    )
    assert code == 0, stderr
    assert files_in(out) == outputs(out, "S2", refined=False)
    assert "XP: variable S2_XP of S2.nc" in stderr and "0.01 mm/px" in stderr  # QEMSCAN spacing from the file
    assert "landmarks: 4 pairs, affine fit" in stdout and "(no refinement: --no-refine)" in stdout
    assert "refinement moved" not in stdout and "OUTLIER" not in stdout
    record = json.loads((out / "S2_registration.json").read_text())
    assert record["kind"] == "affine"
    assert max(r["residual_px"] for r in record["registration"]["landmarks"]) < 0.1  # exact clicks
    with open_nc(out / "S2_registered.nc") as ds:
        labels = np.asarray(ds.variables["S2_QEMSCAN"][0])
        assert {"S2_PP", "S2_XP"} <= set(ds.variables)
    assert agreement(sec, labels, sec.qemscan_table) > 0.9


def test_xp_by_another_affix_or_given_or_absent(tmp_path, capsys, sec):
    q = write_netcdf_qemscan(tmp_path / "q.nc", sec)
    pp, xp = write_pair(tmp_path, sec, "S3_pp.png", "S3_c2.png")
    code, _, stderr = run_main(capsys, "register", pp, q, "--xp-pattern", "c2", "--output", tmp_path / "a", "-q")
    assert code == 0 and f"XP: {xp}" in stderr
    assert files_in(tmp_path / "a") == outputs(tmp_path / "a", "S3")

    other_xp = write_image(tmp_path / "crossed.png", sec.xp)
    code, _, stderr = run_main(capsys, "register", pp, q, "--xp", other_xp, "--output", tmp_path / "b", "-q")
    assert code == 0 and f"XP: {other_xp}" in stderr

    lonely = write_image(tmp_path / "solo" / "S4_PP.png", sec.pp)
    code, stdout, stderr = run_main(capsys, "register", lonely, q, "--output", tmp_path / "c", "-q")
    assert code == 0, stderr
    assert (
        "XP: none found (XP counterpart not found (expected S4_XP.png beside it)); registering with PP alone" in stderr
    )
    assert "XP offset: no XP image" in stdout
    with open_nc(tmp_path / "c" / "S4_registered.nc") as ds:
        assert "S4_XP" not in ds.variables and "S4_QEMSCAN" in ds.variables


def test_existing_outputs_are_refused_unless_overwrite(tmp_path, capsys, sec):
    pp, _ = write_pair(tmp_path, sec)
    q = write_netcdf_qemscan(tmp_path / "q.nc", sec)
    out = tmp_path / "out"
    assert run_main(capsys, "register", pp, q, "--output", out, "-q")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, stderr = run_main(capsys, "register", pp, q, "--output", out, "-q")
    assert code == 2
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith(f"thinseg: error: {out}: output exists already (S1_registration.tfm")
    assert "--overwrite" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, _, stderr = run_main(capsys, "register", pp, q, "--output", out, "--overwrite", "-q")
    assert code == 0, stderr
    assert files_in(out) == outputs(out)  # replaced, no numbered copies or temporaries


def _bad_case(kind, folder, sec, other):
    """(arguments after `register`, path named in the message or None, problem regex)."""
    pp, _ = write_pair(folder, sec)
    q = write_netcdf_qemscan(folder / "q.nc", sec)
    if kind == "missing pp":
        return [folder / "nope_PP.png", q], folder / "nope_PP.png", "PP image file not found"
    if kind == "pp not an image":
        bad = folder / "T_PP.png"
        bad.write_text("not a png")
        return [bad, q], bad, "PP image"
    if kind == "missing qemscan":
        return [pp, folder / "none.tif"], folder / "none.tif", "no such QEMSCAN map file"
    if kind == "unknown colour":
        lut = np.array(sec.qemscan_table.lut(background=(255, 255, 255)), np.uint8)
        rgb = lut[sec.qemscan]
        rgb[5:7, 5:8] = (12, 34, 56)
        bad = write_image(folder / "odd.png", rgb)
        return (
            [pp, bad, "--background", "#ffffff"],
            bad,
            r"the QEMSCAN map has 1 colour\(s\) not in its colour table, e.g. #0c2238 \(6 px\)",
        )
    if kind == "label values without table":
        bad = write_image(folder / "values.png", sec.qemscan)
        return [pp, bad], bad, "a QEMSCAN map of label values needs a colour table"
    if kind == "two labelmaps":
        bad = write_netcdf_qemscan(folder / "two.nc", sec, extra_labelmap=True)
        return [pp, bad], bad, r"name the QEMSCAN labelmap variable \(labelmaps in the file: S1_QEMSCAN, S1_other\)"
    if kind == "unrelated map":
        bad = write_netcdf_qemscan(folder / "other.nc", other)
        return [pp, bad], None, "no match found: the QEMSCAN map and the PP/XP images do not seem to show the same area"
    if kind == "landmark csv without columns":
        bad = folder / "lm.csv"
        bad.write_text("a,b\n1,2\n")
        return [pp, q, "--landmarks", bad], bad, r"the landmark CSV needs columns .* \(missing qemscan_x\)"
    if kind == "too few landmarks":
        bad = write_landmarks_csv(folder / "two.csv", *[a[:2] for a in clicks(sec, n=4)])
        return [pp, q, "--landmarks", bad], bad, "2 landmark pair"
    if kind == "tps without landmarks":
        return [pp, q, "--transform", "tps"], None, "a tps transform needs landmarks"
    if kind == "no-refine without landmarks":
        return [pp, q, "--no-refine"], None, "--no-refine needs landmarks"
    if kind == "landmarks outside the images":
        q_px, img_px = clicks(sec, n=4)
        img_px[1] = [SIZE + 40.0, 10.0]
        bad = write_landmarks_csv(folder / "outside.csv", q_px, img_px)
        return [pp, q, "--landmarks", bad], bad, r"landmark\(s\) P2 lie outside the PP image"
    if kind == "map that does not overlap":
        corner = np.zeros_like(sec.qemscan)
        corner[:6, :6] = sec.qemscan[:6, :6]
        bad = write_netcdf_qemscan(folder / "corner.nc", _with_labels(sec, corner))
        lm = write_landmarks_csv(folder / "lm.csv", *clicks(sec, n=4))
        return [pp, bad, "--landmarks", lm], None, ".*do not overlap"
    if kind == "xp of another size":
        bad = write_image(folder / "small_XP.png", sec.xp[:-4])
        return (
            [pp, q, "--xp", bad],
            bad,
            f"PP is {SIZE}x{SIZE} px but XP is {SIZE}x{SIZE - 4} px; they must be the same size",
        )
    raise AssertionError(kind)


def _with_labels(sec, labels):
    """`sec` with another QEMSCAN label array (same table and pixel size)."""
    import dataclasses

    return dataclasses.replace(sec, qemscan=labels)


BAD = [
    "missing pp",
    "pp not an image",
    "missing qemscan",
    "unknown colour",
    "label values without table",
    "two labelmaps",
    "unrelated map",
    "landmark csv without columns",
    "too few landmarks",
    "tps without landmarks",
    "no-refine without landmarks",
    "xp of another size",
    "landmarks outside the images",
    "map that does not overlap",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_gets_one_line_and_no_output(tmp_path, capsys, sec, other, kind):
    folder = tmp_path / "in"
    folder.mkdir()
    args, culprit, problem = _bad_case(kind, folder, sec, other)
    out = tmp_path / "out"
    code, stdout, stderr = run_main(capsys, "register", *args, "--output", out, "-q")
    assert code == 2, stderr
    no_traceback(stderr)
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    prefix = f"thinseg: error: {re.escape(str(culprit))}: " if culprit is not None else "thinseg: error: "
    assert re.match(prefix + problem, lines[0]), lines[0]
    assert files_in(out) == set()  # nothing, not even hidden temporaries


def test_ctrl_c_while_writing_leaves_nothing(tmp_path, capsys, sec, monkeypatch):
    import thinseg.registration.output as output

    pp, _ = write_pair(tmp_path, sec)
    q = write_netcdf_qemscan(tmp_path / "q.nc", sec)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(output, "_write_netcdf", interrupted)
    code, _, stderr = run_main(capsys, "register", pp, q, "--output", tmp_path / "out", "-q")
    assert code == 130 and "interrupted; no partial output was kept" in stderr
    assert files_in(tmp_path / "out") == set()


def test_diverging_refinement_is_refused_and_nothing_is_written(tmp_path, capsys, sec, monkeypatch):
    make_refinement_diverge(monkeypatch)
    pp, _ = write_pair(tmp_path, sec)
    q = write_netcdf_qemscan(tmp_path / "q.nc", sec)
    lm = write_landmarks_csv(tmp_path / "lm.csv", *clicks(sec, n=4))
    code, _, stderr = run_main(capsys, "register", pp, q, "--landmarks", lm, "--output", tmp_path / "out", "-q")
    assert code == 2 and len(error_lines(stderr)) == 1 and "diverged" in stderr, stderr
    no_traceback(stderr)
    assert files_in(tmp_path / "out") == set()


def test_transform_kinds_are_named_alike_everywhere():
    """The command line and the panel's parameter node list the fits without loading SimpleITK, so
    they name the kinds themselves: their lists must be the registration's own."""
    import ast

    from helpers import MODULE_DIR

    from thinseg.pipelines.register import TRANSFORM_KINDS
    from thinseg.registration.sitk_transforms import KINDS

    parameters = ast.parse((MODULE_DIR / "ThinSectionSegmentationLib" / "parameters.py").read_text(encoding="utf-8"))
    enum_class = next(
        node for node in parameters.body if isinstance(node, ast.ClassDef) and node.name == "TransformKind"
    )
    panel = tuple(ast.literal_eval(node.value) for node in enum_class.body if isinstance(node, ast.Assign))
    assert TRANSFORM_KINDS == KINDS == panel
