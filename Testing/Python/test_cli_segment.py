"""`thinseg segment` end to end: real PNG/JPEG/TIFF/netCDF files, real model folders, in-process
`main([...])` runs (and one real `python -m thinseg` process), checked against what the command promises:
inputs and pairing, GeoSlicer netCDF layout, spacing, numbered outputs, overlay, modal
mineralogy CSV, confidence map, progress, resampling, bad input, exit codes and interrupts.

The models are tiny random UNets (6 -> 7 outputs, roi 64): the labels mean nothing, but every
labelmap is compared pixel by pixel with the engine run directly on the same pixels.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    MM_PER_PIXEL,
    data_variables,
    decoded,
    error_lines,
    expected_transform,
    leftovers,
    make_bundle,
    open_nc,
    read_csv,
    rewrite_bundle,
    run_main,
    run_subprocess,
    section_images,
    write_geoslicer_netcdf,
    write_image,
    write_pair,
)

from thinseg.classes.files import default_class_table
from thinseg.inference.engine import InferenceOptions, Segmenter, _Plan
from thinseg.inference.resample import ResampledSource, labels_to_grid
from thinseg.io.images import ArraySource
from thinseg.model.bundle import load_bundle
from thinseg.model.safe_load import load_torch_file
from thinseg.resources import default_model_dir

H, W = 100, 140  # small, not a multiple of the 64 px tile: exercises padding and blending
TABLE = default_class_table()
LABELS_ATTR = ["Name,Index,Color"] + [f"{c.name},{i},{c.color}" for i, c in enumerate(TABLE.classes, 1)]


# ---------------------------------------------------------------------------------------------
# fixtures and checks


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """Every run on the CPU, also on GPU machines: labels are compared bit for bit with a direct
    engine run, and `--device cuda` must show its fallback. (The subprocess test is not affected.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models") / "ThinSectionEnv"
    return {
        "rgb6": make_bundle(root / "tiny-pp-xp", inputs=("PP", "PX"), title="tiny PP+XP"),
        "rgb3": make_bundle(root / "tiny-pp", inputs=("PP",), seed=1, title="tiny PP only"),
    }


@pytest.fixture(scope="module")
def engines(models):
    """The engine as the CLI builds it (default options, overlap for a 64 px tile), for expected labels."""
    cache = {}

    def get(key: str, confidence: bool = False) -> Segmenter:
        if (key, confidence) not in cache:
            options = InferenceOptions(overlap=16, device="cpu", with_confidence=confidence)
            cache[key, confidence] = Segmenter(load_bundle(models[key]), options)
        return cache[key, confidence]

    return get


def expected(engines, key, images, confidence=False):
    return engines(key, confidence).segment([ArraySource(np.ascontiguousarray(a)) for a in images])


def no_traceback(err: str) -> None:
    assert "Traceback" not in err, err


def check_layout(ds, var: str, shape_hw, mm_per_pixel: float, origin=(0.0, 0.0, 0.0), rgb: bool = False) -> None:
    """GeoSlicer's per-image layout: dims z_/y_/x_<var> (+ c), mm coordinates with x/y origins
    negated, and the 16-float IJK-to-RAS `transform`."""
    v = ds.variables[var]
    dims = (f"z_{var}", f"y_{var}", f"x_{var}") + (("c",) if rgb else ())
    assert v.dimensions == dims
    assert v.shape == (1, *shape_hw) + ((3,) if rgb else ())
    assert v.dtype == np.uint8
    z, y, x = (np.asarray(ds.variables[d][:]) for d in dims[:3])
    assert z.tolist() == [origin[2]]
    np.testing.assert_allclose(y, -origin[1] + mm_per_pixel * np.arange(shape_hw[0]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(x, -origin[0] + mm_per_pixel * np.arange(shape_hw[1]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.diff(x), mm_per_pixel, rtol=1e-9)
    np.testing.assert_allclose(
        np.asarray(v.getncattr("transform"), float), expected_transform(mm_per_pixel, origin), atol=1e-12
    )
    if rgb:
        assert [str(s) for s in ds.variables["c"][:]] == ["r", "g", "b"]


def check_labelmap(ds, var: str, reference: str, shape_hw, mm_per_pixel: float, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    check_layout(ds, var, shape_hw, mm_per_pixel, origin)
    v = ds.variables[var]
    assert v.getncattr("type") == "labelmap"
    assert list(v.getncattr("labels")) == LABELS_ATTR  # a LIST, label k = k-th entry
    assert v.getncattr("reference") == reference
    filters = v.filters()
    assert filters["zlib"] and filters["complevel"] > 0 and v.chunking() != "contiguous"
    labels = np.asarray(v[0])
    assert labels.min() >= 0 and labels.max() <= len(TABLE)
    return labels


def check_csv_matches(csv_path: Path, sections: dict[str, tuple[np.ndarray, float]]) -> None:
    """modal mineralogy CSV == pixel counts of the labelmaps actually written."""
    rows = read_csv(csv_path)
    assert [r["section"] for r in rows] == [s for s in sections for _ in range(len(TABLE) + 1)]
    for name, (labels, mm) in sections.items():
        counts = np.bincount(labels.ravel(), minlength=len(TABLE) + 1)
        counts = np.append(counts[1:], counts[0])  # the classes, then "not classified" (label 0)
        mine = [r for r in rows if r["section"] == name]
        assert [r["class"] for r in mine] == TABLE.names + ["not classified"]
        for k, row in enumerate(mine):
            assert int(row["pixels"]) == counts[k]
            assert float(row["percent"]) == pytest.approx(100 * counts[k] / labels.size, abs=5e-4)
            assert float(row["area_mm2"]) == pytest.approx(counts[k] * mm * mm, abs=5e-7)
        assert sum(float(r["percent"]) for r in mine) == pytest.approx(100, abs=0.01)


def printed_table(stdout: str, section: str) -> dict[str, tuple[float, float, int]]:
    """The terminal table printed for `section`: class -> (%, mm^2, pixels)."""
    block = stdout.split(f"{section}: ", 1)[1]
    rows = {}
    for name in TABLE.names:
        m = re.search(rf"^{re.escape(name)}\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", block, re.M)
        assert m, f"{name} missing from the printed table:\n{block}"
        rows[name] = (float(m.group(1)), float(m.group(2)), int(m.group(3)))
    return rows


# ---------------------------------------------------------------------------------------------
# the happy paths: formats, pairing, layout, reports


def test_png_pair_writes_geoslicer_netcdf_and_modal_mineralogy(tmp_path, capsys, models, engines):
    pp_path, xp_path = write_pair(tmp_path / "in", "S1_PP", "S1_XP")
    out = tmp_path / "deep" / "results"  # created, parents included
    code, stdout, stderr = run_main(capsys, "segment", pp_path, "--model", models["rgb6"], "--output", out)
    assert code == 0, stderr
    no_traceback(stderr)
    assert sorted(p.name for p in out.iterdir()) == ["S1_PP.nc", "modal_mineralogy.csv"]  # no overlay unless asked

    pp, xp = decoded(pp_path), decoded(xp_path)
    with open_nc(out / "S1_PP.nc") as ds:
        assert data_variables(ds) == ["S1_PP", "S1_XP", "S1_Segmentation"]  # no confidence unless asked
        check_layout(ds, "S1_PP", (H, W), MM_PER_PIXEL, rgb=True)  # default 0.00132 mm/px
        check_layout(ds, "S1_XP", (H, W), MM_PER_PIXEL, rgb=True)
        assert np.array_equal(ds.variables["S1_PP"][0], pp) and np.array_equal(ds.variables["S1_XP"][0], xp)
        labels = check_labelmap(ds, "S1_Segmentation", "S1_PP", (H, W), MM_PER_PIXEL)
        assert ds.getncattr("thinseg_model") == "tiny PP+XP"
    assert np.array_equal(labels, expected(engines, "rgb6", (pp, xp)).labels)

    # xarray (what GeoSlicer uses) reads the same thing
    import xarray as xr

    with xr.open_dataset(out / "S1_PP.nc") as xds:
        assert xds["S1_PP"].dims == ("z_S1_PP", "y_S1_PP", "x_S1_PP", "c")
        assert list(xds["S1_Segmentation"].attrs["labels"]) == LABELS_ATTR
        assert np.array_equal(xds["S1_Segmentation"].values[0], labels)

    check_csv_matches(out / "modal_mineralogy.csv", {"S1_PP": (labels, MM_PER_PIXEL)})
    table = printed_table(stdout, "S1_PP")
    counts = np.bincount(labels.ravel(), minlength=7)
    for k, name in enumerate(TABLE.names, start=1):
        percent, area, pixels = table[name]
        assert pixels == counts[k] and percent == pytest.approx(100 * counts[k] / counts[1:].sum(), abs=0.006)
        assert area == pytest.approx(counts[k] * MM_PER_PIXEL**2, abs=6e-5)
    assert f"-> {out / 'S1_PP.nc'}" in stdout and "modal_mineralogy.csv" in stdout
    assert "1 section(s) segmented, 0 failed" in stderr


def test_default_output_folder_is_results(tmp_path, capsys, models, monkeypatch):
    write_pair(tmp_path, "a_PP", "a_XP")
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_main(capsys, "segment", "a_PP.png", "--model", models["rgb6"], "--quiet")
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["a_PP.nc", "modal_mineralogy.csv"]


def test_jpeg_counterpart_found_from_one_image_with_c2_affix(tmp_path, capsys, models, engines):
    pp_path, xp_path = write_pair(tmp_path, "ABC_3200.5_pp", "ABC_3200.5_c2", ".jpg")
    # a decoy with the default XP affix: --xp-pattern c2 must not pick it
    write_image(tmp_path / "ABC_3200.5_xp.jpg", section_images(H, W, seed=5)[1])
    target = tmp_path / "out" / "ABC.nc"
    code, _, stderr = run_main(
        capsys, "segment", pp_path, "--xp-pattern", "c2", "--model", models["rgb6"], "--output", target, "--quiet"
    )
    assert code == 0, stderr
    assert sorted(p.name for p in target.parent.iterdir()) == ["ABC.nc", "ABC_fractions.csv"]
    pp, xp = decoded(pp_path), decoded(xp_path)  # JPEG is lossy: the file's decoded pixels
    with open_nc(target) as ds:
        assert data_variables(ds) == ["ABC_3200.5_pp", "ABC_3200.5_c2", "ABC_3200.5_Segmentation"]
        assert np.array_equal(ds.variables["ABC_3200.5_pp"][0], pp)
        assert np.array_equal(ds.variables["ABC_3200.5_c2"][0], xp)
        labels = check_labelmap(ds, "ABC_3200.5_Segmentation", "ABC_3200.5_pp", (H, W), MM_PER_PIXEL)
    assert np.array_equal(labels, expected(engines, "rgb6", (pp, xp)).labels)
    check_csv_matches(target.parent / "ABC_fractions.csv", {"ABC_3200.5_pp": (labels, MM_PER_PIXEL)})


def test_given_the_xp_image_the_pp_counterpart_is_found(tmp_path, capsys, models):
    _, xp_path = write_pair(tmp_path, "W7_PP", "W7_PX")
    code, _, stderr = run_main(
        capsys,
        "segment",
        xp_path,
        "--xp-pattern",
        "PX",
        "--model",
        models["rgb6"],
        "--output",
        tmp_path / "out",
        "--quiet",
    )
    assert code == 0, stderr
    with open_nc(tmp_path / "out" / "W7_PP.nc") as ds:  # named after the PP image
        assert data_variables(ds) == ["W7_PP", "W7_PX", "W7_Segmentation"]


def test_bigtiff_and_tiled_tiff_are_read_pixel_exact(tmp_path, capsys, models, engines):
    pp, xp = section_images(H, W, seed=2)
    pp_path = write_image(tmp_path / "T_PP.tif", pp, bigtiff=True, tile=(32, 32), compression="zlib")
    write_image(tmp_path / "T_XP.tiff", xp, tile=(48, 48))  # the counterpart may use another extension
    import tifffile

    with tifffile.TiffFile(pp_path) as t:
        assert t.is_bigtiff and t.pages[0].is_tiled
    code, _, stderr = run_main(capsys, "segment", pp_path, "--model", models["rgb6"], "--output", tmp_path / "o", "-q")
    assert code == 0, stderr
    with open_nc(tmp_path / "o" / "T_PP.nc") as ds:
        assert np.array_equal(ds.variables["T_PP"][0], pp) and np.array_equal(ds.variables["T_XP"][0], xp)
        labels = check_labelmap(ds, "T_Segmentation", "T_PP", (H, W), MM_PER_PIXEL)
    assert np.array_equal(labels, expected(engines, "rgb6", (pp, xp)).labels)


def test_folder_batch_processes_every_file_once(tmp_path, capsys, models):
    folder = tmp_path / "well"
    write_pair(folder, "S1_PP", "S1_XP", seed=0)
    write_pair(folder, "s2_pp", "s2_xp", ".tif", seed=1)  # affixes are case-insensitive
    pp3, xp3 = section_images(H, W, seed=2)
    write_geoslicer_netcdf(folder / "S3.nc", {"S3_PP": pp3, "S3_XP": xp3})
    (folder / "notes.md").write_text("not an image")  # ignored in folders
    # the folder, plus one of its counterparts named explicitly: still used once
    code, stdout, stderr = run_main(
        capsys,
        "segment",
        folder,
        folder / "S1_XP.png",
        "--model",
        models["rgb6"],
        "--output",
        tmp_path / "out",
        "--quiet",
    )
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "S1_PP.nc",
        "S3.nc",
        "modal_mineralogy.csv",
        "s2_pp.nc",
    ]
    assert "3 section(s) segmented, 0 failed" in stderr
    sections = {}  # in processing order: the folder's files sorted by name
    for name, seg in (("S1_PP", "S1_Segmentation"), ("S3", "S3_Segmentation"), ("s2_pp", "s2_Segmentation")):
        with open_nc(tmp_path / "out" / f"{name}.nc") as ds:
            sections[name] = (np.asarray(ds.variables[seg][0]), MM_PER_PIXEL)
    with open_nc(tmp_path / "out" / "s2_pp.nc") as ds:
        assert data_variables(ds) == ["s2_pp", "s2_xp", "s2_Segmentation"]
    check_csv_matches(tmp_path / "out" / "modal_mineralogy.csv", sections)
    assert [line.split(": ")[0] for line in stdout.splitlines() if " MPix in " in line] == list(sections)
    assert stdout.count("-> ") == 3


def test_pp_only_model_segments_pp_images_of_a_folder_of_pairs(tmp_path, capsys, models, engines):
    folder = tmp_path / "in"
    pp_path, _ = write_pair(folder, "Q_PP", "Q_XP")
    lone = write_image(folder / "R_PP.png", section_images(H, W, seed=3)[0])  # no XP at all: fine for this model
    code, _, stderr = run_main(capsys, "segment", folder, "--model", models["rgb3"], "--output", tmp_path / "out", "-q")
    assert code == 0, stderr  # the XP image of a pair is not a failure for a PP-only model
    assert not error_lines(stderr)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Q_PP.nc", "R_PP.nc", "modal_mineralogy.csv"]
    for path, name in ((pp_path, "Q"), (lone, "R")):
        with open_nc(tmp_path / "out" / f"{name}_PP.nc") as ds:
            assert data_variables(ds) == [f"{name}_PP", f"{name}_Segmentation"]
            assert np.array_equal(ds.variables[f"{name}_PP"][0], decoded(path))
            labels = check_labelmap(ds, f"{name}_Segmentation", f"{name}_PP", (H, W), MM_PER_PIXEL)
        assert np.array_equal(labels, expected(engines, "rgb3", (decoded(path),)).labels)


def test_pp_only_model_given_only_the_xp_image_uses_its_pp(tmp_path, capsys, models):
    _, xp_path = write_pair(tmp_path, "Z_PP", "Z_XP")
    code, _, stderr = run_main(capsys, "segment", xp_path, "--model", models["rgb3"], "--output", tmp_path / "o", "-q")
    assert code == 0, stderr
    with open_nc(tmp_path / "o" / "Z_PP.nc") as ds:
        assert data_variables(ds) == ["Z_PP", "Z_Segmentation"]


def test_netcdf_input_keeps_its_spacing_and_copies_everything(tmp_path, capsys, models, engines):
    pp, xp = section_images(H, W, seed=4)
    other_pp = section_images(H, W, seed=6)[0]
    manual = (np.arange(H * W).reshape(H, W) % 7).astype(np.uint8)
    porosity = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    origin = (1.5, -2.0, 0.25)
    src = write_geoslicer_netcdf(
        tmp_path / "in" / "well_S.nc",
        {"S_PP": pp, "S_PP_b": other_pp, "S_PX": xp},
        origin_mm=origin,
        labelmaps={"S_Manual": manual},
        scalars={"S_Porosity": porosity},
    )
    before = src.read_bytes()
    # --mm-per-pixel applies to PNG/JPEG/TIFF only: a netCDF file carries its own spacing
    code, stdout, stderr = run_main(
        capsys,
        "segment",
        src,
        "--xp-pattern",
        "PX",
        "--mm-per-pixel",
        "0.005",
        "--model",
        models["rgb6"],
        "--output",
        tmp_path / "out",
        "-q",
    )
    assert code == 0, stderr
    assert "resampl" not in stderr
    assert src.read_bytes() == before
    out = tmp_path / "out" / "well_S.nc"
    with open_nc(src) as s, open_nc(out) as ds:
        assert data_variables(ds) == ["S_PP", "S_PP_b", "S_PX", "S_Manual", "S_Porosity", "well_S_Segmentation"]
        for name in ("S_PP", "S_PP_b", "S_PX", "S_Manual", "S_Porosity"):  # copies: data, dtype, attributes
            a, b = s.variables[name], ds.variables[name]
            assert b.dtype == a.dtype and np.array_equal(b[:], a[:])
            assert {k: np.asarray(a.getncattr(k)).tolist() for k in a.ncattrs()} == {
                k: np.asarray(b.getncattr(k)).tolist() for k in b.ncattrs()
            }
            for dim_a, dim_b in zip(a.dimensions, b.dimensions):
                assert np.array_equal(s.variables[dim_a][:], ds.variables[dim_b][:])
        assert ds.variables["S_Manual"].filters()["zlib"]
        # the first PP variable is the reference; spacing and origin come from the file
        labels = check_labelmap(ds, "well_S_Segmentation", "S_PP", (H, W), MM_PER_PIXEL, origin)
    assert np.array_equal(labels, expected(engines, "rgb6", (pp, xp)).labels)
    check_csv_matches(tmp_path / "out" / "modal_mineralogy.csv", {"well_S": (labels, MM_PER_PIXEL)})


def test_netcdf_output_can_be_segmented_again(tmp_path, capsys, models, engines):
    pp_path, xp_path = write_pair(tmp_path / "in", "N_PP", "N_XP")
    code, _, stderr = run_main(
        capsys,
        "segment",
        pp_path,
        "--model",
        models["rgb6"],
        "--output",
        tmp_path / "first.nc",
        "--probabilities",
        "-q",
    )
    assert code == 0, stderr
    code, _, stderr = run_main(
        capsys, "segment", tmp_path / "first.nc", "--model", models["rgb6"], "--output", tmp_path / "second.nc", "-q"
    )
    assert code == 0, stderr
    with open_nc(tmp_path / "first.nc") as a, open_nc(tmp_path / "second.nc") as b:
        assert data_variables(b) == ["N_PP", "N_XP", "N_Segmentation", "N_Confidence", "first_Segmentation"]
        for name in data_variables(a):
            assert np.array_equal(a.variables[name][:], b.variables[name][:])
        assert np.array_equal(b.variables["first_Segmentation"][:], a.variables["N_Segmentation"][:])
        check_labelmap(b, "first_Segmentation", "N_PP", (H, W), MM_PER_PIXEL)


def test_resampling_to_the_model_resolution_and_back(tmp_path, capsys, models, engines):
    pp_path, xp_path = write_pair(tmp_path, "F_PP", "F_XP")
    fine = MM_PER_PIXEL / 2  # the model sees the section at half the size
    code, _, stderr = run_main(
        capsys,
        "segment",
        pp_path,
        "--mm-per-pixel",
        str(fine),
        "--model",
        models["rgb6"],
        "--output",
        tmp_path / "out",
        "--probabilities",
        "-q",
    )
    assert code == 0, stderr
    assert re.search(
        rf"F_PP\.png: resampling from {fine:g} to the model's {MM_PER_PIXEL:g} mm/px \(70x50 px\) and back", stderr
    ), stderr
    pp, xp = decoded(pp_path), decoded(xp_path)
    with open_nc(tmp_path / "out" / "F_PP.nc") as ds:
        check_layout(ds, "F_PP", (H, W), fine, rgb=True)  # output grid = input grid
        assert np.array_equal(ds.variables["F_PP"][0], pp)
        labels = check_labelmap(ds, "F_Segmentation", "F_PP", (H, W), fine)
        check_layout(ds, "F_Confidence", (H, W), fine)
    small = expected(engines, "rgb6", [ResampledSource(ArraySource(a), 0.5).read(0, 50) for a in (pp, xp)])
    assert np.array_equal(labels, labels_to_grid(small.labels, (H, W)))
    check_csv_matches(tmp_path / "out" / "modal_mineralogy.csv", {"F_PP": (labels, fine)})


def test_resampling_a_netcdf_uses_the_spacing_in_the_file(tmp_path, capsys, models):
    pp, xp = section_images(60, 80, seed=7)
    coarse = 2 * MM_PER_PIXEL
    src = write_geoslicer_netcdf(tmp_path / "coarse.nc", {"C_PP": pp, "C_XP": xp}, mm_per_pixel=coarse)
    code, _, stderr = run_main(capsys, "segment", src, "--model", models["rgb6"], "--output", tmp_path / "out", "-q")
    assert code == 0, stderr
    assert (
        f"coarse.nc: resampling from {coarse:g} to the model's {MM_PER_PIXEL:g} mm/px (160x120 px) and back" in stderr
    )
    with open_nc(tmp_path / "out" / "coarse.nc") as ds:
        check_labelmap(ds, "coarse_Segmentation", "C_PP", (60, 80), coarse)


def test_overlay_png_has_labels_over_pp_and_a_legend(tmp_path, capsys, models):
    pp_path, _ = write_pair(tmp_path, "O_PP", "O_XP")
    code, stdout, stderr = run_main(
        capsys, "segment", pp_path, "--overlay", "--model", models["rgb6"], "--output", tmp_path / "out", "-q"
    )
    assert code == 0, stderr
    overlay = tmp_path / "out" / "O_PP_overlay.png"
    assert f"-> {overlay}" in stdout
    from PIL import Image

    with Image.open(overlay) as image:
        assert image.format == "PNG"
        picture = np.asarray(image.convert("RGB"))
    assert picture.shape[1] > W and picture.shape[0] >= H  # image plus a legend column
    legend = picture[:, W + 10 :].reshape(-1, 3)
    present = {tuple(int(v) for v in c) for c in np.unique(legend, axis=0)}
    for cls in TABLE.classes:
        if cls.color not in ("#000000", "#ffffff"):  # black/white are also text/background
            assert cls.rgb in present, f"legend patch for {cls.name} missing"


def test_probabilities_add_a_uint8_confidence_map(tmp_path, capsys, models, engines):
    pp_path, xp_path = write_pair(tmp_path, "P_PP", "P_XP")
    code, _, stderr = run_main(
        capsys, "segment", pp_path, "--probabilities", "--model", models["rgb6"], "--output", tmp_path / "out", "-q"
    )
    assert code == 0, stderr
    with open_nc(tmp_path / "out" / "P_PP.nc") as ds:
        assert data_variables(ds) == ["P_PP", "P_XP", "P_Segmentation", "P_Confidence"]
        check_layout(ds, "P_Confidence", (H, W), MM_PER_PIXEL)
        conf = ds.variables["P_Confidence"]
        assert "type" not in conf.ncattrs() and "labels" not in conf.ncattrs()  # a plain scalar image
        assert conf.getncattr("reference") == "P_PP"
        confidence, labels = np.asarray(conf[0]), np.asarray(ds.variables["P_Segmentation"][0])
    want = expected(engines, "rgb6", (decoded(pp_path), decoded(xp_path)), confidence=True)
    assert np.array_equal(confidence, want.confidence) and np.array_equal(labels, want.labels)
    assert confidence.min() >= 255 // 7  # max of 7 softmax probabilities >= 1/7


def test_progress_bar_on_stderr_and_quiet_hides_it(tmp_path, capsys, models):
    pp_path, _ = write_pair(tmp_path, "B_PP", "B_XP", height=150, width=200)
    code, stdout, stderr = run_main(
        capsys, "segment", pp_path, "--model", models["rgb6"], "--output", tmp_path / "a", "--tile", "64"
    )
    assert code == 0, stderr
    tiles = _Plan.make(150, 200, (64, 64), 16).n_tiles  # 64 px tiles, default overlap for them: 16 px
    assert tiles == 12
    done = re.findall(r"B_PP: 100%.*?(\d+)/(\d+) \[.*?MPix/s", stderr)
    assert done and done[-1] == (str(tiles), str(tiles)), stderr
    assert "tile" not in stdout
    code, _, stderr = run_main(
        capsys, "segment", pp_path, "--model", models["rgb6"], "--output", tmp_path / "b", "--quiet", "--tile", "64"
    )
    assert code == 0
    assert "MPix/s" not in stderr and "/12" not in stderr and "%|" not in stderr


def test_device_cuda_without_gpu_is_an_error_and_auto_falls_back_to_cpu(tmp_path, capsys, models, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pp_path, _ = write_pair(tmp_path, "D_PP", "D_XP")
    code, _, stderr = run_main(
        capsys, "segment", pp_path, "--device", "cuda", "--model", models["rgb6"], "--output", tmp_path / "out", "-q"
    )
    assert code == 2, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("thinseg: error: device cuda needs a CUDA GPU"), stderr
    assert not (tmp_path / "out" / "D_PP.nc").exists()
    code, _, stderr = run_main(
        capsys, "segment", pp_path, "--device", "auto", "--model", models["rgb6"], "--output", tmp_path / "out", "-q"
    )
    assert code == 0, stderr
    assert "no CUDA GPU found: running on the CPU (device auto)" in stderr
    assert (tmp_path / "out" / "D_PP.nc").is_file()


def test_bundled_default_model(tmp_path, capsys):
    if not (default_model_dir() / "meta.json").is_file():
        pytest.skip(f"bundled model not present yet: {default_model_dir()}")
    bundle = load_bundle(default_model_dir())
    pp, xp = section_images(H, W, seed=8)
    write_image(tmp_path / "G_PP.png", pp)
    if len(bundle.input_names) > 1:
        write_image(tmp_path / "G_XP.png", xp)
    code, stdout, stderr = run_main(capsys, "segment", tmp_path / "G_PP.png", "--output", tmp_path / "out", "-q")
    assert code == 0, stderr
    assert f"model: {bundle.title} ({default_model_dir()})" in stderr
    with open_nc(tmp_path / "out" / "G_PP.nc") as ds:
        assert list(ds.variables["G_Segmentation"].getncattr("labels"))[1:] == bundle.class_table.geoslicer_labels()[1:]


# ---------------------------------------------------------------------------------------------
# existing outputs


def test_existing_outputs_are_kept_and_new_ones_numbered(tmp_path, capsys, models):
    pp_path, _ = write_pair(tmp_path / "in", "E_PP", "E_XP")
    out = tmp_path / "out"
    out.mkdir()
    old = {"E_PP.nc": b"an older result", "E_PP_overlay.png": b"old picture", "modal_mineralogy.csv": b"old,csv\n"}
    for name, data in old.items():
        (out / name).write_bytes(data)
    args = ("segment", pp_path, "--model", models["rgb6"], "--output", out, "--overlay", "-q")
    assert run_main(capsys, *args)[0] == 0
    assert run_main(capsys, *args)[0] == 0
    for name, data in old.items():
        assert (out / name).read_bytes() == data
    # the foreign modal_mineralogy.csv is kept: both runs add to ONE table beside it
    made = ["E_PP_1.nc", "E_PP_1_overlay.png", "E_PP_2.nc", "E_PP_2_overlay.png", "modal_mineralogy_1.csv"]
    assert sorted(p.name for p in out.iterdir()) == sorted(list(old) + made)
    with open_nc(out / "E_PP_2.nc") as ds:
        labels = np.asarray(ds.variables["E_Segmentation"][0])
    check_csv_matches(
        out / "modal_mineralogy_1.csv", {"E_PP_1": (labels, MM_PER_PIXEL), "E_PP_2": (labels, MM_PER_PIXEL)}
    )

    # --overwrite replaces them in place
    code, stdout, stderr = run_main(capsys, *args, "--overwrite")
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(list(old) + made)  # nothing new, nothing hidden
    with open_nc(out / "E_PP.nc") as ds:
        assert np.array_equal(ds.variables["E_Segmentation"][0], labels)
    assert (out / "E_PP_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_csv_matches(out / "modal_mineralogy.csv", {"E_PP": (labels, MM_PER_PIXEL)})


def test_existing_single_output_file_is_kept(tmp_path, capsys, models):
    pp_path, _ = write_pair(tmp_path, "K_PP", "K_XP")
    target = tmp_path / "K.nc"
    target.write_bytes(b"keep me")
    code, stdout, _ = run_main(capsys, "segment", pp_path, "--model", models["rgb6"], "--output", target, "-q")
    assert code == 0
    assert target.read_bytes() == b"keep me"
    assert f"-> {tmp_path / 'K_1.nc'}" in stdout
    with open_nc(tmp_path / "K_1.nc") as ds:
        assert "K_Segmentation" in ds.variables
    code, _, _ = run_main(
        capsys, "segment", pp_path, "--model", models["rgb6"], "--output", target, "-q", "--overwrite"
    )
    assert code == 0
    with open_nc(target) as ds:
        assert "K_Segmentation" in ds.variables
    # the CSV is named after the netCDF it belongs to
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "K.nc",
        "K_1.nc",
        "K_1_fractions.csv",
        "K_PP.png",
        "K_XP.png",
        "K_fractions.csv",
    ]


def test_one_output_file_for_many_sections_is_refused(tmp_path, capsys, models):
    write_pair(tmp_path / "in", "A_PP", "A_XP", seed=0)
    write_pair(tmp_path / "in", "B_PP", "B_XP", seed=1)
    code, _, stderr = run_main(
        capsys, "segment", tmp_path / "in", "--model", models["rgb6"], "--output", tmp_path / "one.nc", "-q"
    )
    assert code == 2
    no_traceback(stderr)
    assert error_lines(stderr) == [
        f"thinseg: error: {tmp_path / 'one.nc'}: --output is one file but 2 sections were given; give a folder"
    ]
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file, non-zero exit, no traceback, no partial output


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _bad_case(kind: str, folder: Path):
    """Build one bad section; returns (INPUT args, the file the message must name, problem regex)."""
    pp, xp = section_images(H, W, seed=0)
    if kind == "missing file":
        return [folder / "nope_PP.png"], folder / "nope_PP.png", "file not found"
    if kind == "not an image":
        p, _ = write_pair(folder, "j_PP", "j_XP")
        p.write_bytes(b"this is not a picture at all" * 10)
        return [p], p, r"PP image is not a readable image \(PNG, JPEG or TIFF expected\)"
    if kind == "empty file":
        p, _ = write_pair(folder, "e_PP", "e_XP")
        p.write_bytes(b"")
        return [p], p, r"PP image is an empty file \(0 bytes\)"
    if kind == "truncated png":
        p, _ = write_pair(folder, "t_PP", "t_XP")
        return [_truncate(p)], p, "PP image is truncated or corrupt"
    if kind == "truncated jpeg":
        _, x = write_pair(folder, "t_PP", "t_XP", ".jpg")
        return [folder / "t_PP.jpg"], _truncate(x), "XP image is truncated or corrupt"
    if kind == "truncated tiff":
        p, _ = write_pair(folder, "t_PP", "t_XP", ".tif", bigtiff=True, tile=(32, 32))
        return [_truncate(p, 0.6)], p, r"PP image is truncated: \d+ of \d+ tiles/strips end past the end of the file"
    if kind == "grayscale png":
        p = write_image(folder / "g_PP.png", pp[..., 0])
        write_image(folder / "g_XP.png", xp)
        return [p], p, r"PP image is grayscale \(1 channel\); an RGB image is expected"
    if kind == "grayscale tiff":
        write_image(folder / "g_PP.tif", pp)
        x = write_image(folder / "g_XP.tif", xp[..., 0])
        return [folder / "g_PP.tif"], x, r"XP image is grayscale \(1 channel\); an RGB image is expected"
    if kind == "rgba png":
        write_image(folder / "a_PP.png", pp)
        x = write_image(folder / "a_XP.png", np.dstack([xp, np.full((H, W), 255, np.uint8)]))
        return [folder / "a_PP.png"], x, r"XP image has 4 channels \(RGBA\); an RGB image is expected"
    if kind == "rgba tiff":
        p = write_image(folder / "a_PP.tif", np.dstack([pp, np.full((H, W), 255, np.uint8)]))
        write_image(folder / "a_XP.tif", xp)
        return [p], p, r"PP image has 4 channels \(RGBA\); an RGB image is expected"
    if kind == "different sizes":
        p = write_image(folder / "d_PP.png", pp)
        write_image(folder / "d_XP.png", xp[:-3])
        return [p], p, rf"PP is {W}x{H} px but XP d_XP.png is {W}x{H - 3} px; they must be the same size"
    if kind == "missing counterpart":
        p = write_image(folder / "m_PP.png", pp)
        return [p], p, r"XP counterpart not found \(expected m_XP.png beside it\)"
    if kind == "no affix":
        p = write_image(folder / "plain.png", pp)
        return [p], p, "cannot tell whether this is PP or XP"
    if kind == "unsupported type":
        p = folder / "notes.txt"
        p.write_text("hello")
        return [p], p, r"unsupported file type '.txt' \(PNG, JPEG, TIFF or netCDF expected\)"
    if kind == "empty folder":
        (folder / "empty").mkdir()
        return [folder / "empty"], folder / "empty", "folder holds no PNG, JPEG, TIFF or netCDF files"
    if kind == "netcdf without pp":
        p = write_geoslicer_netcdf(folder / "nopp.nc", {"S_XP": xp, "S_other": pp})
        return [p], p, r"no PP image: no RGB variable whose name contains 'PP'"
    if kind == "netcdf without xp":
        p = write_geoslicer_netcdf(folder / "noxp.nc", {"S_PP": pp})
        return [p], p, r"no XP image: no RGB variable whose name contains 'XP'"
    if kind == "corrupt netcdf":
        p = write_geoslicer_netcdf(folder / "bad.nc", {"S_PP": pp, "S_XP": xp})
        _truncate(p, 0.3)
        return [p], p, r"not a readable netCDF file"
    raise AssertionError(kind)


BAD_CASES = [
    "missing file",
    "not an image",
    "empty file",
    "truncated png",
    "truncated jpeg",
    "truncated tiff",
    "grayscale png",
    "grayscale tiff",
    "rgba png",
    "rgba tiff",
    "different sizes",
    "missing counterpart",
    "no affix",
    "unsupported type",
    "empty folder",
    "netcdf without pp",
    "netcdf without xp",
    "corrupt netcdf",
]


@pytest.mark.parametrize("kind", BAD_CASES)
def test_bad_input_gets_one_line_and_no_output(tmp_path, capsys, models, kind):
    folder = tmp_path / "in"
    folder.mkdir()
    inputs, culprit, problem = _bad_case(kind, folder)
    out = tmp_path / "out"
    code, stdout, stderr = run_main(capsys, "segment", *inputs, "--model", models["rgb6"], "--output", out, "-q")
    assert code == 2, stderr
    no_traceback(stderr)
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert re.fullmatch(rf"thinseg: error: {re.escape(str(culprit))}: {problem}.*", lines[0]), lines[0]
    assert leftovers(out) == [] and not (out / "modal_mineralogy.csv").exists()
    assert leftovers(folder) == sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*.nc")
    )  # inputs only, no temporaries


def test_batch_goes_on_after_failures_and_lists_them(tmp_path, capsys, models, engines):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = [
        _bad_case(k, folder)
        for k in ("grayscale png", "different sizes", "missing counterpart", "netcdf without pp", "truncated tiff")
    ]
    good_pp, good_xp = write_pair(folder, "ok_PP", "ok_XP", seed=9)
    missing = tmp_path / "gone_PP.png"
    out = tmp_path / "out"
    code, stdout, stderr = run_main(
        capsys, "segment", folder, missing, "--model", models["rgb6"], "--output", out, "-q"
    )
    assert code == 1, stderr
    no_traceback(stderr)
    assert sorted(p.name for p in out.iterdir()) == ["modal_mineralogy.csv", "ok_PP.nc"]
    with open_nc(out / "ok_PP.nc") as ds:
        labels = np.asarray(ds.variables["ok_Segmentation"][0])
    assert np.array_equal(labels, expected(engines, "rgb6", (decoded(good_pp), decoded(good_xp))).labels)
    check_csv_matches(out / "modal_mineralogy.csv", {"ok_PP": (labels, MM_PER_PIXEL)})
    assert "1 section(s) segmented, 6 failed" in stderr
    failed = [line for line in stderr.splitlines() if line.startswith("  failed: ")]
    assert len(failed) == 6 and len(error_lines(stderr)) == 6
    for _inputs, culprit, problem in bad:
        assert any(
            re.fullmatch(rf"thinseg: error: {re.escape(str(culprit))}: {problem}.*", line)
            for line in error_lines(stderr)
        ), culprit
        assert any(re.search(problem, line) for line in failed), problem
    assert f"  failed: {missing}: file not found" in failed
    assert [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".partial"] == []


def test_nothing_done_exits_2_with_a_summary(tmp_path, capsys, models):
    for name in ("u_PP", "v_PP"):
        write_image(tmp_path / f"{name}.png", section_images(H, W)[0][..., 1])
        write_image(tmp_path / f"{name.replace('PP', 'XP')}.png", section_images(H, W)[1])
    code, _, stderr = run_main(
        capsys, "segment", tmp_path, "--model", models["rgb6"], "--output", tmp_path / "out", "-q"
    )
    assert code == 2
    no_traceback(stderr)
    assert "0 section(s) segmented, 2 failed" in stderr and len(error_lines(stderr)) == 2
    assert leftovers(tmp_path / "out") == [] and not (tmp_path / "out" / "modal_mineralogy.csv").exists()


def _bad_model(kind: str, folder: Path) -> tuple[Path, str, str]:
    """(model folder, the path the message names, problem regex)."""
    if kind == "missing folder":
        return folder / "nowhere", "", "model folder not found"
    target = make_bundle(folder / "m")
    if kind == "missing weights":
        (target / "model.pth").unlink()
        return target, "", "not a GeoSlicer model folder: model.pth is missing"
    if kind == "corrupt weights":
        _truncate(target / "model.pth", 0.5)
        return target, "model.pth", r"model.pth is corrupt(, truncated)? or "
    if kind == "bad meta.json":
        (target / "meta.json").write_text("{not json")
        return target, "meta.json", r"meta.json is not valid JSON"
    if kind == "unsupported network":
        rewrite_bundle(target, edit_saved=lambda s: s["config"]["model"].update(name="SegFormer"))
        return target, "model.pth", r".*SegFormer"
    if kind == "channel mismatch":
        # meta.json and model.pth say PP+PX (6 channels); the network in model.pth takes 3
        three = make_bundle(folder / "net3", inputs=("PP",))
        small = load_torch_file(three / "model.pth")

        def swap(saved):
            saved["model_state_dict"] = small["model_state_dict"]
            saved["config"]["model"] = small["config"]["model"]

        rewrite_bundle(target, edit_saved=swap)
        return target, "model.pth", "the inputs give 6 channels but the network takes 3"
    if kind == "non-RGB inputs":
        # a consistent bundle (6 channels in, 6 channels taken) whose inputs are not two RGB images
        def edit(meta):
            meta["inputs"] = {"PP": {"spatial_dims": 2, "n_channels": 4}, "PX": {"spatial_dims": 2, "n_channels": 2}}

        rewrite_bundle(target, edit_meta=edit, edit_saved=lambda saved: edit(saved["config"]["meta"]))
        load_bundle(target)  # the bundle itself loads
        return target, "", r"model 'tiny-6ch' needs PP \(4 channels\), PX \(2 channels\).*RGB"
    raise AssertionError(kind)


BAD_MODELS = [
    "missing folder",
    "missing weights",
    "corrupt weights",
    "bad meta.json",
    "unsupported network",
    "channel mismatch",
    "non-RGB inputs",
]


@pytest.mark.parametrize("kind", BAD_MODELS)
def test_bad_model_is_refused_with_one_line(tmp_path, capsys, kind):
    model, named, problem = _bad_model(kind, tmp_path / "models")
    pp_path, _ = write_pair(tmp_path / "in", "M_PP", "M_XP")
    out = tmp_path / "out"
    code, _, stderr = run_main(capsys, "segment", pp_path, "--model", model, "--output", out, "-q")
    assert code == 2
    no_traceback(stderr)
    lines = error_lines(stderr)
    culprit = model / named if named else model
    assert len(lines) == 1 and re.fullmatch(rf"thinseg: error: {re.escape(str(culprit))}: {problem}.*", lines[0]), (
        stderr
    )
    assert not out.exists()  # refused before anything was written


def test_channel_count_of_model_and_inputs_must_match(tmp_path, capsys, models):
    """A 6-channel model given a section with only PP (netCDF) fails; the PP-only model runs it."""
    pp, _ = section_images(H, W)
    src = write_geoslicer_netcdf(tmp_path / "pponly.nc", {"S_PP": pp})
    code, _, stderr = run_main(capsys, "segment", src, "--model", models["rgb6"], "--output", tmp_path / "a", "-q")
    assert code == 2 and error_lines(stderr) == [
        f"thinseg: error: {src}: no XP image: no RGB variable whose name contains 'XP'"
    ]
    code, _, stderr = run_main(capsys, "segment", src, "--model", models["rgb3"], "--output", tmp_path / "b", "-q")
    assert code == 0, stderr
    assert (tmp_path / "b" / "pponly.nc").is_file()


@pytest.mark.parametrize("single_file", [False, True])
def test_output_that_cannot_be_written(tmp_path, capsys, models, single_file):
    pp_path, _ = write_pair(tmp_path / "in", "W_PP", "W_XP")
    blocker = tmp_path / "a_file"
    blocker.write_text("I am a file")
    out = blocker / "sub" / "x.nc" if single_file else blocker / "sub"
    code, _, stderr = run_main(capsys, "segment", pp_path, "--model", models["rgb6"], "--output", out, "-q")
    assert code == 2
    no_traceback(stderr)
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith(f"thinseg: error: {blocker / 'sub'}: cannot write here"), stderr
    assert blocker.read_text() == "I am a file"
    assert leftovers(tmp_path) == []


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(capsys, "--version")
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("thinseg ")


def test_bad_option_values_are_usage_errors(tmp_path, capsys, models):
    pp_path, _ = write_pair(tmp_path, "V_PP", "V_XP")
    for bad in (["--mm-per-pixel", "0"], ["--mm-per-pixel", "-1"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as exit_info:
            run_main(capsys, "segment", pp_path, "--model", models["rgb6"], *bad)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("thinseg: error: argument --") and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# interrupts and crashes leave nothing half-written


@pytest.mark.parametrize("where", ["labelmap", "xp image", "overlay"])
def test_ctrl_c_mid_write_leaves_no_partial_file(tmp_path, capsys, models, monkeypatch, where):
    pp_path, _ = write_pair(tmp_path / "in", "I_PP", "I_XP")
    out = tmp_path / "out"
    out.mkdir()
    (out / "I_PP.nc").write_bytes(b"previous result")  # --overwrite must not lose it either
    import thinseg.pipelines.segment as segment_module

    if where == "labelmap":

        def interrupted(self, *args, **kwargs):
            raise KeyboardInterrupt

        from thinseg.io.netcdf import BandRowWriter  # labels go to the file band by band while segmenting

        monkeypatch.setattr(BandRowWriter, "write_rows", interrupted)
    elif where == "xp image":  # Ctrl-C while the images are being read, segmented and copied
        from thinseg.io.images import PillowSource

        original = PillowSource.read

        def interrupted(self, y0, *args, **kwargs):
            if self.path.stem.endswith("XP") and y0 > 0:
                raise KeyboardInterrupt
            return original(self, y0, *args, **kwargs)

        monkeypatch.setattr(PillowSource, "read", interrupted)
    else:

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(segment_module, "write_overlay_png", interrupted)
    code, stdout, stderr = run_main(
        capsys,
        "segment",
        pp_path,
        "--model",
        models["rgb6"],
        "--output",
        out,
        "--overlay",
        "--overwrite",
        "-q",
        "--tile",
        "64",
    )  # several tile rows: Ctrl-C after the first
    assert code == 130
    assert "thinseg: interrupted; no partial output was kept" in stderr
    no_traceback(stderr)
    assert sorted(p.name for p in out.iterdir()) == ["I_PP.nc"]  # nothing new, no hidden temporaries
    assert (out / "I_PP.nc").read_bytes() == b"previous result"


def test_unexpected_exception_mid_write_leaves_no_partial_file(tmp_path, capsys, models, monkeypatch):
    pp_path, _ = write_pair(tmp_path / "in", "X_PP", "X_XP")
    from thinseg.io.netcdf import NetcdfWriter

    def broken(self, *args, **kwargs):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(NetcdfWriter, "begin_scalar_image", broken)
    code, _, stderr = run_main(
        capsys, "segment", pp_path, "--model", models["rgb6"], "--output", tmp_path / "out", "--probabilities", "-q"
    )
    assert code == 2 and "Traceback" not in stderr  # a bug is one line too (THINSEG_DEBUG=1 adds the traceback)...
    assert [line for line in error_lines(stderr) if "simulated crash while writing" in line] == error_lines(stderr)
    assert len(error_lines(stderr)) == 1 and "X_PP" in error_lines(stderr)[0]
    assert not (tmp_path / "out").exists()  # ...and leaves nothing behind, not even the folder it made


# ---------------------------------------------------------------------------------------------
# the real command


def test_console_entry_point(tmp_path, models):
    """`python -m thinseg segment` in a fresh process: exit status, stdout/stderr, files."""
    write_pair(tmp_path / "in", "R1_PP", "R1_XP")
    write_image(tmp_path / "in" / "R2_PP.png", section_images(H, W)[0])  # no XP: fails, batch goes on
    proc = run_subprocess(
        "segment", tmp_path / "in", "--model", models["rgb6"], "--output", tmp_path / "out", "--overlay", cwd=tmp_path
    )
    assert proc.returncode == 1, proc.stderr
    no_traceback(proc.stderr)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "R1_PP.nc",
        "R1_PP_overlay.png",
        "modal_mineralogy.csv",
    ]
    assert error_lines(proc.stderr) == [
        f"thinseg: error: {tmp_path / 'in' / 'R2_PP.png'}: XP counterpart not found (expected R2_XP.png beside it)"
    ]
    assert "1 section(s) segmented, 1 failed" in proc.stderr
    assert re.search(r"R1_PP: 100%.*\d+/\d+ \[.*MPix/s", proc.stderr)
    assert "Calcite" in proc.stdout and f"-> {tmp_path / 'out' / 'R1_PP.nc'}" in proc.stdout
    with open_nc(tmp_path / "out" / "R1_PP.nc") as ds:
        labels = np.asarray(ds.variables["R1_Segmentation"][0])
    check_csv_matches(tmp_path / "out" / "modal_mineralogy.csv", {"R1_PP": (labels, MM_PER_PIXEL)})


def test_the_readme_demo_segments_the_bundled_sample_with_the_bundled_model(tmp_path, capsys):
    """`make demo`'s command: the files it promises, and labels that agree with the sample's truth."""
    from helpers import REPO, open_nc, run_main
    from PIL import Image

    sample = REPO / "Resources" / "Sample"
    out = tmp_path / "sample"
    code, stdout, err = run_main(
        capsys, "segment", sample / "sample_PP.jpg", "--output", out, "--overlay", "--probabilities", "--quiet"
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["modal_mineralogy.csv", "sample_PP.nc", "sample_PP_overlay.png"]
    assert "Quartz" in stdout and "modal mineralogy" in stdout
    truth = np.asarray(Image.open(sample / "sample_truth.png"))
    with open_nc(out / "sample_PP.nc") as ds:
        labelmap = next(v for v in ds.variables.values() if getattr(v, "type", None) == "labelmap")
        labels = labelmap[0]
    accuracy = float((labels == truth).mean())
    assert accuracy > 0.90, accuracy  # the model card reports 94% on held-out generated sections


def test_a_full_disk_fails_that_section_in_one_line_and_the_batch_goes_on(tmp_path, capsys, models, monkeypatch):
    import errno

    from thinseg.io.netcdf import NetcdfWriter

    folder = tmp_path / "well"
    write_pair(folder, "S1_PP", "S1_XP", seed=0)
    write_pair(folder, "S2_PP", "S2_XP", seed=1)
    real_begin_labelmap = NetcdfWriter.begin_labelmap

    def disk_full_for_s1(self, name, *args, **kwargs):
        if name.startswith("S1"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_begin_labelmap(self, name, *args, **kwargs)

    monkeypatch.setattr(NetcdfWriter, "begin_labelmap", disk_full_for_s1)
    out = tmp_path / "out"
    code, _, stderr = run_main(capsys, "segment", folder, "--model", models["rgb6"], "--output", out, "--quiet")
    assert code == 1 and "Traceback" not in stderr
    assert f"{out / 'S1_PP.nc'}: cannot write the output: No space left on device" in stderr
    assert "1 section(s) segmented, 1 failed" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["S2_PP.nc", "modal_mineralogy.csv"]  # nothing half-written
