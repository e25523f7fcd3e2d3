"""The modal mineralogy table is honest and kept in one place: pixels left unclassified (label 0)
are a row of their own, so every section's rows sum to 100% of its pixels; repeated runs into
one output folder update ONE modal_mineralogy.csv (a section written again replaces its rows,
other sections stay), atomically, and a file under that name that is not such a table is never
changed without --overwrite."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import MM_PER_PIXEL, leftovers, make_bundle, open_nc, read_csv, run_main, write_pair

from thinseg.classes.files import default_class_table
from thinseg.errors import ThinSegError
from thinseg.reports.mineralogy import (
    UNCLASSIFIED,
    format_table,
    fractions_csv_text,
    modal_mineralogy,
    read_mineralogy_table,
    update_mineralogy_table,
)

TABLE = default_class_table()  # 6 classes: labels 1..6
ROWS = TABLE.names + [UNCLASSIFIED]


def known_labels() -> np.ndarray:
    """40 pixels: 16 Calcite (1), 8 Quartz (5), 4 Others (6), 10 label 0 and 2 of value 9 (no class)."""
    labels = np.zeros((5, 8), np.uint8)
    labels.flat[:16] = 1
    labels.flat[16:24] = 5
    labels.flat[24:28] = 6
    labels.flat[28:30] = 9
    return labels


def test_unclassified_pixels_are_a_row_and_rows_sum_to_the_section():
    result = modal_mineralogy("S", known_labels(), TABLE, mm_per_pixel=0.01)
    rows = {a.name: a for a in result.rows}
    assert [a.name for a in result.rows] == ROWS
    assert [rows[n].pixels for n in ROWS] == [16, 0, 0, 0, 8, 4, 12]  # 10 zeros + 2 without class
    assert [rows[n].percent for n in ROWS] == [40.0, 0.0, 0.0, 0.0, 20.0, 10.0, 30.0]  # of 40 px
    assert [rows[n].area_mm2 for n in ROWS] == pytest.approx([0.0016, 0, 0, 0, 0.0008, 0.0004, 0.0012], abs=1e-15)
    assert (result.classified_pixels, result.section_pixels) == (28, 40)
    assert sum(a.percent for a in result.rows) == 100.0
    assert [a.name for a in result.areas] == TABLE.names  # per-class consumers keep their indexing

    lines = fractions_csv_text([result]).splitlines()
    assert lines[0] == "section,class,pixels,percent,area_mm2"
    assert lines[1] == "S,Calcite,16,40.000,0.001600"
    assert lines[-1] == "S,not classified,12,30.000,0.001200"

    printed = format_table(result).splitlines()
    assert printed[-1].split() == ["not", "classified", "30.00", "0.0012", "12"]


def test_a_fully_classified_section_still_shows_the_row_at_zero():
    result = modal_mineralogy("S", np.full((3, 3), 2, np.uint8), TABLE, mm_per_pixel=0.5)
    assert result.unclassified.pixels == 0 and result.unclassified.percent == 0.0
    assert [a.percent for a in result.rows] == [0.0, 100.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert result.rows[1].area_mm2 == 9 * 0.25
    empty = modal_mineralogy("E", np.zeros((0, 4), np.uint8), TABLE, mm_per_pixel=0.5)
    assert all(a.pixels == 0 and a.percent == 0.0 for a in empty.rows)


def _result(section: str, value: int, size: int = 4):
    return modal_mineralogy(section, np.full((1, size), value, np.uint8), TABLE, mm_per_pixel=0.1)


def test_updates_add_sections_replace_their_own_rows_and_keep_the_others(tmp_path):
    path = tmp_path / "modal_mineralogy.csv"
    assert update_mineralogy_table(path, [_result("A", 1), _result("B", 2)]) == path
    assert update_mineralogy_table(path, [_result("C", 3)]) == path
    rows = read_csv(path)
    assert [r["section"] for r in rows] == ["A"] * 7 + ["B"] * 7 + ["C"] * 7
    before = {r["section"]: r for r in rows if r["class"] == "Dolomite"}
    assert before["B"]["pixels"] == "4"

    # B again (now all label 0): its block is replaced where it was; A and C stay byte for byte
    a_and_c = [line for line in path.read_text().splitlines() if line.startswith(("A,", "C,"))]
    update_mineralogy_table(path, [_result("B", 0, size=5)])
    rows = read_csv(path)
    assert [r["section"] for r in rows] == ["A"] * 7 + ["B"] * 7 + ["C"] * 7
    b = {r["class"]: r for r in rows if r["section"] == "B"}
    assert (b["Dolomite"]["pixels"], b[UNCLASSIFIED]["pixels"], b[UNCLASSIFIED]["percent"]) == ("0", "5", "100.000")
    assert [line for line in path.read_text().splitlines() if line.startswith(("A,", "C,"))] == a_and_c
    assert leftovers(tmp_path) == []  # no temporaries left


def test_a_file_that_is_not_such_a_table_is_kept_unless_overwrite(tmp_path):
    path = tmp_path / "modal_mineralogy.csv"
    old_format = "section,class,pixels,percent,area_mm2\nOld,Calcite,3,100.000,0.030000\n"  # no "not classified"
    path.write_text(old_format)
    assert read_mineralogy_table(path) is None
    first = update_mineralogy_table(path, [_result("A", 1)])
    second = update_mineralogy_table(path, [_result("B", 1)])
    assert first == second == tmp_path / "modal_mineralogy_1.csv"  # one table beside it, not one per run
    assert path.read_text() == old_format
    assert sorted({r["section"] for r in read_csv(first)}) == ["A", "B"]
    (tmp_path / "other.csv").write_bytes(b"\xff\xfe not utf-8")
    assert read_mineralogy_table(tmp_path / "other.csv") is None

    assert update_mineralogy_table(path, [_result("C", 1)], overwrite=True) == path  # asked: replaced
    assert {r["section"] for r in read_csv(path)} == {"C"}


def test_a_failed_update_leaves_the_old_table(tmp_path, monkeypatch):
    path = tmp_path / "modal_mineralogy.csv"
    update_mineralogy_table(path, [_result("A", 1)])
    old = path.read_bytes()

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(ThinSegError, match="No space left"):
        update_mineralogy_table(path, [_result("B", 1)])
    assert path.read_bytes() == old and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# `thinseg segment` runs into one folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("models") / "ThinSectionEnv" / "tiny", title="tiny PP+XP")


def _labels(path: Path, variable: str) -> np.ndarray:
    with open_nc(path) as ds:
        return np.asarray(ds.variables[variable][0])


def _check(rows, section: str, labels: np.ndarray) -> None:
    mine = [r for r in rows if r["section"] == section]
    counts = np.bincount(labels.ravel(), minlength=len(TABLE) + 1)
    expected = list(counts[1:]) + [counts[0]]
    assert [r["class"] for r in mine] == ROWS
    assert [int(r["pixels"]) for r in mine] == expected and sum(expected) == labels.size
    assert [float(r["percent"]) for r in mine] == pytest.approx([100 * c / labels.size for c in expected], abs=5e-4)
    mm2 = MM_PER_PIXEL * MM_PER_PIXEL
    assert [float(r["area_mm2"]) for r in mine] == pytest.approx([c * mm2 for c in expected], abs=5e-7)


def test_runs_into_one_folder_build_one_table(tmp_path, capsys, model):
    a_pp, _ = write_pair(tmp_path / "a", "A_PP", "A_XP", height=40, width=50, seed=1)
    b_pp, _ = write_pair(tmp_path / "b", "B_PP", "B_XP", height=30, width=60, seed=2)
    out = tmp_path / "out"
    base = ("segment", "--model", model, "--output", out, "-q")
    code, stdout, _ = run_main(capsys, *base[:1], a_pp, *base[1:])
    assert code == 0 and f"{UNCLASSIFIED} " in stdout  # the printed table has the row too
    assert run_main(capsys, "segment", b_pp, *base[1:])[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["A_PP.nc", "B_PP.nc", "modal_mineralogy.csv"]
    rows = read_csv(out / "modal_mineralogy.csv")
    assert [r["section"] for r in rows] == ["A_PP"] * 7 + ["B_PP"] * 7
    _check(rows, "A_PP", _labels(out / "A_PP.nc", "A_Segmentation"))
    _check(rows, "B_PP", _labels(out / "B_PP.nc", "B_Segmentation"))

    # A again without --overwrite: a new numbered netCDF, and its own rows named after it
    assert run_main(capsys, "segment", a_pp, *base[1:])[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["A_PP.nc", "A_PP_1.nc", "B_PP.nc", "modal_mineralogy.csv"]
    rows = read_csv(out / "modal_mineralogy.csv")
    assert [r["section"] for r in rows] == ["A_PP"] * 7 + ["B_PP"] * 7 + ["A_PP_1"] * 7
    _check(rows, "A_PP_1", _labels(out / "A_PP_1.nc", "A_Segmentation"))

    # A, now a different (smaller) picture, with --overwrite: A_PP.nc and A_PP's rows replaced in place
    a_small, _ = write_pair(tmp_path / "a2", "A_PP", "A_XP", height=32, width=40, seed=1)
    b_rows = [r for r in rows if r["section"] != "A_PP"]
    code, _, stderr = run_main(capsys, "segment", a_small, *base[1:], "--overwrite")
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["A_PP.nc", "A_PP_1.nc", "B_PP.nc", "modal_mineralogy.csv"]
    rows = read_csv(out / "modal_mineralogy.csv")
    assert [r["section"] for r in rows] == ["A_PP"] * 7 + ["B_PP"] * 7 + ["A_PP_1"] * 7
    new_a = _labels(out / "A_PP.nc", "A_Segmentation")
    assert new_a.shape == (32, 40)
    _check(rows, "A_PP", new_a)
    assert [r for r in rows if r["section"] != "A_PP"] == b_rows
