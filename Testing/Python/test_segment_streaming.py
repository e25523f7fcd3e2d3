"""Labels and confidence streamed band by band: the engine hands each finished band of rows to a
sink once, in order, never more than a tile high, and `thinseg segment` writes its netCDF,
modal mineralogy and overlay from those rows exactly as from whole in-memory maps."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from helpers import MM_PER_PIXEL, decoded, make_bundle, open_nc, read_csv, run_main, write_pair

import thinseg.inference.engine as engine_module
from thinseg.classes.files import default_class_table
from thinseg.inference.engine import ArraySink, InferenceOptions, Segmenter, tile_row_groups
from thinseg.inference.resample import segment_at_model_resolution, stream_at_model_resolution
from thinseg.inference.tiling import blend_weights
from thinseg.io.images import ArraySource
from thinseg.io.netcdf import Geometry, NetcdfWriter
from thinseg.model.bundle import load_bundle
from thinseg.model.networks import network_channels
from thinseg.reports.mineralogy import modal_mineralogy
from thinseg.reports.overlay import MAX_OVERLAY_SIDE, write_overlay_png
from thinseg.reports.preview import read_preview, shrink

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

    def __init__(self, width=None):
        self.bands = []
        self.width = width

    def write_rows(self, y0, labels, confidence, x0=0):
        assert x0 == 0 and labels.shape[1] == (self.width or labels.shape[1])  # whole rows: narrower than a stripe
        self.bands.append((y0, labels.copy(), None if confidence is None else confidence.copy()))


class WindowRecorder:
    """A sink that keeps every window it is given (y0, x0, labels, confidence), as they arrive."""

    def __init__(self):
        self.windows = []

    def write_rows(self, y0, labels, confidence, x0=0):
        self.windows.append((y0, x0, labels.copy(), None if confidence is None else confidence.copy()))

    def maps(self, height, width):
        """The windows pasted into whole maps, checking that each pixel came once."""
        labels, confidence, count = (np.zeros((height, width), np.int64) for _ in range(3))
        for y0, x0, lab, conf in self.windows:
            h, w = lab.shape
            labels[y0 : y0 + h, x0 : x0 + w] = lab
            confidence[y0 : y0 + h, x0 : x0 + w] = conf
            count[y0 : y0 + h, x0 : x0 + w] += 1
        assert (count == 1).all()
        return labels, confidence


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


@pytest.mark.parametrize("rows_per_part", [1, 2, 3, 100])
def test_a_section_run_in_parts_of_tile_rows_equals_the_whole_run_bit_for_bit(model, rows_per_part):
    seg = Segmenter(load_bundle(model), InferenceOptions(tile=64, overlap=16, device="cpu", with_confidence=True))
    sources = images(700, 190, seed=3)
    whole = seg.segment(sources)
    n_rows = len(seg.plan_for(700, 190).ys)
    assert n_rows > 10 and seg.plan_for(700, 190).shared_rows.any()  # tile rows that share rows
    parts = tile_row_groups(n_rows, rows_per_part)
    assert parts[0][0] == 0 and parts[-1][1] == n_rows and len(parts) == -(-n_rows // rows_per_part)
    sink, histogram = Recorder(), np.zeros_like(whole.confidence_histogram)
    for part in parts:
        stats = seg.stream(sources, sink, tile_rows=part)
        histogram += stats.confidence_histogram
    ys = [y0 for y0, _, _ in sink.bands]
    assert ys == sorted(set(ys)) and ys[0] == 0  # each band once, in order, from the top
    assert np.array_equal(np.concatenate([b[1] for b in sink.bands]), whole.labels)
    assert np.array_equal(np.concatenate([b[2] for b in sink.bands]), whole.confidence)
    assert np.array_equal(histogram, whole.confidence_histogram)  # the extra tile row is not counted


def test_a_part_of_tile_rows_outside_the_plan_is_refused(model):
    seg = engine(model)
    n_rows = len(seg.plan_for(700, 190).ys)
    for bad in [(0, 0), (-1, 2), (2, n_rows + 1), (3, 2)]:
        with pytest.raises(ValueError, match="not a part"):
            seg.stream(images(700, 190), Recorder(), tile_rows=bad)


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


# -- bounded memory: blend storage, input windows, overlay -----------------------------------


def reference_blend(seg, sources):
    """Labels and confidence of the plain algorithm, with nothing bounded: one float buffer over
    the whole section takes every tile's weighted logits in placement order (tile rows top to
    bottom, tiles left to right); pixels only one tile covers keep that tile's logits as they
    are; the shared ones are the sums divided by the summed weights."""
    plan = seg.plan_for(*sources[0].shape)
    assert plan.height >= plan.tile_h and plan.width >= plan.tile_w  # no padding in this reference
    n = network_channels(seg.bundle.network)[1]
    window = blend_weights(plan.tile_h, plan.tile_w, plan.ramp)
    sums = torch.zeros((plan.height, plan.width, n)).permute(2, 0, 1)  # classes innermost, as the network gives them
    raw = torch.zeros((plan.height, plan.width, n)).permute(2, 0, 1)
    weights = torch.zeros((plan.height, plan.width))
    alone = torch.zeros((plan.height, plan.width), dtype=torch.bool)
    order = seg._fused[0] if seg._fused is not None else list(range(len(sources)))
    for row, y in enumerate(plan.ys):
        bands = [torch.from_numpy(sources[i].read(y, y + plan.tile_h)) for i in order]
        for batch in plan.batches(seg.batch_size):
            for logits, x in zip(seg._forward(bands, batch, plan.tile_w), batch):
                (r0, r1), (c0, c1) = plan.row_own[row], plan.col_own[x]
                logits = logits.float()
                raw[:, y + r0 : y + r1, x + c0 : x + c1] = logits[:, r0:r1, c0:c1]
                alone[y + r0 : y + r1, x + c0 : x + c1] = True
                shared = torch.ones((plan.tile_h, plan.tile_w), dtype=torch.bool)
                shared[r0:r1, c0:c1] = False
                tile_sums = sums[:, y : y + plan.tile_h, x : x + plan.tile_w]
                tile_weights = weights[y : y + plan.tile_h, x : x + plan.tile_w]
                tile_sums.copy_(torch.where(shared, tile_sums.addcmul(logits, window), tile_sums))
                tile_weights.copy_(torch.where(shared, tile_weights + window, tile_weights))
    logits = torch.where(alone, raw, sums / weights.clamp_min(1e-30))
    labels = (logits.argmax(dim=0) + seg.bundle.first_label).to(torch.uint8).numpy()
    prob = 1.0 / (logits - logits.amax(dim=0, keepdim=True)).exp_().sum(dim=0)
    confidence = (prob * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    return labels, confidence


# (shape, tile, overlap, batch): a long section, a wide one, and tiles that overlap three deep
# (rows and columns covered by three tiles, tiles with no pixel of their own)
BLEND_CASES = [((300, 410), 64, 16, 1), ((170, 700), 96, 24, 3), ((100, 100), 64, 30, 2), ((240, 150), 48, 12, 4)]


@pytest.mark.parametrize(("shape", "tile", "overlap", "batch"), BLEND_CASES)
def test_blended_labels_equal_one_whole_section_blend_bit_for_bit(model, shape, tile, overlap, batch):
    seg = Segmenter(
        load_bundle(model),
        InferenceOptions(tile=tile, overlap=overlap, batch_size=batch, device="cpu", with_confidence=True),
    )
    sources = images(*shape, seed=5)
    plan = seg.plan_for(*shape)
    assert plan.shared_rows.any() and plan.shared_cols  # there is something to blend
    labels, confidence = reference_blend(seg, sources)
    result = seg.segment(sources)
    assert np.array_equal(result.labels, labels)
    assert np.array_equal(result.confidence, confidence)


class HeldBlend(engine_module._Blend):
    """The engine's blend storage, recording the most bytes it held at once."""

    instances: ClassVar[list[HeldBlend]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.peak = 0
        HeldBlend.instances.append(self)

    def held(self):
        """Bytes of sums and of contributions kept for a later sum."""
        total = 0
        for entry in list(self._rows.values()) + list(self._seams.values()):
            if isinstance(entry, engine_module._Pending):
                total += sum(logits.element_size() * logits.numel() for logits, _, _, _ in entry.parts)
            else:
                total += 4 * (entry.logits.numel() + entry.weights.numel())
        return total

    def add_rows(self, *args):
        super().add_rows(*args)
        self.peak = max(self.peak, self.held())

    def add_seam(self, *args):
        super().add_seam(*args)
        self.peak = max(self.peak, self.held())


@pytest.mark.parametrize("rows_per_part", [None, 2])
def test_blend_holds_only_overlap_rows_and_open_seams_and_releases_all(model, monkeypatch, rows_per_part):
    monkeypatch.setattr(engine_module, "_Blend", HeldBlend)
    HeldBlend.instances = []
    seg = Segmenter(load_bundle(model), InferenceOptions(tile=128, overlap=16, batch_size=2, device="cpu"))
    shape = (560, 1500)
    plan = seg.plan_for(*shape)
    runs = engine_module._runs(plan.shared_rows)
    run_rows = max(b - a for a, b in runs)
    seam_cols = max(b - a for a, b in plan.shared_cols)
    per_value = 4 * (network_channels(seg.bundle.network)[1] + 1)  # float32 classes and weight
    parts = [None] if rows_per_part is None else tile_row_groups(len(plan.ys), rows_per_part)
    for part in parts:
        seg.stream(images(*shape, seed=6), Recorder(), tile_rows=part)
    for blend in HeldBlend.instances:
        # one run of shared rows across the width (plus the blocks of the next one being
        # started), and the seams of the tiles being placed: not a tile-high strip
        bound = per_value * (run_rows * (plan.width + 2 * plan.tile_w) + 2 * plan.tile_h * seam_cols)
        assert 0 < blend.peak <= bound
        assert blend.peak * 3 < per_value * plan.tile_h * plan.width
        if rows_per_part is None:
            assert blend.held() == 0  # every sum was turned into labels and released
        else:  # a part stops with the rows it shares with the next part started, nothing more
            assert blend.held() <= per_value * run_rows * (plan.width + plan.tile_w)


class CountedReads:
    """A source that records the (rows, columns) of every read."""

    def __init__(self, source):
        self.source, self.shape, self.reads = source, source.shape, []

    def read(self, y0, y1, x0=0, x1=None):
        x1 = self.shape[1] if x1 is None else x1
        self.reads.append((y1 - y0, x1 - x0))
        return self.source.read(y0, y1, x0, x1)


@pytest.mark.parametrize("prefetch", [True, False])
def test_wide_sections_are_read_in_windows_with_the_same_labels(model, monkeypatch, prefetch):
    options = InferenceOptions(tile=64, overlap=16, batch_size=2, device="cpu", with_confidence=True, prefetch=prefetch)
    seg = Segmenter(load_bundle(model), options)
    sources = images(150, 900, seed=7)
    whole_rows = seg.segment(sources)  # narrower than READ_WIDTH: whole rows at a time
    monkeypatch.setattr(engine_module, "READ_WIDTH", 200)
    counted = [CountedReads(s) for s in sources]
    windowed = seg.segment(counted)
    assert np.array_equal(windowed.labels, whole_rows.labels)
    assert np.array_equal(windowed.confidence, whole_rows.confidence)
    assert np.array_equal(windowed.confidence_histogram, whole_rows.confidence_histogram)
    widths = [w for c in counted for _, w in c.reads]
    assert max(widths) <= 200 and len(widths) > 2 * len(seg.plan_for(150, 900).ys) * 2  # several windows a row


@pytest.mark.parametrize(
    ("shape", "stripe", "align"),
    [((150, 900), 200, 16), ((150, 900), 256, 64), ((90, 610), 100, 32), ((200, 130), 48, 16), ((64, 3000), 999, 16)],
)
def test_wide_sections_run_in_stripes_equal_one_pass_bit_for_bit(model, monkeypatch, shape, stripe, align):
    options = InferenceOptions(tile=64, overlap=16, batch_size=3, device="cpu", with_confidence=True)
    seg = Segmenter(load_bundle(model), options)
    sources = images(*shape, seed=11)
    one_pass = seg.segment(sources)  # narrower than STRIPE_WIDTH: one stripe
    monkeypatch.setattr(engine_module, "STRIPE_WIDTH", stripe)
    monkeypatch.setattr(engine_module, "STRIPE_ALIGN", align)
    plan = seg.plan_for(*shape)
    stripes = engine_module.column_stripes(plan, stripe, align)
    assert len(stripes) == -(-shape[1] // stripe) > 1
    assert [s.x0 for s in stripes[1:]] == [s.x1 for s in stripes[:-1]] and stripes[-1].x1 == shape[1]
    assert all(s.x0 % align == 0 for s in stripes)
    sink = WindowRecorder()
    stats = seg.stream(sources, sink)
    labels, confidence = sink.maps(*shape)
    assert np.array_equal(labels, one_pass.labels) and np.array_equal(confidence, one_pass.confidence)
    assert np.array_equal(stats.confidence_histogram, one_pass.confidence_histogram)
    # stripe by stripe, left to right, each from the top down, never wider than the stripe
    order = [(x0, y0) for y0, x0, _, _ in sink.windows]
    assert order == sorted(order)
    assert {x0 for x0, _ in order} == {s.x0 for s in stripes}
    assert max(lab.shape[1] for _, _, lab, _ in sink.windows) == max(s.x1 - s.x0 for s in stripes)
    # the tile columns over a stripe edge run twice: one, or two where the edge is in a seam
    in_seams = sum(any(a <= s.x0 < b for a, b in plan.shared_cols) for s in stripes[1:])
    if stripe > 2 * plan.tile_w:
        assert plan.n_tiles < stats.tiles <= plan.n_tiles + (len(stripes) - 1 + in_seams) * len(plan.ys)


@pytest.mark.parametrize("rows_per_part", [1, 4])
def test_parts_of_tile_rows_in_stripes_equal_the_whole_run(model, monkeypatch, rows_per_part):
    seg = Segmenter(load_bundle(model), InferenceOptions(tile=64, overlap=16, device="cpu", with_confidence=True))
    sources = images(300, 500, seed=5)
    whole = seg.segment(sources)
    monkeypatch.setattr(engine_module, "STRIPE_WIDTH", 160)
    monkeypatch.setattr(engine_module, "STRIPE_ALIGN", 32)
    sink, histogram = WindowRecorder(), np.zeros_like(whole.confidence_histogram)
    for part in tile_row_groups(len(seg.plan_for(300, 500).ys), rows_per_part):
        histogram += seg.stream(sources, sink, tile_rows=part).confidence_histogram
    labels, confidence = sink.maps(300, 500)
    assert np.array_equal(labels, whole.labels) and np.array_equal(confidence, whole.confidence)
    assert np.array_equal(histogram, whole.confidence_histogram)


def test_a_cluster_part_run_in_stripes_is_sent_back_as_whole_rows(model, monkeypatch):
    from thinseg.pipelines.cluster import _KeptRows

    seg = Segmenter(load_bundle(model), InferenceOptions(tile=64, overlap=16, device="cpu", with_confidence=True))
    sources = images(300, 500, seed=6)
    whole = seg.segment(sources)
    monkeypatch.setattr(engine_module, "STRIPE_WIDTH", 160)
    monkeypatch.setattr(engine_module, "STRIPE_ALIGN", 32)
    for part in tile_row_groups(len(seg.plan_for(300, 500).ys), 3):
        kept = _KeptRows(500)
        seg.stream(sources, kept, tile_rows=part)
        labels, confidence = np.concatenate(kept.labels), np.concatenate(kept.confidence)
        assert labels.shape[1] == 500 and kept.y0 == seg.plan_for(300, 500).ys[part[0]]
        assert np.array_equal(labels, whole.labels[kept.y0 : kept.y0 + len(labels)])
        assert np.array_equal(confidence, whole.confidence[kept.y0 : kept.y0 + len(labels)])


@pytest.mark.parametrize("factor", [0.5, 1.6, (0.8, 1.3)])
def test_a_resampled_run_in_stripes_maps_back_to_the_same_labels(model, monkeypatch, factor):
    seg = engine(model)
    sources = images(150, 470, seed=2)
    whole = segment_at_model_resolution(seg, sources, factor)
    monkeypatch.setattr(engine_module, "STRIPE_WIDTH", 128)
    monkeypatch.setattr(engine_module, "STRIPE_ALIGN", 16)
    sink = WindowRecorder()
    stream_at_model_resolution(seg, sources, factor, sink)
    labels, confidence = sink.maps(150, 470)
    assert np.array_equal(labels, whole.labels) and np.array_equal(confidence, whole.confidence)


def test_band_writer_takes_column_stripes_and_refuses_overlaps_or_gaps(tmp_path):
    rng = np.random.default_rng(4)
    labels = rng.integers(0, len(TABLE) + 1, (1100, 300)).astype(np.uint8)
    geometry = Geometry.thin_section(MM_PER_PIXEL)
    with NetcdfWriter(tmp_path / "stripes.nc") as writer:
        rows = writer.begin_labelmap("L", labels.shape, TABLE, reference="PP", geometry=geometry)
        for x0, x1 in [(0, 128), (128, 256), (256, 300)]:
            for y0, y1 in [(0, 37), (37, 600), (600, 1100)]:
                rows.write_rows(y0, labels[y0:y1, x0:x1], x0)
            assert rows._open == {}  # a finished stripe's buffer is let go
        rows.finish()
    with open_nc(tmp_path / "stripes.nc") as nc:
        assert np.array_equal(nc.variables["L"][0], labels)
    geometry = Geometry.thin_section(MM_PER_PIXEL)
    with pytest.raises(ValueError, match="not new columns"), NetcdfWriter(tmp_path / "x.nc") as writer:
        rows = writer.begin_labelmap("L", (10, 8), TABLE, geometry=geometry)
        rows.write_rows(0, np.ones((10, 4), np.uint8), 0)
        rows.write_rows(0, np.ones((10, 4), np.uint8), 2)  # overlaps columns 2..3
    with pytest.raises(ValueError, match="only 0 of 10 rows"), NetcdfWriter(tmp_path / "y.nc") as writer:
        rows = writer.begin_labelmap("L", (10, 8), TABLE, geometry=geometry)
        rows.write_rows(0, np.ones((10, 4), np.uint8), 0)  # columns 4..7 never come
        rows.finish()
    with pytest.raises(ValueError, match="do not follow row 3"), NetcdfWriter(tmp_path / "z.nc") as writer:
        rows = writer.begin_labelmap("L", (10, 8), TABLE, geometry=geometry)
        rows.write_rows(0, np.ones((3, 4), np.uint8), 4)
        rows.write_rows(4, np.ones((3, 4), np.uint8), 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stripes.nc"]  # nothing half-written


@pytest.mark.parametrize(
    "patches",
    [{"READ_WIDTH": 150}, {"READ_WIDTH": 150, "STRIPE_WIDTH": 192, "STRIPE_ALIGN": 64}],
    ids=["read-windows", "column-stripes"],
)
def test_segment_read_in_windows_or_run_in_stripes_writes_the_same_files(tmp_path, capsys, model, monkeypatch, patches):
    pp_path, xp_path = write_pair(tmp_path, "S_PP", "S_XP", height=230, width=610)
    args = ["--model", model, "--tile", 64, "--overlap", 16, "--batch-size", 2, "--probabilities", "--overlay", "-q"]
    code, _, stderr = run_main(capsys, "segment", pp_path, "--output", tmp_path / "one", *args)
    assert code == 0, stderr
    for name, value in patches.items():
        monkeypatch.setattr(engine_module, name, value)
    code, _, stderr = run_main(capsys, "segment", pp_path, "--output", tmp_path / "parts", *args)
    assert code == 0, stderr
    with open_nc(tmp_path / "one" / "S_PP.nc") as a, open_nc(tmp_path / "parts" / "S_PP.nc") as b:
        assert np.array_equal(b.variables["S_PP"][0], decoded(pp_path))  # every pixel copied once
        assert np.array_equal(b.variables["S_XP"][0], decoded(xp_path))
        assert np.array_equal(a.variables["S_Segmentation"][:], b.variables["S_Segmentation"][:])
        # A stripe's last forward pass may hold fewer tiles than one pass's did, and on some CPUs
        # oneDNN then takes another kernel: a probability moves in the 7th decimal, which can move
        # a uint8 confidence by one step (seen on a 2-core AMD EPYC: 1 pixel of 140,300). A tile
        # placed wrongly would move thousands of pixels, by far more.
        confidence = [np.asarray(ds.variables["S_Confidence"][:], np.int16) for ds in (a, b)]
        assert np.abs(confidence[0] - confidence[1]).max() <= 1
        assert np.count_nonzero(confidence[0] != confidence[1]) <= 10
    pixels = [[r["pixels"] for r in read_csv(tmp_path / run / "modal_mineralogy.csv")] for run in ("one", "parts")]
    assert pixels[0] == pixels[1]
    overlays = [(tmp_path / run / "S_PP_overlay.png").read_bytes() for run in ("one", "parts")]
    assert overlays[0] == overlays[1]


def matplotlib_overlay(path, pp_preview, labels, table, percents, title):
    """The overlay as it was drawn before: the whole picture by matplotlib (imshow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from thinseg.reports.overlay import blend

    image = blend(pp_preview, labels, table)
    h, w = image.shape[:2]
    fig = plt.figure(figsize=((w + 260) / 100, max(h, 300) / 100), dpi=100)
    ax = fig.add_axes((0, 0, w / (w + 260), h / max(h, 300)))
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    handles = [
        Patch(facecolor=c.color, edgecolor="0.3", label=f"{c.name}  {p:.1f}%") for c, p in zip(table.classes, percents)
    ]
    fig.legend(handles=handles, loc="upper right", frameon=False, fontsize=11, title=title, title_fontsize=11)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


# taller than the legend, and shorter; widths whose figure size in inches matplotlib turns back
# into exactly width + 260 px (3.9 makes 4.6 in x 100 dpi 459 px)
@pytest.mark.parametrize("shape", [(420, 380), (120, 240)])
def test_overlay_is_the_picture_matplotlib_drew_without_drawing_the_preview_with_it(tmp_path, shape):
    from PIL import Image

    rng = np.random.default_rng(8)
    pp = (rng.random(shape + (3,)) * 255).astype(np.uint8)
    labels = rng.integers(0, len(TABLE) + 1, shape).astype(np.uint8)
    percents = [12.5, 30.0, 7.25, 0.0, 40.0, 10.25][: len(TABLE)]
    write_overlay_png(tmp_path / "new.png", pp, labels, TABLE, percents, "S_PP")
    matplotlib_overlay(tmp_path / "old.png", pp, labels, TABLE, percents, "S_PP")
    with Image.open(tmp_path / "new.png") as new, Image.open(tmp_path / "old.png") as old:
        assert new.size == old.size == (shape[1] + 260, max(shape[0], 300))
        assert np.array_equal(np.asarray(new.convert("RGB")), np.asarray(old.convert("RGB")))


def test_overlay_legend_widens_for_long_class_names_instead_of_covering_the_image(tmp_path):
    from PIL import Image

    from thinseg.classes.table import ClassTable

    long_names = ClassTable.from_names_colors(
        [f"{n} with a very long descriptive name" for n in TABLE.names], TABLE.colors
    )
    pp = np.full((300, 200, 3), 90, np.uint8)
    labels = np.zeros((300, 200), np.uint8)  # PP unchanged under unclassified pixels
    write_overlay_png(tmp_path / "o.png", pp, labels, long_names, [10.0] * len(TABLE), "S")
    with Image.open(tmp_path / "o.png") as image:
        picture = np.asarray(image.convert("RGB"))
    assert picture.shape[1] > 200 + 260
    assert np.array_equal(picture[:, :200], pp)  # the legend does not cover the image
    ink = np.nonzero((picture[:, 200:] < 250).any(axis=(0, 2)))[0]
    assert ink.size and ink[0] > 0 and ink[-1] < picture.shape[1] - 200 - 1  # nothing cut at either side


def test_overlay_of_a_large_preview_stays_small_in_memory(tmp_path):
    import tracemalloc

    rng = np.random.default_rng(9)
    pp = (rng.random((1536, 1536, 3)) * 255).astype(np.uint8)
    labels = rng.integers(0, len(TABLE) + 1, (1536, 1536)).astype(np.uint8)
    write_overlay_png(tmp_path / "warm.png", pp[:64, :64], labels[:64, :64], TABLE, None, "")  # imports
    tracemalloc.start()
    try:
        write_overlay_png(tmp_path / "o.png", pp, labels, TABLE, [10.0] * len(TABLE), "big")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the picture and a few bands of float temporaries (about 17 B/px here), not float copies
    # of the whole preview (drawn with imshow: about 118 B/px)
    assert peak < 25 * pp.shape[0] * pp.shape[1]


def test_preview_read_in_windows_picks_the_pixels_shrink_picks(tmp_path):
    rng = np.random.default_rng(10)
    image = (rng.random((1000, 1700, 3)) * 255).astype(np.uint8)
    source = CountedReads(ArraySource(image))
    preview = read_preview(source, 300, band_rows=128, band_cols=256)
    assert np.array_equal(preview, shrink(image, 300))
    assert max(h for h, _ in source.reads) <= 128 and max(w for _, w in source.reads) <= 256
