"""`thinseg analyze` from the command line: result folders written whole (grains.csv, summary.json,
report.html, overview.png) and equal to the library's answer, never replaced without
--overwrite, netCDF labelmaps (ours and GeoSlicer-layout) read with their spacing and class
names, and every bad input one `thinseg: error: <file>: <problem>` line with exit code 2 and no
result folder left; a batch with one bad input exits 1 with the good one written.

Runs are in-process `main([...])` calls, plus one real `python -m thinseg analyze` process.
Labelmaps are generated discs, 200 x 200 pixels.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from grain_shapes import CLASSES, MATRIX, QUARTZ, disc, paint_discs, scatter_discs
from helpers import error_lines, run_main, run_subprocess, section_images, write_geoslicer_netcdf, write_image

from thinseg.analysis import GRAIN_COLUMNS, GrainOptions, analyze, open_labelmap
from thinseg.classes.files import default_class_table
from thinseg.io.netcdf import NetcdfWriter

MM = 0.004
SHAPE = (200, 200)
FILES = ("grains.csv", "summary.json", "report.html", "overview.png")


def _labels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = paint_discs(SHAPE, scatter_discs(SHAPE, [float(r) for r in rng.uniform(5, 20, 14)], rng))
    labels[disc(SHAPE, 0, 100, 12)] = QUARTZ  # one grain at the edge
    return labels


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """A label PNG coded 0..3 with its value,name,color class file (code k = class k + 1)."""
    codes = _labels() - 1
    classes = tmp_path / "classes.csv"
    classes.write_text(
        "value,name,color\n" + "".join(f"{k},{c.name},{c.color}\n" for k, c in enumerate(CLASSES.classes)),
        encoding="utf-8",
    )
    return {"png": write_image(tmp_path / "field.png", codes.astype(np.uint8)), "classes": classes}


def _analyze(tmp_path: Path, capsys, *args: object) -> tuple[int, str, str]:
    return run_main(capsys, "analyze", *args, "-o", tmp_path / "out", "-q", "--workers", "1")


def _no_nan(constant: str) -> None:
    raise AssertionError(f"summary.json holds {constant}: not JSON")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_analyze_writes_the_result_folder_the_library_computes(tmp_path, capsys, inputs):
    code, out, err = _analyze(tmp_path, capsys, inputs["png"], "--classes", inputs["classes"], "--pixel-size", MM)
    assert code == 0, err
    folder = tmp_path / "out" / "field"
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    expected = analyze(open_labelmap(inputs["png"], classes=inputs["classes"], mm_per_pixel=MM), GrainOptions())
    text = (folder / "grains.csv").read_text(encoding="utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == [name for name, _unit in GRAIN_COLUMNS]
    assert len(rows) == 1 + len(expected.table) and len(expected.table) >= 10
    assert text == expected.table.csv_text()
    by_name = list(csv.DictReader(io.StringIO(text)))
    assert {r["class"] for r in by_name} <= {"Quartz", "Feldspar", "Lithic"}
    assert sum(int(r["touches_edge"]) for r in by_name) == 1
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"), parse_constant=_no_nan)
    assert summary == json.loads(json.dumps(expected.summary))
    assert summary["section"]["mm_per_pixel"] == MM
    assert [c["class"] for c in summary["classes"]] == CLASSES.names
    counts = np.bincount(_labels().ravel(), minlength=5)
    for value, entry in enumerate(summary["classes"], 1):
        assert entry["area_percent"] == pytest.approx(100 * counts[value] / counts.sum(), rel=1e-12)
    html = (folder / "report.html").read_text(encoding="utf-8")
    assert "<html" in html.lower() and "field" in html
    from PIL import Image

    with Image.open(folder / "overview.png") as image:
        assert image.size[0] > 0 and image.size[1] > 0
    assert f"{len(expected.table)} grains" in out and "field" in out
    assert error_lines(err) == []
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_an_existing_result_is_replaced_only_with_overwrite(tmp_path, capsys, inputs):
    args = (inputs["png"], "--classes", inputs["classes"], "--pixel-size", MM)
    assert _analyze(tmp_path, capsys, *args)[0] == 0
    folder = tmp_path / "out" / "field"
    before = _snapshot(folder)
    code, _out, err = _analyze(tmp_path, capsys, *args, "--min-pixels", "400")
    assert code != 0
    lines = error_lines(err)
    assert len(lines) == 1 and "field" in lines[0] and "--overwrite" in lines[0]
    assert _snapshot(folder) == before
    code, _out, err = _analyze(tmp_path, capsys, *args, "--min-pixels", "400", "--overwrite")
    assert code == 0, err
    after = _snapshot(folder)
    assert sorted(after) == sorted(FILES)
    assert after["grains.csv"] != before["grains.csv"]
    assert json.loads(after["summary.json"])["settings"]["min_grain_pixels"] == 400
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["field"]


def test_our_netcdf_labelmap_gives_its_spacing_and_class_names(tmp_path, capsys):
    labels = _labels(1)
    path = tmp_path / "section.nc"
    with NetcdfWriter(path) as writer:
        writer.add_labelmap("section_Segmentation", labels, CLASSES, MM)
    code, _out, err = _analyze(tmp_path, capsys, path)
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "section" / "summary.json").read_text(encoding="utf-8"))
    assert summary["section"]["mm_per_pixel"] == pytest.approx(MM)
    assert [c["class"] for c in summary["classes"]] == CLASSES.names
    assert summary["settings"]["matrix_classes"] == ["Matrix"]
    counts = np.bincount(labels.ravel(), minlength=5)
    assert summary["classes"][MATRIX - 1]["area_mm2"] == pytest.approx(counts[MATRIX] * MM * MM)
    # --pixel-size overrides the file's spacing
    code, _out, err = _analyze(tmp_path, capsys, path, "--pixel-size", 2 * MM, "--overwrite")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "section" / "summary.json").read_text(encoding="utf-8"))
    assert summary["section"]["mm_per_pixel"] == pytest.approx(2 * MM)


def test_a_geoslicer_netcdf_labelmap_with_its_pp_image(tmp_path, capsys):
    table = default_class_table()  # Calcite, Dolomite, Mg-Clay minerals, Pores, Quartz, Others
    pp, _xp = section_images(*SHAPE)
    labels = np.full(SHAPE, 1, np.uint8)
    labels[disc(SHAPE, 60, 60, 25)] = 4  # a pore
    labels[disc(SHAPE, 140, 130, 30)] = 5
    path = write_geoslicer_netcdf(tmp_path / "gs.nc", {"PP": pp}, mm_per_pixel=MM, labelmaps={"gs_labels": labels})
    code, _out, err = _analyze(tmp_path, capsys, path, "--matrix", "Calcite")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "gs" / "summary.json").read_text(encoding="utf-8"))
    assert summary["section"]["mm_per_pixel"] == pytest.approx(MM)
    assert [c["class"] for c in summary["classes"]] == table.names
    assert summary["porosity"]["pore_classes"] == ["Pores"]
    assert summary["porosity"]["porosity_percent"] == pytest.approx(100 * (labels == 4).sum() / labels.size)
    assert summary["porosity"]["pore_bodies"] == 1
    assert summary["settings"]["matrix_classes"] == ["Calcite"]
    assert summary["grains"]["count"] == summary["grains"]["measured"] == 1  # the quartz; the pore apart
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "gs" / "grains.csv").read_text(encoding="utf-8"))))
    assert sorted(r["class"] for r in rows) == ["Pores", "Quartz"]


def _nc_without_labelmap(tmp_path: Path) -> Path:
    pp, _xp = section_images(*SHAPE)
    return write_geoslicer_netcdf(tmp_path / "images.nc", {"PP": pp}, mm_per_pixel=MM)


def _nc_with_two_labelmaps(tmp_path: Path) -> Path:
    pp, _xp = section_images(*SHAPE)
    labels = np.ones(SHAPE, np.uint8)
    return write_geoslicer_netcdf(
        tmp_path / "two.nc", {"PP": pp}, mm_per_pixel=MM, labelmaps={"a": labels, "b": labels}
    )


def _rgb_png(tmp_path: Path) -> Path:
    return write_image(tmp_path / "rgb.png", section_images(*SHAPE)[0])


def _unknown_values(tmp_path: Path) -> Path:
    codes = _labels() - 1
    codes[5:9, 5:9] = 7
    return write_image(tmp_path / "odd.png", codes)


@pytest.mark.parametrize(
    ("make", "extra", "problem"),
    [
        (_rgb_png, ("--pixel-size", MM), "single-channel"),
        (_unknown_values, ("--pixel-size", MM), "label values 7 are not in the class file"),
        (lambda tmp: Path(tmp / "field.png"), (), "no pixel size"),
        (_nc_without_labelmap, (), "no labelmap in the file"),
        (_nc_with_two_labelmaps, (), "several labelmaps (a, b): name one with --variable"),
        (lambda tmp: tmp / "missing.png", ("--pixel-size", MM), "labelmap not found"),
    ],
    ids=["rgb image", "unknown label values", "no pixel size", "netcdf without labelmap", "two labelmaps", "missing"],
)
def test_a_bad_input_is_one_error_line_and_leaves_no_result(tmp_path, capsys, inputs, make, extra, problem):
    path = make(tmp_path)
    code, out, err = _analyze(tmp_path, capsys, path, "--classes", inputs["classes"], *extra)
    assert code == 2
    lines = error_lines(err)
    assert lines == [f"thinseg: error: {path}: {lines[0].split(': ', 3)[-1]}"], err
    assert problem in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_two_labelmaps_one_named_with_variable(tmp_path, capsys):
    path = _nc_with_two_labelmaps(tmp_path)
    code, _out, err = _analyze(tmp_path, capsys, path, "--variable", "b")
    assert code == 0, err
    assert (tmp_path / "out" / "two" / "grains.csv").is_file()
    code, _out, err = _analyze(tmp_path, capsys, path, "--variable", "c", "--overwrite")
    assert code == 2 and "no variable 'c'" in error_lines(err)[0]


@pytest.mark.parametrize("value", ["0", "1000", "nan", "-0.01"])
def test_a_pixel_size_out_of_range_is_a_usage_error(tmp_path, capsys, inputs, value):
    with pytest.raises(SystemExit) as stop:
        _analyze(tmp_path, capsys, inputs["png"], "--classes", inputs["classes"], "--pixel-size", value)
    assert stop.value.code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--pixel-size" in lines[0]
    assert not (tmp_path / "out").exists()


def test_one_bad_input_among_several_exits_1_with_the_good_one_written(tmp_path, capsys, inputs):
    bad = _unknown_values(tmp_path)
    code, out, err = _analyze(tmp_path, capsys, bad, inputs["png"], "--classes", inputs["classes"], "--pixel-size", MM)
    assert code == 1
    lines = error_lines(err)
    assert len(lines) == 1 and str(bad) in lines[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["field"]
    assert sorted(p.name for p in (tmp_path / "out" / "field").iterdir()) == sorted(FILES)


def test_the_real_command_exits_2_with_one_error_line(tmp_path, inputs):
    bad = _unknown_values(tmp_path)
    done = run_subprocess("analyze", bad, "--classes", inputs["classes"], "--pixel-size", MM, "-o", tmp_path / "out")
    assert done.returncode == 2
    lines = error_lines(done.stderr)
    assert lines == [f"thinseg: error: {bad}: label values 7 are not in the class file classes.csv"], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
