"""What a registration shows a person: per-landmark residuals of the landmark fit beside those of
the final (refined) transform, in the JSON record and the printed table, and overlay pictures
that say what they show (section, transform, stage, metric) with a legend of the minerals and of
the landmark markers. Generated sections with a known QEMSCAN transform; the residuals are
recomputed here from the two transforms and the clicks by a different route (mapping the QEMSCAN
click back into the image)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from thinseg.cli.register_cmd import format_result
from thinseg.registration import register_section, write_outputs
from thinseg.registration.output import landmark_residuals, overlay_figure, overlay_texts
from thinseg.synth import generate_section

SIZE = 384


@pytest.fixture(scope="module")
def sec():
    return generate_section(SIZE, SIZE, seed=5)


def clicks(s, bad: int | None = None, offset: float = 3.0):
    """Five landmark pairs from the true transform (QEMSCAN px, image px); click `bad` is off by
    `offset` image px (small: not flagged, but the refinement moves away from it)."""
    image = np.array([[0.15, 0.15], [0.85, 0.12], [0.88, 0.85], [0.12, 0.88], [0.5, 0.45]]) * SIZE
    inv = np.linalg.inv(s.qemscan_to_image)
    qemscan = image @ inv[:2, :2].T + inv[:2, 2]
    image = image.copy()
    if bad is not None:
        image[bad] += [offset, -offset]
    return qemscan, image


def register_clicks(s, qemscan_px, image_px, xp=None, **options):
    """Register the synthetic section `s` from the given click pairs."""
    return register_section(
        s.pp,
        xp,
        s.qemscan,
        s.qemscan_table,
        image_mm_per_pixel=s.mm_per_pixel,
        qemscan_mm_per_pixel=s.qemscan_mm_per_pixel,
        landmarks=(qemscan_px, image_px),
        **options,
    )


@pytest.fixture(scope="module")
def refined(sec):
    q, p = clicks(sec, bad=1)
    result = register_clicks(sec, q, p, xp=sec.xp, kind="affine")
    return result, q, p


def back_in_image(transform, q: np.ndarray) -> np.ndarray:
    """Image px that a linear transform maps onto QEMSCAN px `q`."""
    m = np.linalg.inv(transform.linear_px())
    return q @ m[:2, :2].T + m[:2, 2]


def test_residuals_of_the_fit_and_of_the_refined_transform(refined):
    result, q, p = refined
    assert result.refinement is not None and result.transform.is_linear
    rows = landmark_residuals(result)
    fit_expected = np.linalg.norm(p - back_in_image(result.landmark_fit.transform, q), axis=1)
    final_expected = np.linalg.norm(p - back_in_image(result.transform, q), axis=1)
    um = 1000 * result.geometry.image_mm_per_pixel
    got_fit = np.array([r["residual_fit_px"] for r in rows])
    got_final = np.array([r["residual_final_px"] for r in rows])
    np.testing.assert_allclose(got_fit, fit_expected, atol=1e-6)
    np.testing.assert_allclose(got_final, final_expected, atol=1e-6)
    np.testing.assert_allclose([r["residual_fit_um"] for r in rows], fit_expected * um, atol=1e-6)
    np.testing.assert_allclose([r["residual_final_um"] for r in rows], final_expected * um, atol=1e-6)
    assert [r["residual_px"] for r in rows] == list(got_fit)  # the fit's column keeps its old name
    # the clicks are true but one: the fit spreads that error over all, the refinement goes back to
    # the true map, so after refinement the wrong click stands out
    assert int(np.argmax(got_final)) == 1 and got_final[1] > 2.0
    assert got_fit[1] < got_final[1]
    assert [r["image_px"] for r in rows] == p.tolist() and np.allclose([r["qemscan_px"] for r in rows], q)


def test_the_printed_table_and_the_record_show_both(refined, tmp_path, sec):
    result, _q, _p = refined
    rows = landmark_residuals(result)
    text = format_result(result, xp_given=True)
    assert "fit px" in text and "refined px" in text and "refined um" in text
    for r in rows:
        line = next(line for line in text.splitlines() if line.strip().startswith(r["name"] + " "))
        for key in ("residual_fit_px", "residual_final_px", "residual_final_um"):
            assert f"{r[key]:.2f}" in line, (key, line)
    assert "moved away" not in text  # 1.7 px further from click 2: under half a QEMSCAN pixel
    paths = write_outputs(result, tmp_path, "S1", sec.pp, sec.qemscan, netcdf=False)
    record = json.loads(paths.json.read_text(encoding="utf-8"))["registration"]["landmarks"]
    assert [r["residual_final_px"] for r in record] == pytest.approx([r["residual_final_px"] for r in rows])


def test_without_refinement_both_columns_are_the_fit(sec):
    q, p = clicks(sec, bad=1)
    result = register_clicks(sec, q, p, refine=False)
    rows = landmark_residuals(result)
    assert [r["residual_final_px"] for r in rows] == [r["residual_fit_px"] for r in rows]
    assert max(r["residual_fit_px"] for r in rows) > 1.0
    assert "(no refinement" in format_result(result, xp_given=False)


def test_overlay_figures_say_what_they_show(refined, sec, tmp_path):
    from matplotlib.figure import Figure

    result, q, p = refined
    for stage, words in (("start", "affine transform, landmark fit"), ("final", "affine transform, after refinement")):
        texts = overlay_texts("S1", result, stage)
        assert texts.title == f"S1: {words}"
        transform = result.initial if stage == "start" else result.transform
        from thinseg.registration.warp import resample_labels

        labels = resample_labels(sec.qemscan, transform)
        fig = overlay_figure(sec.pp, labels, sec.qemscan_table, texts, (p, back_in_image(transform, q)))
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        assert ax.get_title(loc="left") == f"{texts.title}\n{texts.subtitle}"
        legend = fig.legends[0]
        names = [t.get_text() for t in legend.get_texts()]
        present = sorted(int(v) for v in np.unique(labels) if v > 0)
        assert names[:-2] == [sec.qemscan_table.classes[v - 1].name for v in present]
        assert names[-2:] == ["landmark clicked on PP", "its QEMSCAN click, placed\nby this transform"]
        assert legend.get_title().get_text() == "QEMSCAN classes (outline colour)"
    assert "match contrast" in overlay_texts("S1", result, "final").subtitle
    assert f"{result.contrast:.2f}" in overlay_texts("S1", result, "final").subtitle


def test_overlay_pngs_have_title_and_legend_room(refined, sec, tmp_path):
    result, _q, _p = refined
    paths = write_outputs(result, tmp_path, "S1", sec.pp, sec.qemscan, netcdf=False)
    for path in (paths.overlay_before, paths.overlay_after):
        with Image.open(path) as png:
            width, height = png.size
            pixels = np.asarray(png.convert("RGB"))
        assert width == SIZE + 320 and height == SIZE + 70  # legend column and title band
        band = pixels[:70]
        assert (band < 100).any() and (band == 255).mean() > 0.8  # dark title text on white
        column = pixels[70:, SIZE + 10 :]
        assert (column != 255).any(axis=2).mean() > 0.01  # legend drawn
    before = np.asarray(Image.open(paths.overlay_before).convert("RGB"))[70:, :SIZE]
    after = np.asarray(Image.open(paths.overlay_after).convert("RGB"))[70:, :SIZE]
    assert not np.array_equal(before, after)


def test_a_click_the_refinement_moved_far_from_is_named(sec):
    q, p = clicks(sec, bad=1, offset=7.0)
    result = register_clicks(sec, q, p, xp=sec.xp, kind="affine")
    rows = landmark_residuals(result)
    assert not any(r["outlier"] for r in rows)  # the leave-one-out check lets it pass
    moved = [r["name"] for r in rows if r["residual_final_px"] - r["residual_fit_px"] > 0.5 * result.geometry.ratio]
    assert moved == ["2"]
    assert "the refinement moved away from click(s) 2 (by more than half a QEMSCAN pixel)" in format_result(
        result, xp_given=True
    )
