"""`thinseg prepare` on a REAL sandstone field (PPL, XPL, hand-drawn mask): the netCDF training
section it writes (exact pixels, XP aligned, labels named by the class file, GeoSlicer
attributes), that `thinseg train` reads it, and refusals that leave nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from helpers import REAL_CLASSES, error_lines, open_nc, read_rgb, real_field, run_main, write_image

from thinseg.registration.ppxp import shift_image


@pytest.fixture(scope="module")
def field():
    return real_field("2a")


def prepare(capsys, field, out, *extra):
    return run_main(
        capsys,
        "prepare",
        field["pp"],
        field["mask"],
        "--xp",
        field["xp"],
        "--pp-pattern",
        "paralelos",
        "--classes",
        REAL_CLASSES,
        "--output",
        out,
        *extra,
    )


def test_a_real_field_becomes_a_geoslicer_training_section(capsys, tmp_path, field):
    code, out, err = prepare(capsys, field, tmp_path / "sections")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "sections").iterdir()) == ["2a.nc", "2a_prepared.png"]
    assert "XP offset from PP by dy +4, dx +8 px" in out
    assert "Quartz                5    25.20" in out  # 483811 of 1920000 mask pixels are code 4
    pp, xp, mask = read_rgb(field["pp"]), read_rgb(field["xp"]), tifffile.imread(field["mask"])
    with open_nc(tmp_path / "sections" / "2a.nc") as ds:
        assert ds["2a_PP"].dimensions == ("z_2a_PP", "y_2a_PP", "x_2a_PP", "c")
        assert np.array_equal(ds["2a_PP"][0], pp)
        assert np.array_equal(ds["2a_XP"][0], shift_image(xp, 4, 8))
        labels = ds["2a_labels"]
        assert labels.type == "labelmap" and labels.reference == "2a_PP"
        assert list(labels.labels) == [
            "Name,Index,Color",
            "Matrix,1,#8c6e5a",
            "K-feldspar,2,#f08080",
            "Lithic fragments,3,#556b2f",
            "Plagioclase,4,#87ceeb",
            "Quartz,5,#ffd700",
        ]
        assert np.array_equal(labels[0], mask + 1)
        assert labels.filters()["zlib"]
        record = json.loads(ds.thinseg_prepare)
        assert record["xp_alignment"]["dy"] == 4 and record["xp_alignment"]["dx"] == 8
        assert np.allclose(ds["2a_PP"].transform, [-0.00132, 0, 0, 0, 0, -0.00132, 0, 0, 0, 0, 0.00132, 0, 0, 0, 0, 1])


def test_the_section_is_what_training_reads(capsys, tmp_path, field):
    from thinseg.data.sections import open_section

    assert prepare(capsys, field, tmp_path)[0] == 0
    section = open_section(tmp_path / "2a.nc")
    assert section.name == "2a" and section.shape == (1200, 1600)
    assert section.class_table.names[0] == "Matrix"
    assert np.array_equal(section.source("PP").read(100, 140, 200, 260), read_rgb(field["pp"])[100:140, 200:260])
    assert np.array_equal(section.source("XP").read(100, 140, 200, 260), read_rgb(field["xp"])[104:144, 208:268])
    assert section.read_labels()[600, 800] == tifffile.imread(field["mask"])[600, 800] + 1


def test_pp_only_and_no_align(capsys, tmp_path, field):
    code, out, _ = prepare(capsys, field, tmp_path / "a", "--no-align", "--name", "field 2a")
    assert code == 0 and "XP: not checked (--no-align)" in out
    with open_nc(tmp_path / "a" / "field_2a.nc") as ds:  # GeoSlicer variable names keep spaces
        assert np.array_equal(ds["field 2a_XP"][0], read_rgb(field["xp"]))
    code, out, _ = run_main(
        capsys,
        "prepare",
        field["pp"],
        field["mask"],
        "--pp-only",
        "--pp-pattern",
        "paralelos",
        "--classes",
        REAL_CLASSES,
        "--output",
        tmp_path / "b",
    )
    assert code == 0 and "PP-only section" in out
    with open_nc(tmp_path / "b" / "2a.nc") as ds:
        assert "2a_XP" not in ds.variables and "2a_PP" in ds.variables


def test_bad_inputs_get_one_line_and_leave_nothing(capsys, tmp_path, field):
    out = tmp_path / "out"
    small = write_image(tmp_path / "small_mask.tif", np.zeros((100, 100), np.uint8))
    odd = write_image(tmp_path / "odd_mask.tif", np.full((1200, 1600), 7, np.uint8))
    cases = [
        ((field["pp"], small, "--xp", field["xp"]), "small_mask.tif: label image is 100x100 px but PP is 1600x1200 px"),
        ((field["pp"], odd, "--xp", field["xp"]), "odd_mask.tif: label values 7 are not in the class file"),
        ((field["pp"], field["mask"]), "no XP image found"),
        ((tmp_path / "nope_PP.jpg", field["mask"], "--xp", field["xp"]), "nope_PP.jpg: PP image file not found"),
    ]
    for args, message in cases:
        code, _, err = run_main(capsys, "prepare", *args, "--classes", REAL_CLASSES, "--output", out)
        assert code == 2 and message in err and len(error_lines(err)) == 1, err
        assert "Traceback" not in err
        assert not out.exists() or list(out.iterdir()) == []


def test_an_existing_section_is_not_replaced_without_overwrite(capsys, tmp_path, field):
    assert prepare(capsys, field, tmp_path)[0] == 0
    before = (tmp_path / "2a.nc").stat().st_mtime_ns
    code, _, err = prepare(capsys, field, tmp_path)
    assert code == 2 and "output exists already (2a.nc, 2a_prepared.png)" in err
    assert (tmp_path / "2a.nc").stat().st_mtime_ns == before
    assert prepare(capsys, field, tmp_path, "--overwrite")[0] == 0
