"""Hostile image files: a few kilobytes that declare gigapixels, data that stops short, pictures
stored turned. Each is given to the real `thinseg segment` process and must be refused in one
line naming the file (exit 2 alone, exit 1 in a batch whose good sections finish), with no
traceback, nothing left in the output folder and, for bombs, bounded peak memory; a turned
picture must be segmented upright, as image viewers show it.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers import make_bundle, section_images, write_image
from hostile import REFUSAL_PEAK_MB, assert_batch_partial, assert_nothing_left, assert_refused, snapshot, thinseg
from PIL import Image, ImageOps

from thinseg.errors import ThinSegError
from thinseg.io.images import TiffSource, open_image

SIDE = 96  # tiny square sections: a turned XP keeps the pair's shape


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("models") / "tiny-pp-xp", inputs=("PP", "PX"))


def segment(model: Path, out: Path, *inputs: object, env: dict[str, str] | None = None):
    return thinseg("segment", *inputs, "--model", model, "-o", out, "-q", env=env)


def refused_alone(run, out: Path, name: str, *mentions: str) -> str:
    line = assert_refused(run, code=2, mentions=[name, *mentions])
    assert_nothing_left(out)
    return line


# ---------------------------------------------------------------------------------------------
# files that declare more than they hold


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, rows: bytes) -> bytes:
    """A PNG (8-bit RGB) declaring `width` x `height` whose IDAT stream holds `rows` (filtered
    rows) and ends cleanly: every chunk CRC right."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b"")
    )


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A real 16 x 16 JPEG whose frame header (SOF0) is patched to declare `width` x `height`."""
    data = io.BytesIO()
    Image.fromarray(section_images(16, 16)[0]).save(data, "JPEG", quality=80)
    raw = bytearray(data.getvalue())
    sof = raw.find(b"\xff\xc0")
    struct.pack_into(">HH", raw, sof + 5, height, width)
    return bytes(raw)


def _tiff(
    width: int,
    height: int,
    blocks: list[tuple[int, int]],
    data: bytes,
    *,
    tile: int | None = None,
    rows_per_strip: int | None = None,
    compression: int = 1,
) -> bytes:
    """A little-endian classic TIFF (8-bit RGB) written by hand: `blocks` are the (offset,
    byte count) of each tile/strip, offsets relative to `data`, which follows the header and IFD."""
    count = len(blocks)
    entries: list[tuple[int, int, int, object]] = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 3, "bits"),
        (259, 3, 1, compression),
        (262, 3, 1, 2),
        (277, 3, 1, 3),
        (284, 3, 1, 1),
    ]
    if tile:
        entries += [(322, 4, 1, tile), (323, 4, 1, tile), (324, 4, count, "offsets"), (325, 4, count, "counts")]
    else:
        entries += [(273, 4, count, "offsets"), (278, 4, 1, rows_per_strip or height), (279, 4, count, "counts")]
    entries.sort()
    ifd_size = 2 + 12 * len(entries) + 4
    extra_at = 8 + ifd_size
    bits = struct.pack("<3H", 8, 8, 8)
    offsets_at = extra_at + len(bits)
    counts_at = offsets_at + 4 * count
    data_at = counts_at + 4 * count
    out = io.BytesIO()
    out.write(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for code, kind, n, value in entries:
        if value == "bits":
            out.write(struct.pack("<HHII", code, kind, n, extra_at))
        elif value in ("offsets", "counts"):
            at = offsets_at if value == "offsets" else counts_at
            if n == 1:
                first = blocks[0][0] + data_at if value == "offsets" else blocks[0][1]
                out.write(struct.pack("<HHII", code, kind, n, first))
            else:
                out.write(struct.pack("<HHII", code, kind, n, at))
        elif kind == 3:
            out.write(struct.pack("<HHIHH", code, kind, n, int(value), 0))  # type: ignore[call-overload]
        else:
            out.write(struct.pack("<HHII", code, kind, n, int(value)))  # type: ignore[call-overload]
    out.write(struct.pack("<I", 0))
    out.write(bits)
    out.write(struct.pack(f"<{count}I", *(offset + data_at for offset, _ in blocks)))
    out.write(struct.pack(f"<{count}I", *(size for _, size in blocks)))
    out.write(data)
    return out.getvalue()


def test_jpeg_of_under_a_kilobyte_declaring_65000_squared_px_is_refused_before_decoding(tmp_path, model):
    bomb = tmp_path / "bomb_PP.jpg"
    bomb.write_bytes(_jpeg_declaring(65000, 65000))
    xp = write_image(tmp_path / "bomb_XP.png", section_images(16, 16)[1])
    assert bomb.stat().st_size < 1000
    run = segment(model, tmp_path / "out", bomb, "--xp", xp)
    refused_alone(run, tmp_path / "out", "bomb_PP.jpg", "65000 x 65000 px", "THINSEG_MAX_PIXELS")
    assert run.peak_mb < REFUSAL_PEAK_MB, run.peak_mb


def test_png_declaring_40000_squared_px_is_refused_before_decoding(tmp_path, model):
    bomb = tmp_path / "bomb_PP.png"
    bomb.write_bytes(_png(40000, 40000, bytes(100 * (1 + 3 * 40000))))  # 100 black rows, 12 KB
    write_image(tmp_path / "bomb_XP.png", section_images(16, 16)[1])
    run = segment(model, tmp_path / "out", bomb)
    refused_alone(run, tmp_path / "out", "bomb_PP.png", "40000 x 40000 px", "1,200 Mpx limit")
    assert run.peak_mb < REFUSAL_PEAK_MB, run.peak_mb


def test_png_within_the_bound_whose_few_kilobytes_cannot_hold_its_rows_is_refused_before_decoding(tmp_path, model):
    """20000 x 20000 px is within the bound, but 12 KB of deflate cannot inflate to 1.2 GB: the
    file is refused before Pillow allocates the image (1.6 GB), with its rows counted."""
    short = tmp_path / "wide_PP.png"
    short.write_bytes(_png(20000, 20000, bytes(100 * (1 + 3 * 20000))))
    write_image(tmp_path / "wide_XP.png", section_images(16, 16)[1])
    run = segment(model, tmp_path / "out", short)
    refused_alone(run, tmp_path / "out", "wide_PP.png", "ends after 100 of 20000 rows")
    assert run.peak_mb < REFUSAL_PEAK_MB, run.peak_mb


def test_png_that_cannot_hold_its_rows_is_refused_before_pillow_decodes_it(tmp_path, monkeypatch):
    """Pillow's allocation of untouched rows stays virtual on Linux (the peak above cannot show
    it) but is committed memory elsewhere: the refusal must come before any decoding."""
    from PIL import ImageFile

    def decoded(self):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    path = tmp_path / "wide.png"
    path.write_bytes(_png(20000, 20000, bytes(100 * (1 + 3 * 20000))))
    with pytest.raises(ThinSegError, match="ends after 100 of 20000 rows"):
        open_image(path)


def test_tiled_tiff_whose_tiles_all_point_at_one_block_declaring_10_gigapixels_is_refused(tmp_path, model):
    side, tile = 100_000, 1024
    tiles = -((-side // tile) ** 2)
    block = zlib.compress(bytes(tile * tile * 3), 9)
    bomb = tmp_path / "bomb_PP.tif"
    bomb.write_bytes(_tiff(side, side, [(0, len(block))] * tiles, block, tile=tile, compression=8))
    write_image(tmp_path / "bomb_XP.png", section_images(16, 16)[1])
    assert bomb.stat().st_size < 100_000
    run = segment(model, tmp_path / "out", bomb)
    refused_alone(run, tmp_path / "out", "bomb_PP.tif", "100000 x 100000 px")
    assert run.peak_mb < REFUSAL_PEAK_MB, run.peak_mb


def test_tiff_whose_strips_lie_beyond_the_end_of_the_file_is_refused(tmp_path, model):
    pp, xp = section_images(SIDE, SIDE)
    strip = zlib.compress(pp[:48].tobytes())
    blocks = [(0, len(strip)), (len(strip) + 50_000, len(strip))]  # the second strip is not there
    bad = tmp_path / "s_PP.tif"
    bad.write_bytes(_tiff(SIDE, SIDE, blocks, strip, rows_per_strip=48, compression=8))
    write_image(tmp_path / "s_XP.png", xp)
    run = segment(model, tmp_path / "out", bad)
    refused_alone(run, tmp_path / "out", "s_PP.tif", "1 of 2 tiles/strips end past the end of the file")


def test_uncompressed_tiff_shorter_than_its_declared_pixels_is_refused(tmp_path):
    pp = section_images(SIDE, SIDE)[0]
    rows = pp[:10].tobytes()  # 10 of 96 rows, and byte counts that say so
    path = tmp_path / "short.tif"
    path.write_bytes(_tiff(SIDE, SIDE, [(0, len(rows))], rows))
    with pytest.raises(ThinSegError) as info:
        open_image(path, role="PP image")
    assert info.value.problem == (
        f"PP image declares {SIDE} x {SIDE} px uncompressed ({SIDE * SIDE * 3:,} bytes) but its strips/tiles"
        f" hold only {len(rows):,} bytes (truncated TIFF)"
    )


def test_tiles_sharing_one_block_within_the_bound_are_read(tmp_path):
    """Writers store identical empty tiles once: shared offsets alone are no reason to refuse."""
    block = zlib.compress(bytes(64 * 64 * 3))
    path = tmp_path / "shared.tif"
    path.write_bytes(_tiff(256, 192, [(0, len(block))] * 12, block, tile=64, compression=8))
    source = open_image(path)
    assert source.shape == (192, 256)
    assert not source.read(0, 192).any()


# ---------------------------------------------------------------------------------------------
# data that stops short


def _filtered_rows(array: np.ndarray) -> bytes:
    return b"".join(b"\x00" + row.tobytes() for row in array)


def test_png_whose_data_ends_cleanly_after_10_of_384_rows_is_refused(tmp_path, model):
    pp, xp = section_images(384, 384)
    short = tmp_path / "short_PP.png"
    short.write_bytes(_png(384, 384, _filtered_rows(pp[:10])))
    with Image.open(short) as image:
        image.load()  # Pillow alone takes it, padded with black rows
    write_image(tmp_path / "short_XP.png", xp)
    run = segment(model, tmp_path / "out", short)
    refused_alone(run, tmp_path / "out", "short_PP.png", "ends after 10 of 384 rows")


def test_interlaced_png_whose_data_stops_in_the_last_pass_is_refused(tmp_path):
    """Adam7: the last pass holds the odd rows; stopping after 5 of them leaves rows 0-10 whole."""
    rgb = section_images(32, 40)[0]
    # passes 1-6 cover the even rows; pass 7 the odd rows, 40 px each
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    stream = b"".join(_filtered_rows(rgb[y0::dy, x0::dx]) for x0, y0, dx, dy in passes[:6])
    stream += _filtered_rows(rgb[1::2][:5])
    header = struct.pack(">IIBBBBB", 40, 32, 8, 2, 0, 0, 1)
    data = (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(stream)) + _chunk(b"IEND", b"")
    )
    path = tmp_path / "interlaced.png"
    path.write_bytes(data)
    with pytest.raises(ThinSegError) as info:
        open_image(path)
    assert "ends after 11 of 32 rows" in info.value.problem
    complete = data.replace(
        data[data.index(b"IDAT") - 4 : data.index(b"IEND") - 4],
        _chunk(b"IDAT", zlib.compress(stream + _filtered_rows(rgb[1::2][5:]))),
    )
    path.write_bytes(complete)
    np.testing.assert_array_equal(open_image(path).read(0, 32), rgb)


def test_png_whose_last_rows_are_really_black_is_read(tmp_path):
    """A black border is a uniform last row too: the exact count must let it through."""
    rgb = section_images(64, 80)[0]
    rgb[-5:] = 0
    path = write_image(tmp_path / "border.png", rgb)
    np.testing.assert_array_equal(open_image(path).read(0, 64), rgb)


def test_truncated_jpeg_is_refused(tmp_path, model):
    pp, xp = section_images(SIDE, SIDE)
    full = write_image(tmp_path / "full.jpg", pp)
    cut = tmp_path / "cut_PP.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    write_image(tmp_path / "cut_XP.png", xp)
    run = segment(model, tmp_path / "out", cut)
    refused_alone(run, tmp_path / "out", "cut_PP.jpg", "truncated")


@pytest.mark.parametrize("subsampling", [0, 2])
def test_jpeg_cut_short_and_closed_with_an_end_marker_is_refused(tmp_path, subsampling):
    """libjpeg fills what is missing with mid-gray and Pillow says nothing; we must."""
    pp = section_images(SIDE, SIDE + 5)[0]
    buffer = io.BytesIO()
    Image.fromarray(pp).save(buffer, "JPEG", quality=90, subsampling=subsampling)
    data = buffer.getvalue()
    path = tmp_path / "closed_PP.jpg"
    path.write_bytes(data)
    open_image(path).close()  # the whole file is fine
    for keep in (len(data) // 3, len(data) * 2 // 3):
        path.write_bytes(data[:keep] + b"\xff\xd9")
        with Image.open(path) as image:
            image.load()  # Pillow alone takes it
        with pytest.raises(ThinSegError) as info:
            open_image(path, role="PP image")
        assert "ends before its last rows" in info.value.problem and "truncated JPEG" in info.value.problem


# ---------------------------------------------------------------------------------------------
# the section bound


def test_max_pixels_variable_refuses_a_small_good_image_and_lets_it_through_at_its_size(tmp_path, model):
    pp, xp = (write_image(tmp_path / f"g_{role}.png", a) for role, a in zip(("PP", "XP"), section_images(SIDE, SIDE)))
    run = segment(model, tmp_path / "refused", pp, env={"THINSEG_MAX_PIXELS": "1000"})
    refused_alone(run, tmp_path / "refused", "g_PP.png", f"{SIDE} x {SIDE} px", "THINSEG_MAX_PIXELS")
    run = segment(model, tmp_path / "through", pp, env={"THINSEG_MAX_PIXELS": str(SIDE * SIDE)})
    assert run.returncode == 0, run.describe()
    assert len(list((tmp_path / "through").glob("*.nc"))) == 1


def test_tiff_tiles_larger_than_the_bound_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("THINSEG_MAX_PIXELS", str(64 * 64))
    path = tmp_path / "big_tiles.tif"
    block = zlib.compress(bytes(128 * 128 * 3))
    path.write_bytes(_tiff(60, 60, [(0, len(block))], block, tile=128, compression=8))
    with pytest.raises(ThinSegError) as info:
        open_image(path)
    assert "tiles of 128 x 128 px" in info.value.problem


def test_pillow_keeps_its_own_bomb_check_outside_our_reads(tmp_path):
    path = write_image(tmp_path / "a.png", section_images(16, 16)[0])
    before = Image.MAX_IMAGE_PIXELS
    open_image(path).close()
    assert before == Image.MAX_IMAGE_PIXELS


def test_image_above_pillows_own_limit_but_within_ours_opens_without_its_warning(tmp_path, monkeypatch):
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow would warn at 100 px, refuse at 200
    path = write_image(tmp_path / "a.png", section_images(20, 30)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_image(path).shape == (20, 30)


# ---------------------------------------------------------------------------------------------
# orientation


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[274] = orientation
    return exif.tobytes()


def _as_viewers_show(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("kind", ["png", "jpg", "tif_memmap", "tif_tiled", "tif_strips"])
def test_every_source_reads_upright_as_viewers_show(tmp_path, kind, orientation):
    stored = section_images(48, 80)[0]
    if kind in ("png", "jpg"):
        path = tmp_path / f"a.{kind}"
        Image.fromarray(stored).save(path, exif=_exif(orientation), **({"quality": 95} if kind == "jpg" else {}))
        expected = _as_viewers_show(path)
    else:
        path = tmp_path / "a.tif"
        layout = {"tif_memmap": {}, "tif_tiled": {"tile": (16, 16)}, "tif_strips": {"rowsperstrip": 8}}[kind]
        compression = None if kind == "tif_memmap" else "zlib"
        tifffile.imwrite(
            path,
            stored,
            photometric="rgb",
            compression=compression,
            extratags=[(274, 3, 1, orientation, True)],
            **layout,
        )
        png = tmp_path / "same.png"  # the same picture and tag, shown by Pillow
        Image.fromarray(stored).save(png, exif=_exif(orientation))
        expected = _as_viewers_show(png)
    source = open_image(path)
    if kind == "tif_memmap":
        assert isinstance(source, TiffSource) and source.memory_mapped
    assert source.shape == expected.shape[:2] == ((80, 48) if orientation >= 5 else (48, 80))
    np.testing.assert_array_equal(source.read(0, source.shape[0]), expected)
    np.testing.assert_array_equal(source.read(5, 31, 7, 40), expected[5:31, 7:40])
    source.close()


def _labels(folder: Path) -> np.ndarray:
    from helpers import open_nc

    (path,) = folder.glob("*.nc")
    with open_nc(path) as ds:
        for variable in ds.variables.values():
            if "type" in variable.ncattrs() and variable.getncattr("type") == "labelmap":
                return np.asarray(variable[0])
    raise AssertionError(f"no labelmap in {path}")


def test_xp_stored_turned_with_an_exif_orientation_is_segmented_upright(tmp_path, model):
    """A square pair passes the size check whichever way XP lies: XP must be turned upright."""
    pp, xp = section_images(SIDE, SIDE)
    upright, turned = tmp_path / "upright", tmp_path / "turned"
    write_image(upright / "s_PP.png", pp)
    write_image(turned / "s_PP.png", pp)
    Image.fromarray(np.rot90(xp, 1)).save(turned / "s_XP.jpg", quality=95, exif=_exif(6))  # shown turned back
    shown = _as_viewers_show(turned / "s_XP.jpg")
    write_image(upright / "s_XP.png", shown)
    assert np.abs(shown.astype(int) - xp.astype(int)).mean() < 8  # it is XP, upright
    first = segment(model, tmp_path / "out_upright", upright / "s_PP.png")
    second = segment(model, tmp_path / "out_turned", turned / "s_PP.png")
    assert first.returncode == 0 and second.returncode == 0, first.describe() + second.describe()
    np.testing.assert_array_equal(_labels(tmp_path / "out_turned"), _labels(tmp_path / "out_upright"))


# ---------------------------------------------------------------------------------------------
# batches


def test_batch_of_a_bomb_and_a_good_pair_finishes_the_good_one_and_exits_1(tmp_path, model):
    inputs = tmp_path / "in"
    (inputs / "bomb_PP.jpg").parent.mkdir()
    (inputs / "bomb_PP.jpg").write_bytes(_jpeg_declaring(65000, 65000))
    (inputs / "bomb_XP.jpg").write_bytes(_jpeg_declaring(65000, 65000))
    pp, xp = section_images(SIDE, SIDE)
    write_image(inputs / "good_PP.png", pp)
    write_image(inputs / "good_XP.png", xp)
    out = tmp_path / "out"
    before = snapshot(out)
    run = segment(model, out, inputs)
    lines = assert_batch_partial(run, ["bomb_PP.jpg"])
    assert any("65000 x 65000 px" in line for line in lines), run.describe()
    assert run.peak_mb < REFUSAL_PEAK_MB + 500, run.peak_mb
    written = sorted(p.name for p in out.iterdir())
    assert any(name.startswith("good") and name.endswith(".nc") for name in written)
    assert not any(name.startswith("bomb") for name in written), written
    assert not any(name.startswith(".") or name.endswith(".partial") for name in written), written
    assert before == set()


# -- label images and QEMSCAN maps: our bound, not Pillow's ----------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_label_images_and_qemscan_maps_answer_to_the_section_bound_not_pillows(tmp_path, monkeypatch, suffix):
    """A full-resolution mask (20k x 30k = 600 Mpx) is legitimate where Pillow's own bomb check
    refuses at 179 Mpx: label images and QEMSCAN maps are read under the section bound instead,
    refused in one line above it, and Pillow's setting is left as it was."""
    from thinseg import limits
    from thinseg.data.sections import read_label_image
    from thinseg.registration.qemscan_maps import _read_raster

    labels = (np.arange(30 * 40).reshape(30, 40) % 7).astype(np.uint8)
    path = tmp_path / f"mask{suffix}"
    if suffix == ".png":
        Image.fromarray(labels, mode="L").save(path)
    else:
        tifffile.imwrite(path, labels)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow alone would refuse 1,200 px
    assert np.array_equal(read_label_image(path), labels)
    assert np.array_equal(_read_raster(path)[0], labels)
    assert Image.MAX_IMAGE_PIXELS == 100
    with limits.section_pixel_limit(1000):
        for read in (read_label_image, _read_raster):
            with pytest.raises(ThinSegError) as refused:
                read(path)
            assert refused.value.path == path and "40 x 30 px" in str(refused.value)


def test_a_planar_tiff_label_image_is_bounded_by_its_height_and_width_not_its_samples(tmp_path):
    """A planar TIFF's first axis is its samples: the bound applies to the declared height x
    width from the tags (here 3 x 40 x 30, refused under a 1,000 px bound)."""
    from thinseg import limits
    from thinseg.registration.qemscan_maps import _read_raster

    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.zeros((3, 40, 30), np.uint8), planarconfig="separate", photometric="rgb")
    with limits.section_pixel_limit(1000), pytest.raises(ThinSegError, match="30 x 40 px"):
        _read_raster(path)
