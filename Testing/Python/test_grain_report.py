"""The grain report (`thinseg analyze`'s report.html and overview.png) on real analyses: the real
sandstone field 10a with its PPL photograph, and generated labelmaps whose grains, pores and
empty classes are known exactly. The page must be one self-contained file (nothing fetched), hold
every section with the summary's numbers as printed, survive empty classes, and render in a real
browser (headless Chromium) into a picture that is not blank."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import REAL_CLASSES, real_field
from PIL import Image

from thinseg.analysis import ArrayLabelmap, GrainAnalysis, GrainOptions, analyze, open_labelmap
from thinseg.classes.table import ClassTable
from thinseg.pipelines.analyze import pp_overview
from thinseg.reports.grain_report import (
    OUTLINE_DEFAULT,
    OUTLINE_ON_CLASSES,
    SECTIONS,
    UNCLASSIFIED_RGB,
    grain_overview_image,
    grain_report_html,
)

#: Class names with characters HTML must escape: the page shows them as text, never as markup.
FELDSPAR = "Feldspar <K&Na>"
SYNTH_CLASSES = ClassTable.from_names_colors(
    ["Matrix", "Quartz", FELDSPAR, "Pore", "Calcite"], ["#8c6e5a", "#ffd700", "#f08080", "#1e90ff", "#9932cc"]
)
#: Quartz discs of the generated section: (row, col, radius px), none touching another or the edge.
QUARTZ = [(40 + 70 * (i // 7), 40 + 70 * (i % 7), 8 + 3 * (i % 7) + (i // 7)) for i in range(21)]
PORES = [(250, 60, 12), (250, 200, 20), (250, 340, 16)]
FELDSPAR_DISC = (250, 460, 25)
VOID_ELEMENTS = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "wbr", "source"}


def _disc(labels: np.ndarray, row: int, col: int, radius: int, value: int) -> None:
    yy, xx = np.mgrid[: labels.shape[0], : labels.shape[1]]
    labels[(yy - row) ** 2 + (xx - col) ** 2 <= radius * radius] = value


def synthetic_labels() -> np.ndarray:
    labels = np.ones((300, 520), np.uint8)  # Matrix everywhere
    for row, col, radius in QUARTZ:
        _disc(labels, row, col, radius, 2)
    _disc(labels, *FELDSPAR_DISC, 3)
    for row, col, radius in PORES:
        _disc(labels, row, col, radius, 4)
    return labels


class PageParser(HTMLParser):
    """The page's structure: sections (id, heading, tables as rows of cell texts, image sources),
    and every tag closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.sections: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.current: dict[str, Any] | None = None
        self.images: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self.cell: list[str] | None = None
        self.in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag not in VOID_ELEMENTS:
            self.stack.append(tag)
        if tag == "section":
            self.current = {"h2": "", "tables": [], "images": [], "text": ""}
            self.sections[str(attributes.get("id"))] = self.current
            self.order.append(str(attributes.get("id")))
        elif tag == "h2":
            self.in_h2 = True
        elif tag == "table" and self.current is not None:
            self.current["tables"].append([])
        elif tag == "tr" and self.current is not None and self.current["tables"]:
            self.current["tables"][-1].append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "a":
            self.links.append(str(attributes.get("href")))
        elif tag == "img":
            self.images.append(str(attributes.get("src")))
            if self.current is not None:
                self.current["images"].append(str(attributes.get("src")))

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()
        if tag == "h2":
            self.in_h2 = False
        elif tag in ("td", "th") and self.cell is not None and self.current is not None and self.current["tables"]:
            self.current["tables"][-1][-1].append(" ".join("".join(self.cell).split()))
            self.cell = None
        elif tag == "section":
            self.current = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self.cell is not None:
            self.cell.append(data)
        if self.current is not None:
            self.current["text"] += data
            if self.in_h2:
                self.current["h2"] += data


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert not parser.errors, parser.errors[:5]
    assert parser.stack == [], f"unclosed: {parser.stack}"
    return parser


def row_of(table: list[list[str]], first: str) -> list[str]:
    rows = [row for row in table if row and row[0] == first]
    assert len(rows) == 1, f"{first!r} in {[r[0] for r in table if r]}"
    return rows[0]


@pytest.fixture(scope="module")
def synthetic() -> tuple[GrainAnalysis, str]:
    analysis = analyze(ArrayLabelmap(synthetic_labels(), SYNTH_CLASSES, 0.01, name="synthetic <section> & co"))
    return analysis, grain_report_html(analysis, None)


@pytest.fixture(scope="module")
def real_10a() -> tuple[GrainAnalysis, np.ndarray, str]:
    files = real_field("10a")
    source = open_labelmap(files["mask"], classes=REAL_CLASSES, mm_per_pixel=0.001, pp=files["pp"])
    analysis = analyze(source)
    pp = source.open_pp()
    assert pp is not None
    try:
        small = pp_overview(pp, analysis.scan.overview_factor)
    finally:
        pp.close()
    return analysis, small, grain_report_html(analysis, small)


@pytest.fixture(params=["synthetic", "real_10a"])
def report(request: pytest.FixtureRequest) -> tuple[GrainAnalysis, str]:
    fixture = request.getfixturevalue(request.param)
    return fixture[0], fixture[-1]


def test_the_page_is_self_contained_well_formed_and_holds_every_section_in_order(report):
    analysis, page = report
    assert not re.search(r"https?:|ftp:|<script|<link|<iframe|<object|@import|url\(", page, re.IGNORECASE)
    parsed = parse(page)
    assert [parsed.sections[s]["h2"] for s in parsed.order] == [title for _, title in SECTIONS]
    assert parsed.images, "no figures"
    assert parsed.links and all(link.startswith("#") and link[1:] in parsed.sections for link in parsed.links)
    for source in parsed.images:
        assert source.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            assert image.format == "PNG" and min(image.size) >= 100
    for name in analysis.source.classes.names:
        assert html_text(name) in page
    # one figure each at least: modal bars, size histograms + curves, shapes + rose, contacts, overview
    for section, least in (("modal", 1), ("size", 2), ("shape", 2), ("contacts", 1), ("overview", 1)):
        assert len(parsed.sections[section]["images"]) >= least, section


def html_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_modal_counts_and_folk_ward_are_printed_as_the_summary_holds_them(report):
    analysis, page = report
    parsed = parse(page)
    summary = analysis.summary
    modal = parsed.sections["modal"]["tables"][0]
    counts = parsed.sections["counts"]["tables"][0]
    for entry in summary["classes"]:
        row = row_of(modal, entry["class"])
        assert row[3] == f"{entry['area_percent']:.2f}"
        low, high = entry["area_percent_interval"]
        assert row[4] == f"{low:.2f} \N{EN DASH} {high:.2f}"
        count_row = row_of(counts, entry["class"])
        if entry["role"] != "matrix":
            assert count_row[2:5] == [str(entry["grains"]), str(entry["grains_measured"]), str(entry["grains_at_edge"])]
    grains = summary["grains"]
    assert row_of(counts, "All grains (pores excluded)")[2:5] == [
        str(grains["measured"] + grains["at_edge"]),
        str(grains["measured"]),
        str(grains["at_edge"]),
    ]
    folk = row_of(parsed.sections["size"]["tables"][0], "All grains")
    fw = grains["size"]["folk_ward"]
    assert folk[2:] == [
        f"{fw['mean_phi']:.2f}",
        f"{fw['mean_mm']:.3f}",
        fw["mean_class"],
        f"{fw['sorting_phi']:.2f}",
        fw["sorting"],
        f"{fw['skewness']:.2f}",
        fw["skewness_words"],
        f"{fw['kurtosis']:.2f}",
        fw["kurtosis_words"],
    ]
    percentiles = row_of(parsed.sections["size"]["tables"][1], "All grains")
    for key, cell in zip(("d10_mm", "d50_mm", "d90_mm"), percentiles[4:7]):
        value = grains["size"][key]
        assert cell == (f"{value:.4f}" if value < 0.1 else f"{value:.3f}")
    largest = parsed.sections["largest"]["tables"][0]
    areas = analysis.table.columns["area_mm2"]
    assert len(largest) == 1 + min(20, len(analysis.table))
    assert largest[1][2] == f"{areas.max():.4f}"
    assert [int(r[0]) for r in largest[1:]] == [int(g) for g in 1 + np.argsort(-areas, kind="stable")[:20]]


def test_known_grains_pores_and_empty_classes_of_a_generated_section(synthetic):
    analysis, page = synthetic
    parsed = parse(page)
    labels = synthetic_labels()
    counts = parsed.sections["counts"]["tables"][0]
    assert row_of(counts, "Quartz")[2:5] == [str(len(QUARTZ)), str(len(QUARTZ)), "0"]
    assert row_of(counts, FELDSPAR)[2:5] == ["1", "1", "0"]
    assert row_of(counts, "Calcite")[2:5] == ["0", "0", "0"]
    assert row_of(counts, "Pore")[2:5] == [str(len(PORES)), str(len(PORES)), "0"]
    assert row_of(counts, "All grains (pores excluded)")[2:5] == [str(len(QUARTZ) + 1), str(len(QUARTZ) + 1), "0"]
    folk = parsed.sections["size"]["tables"][0]
    assert row_of(folk, FELDSPAR)[1:3] == ["1", "needs 2 grains or more"]
    assert row_of(folk, "Calcite")[1:3] == ["0", "no measured grains"]
    assert "No measured grains: Calcite." in "".join(parsed.text)
    # porosity: exact pixel share of the pore discs, and their bodies
    porosity = 100 * np.count_nonzero(labels == 4) / labels.size
    text = " ".join(parsed.sections["porosity"]["text"].split())
    assert f"Porosity: {porosity:.2f}% of the classified area (Pore); {len(PORES)} pore bodies, 3 measured" in text
    assert len(parsed.sections["porosity"]["images"]) == 1
    pore_row = row_of(parsed.sections["porosity"]["tables"][1], "Pore")
    assert pore_row[1] == str(len(PORES))
    # round discs have a long axis near 0 degrees, either side: printed without a minus zero
    orientations = [row[9] for row in parsed.sections["largest"]["tables"][0][1:]]
    assert "0" in orientations and "-0" not in orientations
    # escaped everywhere: the raw markup of the names never appears
    assert "<K&Na>" not in page and "<section> & co" not in page
    assert "synthetic &lt;section&gt; &amp; co" in page
    assert "Feldspar &lt;K&amp;Na&gt;" in page


def test_the_real_field_without_a_pore_class_says_so(real_10a):
    _, _, page = real_10a
    parsed = parse(page)
    text = " ".join(parsed.sections["porosity"]["text"].split())
    assert "No pore class in this labelmap's classes" in text
    assert parsed.sections["porosity"]["images"] == []


@pytest.mark.parametrize(
    "labels, expected",
    [
        (np.zeros((40, 50), np.uint8), ["No classified pixels: no modal mineralogy.", "No grains."]),
        (np.ones((40, 50), np.uint8), ["No measured grains: no size distribution.", "No grains."]),
    ],
    ids=["nothing-classified", "matrix-only"],
)
def test_sections_without_grains_say_so_instead_of_drawing_empty_plots(labels, expected):
    analysis = analyze(ArrayLabelmap(labels, SYNTH_CLASSES, 0.01))
    page = grain_report_html(analysis, None)
    parsed = parse(page)
    text = " ".join("".join(parsed.text).split())
    for sentence in expected:
        assert sentence in text
    assert "No measured grains: no shape distributions." in text
    assert parsed.sections["size"]["images"] == [] and parsed.sections["shape"]["images"] == []
    assert [parsed.sections[s]["h2"] for s in parsed.order] == [title for _, title in SECTIONS]


def test_one_grain_gets_a_histogram_bar_but_no_folk_and_ward():
    labels = np.ones((120, 120), np.uint8)
    _disc(labels, 60, 60, 20, 2)
    analysis = analyze(ArrayLabelmap(labels, SYNTH_CLASSES, 0.01))
    parsed = parse(grain_report_html(analysis, None))
    assert row_of(parsed.sections["size"]["tables"][0], "Quartz")[1:3] == ["1", "needs 2 grains or more"]
    assert len(parsed.sections["size"]["images"]) == 2  # histogram and cumulative curve


def test_overview_outlines_grains_in_class_colours_on_the_pp_and_leaves_the_rest_untouched(real_10a):
    analysis, small, _ = real_10a
    scan = analysis.scan
    image = grain_overview_image(analysis, small)
    h, w = image.shape[:2]
    assert image.dtype == np.uint8 and (h, w) == scan.overview_labels.shape == small.shape[:2]
    outlines = scan.overview_outlines[:h, :w]
    labels = scan.overview_labels[:h, :w]
    assert outlines.sum() > 1000
    lut = np.array(analysis.source.classes.lut(UNCLASSIFIED_RGB), np.uint8)
    lut[0] = OUTLINE_DEFAULT
    for value in scan.roles.matrix:
        lut[value] = OUTLINE_DEFAULT
    np.testing.assert_array_equal(image[outlines], lut[labels[outlines]])
    # pixels more than two (8-neighbour steps) from any outline are the PP's own: a line of at
    # most two pixels plus a one-pixel contrasting edge
    near = outlines.copy()
    for _ in range(2):
        tall = near.copy()
        tall[1:] |= near[:-1]
        tall[:-1] |= near[1:]
        near = tall.copy()
        near[:, 1:] |= tall[:, :-1]
        near[:, :-1] |= tall[:, 1:]
    np.testing.assert_array_equal(image[~near], small[:h, :w][~near])
    assert np.any(image[near & ~outlines] != small[:h, :w][near & ~outlines])  # the contrasting edge


def test_overview_without_pp_shows_class_colours_with_dark_outlines(synthetic):
    analysis, _ = synthetic
    scan = analysis.scan
    image = grain_overview_image(analysis, None)
    lut = np.array(analysis.source.classes.lut(UNCLASSIFIED_RGB), np.uint8)
    outlines = scan.overview_outlines
    np.testing.assert_array_equal(image[~outlines], lut[scan.overview_labels][~outlines])
    assert np.all(image[outlines] == OUTLINE_ON_CLASSES)
    # every quartz disc is outlined: its rim pixel (top of the disc) is on an outline
    for row, col, radius in QUARTZ:
        assert outlines[row - radius, col]


@pytest.mark.slow  # the analysis of 30,000 grains takes about 10 s; the report itself about 1.5 s
def test_a_report_of_thirty_thousand_grains_builds_in_seconds():
    classes = ClassTable.from_names_colors(
        ["Matrix", "Quartz", "Feldspar", "Pore"], ["#8c6e5a", "#ffd700", "#f08080", "#1e90ff"]
    )
    n, step = 174, 6
    labels = np.ones((n * step, n * step), np.uint8)
    value = 2 + np.arange(n * n).reshape(n, n) % 3
    for dy in range(4):
        for dx in range(4):
            labels[1 + dy :: step, 1 + dx :: step] = value
    analysis = analyze(ArrayLabelmap(labels, classes, 0.005), GrainOptions(split=False))
    assert len(analysis.table) == n * n
    start = time.perf_counter()
    page = grain_report_html(analysis, None)
    elapsed = time.perf_counter() - start
    assert elapsed < 8.0, f"{elapsed:.1f} s"
    counts = parse(page).sections["counts"]["tables"][0]
    assert row_of(counts, "All grains (pores excluded)")[2] == str(np.count_nonzero(value != 4))


def _screenshot(page: str, folder: Path) -> np.ndarray:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (no `chromium` on PATH): the page is not rendered")
    html_path = folder / "report.html"
    html_path.write_text(page, encoding="utf-8")
    png = folder / "out.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={folder / 'profile'}",
            f"--screenshot={png}",
            "--window-size=1400,4000",
            html_path.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert png.is_file()
    with Image.open(png) as image:
        assert image.size == (1400, 4000)
        return np.asarray(image.convert("RGB"))


def test_the_page_renders_in_headless_chromium_with_its_class_colours(report, tmp_path):
    analysis, page = report
    pixels = _screenshot(page, tmp_path)
    assert pixels.astype(np.float64).std() > 20
    flat = pixels.reshape(-1, 3)
    assert len(np.unique(flat[::7], axis=0)) > 200
    for mineral in analysis.source.classes.classes:
        distance = np.abs(flat.astype(np.int16) - np.array(mineral.rgb, np.int16)).max(axis=1)
        assert np.count_nonzero(distance <= 2) > 100, mineral.name
