"""Procedural thin sections: determinism, class appearance, class areas and the exact
QEMSCAN -> image transform that registration tests rely on."""

import numpy as np
import pytest
from scipy.ndimage import affine_transform, binary_erosion

from thinseg.classes.files import default_class_table, qemscan_palette
from thinseg.classes.table import rgb_to_hex
from thinseg.synth import SyntheticSection, generate_section, render_labels_rgb

CALCITE, DOLOMITE, CLAY, PORE, QUARTZ, OTHERS = range(1, 7)


@pytest.fixture(scope="module")
def section() -> SyntheticSection:
    return generate_section(1024, 1024, seed=0)


@pytest.fixture(scope="module")
def small() -> SyntheticSection:
    return generate_section(512, 448, seed=7)


def qemscan_in_image(s: SyntheticSection, A: np.ndarray) -> np.ndarray:
    """QEMSCAN map resampled (nearest) onto the image grid through A, as class values."""
    inv = np.linalg.inv(A)
    swap = np.array([[0, 1], [1, 0]])  # (x, y) <-> (row, col)
    q = affine_transform(
        s.qemscan,
        swap @ inv[:2, :2] @ swap,
        offset=swap @ inv[:2, 2],
        output_shape=s.labels.shape,
        order=0,
        mode="constant",
        cval=0,
    )
    lut = np.zeros(256, np.uint8)
    for value, cls in s.image_to_class.items():
        lut[value] = cls
    return lut[q]


def shifted(A: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """A composed with a shift of (dx, dy) QEMSCAN pixels."""
    return A @ np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def interior(labels: np.ndarray, cls: int) -> np.ndarray:
    """Pixels of `cls` away from its edges (no blur from neighbours)."""
    return binary_erosion(labels == cls, iterations=4)


def test_same_seed_same_section_other_seed_differs():
    a = generate_section(200, 160, seed=3)
    b = generate_section(200, 160, seed=3)
    c = generate_section(200, 160, seed=4)
    for name in ("pp", "xp", "labels", "qemscan", "qemscan_to_image"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.labels, c.labels)
    assert not np.array_equal(a.qemscan_to_image, c.qemscan_to_image)


def test_shapes_dtypes_and_tables(small):
    s = small
    assert s.pp.shape == s.xp.shape == (512, 448, 3)
    assert s.pp.dtype == s.xp.dtype == s.labels.dtype == s.qemscan.dtype == np.uint8
    assert s.labels.shape == (512, 448)
    assert s.labels.min() >= 1 and s.labels.max() <= 6
    assert s.mm_per_pixel == 0.00132 and s.qemscan_mm_per_pixel == 0.01
    assert s.qemscan_to_image.shape == (3, 3) and s.qemscan_to_image.dtype == np.float64
    np.testing.assert_array_equal(s.qemscan_to_image[2], [0, 0, 1])
    assert s.qemscan.max() <= len(s.qemscan_table)
    assert set(s.image_to_class) == set(range(1, len(s.qemscan_table) + 1))
    assert set(s.image_to_class.values()) == set(range(1, 7))
    palette = {en: rgb_to_hex(rgb) for _pt, en, rgb in qemscan_palette()}
    for name, colour in zip(s.qemscan_table.names, s.qemscan_table.colors):
        assert palette[name] == colour
    for name in ("Calcite (0-1% MgO)", "Dolomite", "Mg-Clay minerals", "Pores", "Quartz"):
        assert name in s.qemscan_table.names


def test_every_class_present_and_default_weights_roughly_kept(section):
    fractions = np.bincount(section.labels.ravel(), minlength=7)[1:] / section.labels.size
    assert np.all(fractions > 0.03), fractions
    np.testing.assert_allclose(fractions, [0.30, 0.14, 0.15, 0.15, 0.18, 0.08], atol=0.05)


def test_class_weights_are_respected_and_zero_weights_absent():
    s = generate_section(512, 512, seed=11, class_weights=[5, 0, 2, 3, 0, 0])
    fractions = np.bincount(s.labels.ravel(), minlength=7)[1:] / s.labels.size
    np.testing.assert_allclose(fractions, [0.5, 0, 0.2, 0.3, 0, 0], atol=0.05)
    assert fractions[DOLOMITE - 1] == fractions[QUARTZ - 1] == fractions[OTHERS - 1] == 0


def test_pores_are_blue_epoxy_in_pp_and_black_in_xp(section):
    m = interior(section.labels, PORE)
    r, g, b = section.pp[m].mean(axis=0)
    assert b > r + 60 and b > g + 40, (r, g, b)
    xp_pore = section.xp[m].mean()
    assert xp_pore < 25
    for cls in (CALCITE, DOLOMITE, QUARTZ):  # birefringent grains transmit far more on average
        assert section.xp[interior(section.labels, cls)].mean() > xp_pore + 60


def test_quartz_is_clear_in_pp_and_dolomite_cloudier(section):
    pp = section.pp.astype(np.float32)
    quartz = pp[interior(section.labels, QUARTZ)].mean()
    dolomite = pp[interior(section.labels, DOLOMITE)].mean()
    assert quartz > 190 and quartz > dolomite + 10


def test_calcite_twin_lamellae_texture_xp_only(section):
    """Twin lamellae make calcite's XP image stripy inside grains; quartz is smooth there and
    the stripes are (nearly) invisible in PP, as under the microscope."""

    def texture(image, cls):
        lum = image.astype(np.float32).mean(axis=-1)
        gy, gx = np.gradient(lum)
        return np.hypot(gx, gy)[interior(section.labels, cls)].mean()

    assert texture(section.xp, CALCITE) > 3 * texture(section.xp, QUARTZ)
    assert texture(section.xp, CALCITE) > 2 * texture(section.pp, CALCITE)


def test_qemscan_map_has_an_empty_margin_and_both_others_minerals(section):
    q = section.qemscan
    for edge in (q[0], q[-1], q[:, 0], q[:, -1]):
        assert np.all(edge == 0)
    others = [v for v, cls in section.image_to_class.items() if cls == OTHERS]
    assert len(others) >= 2 and all(np.any(q == v) for v in others)


@pytest.mark.parametrize("seed", [0, 5])
def test_qemscan_to_image_maps_the_map_onto_the_labels(seed, section):
    s = section if seed == 0 else generate_section(640, 768, seed=seed)
    A = s.qemscan_to_image
    agree = np.mean(qemscan_in_image(s, A) == s.labels)
    assert agree > 0.85
    # a transform off by 5 QEMSCAN pixels is clearly worse: the test can fail
    assert np.mean(qemscan_in_image(s, shifted(A, 5, 0)) == s.labels) < agree - 0.15
    # and A is the optimum, not merely close to it
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        assert np.mean(qemscan_in_image(s, shifted(A, dx, dy)) == s.labels) < agree - 0.02


def test_explicit_misalignment_is_the_documented_similarity():
    h, w = 300, 400
    s = generate_section(h, w, seed=1, rotation_deg=5.0, scale=1.05, translation_px=(20.0, -10.0))
    A = s.qemscan_to_image
    f = s.qemscan_mm_per_pixel / s.mm_per_pixel * 1.05
    a = np.deg2rad(5.0)
    np.testing.assert_allclose(A[:2, :2], f * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]))
    h_q, w_q = s.qemscan.shape
    centre_q = np.array([(w_q - 1) / 2, (h_q - 1) / 2, 1.0])
    np.testing.assert_allclose(A @ centre_q, [(w - 1) / 2 + 20.0, (h - 1) / 2 - 10.0, 1.0])
    assert np.mean(qemscan_in_image(s, A) == s.labels) > 0.85


def test_no_misalignment_is_only_the_resolution_change():
    s = generate_section(256, 256, seed=2, misalignment=False)
    f = s.qemscan_mm_per_pixel / s.mm_per_pixel
    np.testing.assert_allclose(s.qemscan_to_image[:2, :2], f * np.eye(2))
    same_images = generate_section(256, 256, seed=2)
    np.testing.assert_array_equal(s.pp, same_images.pp)  # misalignment touches only the map


def test_render_labels_rgb_uses_the_table_colours(small):
    table = default_class_table()
    rgb = render_labels_rgb(small.labels, table)
    assert rgb.shape == small.pp.shape and rgb.dtype == np.uint8
    for cls in range(1, 7):
        m = small.labels == cls
        if m.any():
            assert tuple(rgb[m][0]) == table.classes[cls - 1].rgb
    assert tuple(render_labels_rgb(np.zeros((1, 1), np.uint8), table)[0, 0]) == (0, 0, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"height": 4, "width": 100},
        {"mm_per_pixel": 0.0},
        {"class_weights": [1, 2, 3]},
        {"class_weights": [0, 0, 0, 0, 0, 0]},
        {"class_weights": [1, -1, 1, 1, 1, 1]},
        {"scale": 0.0},
    ],
)
def test_bad_arguments_raise_value_error(kwargs):
    args = {"height": 64, "width": 64, **kwargs}
    with pytest.raises(ValueError):
        generate_section(**args)
