"""QEMSCAN map readers and the registration's output files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.registration import load_qemscan, register_section, write_outputs
from thinseg.registration.output import load_transform
from thinseg.synth import generate_section

TABLE = ClassTable.from_names_colors(["Quartz", "Calcite", "Pores"], ["#ffff00", "#00ffff", "#000000"])


def _labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    labels = rng.integers(1, 4, (40, 50)).astype(np.uint8)
    labels[:5] = 0
    return labels


def _table_csv(tmp_path):
    path = tmp_path / "colors.csv"
    path.write_text("Mineral;R;G;B;English\nQuartzo;255;255;0;Quartz\nCalcita;0;255;255;Calcite\nPoros;0;0;0;Pores\n")
    return path


def test_rgb_map_with_colour_table(tmp_path):
    from PIL import Image

    labels = _labels()
    rgb = np.array(TABLE.lut(background=(255, 255, 255)), np.uint8)[labels]
    Image.fromarray(rgb).save(tmp_path / "map.png")
    q = load_qemscan(tmp_path / "map.png", _table_csv(tmp_path), background="#ffffff")
    assert q.table.names == ["Quartz", "Calcite", "Pores"]
    assert np.array_equal(q.labels, labels)


def test_colours_missing_from_the_table_are_refused(tmp_path):
    from PIL import Image

    rgb = np.array(TABLE.lut(background=(255, 255, 255)), np.uint8)[_labels()]
    rgb[10:12, 10:13] = (12, 34, 56)
    Image.fromarray(rgb).save(tmp_path / "map.png")
    with pytest.raises(ThinSegError, match=r"colour\(s\) not in its colour table, e.g. #0c2238 \(6 px\)"):
        load_qemscan(tmp_path / "map.png", _table_csv(tmp_path), background="#ffffff")


def test_paletted_tiff_is_named_by_the_default_qemscan_colours(tmp_path):
    import tifffile

    labels = _labels()
    cmap = np.zeros((3, 256), np.uint16)
    # palette index 1 = calcite cyan, 2 = quartz yellow, 3 = pores black (not the table's order)
    for index, rgb in ((0, (255, 255, 255)), (1, (0, 255, 255)), (2, (255, 255, 0)), (3, (0, 0, 0))):
        cmap[:, index] = np.array(rgb) * 257
    tifffile.imwrite(tmp_path / "map.tif", labels, photometric="palette", colormap=cmap)
    q = load_qemscan(tmp_path / "map.tif", background="#ffffff")
    # compacted in GeoSlicer's palette order: Pores, Quartz, Calcite
    assert q.table.names == ["Pores", "Quartz", "Calcite (0-1% MgO)"]
    expected = np.array([0, 3, 2, 1], np.uint8)[labels]
    assert np.array_equal(q.labels, expected)


def test_label_values_need_a_table_that_covers_them(tmp_path):
    from PIL import Image

    labels = _labels()
    Image.fromarray(labels).save(tmp_path / "labels.png")
    assert np.array_equal(load_qemscan(tmp_path / "labels.png", TABLE).labels, labels)
    labels[0, 0] = 7
    Image.fromarray(labels).save(tmp_path / "labels.png")
    with pytest.raises(ThinSegError, match="label value 7 but its table lists 3 classes"):
        load_qemscan(tmp_path / "labels.png", TABLE)
    with pytest.raises(ThinSegError, match="needs a colour table"):
        load_qemscan(tmp_path / "labels.png")


def test_netcdf_labelmap(tmp_path):
    from thinseg.io.netcdf import NetcdfWriter

    labels = _labels()
    with NetcdfWriter(tmp_path / "q.nc") as writer:
        writer.add_labelmap("s1_QEMSCAN", labels, TABLE, 0.01)
    q = load_qemscan(tmp_path / "q.nc")
    assert q.table.names == TABLE.names and q.table.colors == TABLE.colors
    assert np.array_equal(q.labels, labels)
    assert q.mm_per_pixel == pytest.approx(0.01)


@pytest.fixture(scope="module")
def small_registration():
    s = generate_section(384, 384, seed=5)
    h, w = s.pp.shape[:2]
    image = np.array([[60.0, 60.0], [320.0, 50.0], [330.0, 330.0], [50.0, 320.0]])
    inv = np.linalg.inv(s.qemscan_to_image)
    qemscan = image @ inv[:2, :2].T + inv[:2, 2]
    result = register_section(
        s.pp,
        s.xp,
        s.qemscan,
        s.qemscan_table,
        image_mm_per_pixel=s.mm_per_pixel,
        qemscan_mm_per_pixel=s.qemscan_mm_per_pixel,
        landmarks=(qemscan, image),
    )
    return s, result


def test_outputs_are_complete_and_read_back(small_registration, tmp_path):
    import xarray as xr

    s, result = small_registration
    paths = write_outputs(result, tmp_path, "s5", s.pp, s.qemscan)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        [
            "s5_registration.tfm",
            "s5_registration.json",
            "s5_qemscan_on_pp.tif",
            "s5_registered.nc",
            "s5_overlay_before.png",
            "s5_overlay_after.png",
        ]
    )
    doc = json.loads(paths.json.read_text())
    assert doc["kind"] == "similarity" and len(doc["registration"]["landmarks"]) == 4
    assert doc["registration"]["metric_final"] >= doc["registration"]["metric_initial"]
    itk = sitk.ReadTransform(str(paths.tfm))
    probe = (0.2, 0.3)
    assert np.allclose(itk.TransformPoint(probe), result.transform.itk.TransformPoint(probe))
    back = load_transform(paths.json)
    assert np.allclose(back.linear_px(), result.transform.linear_px())
    assert np.array_equal(load_qemscan(paths.labels_tif).labels, result.labels)
    with xr.open_dataset(paths.netcdf) as ds:
        assert set(ds.data_vars) == {"s5_PP", "s5_XP", "s5_QEMSCAN"}
        label_var = ds["s5_QEMSCAN"]
        assert label_var.attrs["type"] == "labelmap" and label_var.attrs["reference"] == "s5_PP"
        assert list(label_var.attrs["labels"]) == s.qemscan_table.geoslicer_labels()
        assert np.array_equal(label_var.values[0], result.labels)
        assert np.array_equal(ds["s5_PP"].values[0], s.pp)
    with pytest.raises(ThinSegError, match="output exists already"):
        write_outputs(result, tmp_path, "s5", s.pp, s.qemscan)


def test_a_failed_write_leaves_nothing(small_registration, tmp_path, monkeypatch):
    import thinseg.registration.output as output

    s, result = small_registration

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(output, "_write_netcdf", broken)
    with pytest.raises(OSError):
        write_outputs(result, tmp_path, "s5", s.pp, s.qemscan)
    assert list(tmp_path.iterdir()) == []
