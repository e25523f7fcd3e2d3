"""Resampling to the model's resolution and back; modal mineralogy figures."""

import numpy as np

from thinseg.classes.files import default_class_table
from thinseg.inference.resample import ResampledSource, labels_to_grid, needs_resampling
from thinseg.reports.mineralogy import fractions_csv_text, modal_mineralogy


class ArrayLike:
    def __init__(self, a):
        self.a, self.shape = a, a.shape[:2]

    def read(self, y0, y1, x0=0, x1=None):
        return self.a[y0:y1, x0:x1]


def test_needs_resampling_tolerance():
    assert not needs_resampling(0.00132, 0.00132)
    assert not needs_resampling(0.001325, 0.00132)
    assert needs_resampling(0.002, 0.00132)
    assert not needs_resampling(0.002, None)


def test_band_reads_of_a_resampled_source_match_one_whole_read():
    rng = np.random.default_rng(0)
    image = (rng.random((300, 420, 3)) * 255).astype(np.uint8)
    for factor in (0.5, 1.7):
        src = ResampledSource(ArrayLike(image), factor)
        h, w = src.shape
        assert (h, w) == (round(300 * factor), round(420 * factor))
        whole = src.read(0, h, 0, w).astype(int)
        bands = np.concatenate([src.read(y, min(h, y + 37), 0, w) for y in range(0, h, 37)]).astype(int)
        # Band edges see the same input pixels (margins), so at most rounding differences remain
        assert np.abs(whole - bands).max() <= 2


def test_resampling_preserves_geometry():
    image = np.zeros((200, 200, 3), np.uint8)
    image[50:150, 80:120] = 255  # a bright bar
    small = ResampledSource(ArrayLike(image), 0.5).read(0, 100, 0, 100)
    ys, xs = np.nonzero(small[..., 0] > 127)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (25, 74, 40, 59)


def test_labels_back_to_the_input_grid():
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    up = labels_to_grid(labels, (6, 8))
    assert np.array_equal(up, np.kron(labels, np.ones((2, 2), np.uint8)))
    assert np.array_equal(labels_to_grid(up, (3, 4)), labels)


def test_modal_mineralogy_percent_and_area():
    table = default_class_table()
    labels = np.zeros((10, 10), np.uint8)
    labels[:5] = 1  # 50 px calcite
    labels[5:, :5] = 5  # 25 px quartz, 25 px unclassified
    result = modal_mineralogy("s", labels, table, mm_per_pixel=0.01)
    by_name = {a.name: a for a in result.areas}
    assert by_name["Calcite"].pixels == 50 and by_name["Calcite"].percent == 50.0  # % of the section
    assert abs(by_name["Quartz"].area_mm2 - 25 * 1e-4) < 1e-12
    assert result.classified_pixels == 75 and result.section_pixels == 100
    assert (result.unclassified.pixels, result.unclassified.percent) == (25, 25.0)
    text = fractions_csv_text([result])
    assert text.splitlines()[0] == "section,class,pixels,percent,area_mm2"
    assert "s,Calcite,50,50.000,0.005000" in text
    assert text.splitlines()[-1] == "s,not classified,25,25.000,0.002500"


def test_resampling_factors_per_axis():
    from thinseg.inference.resample import resampling_factors

    assert resampling_factors((0.00132, 0.00132), 0.00132) is None
    assert resampling_factors((0.001325, 0.00131), 0.00132) is None  # both within the tolerance
    assert resampling_factors((0.01, 0.02), 0.01) == (2.0, 1.0)  # (rows, columns); x kept as it is
    assert resampling_factors((0.02, 0.01), 0.01) == (1.0, 2.0)
    assert resampling_factors((0.02, 0.04), 0.01) == (4.0, 2.0)
    assert resampling_factors((0.01, 0.02), None) is None
    assert resampling_factors(None, 0.01) is None


def test_non_square_pixels_are_resampled_per_axis_keeping_geometry():
    image = np.zeros((100, 200, 3), np.uint8)  # pixels twice as tall as wide: 100 rows cover 200 columns' length
    image[25:75, 80:120] = 255
    source = ResampledSource(ArrayLike(image), (2.0, 1.0))
    assert source.shape == (200, 200)
    square = source.read(0, 200, 0, 200)
    ys, xs = np.nonzero(square[..., 0] > 127)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (50, 149, 80, 119)
    bands = np.concatenate([source.read(y, min(200, y + 33), 0, 200) for y in range(0, 200, 33)]).astype(int)
    assert np.abs(bands - square.astype(int)).max() <= 2
    labels = (square[..., 0] > 127).astype(np.uint8)
    back = labels_to_grid(labels, (100, 200))  # nearest neighbour onto the input grid
    assert np.array_equal(back, (image[..., 0] > 127).astype(np.uint8))
