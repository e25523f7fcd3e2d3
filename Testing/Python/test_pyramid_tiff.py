"""The streamed pyramidal BigTIFF writer (`thinseg.io.pyramid_tiff`) and reading its pixel size back.

Every file here is written by `PyramidTiffWriter` (or by tifffile, for OME variants it does not
write) and read back through thinseg's own `open_image` and through tifffile: pixels exact, the
reduced levels exact 2x2 means computed independently, the OME pixel size the one segment uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers import MM_PER_PIXEL, MODULE_DIR, make_bundle, run_main, section_images

from thinseg.data.section_images import DEFAULT_MM_PER_PIXEL, open_ppxp
from thinseg.errors import ThinSegError
from thinseg.io.images import open_image
from thinseg.io.pyramid_tiff import PyramidTiffWriter

H, W = 1500, 2100  # neither a multiple of the 256 px tile nor of 2 at every level
TILE, SMALLEST = 256, 256
MM = 0.0025
#: Band heights that straddle tile-rows every way: 1 row, several tile-rows, exact ends.
BANDS = [1, 300, 255, 212, 488, 244]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def written(tmp_path_factory, image) -> Path:
    path = tmp_path_factory.mktemp("pyramid") / "panorama.tif"
    assert sum(BANDS) == H
    with PyramidTiffWriter(path, (H, W), mm_per_pixel=MM, tile=TILE, smallest_level=SMALLEST) as writer:
        y0 = 0
        for rows in BANDS:
            writer.write_rows(y0, image[y0 : y0 + rows])
            y0 += rows
    return path


def mean_2x2(a: np.ndarray) -> np.ndarray:
    """2x2 means rounded half up, an odd last row/column repeated: written independently of `halve`."""
    if a.shape[0] % 2:
        a = np.concatenate([a, a[-1:]], axis=0)
    if a.shape[1] % 2:
        a = np.concatenate([a, a[:, -1:]], axis=1)
    sums = a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, 3).astype(np.int64).sum(axis=(1, 3))
    return ((sums + 2) // 4).astype(np.uint8)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# what is written


def test_bands_of_any_height_read_back_exactly_through_open_image_and_tifffile(written, image):
    source = open_image(written)
    try:
        assert source.shape == (H, W)
        assert np.array_equal(source.read(0, H), image)
        assert np.array_equal(source.read(700, 913, 255, 1801), image[700:913, 255:1801])
    finally:
        source.close()
    assert np.array_equal(tifffile.imread(written), image)


def test_reduced_levels_are_subifds_holding_the_2x2_means_of_the_level_above(written, image):
    with tifffile.TiffFile(written) as tif:
        levels = tif.series[0].levels
        assert [level.shape for level in levels] == [
            (1500, 2100, 3),
            (750, 1050, 3),
            (375, 525, 3),
            (188, 263, 3),
            (94, 132, 3),
        ]
        assert len(tif.pages) == 1  # one top-level image: the reduced ones are its SubIFDs
        assert len(tif.pages[0].subifds) == 4
        expected = image
        for level in levels[1:]:
            expected = mean_2x2(expected)
            page = level.keyframe
            assert int(page.subfiletype) == 1  # reduced-resolution image
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (TILE, TILE)
            assert np.array_equal(level.asarray(), expected)


def test_file_is_a_tiled_zlib_bigtiff_with_ome_size_and_resolution_tags(written):
    with tifffile.TiffFile(written) as tif:
        assert tif.is_bigtiff and tif.is_ome
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (TILE, TILE)
        assert int(page.photometric) == 2 and int(page.planarconfig) == 1  # RGB, contiguous
        assert int(page.compression) == 8  # deflate
        assert int(page.tags["ResolutionUnit"].value) == 3  # centimetre
        assert page.tags["XResolution"].value == page.tags["YResolution"].value == (4000, 1)  # 10 mm / 0.0025
        sub = tif.series[0].levels[2].keyframe
        assert sub.tags["XResolution"].value == (1000, 1)  # 4x coarser
        assert 'PhysicalSizeX="2.5"' in tif.ome_metadata and 'PhysicalSizeXUnit="µm"' in tif.ome_metadata


def test_open_image_reads_the_ome_physical_size_as_mm_per_pixel(written):
    source = open_image(written)
    try:
        assert source.mm_per_pixel == pytest.approx(MM, rel=1e-12)
    finally:
        source.close()


def test_image_smaller_than_the_smallest_level_has_no_reduced_levels_and_no_scale(tmp_path):
    small = np.arange(40 * 50 * 3, dtype=np.uint32).astype(np.uint8).reshape(40, 50, 3)
    with PyramidTiffWriter(tmp_path / "s.tif", (40, 50), tile=16, compression="none", smallest_level=50) as writer:
        writer.write_rows(0, small)
    with tifffile.TiffFile(tmp_path / "s.tif") as tif:
        assert len(tif.series[0].levels) == 1 and not tif.pages[0].subifds
        assert int(tif.pages[0].compression) == 1
    source = open_image(tmp_path / "s.tif")
    try:
        assert source.mm_per_pixel is None
        assert np.array_equal(source.read(0, 40), small)
    finally:
        source.close()
    assert leftovers(tmp_path) == ["s.tif"]  # no raw level files left


#: Writes an H x 4096 image in 128-row bands in a fresh process; prints how far its peak resident
#: memory (VmHWM) rose above its resident memory before the writer was made, in MB.
STREAMED_WRITE = """
import sys
import numpy as np
from thinseg.io.pyramid_tiff import PyramidTiffWriter

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))

height, width, out = int(sys.argv[1]), 4096, sys.argv[2]
with PyramidTiffWriter(out + ".warm", (64, 64), tile=16, smallest_level=16) as w:  # imports the codecs
    w.write_rows(0, np.zeros((64, 64, 3), np.uint8))
ramp = (np.arange(width, dtype=np.uint32)[None, :, None] * np.array([1, 3, 7], np.uint32)) % 251
before = status("VmRSS:")
with PyramidTiffWriter(out, (height, width), tile=256, smallest_level=256) as w:
    for y0 in range(0, height, 128):
        band = ((ramp + np.arange(y0, y0 + 128, dtype=np.uint32)[:, None, None]) % 256).astype(np.uint8)
        w.write_rows(y0, band)
print(status("VmHWM:") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak memory from /proc (Linux)")
def test_memory_does_not_grow_with_the_image_height(tmp_path):
    """A 6144-row image costs the writer what a 1024-row one does: a tile-row, not the image."""
    env = dict(os.environ, PYTHONPATH=str(MODULE_DIR))
    rises = {}
    for height in (1024, 6144):
        run = subprocess.run(
            [sys.executable, "-c", STREAMED_WRITE, str(height), str(tmp_path / f"{height}.tif")],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        rises[height] = float(run.stdout.split()[-1])
    image_mb = 6144 * 4096 * 3 / 2**20  # 72 MB
    assert rises[6144] < image_mb / 2, rises
    assert rises[6144] - rises[1024] < 8, rises  # 5120 more rows: 60 MB more image, no more memory


# ---------------------------------------------------------------------------------------------
# the pixel size other writers record


def _ome_tiff(path: Path, **physical) -> Path:
    tifffile.imwrite(
        path, np.zeros((8, 8, 3), np.uint8), photometric="rgb", ome=True, metadata={"axes": "YXS", **physical}
    )
    return path


@pytest.mark.parametrize(
    ("physical", "mm"),
    [
        ({"PhysicalSizeX": 1.32, "PhysicalSizeY": 1.32}, 0.00132),  # no unit: micrometres
        ({"PhysicalSizeX": 2.0, "PhysicalSizeXUnit": "um", "PhysicalSizeY": 8.0, "PhysicalSizeYUnit": "um"}, 0.004),
        (
            {"PhysicalSizeX": 1500.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 1500.0, "PhysicalSizeYUnit": "nm"},
            0.0015,
        ),
        ({"PhysicalSizeX": 0.002, "PhysicalSizeXUnit": "mm", "PhysicalSizeY": 0.002, "PhysicalSizeYUnit": "mm"}, 0.002),
        (
            {"PhysicalSizeX": 0.0003, "PhysicalSizeXUnit": "cm", "PhysicalSizeY": 0.0003, "PhysicalSizeYUnit": "cm"},
            0.003,
        ),
        ({"PhysicalSizeX": 3.0}, 0.003),  # only X given: pixels taken as square
        ({}, None),
        ({"PhysicalSizeX": 3.0, "PhysicalSizeXUnit": "parsec", "PhysicalSizeY": 3.0, "PhysicalSizeYUnit": "ly"}, None),
        ({"PhysicalSizeX": 5e6, "PhysicalSizeY": 5e6}, None),  # 5 m pixels: outside the sane range
    ],
)
def test_ome_physical_size_units_become_mm_per_pixel(tmp_path, physical, mm):
    source = open_image(_ome_tiff(tmp_path / "ome.tif", **physical))
    try:
        assert source.mm_per_pixel == (pytest.approx(mm, rel=1e-12) if mm is not None else None)
    finally:
        source.close()


def test_plain_tiff_resolution_tags_are_not_taken_for_a_pixel_size(tmp_path):
    path = tmp_path / "camera.tif"
    tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8), photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    source = open_image(path)
    try:
        assert source.mm_per_pixel is None
    finally:
        source.close()


# ---------------------------------------------------------------------------------------------
# failures


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_a_full_disk_is_one_thinseg_error_naming_the_file_and_leaves_nothing(tmp_path, image):
    path = tmp_path / "full.tif"
    path.symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    writer = PyramidTiffWriter(path, (H, W), tile=TILE, smallest_level=SMALLEST)
    with pytest.raises(ThinSegError, match="No space left on device") as raised, writer:
        for y0 in range(0, H, 100):
            writer.write_rows(y0, image[y0 : y0 + 100])
    assert raised.value.path == path
    assert leftovers(tmp_path) == []  # the file (here the link) and the raw level files are gone
    assert os.path.exists("/dev/full")


def test_an_output_folder_that_does_not_exist_is_one_thinseg_error_naming_the_file(tmp_path):
    path = tmp_path / "missing" / "p.tif"
    with pytest.raises(ThinSegError, match="cannot write the image: No such file or directory") as raised:
        PyramidTiffWriter(path, (H, W))
    assert raised.value.path == path
    shown = tmp_path / "panorama_PP.tif"  # the name the user will see, for a temporary `path`
    with pytest.raises(ThinSegError, match="cannot write the image") as raised:
        PyramidTiffWriter(path, (H, W), shown_as=shown)
    assert raised.value.path == shown


def test_an_exception_in_the_with_block_aborts_and_removes_everything(tmp_path, image):
    writer = PyramidTiffWriter(tmp_path / "p.tif", (H, W), tile=TILE, smallest_level=SMALLEST)
    with pytest.raises(RuntimeError, match="stitching failed"), writer:
        writer.write_rows(0, image[:600])  # two full tile-rows reach tifffile and the level-1 file
        raise RuntimeError("stitching failed")
    assert leftovers(tmp_path) == []


def test_rows_out_of_order_or_of_the_wrong_shape_are_value_errors(tmp_path, image):
    writer = PyramidTiffWriter(tmp_path / "p.tif", (H, W), tile=TILE, smallest_level=SMALLEST)
    try:
        writer.write_rows(0, image[:10])
        with pytest.raises(ValueError, match="expected y0=10, got 20"):
            writer.write_rows(20, image[20:30])
        with pytest.raises(ValueError, match=r"uint8 \(rows, 2100, 3\)"):
            writer.write_rows(10, image[10:20, :-1])
        with pytest.raises(ValueError, match=r"uint8 \(rows, 2100, 3\)"):
            writer.write_rows(10, image[10:20].astype(np.uint16))
        with pytest.raises(ValueError, match="past the image height 1500"):
            writer.write_rows(10, np.zeros((H, W, 3), np.uint8))
        with pytest.raises(ValueError, match="only 10 of 1500 rows"):
            writer.close()  # an unfinished image is removed, not left half-written
    finally:
        writer.abort()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# thinseg segment on an OME-TIFF: given pixel size > the file's > the default


def _ome_pair(folder: Path, mm_per_pixel: float | None) -> Path:
    pp, xp = section_images(100, 140)
    folder.mkdir()
    for name, array in (("F_PP.tif", pp), ("F_XP.tif", xp)):
        with PyramidTiffWriter(folder / name, (100, 140), mm_per_pixel=mm_per_pixel, tile=64, smallest_level=64) as w:
            w.write_rows(0, array)
    return folder / "F_PP.tif"


@pytest.mark.parametrize(
    ("file_mm", "given", "used"),
    [
        (2 * MM_PER_PIXEL, None, 2 * MM_PER_PIXEL),  # the file's own pixel size beats the default
        (2 * MM_PER_PIXEL, MM_PER_PIXEL, MM_PER_PIXEL),  # --mm-per-pixel beats the file's
        (None, None, DEFAULT_MM_PER_PIXEL),  # neither: the default
    ],
)
def test_segment_uses_the_given_pixel_size_then_the_files_then_the_default(tmp_path, capsys, file_mm, given, used):
    model = make_bundle(tmp_path / "model", inputs=("PP", "PX"))
    pp = _ome_pair(tmp_path / "in", file_mm)
    given_args = ["--mm-per-pixel", str(given)] if given is not None else []
    code, _, stderr = run_main(capsys, "segment", pp, *given_args, "--model", model, "--output", tmp_path / "out", "-q")
    assert code == 0, stderr
    with open_ppxp(tmp_path / "out" / "F_PP.nc") as written:  # the output's grid, read by thinseg
        assert written.mm_per_pixel == pytest.approx(used, rel=1e-9)
    assert (f"resampling from {used:g}" in stderr) == (used != MM_PER_PIXEL), stderr
