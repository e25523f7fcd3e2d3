"""Image readers: region reads equal array slices, bad inputs are refused at open with a clear
one-line error, and a band of a large tiled TIFF is read without loading the whole image."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from thinseg.errors import ThinSegError
from thinseg.io.images import ArraySource, PillowSource, TiffSource, open_image


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (300, 410, 3), dtype=np.uint8)


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    out = path.with_name("truncated_" + path.name)
    out.write_bytes(data[: int(len(data) * keep)])
    return out


# ------------------------------------------------------------------------------ reading


def test_png_regions_equal_slices(tmp_path, rgb):
    source = open_image(_png(tmp_path / "s_PP.png", rgb), role="PP image")
    assert isinstance(source, PillowSource)
    assert source.shape == (300, 410) and source.name == "s_PP" and source.mm_per_pixel is None
    band = source.read(17, 129, 33, 250)
    assert band.dtype == np.uint8 and band.flags.c_contiguous
    np.testing.assert_array_equal(band, rgb[17:129, 33:250])
    np.testing.assert_array_equal(source.read(0, 300), rgb)
    band[:] = 0  # the caller owns the result
    np.testing.assert_array_equal(source.read(17, 129, 33, 250), rgb[17:129, 33:250])
    source.close()


def test_jpeg_reads_as_rgb(tmp_path, rgb):
    smooth = np.repeat(np.repeat(rgb[:30, :41], 10, axis=0), 10, axis=1)
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95, subsampling=0)
    source = open_image(tmp_path / "a.jpg")
    band = source.read(0, 100, 0, 410)
    assert band.shape == (100, 410, 3) and band.dtype == np.uint8
    assert np.abs(band.astype(int) - smooth[:100].astype(int)).mean() < 6


def test_palette_png_becomes_rgb(tmp_path, rgb):
    Image.fromarray(rgb[:, :, 0] // 64 * 64).convert("P").save(tmp_path / "p.png")
    band = open_image(tmp_path / "p.png").read(0, 10)
    assert band.shape == (10, 410, 3)


def test_tiled_bigtiff_region_equals_slice(tmp_path, rgb):
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, rgb, tile=(64, 64), bigtiff=True, compression="zlib", photometric="rgb")
    source = open_image(path)
    assert isinstance(source, TiffSource) and not source.memory_mapped
    np.testing.assert_array_equal(source.read(50, 201, 70, 333), rgb[50:201, 70:333])
    np.testing.assert_array_equal(source.read(299, 300), rgb[299:300])
    source.close()


@pytest.mark.parametrize("compression", [None, "lzw", "zlib"])
def test_stripped_tiff_region_equals_slice(tmp_path, rgb, compression):
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, rgb, rowsperstrip=16, compression=compression, photometric="rgb")
    source = open_image(path)
    np.testing.assert_array_equal(source.read(5, 77, 1, 409), rgb[5:77, 1:409])


def test_uncompressed_contiguous_tiff_is_memory_mapped(tmp_path, rgb):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    source = open_image(path)
    assert source.memory_mapped
    np.testing.assert_array_equal(source.read(10, 20, 30, 40), rgb[10:20, 30:40])


def test_single_huge_compressed_strip_is_decoded_once(tmp_path, rgb, monkeypatch):
    import thinseg.io.images as images

    monkeypatch.setattr(images, "WHOLE_DECODE_SEGMENT_BYTES", 10_000)
    path = tmp_path / "one_strip.tif"
    tifffile.imwrite(path, rgb, rowsperstrip=300, compression="lzw", photometric="rgb")
    source = open_image(path)
    assert source.decoded_whole
    np.testing.assert_array_equal(source.read(12, 250, 5, 400), rgb[12:250, 5:400])


def test_planar_tiff_gives_interleaved_rgb(tmp_path, rgb):
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(rgb, 2, 0), photometric="rgb", planarconfig="separate", tile=(64, 64))
    np.testing.assert_array_equal(open_image(path).read(3, 99, 8, 200), rgb[3:99, 8:200])


def test_pyramid_ome_tiff_reads_level_0(tmp_path, rgb):
    path = tmp_path / "pyr.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(rgb, tile=(64, 64), subifds=1, photometric="rgb")
        tw.write(rgb[::2, ::2], tile=(64, 64), subfiletype=1, photometric="rgb")
    source = open_image(path)
    assert source.shape == (300, 410)
    np.testing.assert_array_equal(source.read(100, 164, 0, 410), rgb[100:164])


def test_jpeg_compressed_tiff(tmp_path, rgb):
    smooth = np.repeat(np.repeat(rgb[:30, :41], 10, axis=0), 10, axis=1)
    path = tmp_path / "jpeg.tif"
    tifffile.imwrite(path, smooth, tile=(64, 64), compression="jpeg", photometric="rgb")
    band = open_image(path).read(40, 140, 0, 410)
    assert band.shape == (100, 410, 3)
    assert np.abs(band.astype(int) - smooth[40:140].astype(int)).mean() < 8


def test_array_source_and_bounds(rgb):
    source = ArraySource(rgb, name="mem", mm_per_pixel=0.01)
    np.testing.assert_array_equal(source.read(1, 3, 2, 5), rgb[1:3, 2:5])
    with pytest.raises(ValueError):
        source.read(0, 301)
    with pytest.raises(ValueError):
        ArraySource(rgb[:, :, 0])


# ------------------------------------------------------------------------------ refusals


def _problem(path: Path, role: str = "PP image") -> str:
    with pytest.raises(ThinSegError) as info:
        open_image(path, role=role)
    assert info.value.path == path
    assert str(path) in str(info.value)
    return info.value.problem


def test_missing_file(tmp_path):
    assert _problem(tmp_path / "nope_PP.png") == "PP image file not found"


def test_empty_and_non_image_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty" in _problem(tmp_path / "empty.png")
    (tmp_path / "notes.png").write_text("not an image")
    assert "not a readable image" in _problem(tmp_path / "notes.png")


@pytest.mark.parametrize("kind", ["png", "jpg", "tif_tiled", "tif_strips"])
def test_truncated_files_are_refused_at_open(tmp_path, rgb, kind):
    if kind == "png":
        path = _png(tmp_path / "a.png", rgb)
    elif kind == "jpg":
        path = tmp_path / "a.jpg"
        Image.fromarray(rgb).save(path, quality=90)
    else:
        path = tmp_path / "a.tif"
        layout = {"tile": (64, 64)} if kind == "tif_tiled" else {"rowsperstrip": 32}
        tifffile.imwrite(path, rgb, compression="zlib", photometric="rgb", **layout)
    problem = _problem(_truncate(path))
    assert "truncated" in problem or "corrupt" in problem


def test_tiff_cut_inside_its_header_is_refused(tmp_path, rgb):
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, rgb, tile=(64, 64), photometric="rgb")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(path.read_bytes()[:60])
    assert "TIFF" in _problem(cut)


def test_grayscale_is_refused(tmp_path, rgb):
    png = _png(tmp_path / "g.png", rgb[:, :, 0])
    assert _problem(png) == "PP image is grayscale (1 channel); an RGB image is expected"
    tif = tmp_path / "g.tif"
    tifffile.imwrite(tif, rgb[:, :, 0])
    assert _problem(tif) == "PP image is grayscale (1 channel); an RGB image is expected"


def test_rgba_is_refused_not_silently_dropped(tmp_path, rgb):
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    png = _png(tmp_path / "a.png", rgba)
    assert _problem(png) == "PP image has 4 channels (RGBA); an RGB image is expected"
    tif = tmp_path / "a.tif"
    tifffile.imwrite(tif, rgba, photometric="rgb", extrasamples=["unassalpha"])
    assert _problem(tif) == "PP image has 4 channels (RGBA); an RGB image is expected"
    la = _png(tmp_path / "la.png", rgba[:, :, 2:])
    assert "2 channels" in _problem(la)


def test_16_bit_is_refused(tmp_path, rgb):
    import imagecodecs

    deep = rgb.astype(np.uint16) * 257
    (tmp_path / "rgb48.png").write_bytes(imagecodecs.png_encode(deep))
    assert "16-bit" in _problem(tmp_path / "rgb48.png") and "8-bit RGB" in _problem(tmp_path / "rgb48.png")
    (tmp_path / "g16.png").write_bytes(imagecodecs.png_encode(np.ascontiguousarray(deep[:, :, 0])))
    assert "16-bit" in _problem(tmp_path / "g16.png")
    tifffile.imwrite(tmp_path / "rgb48.tif", deep, photometric="rgb")
    assert _problem(tmp_path / "rgb48.tif") == "PP image is 16-bit (uint16); an 8-bit RGB image is expected"


def test_stacks_are_refused(tmp_path, rgb):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.stack([rgb, rgb, rgb]), photometric="rgb")
    assert "stack of 3 images" in _problem(path)


def test_netcdf_given_as_image_is_refused(tmp_path):
    path = tmp_path / "x.nc"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert "netCDF" in _problem(path)


# ------------------------------------------------------------------------------ memory


def test_band_of_large_tiled_tiff_uses_little_memory(tmp_path):
    """8192 x 8192 RGB (201 MB) written tile by tile; one 512-row band must not load it all."""
    import zarr  # noqa: F401  (import outside the measurement)

    n, tile_edge = 8192, 256
    ramp = np.arange(tile_edge, dtype=np.uint8)
    tile = np.dstack(
        [np.add.outer(ramp, ramp), np.subtract.outer(ramp, ramp), np.full((tile_edge, tile_edge), 7, np.uint8)]
    )
    path = tmp_path / "large.tif"
    tiles = (tile for _ in range((n // tile_edge) ** 2))
    tifffile.imwrite(
        path, tiles, shape=(n, n, 3), dtype=np.uint8, tile=(tile_edge, tile_edge), bigtiff=True, photometric="rgb"
    )
    image_bytes = n * n * 3

    tracemalloc.start()
    try:
        source = open_image(path)
        band = source.read(4096, 4608, 0, n)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert band.shape == (512, n, 3)
    np.testing.assert_array_equal(band[:256, 256:512], tile)
    assert peak < image_bytes / 5, (
        f"reading one band allocated {peak / 1e6:.0f} MB of a {image_bytes / 1e6:.0f} MB image"
    )
    source.close()
    path.unlink()  # 201 MB; pytest keeps the last runs' tmp folders
