"""Labels and confidence streamed band by band: the engine hands each finished band of rows to a
sink once, in order, never more than a tile high, and `thinseg segment` writes its netCDF,
modal mineralogy and overlay from those rows exactly as from whole in-memory maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import MM_PER_PIXEL, decoded, make_bundle, open_nc, read_csv, run_main, write_pair

from thinseg.classes.files import default_class_table
from thinseg.inference.engine import ArraySink, InferenceOptions, Segmenter
from thinseg.inference.resample import segment_at_model_resolution, stream_at_model_resolution
from thinseg.io.images import ArraySource
from thinseg.io.netcdf import Geometry, NetcdfWriter
from thinseg.model.bundle import load_bundle
from thinseg.reports.mineralogy import modal_mineralogy
from thinseg.reports.overlay import MAX_OVERLAY_SIDE, write_overlay_png
from thinseg.reports.preview import read_preview

TABLE = default_class_table()
H, W = 700, 190  # 700 rows: more than one 512-row netCDF chunk, and many 64 px tile rows


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """Every run on the CPU, so the streamed labels are compared bit for bit with a direct run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("models") / "ThinSectionEnv" / "tiny-pp-xp", inputs=("PP", "PX"))


def engine(model, confidence=True):
    return Segmenter(load_bundle(model), InferenceOptions(overlap=16, device="cpu", with_confidence=confidence))


class Recorder:
    """A sink that keeps copies of the bands it is given, as they arrive."""

    def __init__(self):
        self.bands = []

    def write_rows(self, y0, labels, confidence):
        self.bands.append((y0, labels.copy(), None if confidence is None else confidence.copy()))


def images(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return [ArraySource((rng.random((height, width, 3)) * 255).astype(np.uint8)) for _ in range(2)]


@pytest.mark.parametrize("shape", [(700, 190), (120, 121), (40, 300)])
def test_rows_arrive_in_order_once_each_at_most_a_tile_high_and_equal_the_whole_maps(model, shape):
    seg = engine(model)
    sources = images(*shape)
    whole = seg.segment(sources)
    sink = Recorder()
    stats = seg.stream(sources, sink)
    starts = [y0 for y0, _, _ in sink.bands]
    heights = [labels.shape[0] for _, labels, _ in sink.bands]
    assert starts == list(np.cumsum([0] + heights[:-1])) and sum(heights) == shape[0]  # in order, each row once
    assert max(heights) <= seg.plan_for(*shape).tile_h  # the engine never holds more than a tile-high band
    assert np.array_equal(np.concatenate([b[1] for b in sink.bands]), whole.labels)
    assert np.array_equal(np.concatenate([b[2] for b in sink.bands]), whole.confidence)
    assert stats.shape == shape and stats.tiles == whole.tiles
    assert np.array_equal(stats.confidence_histogram, whole.confidence_histogram)


@pytest.mark.parametrize("factor", [0.5, 0.73, 1.6, (0.8, 1.3)])
def test_rows_streamed_from_a_resampled_run_equal_the_labels_mapped_back_whole(model, factor):
    seg = engine(model)
    sources = images(150, 170, seed=2)
    whole = segment_at_model_resolution(seg, sources, factor)
    sink = ArraySink(150, 170, with_confidence=True)
    stream_at_model_resolution(seg, sources, factor, sink)
    assert np.array_equal(sink.labels, whole.labels)
    assert np.array_equal(sink.confidence, whole.confidence)


def test_labelmap_written_in_uneven_bands_equals_the_whole_map_variable(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, len(TABLE) + 1, (1100, 300)).astype(np.uint8)
    geometry = Geometry.thin_section(MM_PER_PIXEL)
    with NetcdfWriter(tmp_path / "whole.nc") as writer:
        writer.add_labelmap("L", labels, TABLE, reference="PP", geometry=geometry)
        writer.add_scalar_image("C", labels * 3, geometry=geometry)
    with NetcdfWriter(tmp_path / "bands.nc") as writer:
        rows = writer.begin_labelmap("L", labels.shape, TABLE, reference="PP", geometry=geometry)
        scalar = writer.begin_scalar_image("C", labels.shape, np.uint8, geometry=geometry)
        for y0, y1 in [(0, 1), (1, 300), (300, 800), (800, 1037), (1037, 1100)]:
            rows.write_rows(y0, labels[y0:y1])
            scalar.write_rows(y0, labels[y0:y1] * 3)
        rows.finish()
        scalar.finish()
    with open_nc(tmp_path / "whole.nc") as a, open_nc(tmp_path / "bands.nc") as b:
        assert list(a.variables) == list(b.variables)
        for name in a.variables:
            va, vb = a.variables[name], b.variables[name]
            assert va.dimensions == vb.dimensions and va.chunking() == vb.chunking() and va.filters() == vb.filters()
            assert {k: str(va.getncattr(k)) for k in va.ncattrs()} == {k: str(vb.getncattr(k)) for k in vb.ncattrs()}
            assert np.array_equal(va[:], vb[:])


def test_band_writer_refuses_rows_out_of_order_missing_or_without_a_class(tmp_path):
    geometry = Geometry.thin_section(MM_PER_PIXEL)
    with pytest.raises(ValueError), NetcdfWriter(tmp_path / "x.nc") as writer:
        rows = writer.begin_labelmap("L", (10, 4), TABLE, geometry=geometry)
        rows.write_rows(0, np.ones((3, 4), np.uint8))
        rows.write_rows(5, np.ones((3, 4), np.uint8))  # skips rows 3..4
    with pytest.raises(ValueError, match="only 3 of 10 rows"), NetcdfWriter(tmp_path / "y.nc") as writer:
        rows = writer.begin_labelmap("L", (10, 4), TABLE, geometry=geometry)
        rows.write_rows(0, np.ones((3, 4), np.uint8))
        rows.finish()
    with pytest.raises(ValueError, match="label values must be"), NetcdfWriter(tmp_path / "z.nc") as writer:
        rows = writer.begin_labelmap("L", (10, 4), TABLE, geometry=geometry)
        rows.write_rows(0, np.full((10, 4), len(TABLE) + 1, np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize("mm_per_pixel", [MM_PER_PIXEL, MM_PER_PIXEL * 0.8])  # as the model's, and resampled
def test_segment_outputs_equal_those_made_from_whole_label_maps(tmp_path, capsys, model, mm_per_pixel):
    pp_path, xp_path = write_pair(tmp_path, "T_PP", "T_XP", height=H, width=W)
    code, _, stderr = run_main(
        capsys, "segment", pp_path, "--probabilities", "--overlay", "--mm-per-pixel", mm_per_pixel,
        "--model", model, "--output", tmp_path / "out", "-q",
    )  # fmt: skip
    assert code == 0, stderr
    pp, xp = ArraySource(decoded(pp_path)), ArraySource(decoded(xp_path))
    factor = None if mm_per_pixel == MM_PER_PIXEL else mm_per_pixel / MM_PER_PIXEL
    whole = segment_at_model_resolution(engine(model), [pp, xp], factor)
    with open_nc(tmp_path / "out" / "T_PP.nc") as ds:
        assert np.array_equal(ds.variables["T_Segmentation"][0], whole.labels)
        assert np.array_equal(ds.variables["T_Confidence"][0], whole.confidence)
    mineralogy = modal_mineralogy("T_PP", whole.labels, TABLE, mm_per_pixel)
    rows = read_csv(tmp_path / "out" / "modal_mineralogy.csv")
    assert [int(r["pixels"]) for r in rows] == [a.pixels for a in mineralogy.rows]
    percents = [a.percent for a in mineralogy.areas]
    write_overlay_png(tmp_path / "whole.png", read_preview(pp, MAX_OVERLAY_SIDE), whole.labels, TABLE, percents, "T_PP")
    assert (tmp_path / "out" / "T_PP_overlay.png").read_bytes() == (tmp_path / "whole.png").read_bytes()
