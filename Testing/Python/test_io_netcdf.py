"""GeoSlicer netCDF layout: our files read back exactly (also by plain xarray, checking every
convention GeoSlicer relies on), GeoSlicer-style xarray files read here, streaming writes,
name sanitising, and all-or-nothing output files."""

from __future__ import annotations

from pathlib import Path

import netCDF4
import numpy as np
import pytest
import tifffile
import xarray as xr

from thinseg.classes.files import default_class_table
from thinseg.classes.table import ClassTable
from thinseg.data.section_images import netcdf_layout, netcdf_sections
from thinseg.errors import ThinSegError
from thinseg.io.atomic import atomic_output, ensure_writable_dir, free_output_path
from thinseg.io.images import open_image
from thinseg.io.netcdf import (
    Geometry,
    NetcdfWriter,
    Window,
    find_image_variable,
    labels_problem,
    list_variables,
    open_netcdf_image,
    padding_window,
    read_labelmap,
    sanitize_name,
)

SPACING = 0.00132
ORIGIN = (1.5, -2.0, 0.25)  # RAS


@pytest.fixture(scope="module")
def section() -> tuple[np.ndarray, np.ndarray, ClassTable]:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    table = default_class_table()
    labels = rng.integers(0, len(table) + 1, (70, 90), dtype=np.uint8)
    return image, labels, table


def _write_section(path: Path, image: np.ndarray, labels: np.ndarray, table: ClassTable) -> tuple[str, str]:
    with NetcdfWriter(path, attrs={"thinseg_version": "0.1.0"}) as writer:
        pp = writer.add_rgb_image("S1_PP", image, SPACING, ORIGIN)
        seg = writer.add_labelmap("S1_Segmentation", labels, table, SPACING, ORIGIN, reference=pp)
    return pp, seg


def _expected_transform(spacing: float = SPACING, origin=ORIGIN) -> list[float]:
    ox, oy, oz = origin
    return [-spacing, 0, 0, ox, 0, -spacing, 0, oy, 0, 0, spacing, oz, 0, 0, 0, 1]


# ------------------------------------------------------------------------------ round trips


def test_round_trip_rgb_and_labelmap_exact(tmp_path, section):
    image, labels, table = section
    path = tmp_path / "s1.nc"
    pp, seg = _write_section(path, image, labels, table)
    assert (pp, seg) == ("S1_PP", "S1_Segmentation")

    infos = {v.name: v for v in list_variables(path)}
    assert set(infos) == {"S1_PP", "S1_Segmentation"}
    assert infos["S1_PP"].kind == "rgb" and infos["S1_Segmentation"].kind == "labelmap"
    assert infos["S1_PP"].shape == (1, 70, 90, 3)

    source = open_netcdf_image(path, pp)
    assert source.shape == (70, 90) and source.name == "S1_PP"
    assert source.mm_per_pixel == pytest.approx(SPACING)
    assert source.origin_mm == pytest.approx(ORIGIN)
    np.testing.assert_array_equal(source.read(0, 70), image)
    np.testing.assert_array_equal(source.read(11, 40, 7, 66), image[11:40, 7:66])
    source.close()

    read, read_table, spacing, origin = read_labelmap(path, seg)
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, labels)
    assert read_table == table
    assert spacing == pytest.approx(SPACING) and origin == pytest.approx(ORIGIN)


def test_plain_xarray_sees_geoslicer_layout(tmp_path, section):
    image, labels, table = section
    path = tmp_path / "s1.nc"
    pp, seg = _write_section(path, image, labels, table)
    with xr.open_dataset(path) as ds:
        assert ds.attrs["thinseg_version"] == "0.1.0"
        img = ds[pp]
        assert img.dims == ("z_S1_PP", "y_S1_PP", "x_S1_PP", "c")
        assert img.dtype == np.uint8 and img.shape == (1, 70, 90, 3)
        assert list(ds["c"].values) == ["r", "g", "b"]
        np.testing.assert_array_equal(img.values[0], image)
        # x and y coordinates are the negated RAS origin plus spacing * index; z is not negated
        np.testing.assert_allclose(ds["x_S1_PP"].values, -ORIGIN[0] + SPACING * np.arange(90))
        np.testing.assert_allclose(ds["y_S1_PP"].values, -ORIGIN[1] + SPACING * np.arange(70))
        np.testing.assert_allclose(ds["z_S1_PP"].values, [ORIGIN[2]])
        assert ds["x_S1_PP"].dtype == np.float64
        transform = img.attrs["transform"]
        assert len(transform) == 16
        np.testing.assert_allclose(transform, _expected_transform())
        assert "type" not in img.attrs

        lab = ds[seg]
        assert lab.dims == ("z_S1_Segmentation", "y_S1_Segmentation", "x_S1_Segmentation")
        assert lab.dtype == np.uint8
        np.testing.assert_array_equal(lab.values[0], labels)
        assert lab.attrs["type"] == "labelmap"
        assert isinstance(lab.attrs["labels"], list)
        assert lab.attrs["labels"] == ["Name,Index,Color"] + [
            f"{c.name},{k},{c.color}" for k, c in enumerate(table.classes, 1)
        ]
        assert lab.attrs["reference"] == pp
        np.testing.assert_allclose(lab.attrs["transform"], _expected_transform())
    # GeoSlicer's importer: spacing = coordinate step, origin = (-x0, -y0, z0), directions diag(-1,-1,1)
    with xr.open_dataset(path) as ds:
        x, y, z = ds["x_S1_PP"].values, ds["y_S1_PP"].values, ds["z_S1_PP"].values
        matrix = np.asarray(ds[pp].attrs["transform"]).reshape(4, 4)
        assert np.allclose(matrix[:3, 3], [-x[0], -y[0], z[0]])
        assert np.allclose(np.diag(matrix)[:2], [-(x[1] - x[0]), -(y[1] - y[0])])


def test_labels_are_compressed_and_large_images_chunked(tmp_path, section):
    image, labels, table = section
    path = tmp_path / "s1.nc"
    with NetcdfWriter(path) as writer:
        pp = writer.add_rgb_image("big_PP", np.zeros((1100, 1300, 3), np.uint8), SPACING)
        seg = writer.add_labelmap("seg", labels, table, SPACING)
    with netCDF4.Dataset(path) as ds:
        assert ds.data_model == "NETCDF4"
        assert ds[seg].filters()["zlib"] is True
        assert ds[pp].chunking() == [1, 512, 512, 3]
        assert ds[seg].chunking() == [1, 70, 90]


def test_streaming_write_from_tiff_source(tmp_path):
    rng = np.random.default_rng(5)
    big = rng.integers(0, 256, (3000, 2000, 3), dtype=np.uint8)
    tif = tmp_path / "big_PP.tif"
    tifffile.imwrite(tif, big, tile=(256, 256), photometric="rgb")
    path = tmp_path / "big.nc"
    source = open_image(tif)
    with NetcdfWriter(path) as writer:
        name = writer.add_rgb_image(source.name, source, 0.002, band_rows=512)
    source.close()
    reader = open_netcdf_image(path, name)
    for y0 in (0, 1000, 2488):
        np.testing.assert_array_equal(reader.read(y0, y0 + 512), big[y0 : y0 + 512])
    np.testing.assert_array_equal(reader.read(2999, 3000, 1999, 2000), big[2999:, 1999:])
    reader.close()


def test_scalar_image_and_copy_variable(tmp_path, section):
    image, labels, table = section
    first = tmp_path / "first.nc"
    pp, seg = _write_section(first, image, labels, table)
    second = tmp_path / "second.nc"
    confidence = (labels * 30).astype(np.uint8)
    with NetcdfWriter(second) as writer:
        copied = [writer.copy_variable(first, pp), writer.copy_variable(first, seg)]
        writer.add_scalar_image("S1_Confidence", confidence, SPACING, ORIGIN, attrs={"reference": copied[0]})
        again = writer.copy_variable(first, pp)
    assert copied == [pp, seg] and again == "S1_PP_1"
    kinds = {v.name: v.kind for v in list_variables(second)}
    assert kinds == {"S1_PP": "rgb", "S1_Segmentation": "labelmap", "S1_Confidence": "scalar", "S1_PP_1": "rgb"}
    with xr.open_dataset(first) as a, xr.open_dataset(second) as b:
        for name in (pp, seg):
            np.testing.assert_array_equal(a[name].values, b[name].values)
            assert a[name].attrs.keys() == b[name].attrs.keys()
            assert a[name].attrs["transform"] == pytest.approx(b[name].attrs["transform"])
            for axis in "zyx":
                np.testing.assert_array_equal(a[f"{axis}_{name}"].values, b[f"{axis}_{name}"].values)
        assert b[seg].attrs["labels"] == a[seg].attrs["labels"]
        np.testing.assert_array_equal(b["S1_Confidence"].values[0], confidence)
    with netCDF4.Dataset(second) as ds:
        assert ds[seg].filters()["zlib"] is True


# ------------------------------------------------------------------------------ GeoSlicer's own files


def _geoslicer_style_export(path: Path, image: np.ndarray, labels: np.ndarray, table: ClassTable, shared: bool) -> None:
    """What GeoSlicer's exporter writes with xarray (per-image coordinates, or one shared grid)."""
    spacing, (ox, oy, oz) = 0.01, (2.0, 3.0, 0.5)
    transform = np.array(_expected_transform(spacing, (ox, oy, oz)), dtype=float).tolist()
    names = {"img": "Well_3200_PX", "seg": "Well_3200_Minerals"}
    coords: dict[str, object] = {"c": ["r", "g", "b"]}
    arrays = {}
    for key, data in (("img", image[None]), ("seg", labels[None])):
        name = names[key]
        dims = list("zyx") if shared else [f"{a}_{name}" for a in "zyx"]
        attrs = (
            {} if key == "img" else {"type": "labelmap", "labels": table.geoslicer_labels(), "reference": names["img"]}
        )
        if not shared:
            attrs["transform"] = transform
        arrays[name] = xr.DataArray(data, dims=dims + (["c"] if data.ndim == 4 else []), attrs=attrs)
        for axis, start, n in zip(dims, (oz, -oy, -ox), data.shape[:3]):
            coords[axis] = np.linspace(start, start + spacing * (n - 1), n)
    dataset = xr.Dataset(arrays, coords=coords)
    dataset.attrs["geoslicer_version"] = "2.5.0"
    encoding = {name: {"zlib": False, "chunksizes": None} for name in arrays}
    dataset.to_netcdf(path, encoding=encoding, format="NETCDF4")


@pytest.mark.parametrize("shared", [False, True], ids=["per-image-coords", "same-coordinate-system"])
def test_reads_geoslicer_xarray_files(tmp_path, section, shared):
    image, labels, table = section
    path = tmp_path / "geoslicer.nc"
    _geoslicer_style_export(path, image, labels, table, shared)
    assert find_image_variable(path, "px") == "Well_3200_PX"
    assert find_image_variable(path, "PP") is None
    source = open_netcdf_image(path, "Well_3200_PX")
    assert source.mm_per_pixel == pytest.approx(0.01)
    assert source.origin_mm == pytest.approx((2.0, 3.0, 0.5))
    np.testing.assert_array_equal(source.read(5, 60, 3, 80), image[5:60, 3:80])
    source.close()
    read, read_table, spacing, origin = read_labelmap(path, "Well_3200_Minerals")
    np.testing.assert_array_equal(read, labels)
    assert read_table == table and spacing == pytest.approx(0.01) and origin == pytest.approx((2.0, 3.0, 0.5))


def test_find_image_variable_without_rgb(tmp_path, section):
    _, labels, table = section
    path = tmp_path / "labels_only.nc"
    with NetcdfWriter(path) as writer:
        writer.add_labelmap("S1_PP_labels", labels, table, SPACING)
    assert find_image_variable(path, "PP") is None
    with pytest.raises(ThinSegError, match="not an RGB image"):
        open_netcdf_image(path, "S1_PP_labels")
    with pytest.raises(ThinSegError, match="has no variable 'nope'"):
        open_netcdf_image(path, "nope")


def test_find_image_variable_prefers_the_affix_as_a_token(tmp_path, section):
    image, _, _ = section
    path = tmp_path / "two.nc"
    with NetcdfWriter(path) as writer:
        writer.add_rgb_image("APPLE_c1", image, SPACING)
        writer.add_rgb_image("s1_pp", image, SPACING)
        writer.add_rgb_image("s1_XP", image, SPACING)
    assert find_image_variable(path, "PP") == "s1_pp"
    assert find_image_variable(path, "xp") == "s1_XP"
    assert find_image_variable(path, "c1") == "APPLE_c1"


@pytest.mark.parametrize(
    "variables, sections, spare",
    [
        # a spare XP beside a complete section: S1 as it is, S2_XP left over (no IndexError)
        (["S1_PP", "S1_XP", "S2_XP"], [("S1", "S1_PP", "S1_XP")], ["S2_XP"]),
        (
            ["S1_PP", "S1_XP", "S2_PP", "S2_XP", "S3_XP"],
            [("S1", "S1_PP", "S1_XP"), ("S2", "S2_PP", "S2_XP")],
            ["S3_XP"],
        ),
        # a lone PP takes the first XP left
        (["S1_PP", "A_XP", "B_XP"], [("S1", "S1_PP", "A_XP")], ["B_XP"]),
        (["S1_PP", "A_XP"], [("S1", "S1_PP", "A_XP")], []),
        # one unpaired PP and one XP left: paired
        (["S1_PP", "S1_XP", "S2_PP", "X_XP"], [("S1", "S1_PP", "S1_XP"), ("S2", "S2_PP", "X_XP")], []),
        # ambiguous: two PPs without XP, or one PP among several with two XPs left: nothing guessed
        (["S1_PP", "S2_PP", "X_XP"], [("S1", "S1_PP", None), ("S2", "S2_PP", None)], ["X_XP"]),
        (
            ["S1_PP", "S2_PP", "S2_XP", "A_XP", "B_XP"],
            [("S1", "S1_PP", None), ("S2", "S2_PP", "S2_XP")],
            ["A_XP", "B_XP"],
        ),
        # no PP image at all: no section
        (["S2_XP"], [], []),
    ],
)
def test_netcdf_sections_pair_pp_and_xp_variables(tmp_path, section, variables, sections, spare):
    image, _, _ = section
    path = tmp_path / "sections.nc"
    with NetcdfWriter(path) as writer:
        for name in variables:
            writer.add_rgb_image(name, image, SPACING)
    layout = netcdf_layout(path)
    assert [(s.name, s.pp, s.xp) for s in layout.sections] == sections
    assert layout.spare_xp == spare
    assert netcdf_sections(path) == layout.sections


# ------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("S1_PP", "S1_PP"),
        ("a/b", "a\u2215b"),
        ("a__b___c", "a_b_c"),
        ("-x", "_-x"),
        (" x", "_ x"),
        ("_x", "_x"),
        ("\u2215x", "_\u2215x"),
        ("/x", "_\u2215x"),
        ("a\tb\nc\x00", "abc"),
        ("", "_"),
        ("3200m", "3200m"),
        ("Amostra ç", "Amostra ç"),
    ],
)
def test_sanitize_name(raw, clean):
    assert sanitize_name(raw) == clean


def test_duplicate_and_colliding_names_are_numbered(tmp_path, section):
    image, labels, table = section
    path = tmp_path / "names.nc"
    with NetcdfWriter(path) as writer:
        names = [writer.add_rgb_image("a//b", image, SPACING) for _ in range(3)]
        names.append(writer.add_labelmap("x_img", labels, table, SPACING))
        names.append(writer.add_labelmap("img", labels, table, SPACING))  # its x_img dim is taken
        names.append(writer.add_labelmap("c", labels, table, SPACING))
    assert names == ["a\u2215\u2215b", "a\u2215\u2215b_1", "a\u2215\u2215b_2", "x_img", "img_1", "c_1"]
    with xr.open_dataset(path) as ds:
        assert set(ds.data_vars) == set(names)


# ------------------------------------------------------------------------------ errors and atomicity


def test_unreadable_netcdf_files(tmp_path, section):
    image, labels, table = section
    good = tmp_path / "good.nc"
    _write_section(good, image, labels, table)
    truncated = tmp_path / "truncated.nc"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.nc"
    text.write_text("hello")
    for path in (truncated, text):
        with pytest.raises(ThinSegError) as info:
            list_variables(path)
        assert info.value.path == path and str(path) in str(info.value)
        assert "not a readable netCDF file" in info.value.problem
        with pytest.raises(ThinSegError):
            open_netcdf_image(path, "S1_PP")
    with pytest.raises(ThinSegError, match="file not found"):
        find_image_variable(tmp_path / "missing.nc", "PP")


def test_writer_leaves_nothing_on_error(tmp_path, section):
    image, labels, table = section
    path = tmp_path / "out.nc"
    with pytest.raises(ValueError), NetcdfWriter(path) as writer:
        writer.add_rgb_image("S1_PP", image, SPACING)
        writer.add_labelmap("seg", labels + len(table), table, SPACING)  # values without a class
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_replaces_only_on_success(tmp_path):
    target = tmp_path / "result.csv"
    target.write_text("old")
    for exception in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exception)), atomic_output(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".result.csv.") and tmp.name.endswith(".partial")
            tmp.write_text("half")
            raise exception
        assert target.read_text() == "old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["result.csv"]
    with atomic_output(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.csv"]


def test_free_output_path_numbering(tmp_path):
    target = tmp_path / "S1.nc"
    assert free_output_path(target) == target
    target.write_bytes(b"")
    assert free_output_path(target) == tmp_path / "S1_1.nc"
    (tmp_path / "S1_1.nc").write_bytes(b"")
    (tmp_path / "S1_3.nc").write_bytes(b"")
    assert free_output_path(target) == tmp_path / "S1_2.nc"


def test_ensure_writable_dir(tmp_path):
    made = ensure_writable_dir(tmp_path / "a" / "b")
    assert made.is_dir() and list(made.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ThinSegError, match="cannot write here"):
        ensure_writable_dir(blocker)


def test_readers_of_one_file_share_one_handle(tmp_path, section):
    """HDF5 can segfault when a process holds two handles of a file with a string variable (the
    colour coordinate `c`) and opens it again (netcdf4-python#1444, hdf5#5359): PP and XP
    sources and labelmap reads of one file share a single handle, closed by its last user."""
    import thinseg.io.netcdf as nc

    image, labels, table = section
    path = tmp_path / "s.nc"
    with NetcdfWriter(path) as writer:
        pp = writer.add_rgb_image("S1_PP", image, SPACING)
        writer.add_rgb_image("S1_XP", image[::-1].copy(), SPACING)
        writer.add_labelmap("S1_labels", labels, table, SPACING, reference=pp)

    def handles() -> int:
        return sum(1 for key in nc._SHARED if key[1] == str(path.resolve()))

    a, b = open_netcdf_image(path, "S1_PP"), open_netcdf_image(path, "S1_XP")
    assert a._ds is b._ds and handles() == 1
    for _ in range(20):  # reads while both sources are open reuse the same handle
        assert np.array_equal(read_labelmap(path, "S1_labels")[0], labels)
        assert [v.name for v in list_variables(path) if v.kind == "rgb"] == ["S1_PP", "S1_XP"]
    assert np.array_equal(b.read(0, 70), image[::-1])
    a.close()
    assert np.array_equal(b.read(10, 20), image[::-1][10:20])  # still open for the other reader
    b.close()
    assert handles() == 0 and a._ds is None and b._ds is None


# ------------------------------------------------------------------------------ geometry, padding, labels


ROTATED = np.array(
    [[-0.0086, 0.0100, 0, 4.25], [-0.0050, -0.0173, 0, -1.5], [0, 0, 0.5, 0.75], [0, 0, 0, 1]], dtype=np.float64
)  # 30 degrees in plane, 0.01 x 0.02 mm pixels


@pytest.mark.parametrize(
    "matrix",
    [Geometry.thin_section(0.01, (1.0, 2.0, 0.5), mm_per_row=0.02).matrix, np.diag([0.01, 0.01, 1.0, 1.0]), ROTATED],
    ids=["non-square", "slicer-directions", "rotated"],
)
def test_any_ijk_to_ras_is_written_and_read_back_exactly(tmp_path, section, matrix):
    image, labels, table = section
    grid = Geometry(matrix)
    path = tmp_path / "g.nc"
    with NetcdfWriter(path) as writer:
        pp = writer.add_rgb_image("G_PP", image, geometry=grid)
        seg = writer.add_labelmap("G_Segmentation", labels, table, reference=pp, geometry=grid)
    infos = {v.name: v for v in list_variables(path)}
    for name in (pp, seg):
        assert infos[name].geometry is not None and infos[name].geometry.allclose(grid, atol=0)
        assert not infos[name].on_shared_grid
    source = open_netcdf_image(path, pp)
    assert source.geometry.allclose(grid, atol=0) and source.origin_mm == pytest.approx(grid.origin)
    sx, sy, _ = grid.spacing
    assert source.mm_per_pixel == pytest.approx(np.sqrt(sx * sy))  # the same pixel area
    source.close()
    with xr.open_dataset(path) as ds:  # coordinates as GeoSlicer writes them: origin x/y negated, steps > 0
        ox, oy, oz = grid.origin
        np.testing.assert_allclose(ds[f"x_{seg}"].values, -ox + sx * np.arange(90), atol=1e-15)
        np.testing.assert_allclose(ds[f"y_{seg}"].values, -oy + sy * np.arange(70), atol=1e-15)
        np.testing.assert_allclose(ds[f"z_{seg}"].values, [oz])
        np.testing.assert_array_equal(ds[seg].attrs["transform"], matrix.ravel())


def test_geometry_of_a_crop_and_of_square_pixels():
    grid = Geometry.thin_section(0.01, (1.0, 2.0, 0.0), mm_per_row=0.02)
    assert grid.spacing == pytest.approx((0.01, 0.02, 0.01)) and not grid.is_square
    assert grid.mm_per_pixel == pytest.approx(np.sqrt(0.01 * 0.02))
    crop = grid.shifted(rows=5, cols=3)  # pixel (row 5, col 3) becomes the origin
    assert crop.origin == pytest.approx((1.0 - 0.03, 2.0 - 0.10, 0.0))
    np.testing.assert_array_equal(crop.matrix[:3, :3], grid.matrix[:3, :3])
    assert Geometry.thin_section(0.002).is_square
    with pytest.raises(ValueError):
        Geometry(np.diag([0.01, 0.0, 1.0, 1.0]))


def _shared_grid_file(path: Path, image: np.ndarray, labels: np.ndarray, table: ClassTable, pad: int) -> None:
    """A "same coordinate system" export as xarray writes it: shared z/y/x, no `transform`,
    the image padded with 255 and the labels with 0 on every side."""
    spacing = 0.01
    padded = np.pad(image, ((pad, pad + 1), (pad + 2, pad), (0, 0)), constant_values=255)
    padded_labels = np.pad(labels, ((pad, pad + 1), (pad + 2, pad)))
    h, w = padded.shape[:2]
    coords = {
        "z": [0.0],
        "y": np.linspace(-3.0, -3.0 + spacing * (h - 1), h),
        "x": np.linspace(-2.0, -2.0 + spacing * (w - 1), w),
        "c": ["r", "g", "b"],
    }
    arrays = {
        "S_PP": xr.DataArray(padded[None], dims=("z", "y", "x", "c")),
        "S_labels": xr.DataArray(
            padded_labels[None], dims=("z", "y", "x"), attrs={"type": "labelmap", "labels": table.geoslicer_labels()}
        ),
    }
    xr.Dataset(arrays, coords=coords).to_netcdf(path, format="NETCDF4")


def test_padding_of_a_shared_grid_is_cropped_and_the_origin_follows(tmp_path, section):
    image, labels, table = section
    labels = labels.copy()
    labels[0, :] = labels[:, 0] = 1  # data on the first row and column: nothing of it is cropped
    path = tmp_path / "shared.nc"
    _shared_grid_file(path, image, labels, table, pad=4)
    window = padding_window(path, "S_PP")
    assert window == Window(4, 74, 6, 96)
    source = open_netcdf_image(path, "S_PP", crop_padding=True)
    assert source.shape == (70, 90) and source.window == window and source.full_shape == (79, 100)
    np.testing.assert_array_equal(source.read(0, 70), image)
    # GeoSlicer's origin: (-x, -y) of the first pixel kept, as stored (not recomputed)
    with xr.open_dataset(path) as ds:
        expected = (-float(ds["x"].values[6]), -float(ds["y"].values[4]), 0.0)
    assert source.origin_mm == expected and source.mm_per_pixel == pytest.approx(0.01)
    source.close()
    whole = open_netcdf_image(path, "S_PP")  # without crop_padding: the stored array
    assert whole.shape == (79, 100) and whole.origin_mm == pytest.approx((2.0, 3.0, 0.0))
    whole.close()
    read, _table, _mm, origin = read_labelmap(path, "S_labels", crop_padding=True)
    np.testing.assert_array_equal(read, labels)
    assert origin == expected

    with NetcdfWriter(tmp_path / "copy.nc") as writer:  # a copy of the window: coordinates follow
        copied = writer.copy_variable(path, "S_PP", window=window)
    with xr.open_dataset(path) as a, xr.open_dataset(tmp_path / "copy.nc") as b:
        np.testing.assert_array_equal(b[copied].values[0], image)
        np.testing.assert_array_equal(b[f"x_{copied}"].values, a["x"].values[6:96])
        np.testing.assert_array_equal(b[f"y_{copied}"].values, a["y"].values[4:74])
    assert padding_window(tmp_path / "copy.nc", copied) == Window(0, 70, 0, 90)  # nothing left to crop


def test_padding_is_found_without_reading_the_whole_image(tmp_path, monkeypatch):
    import thinseg.io.netcdf as nc

    big = np.full((2000, 1500, 3), 120, np.uint8)
    path = tmp_path / "big.nc"
    _shared_grid_file(path, big, np.zeros((2000, 1500), np.uint8), default_class_table(), pad=3)
    read_bytes = []
    real_raw = nc._raw

    def counting(variable, attrs, index):
        data = real_raw(variable, attrs, index)
        read_bytes.append(data.nbytes)
        return data

    monkeypatch.setattr(nc, "_raw", counting)
    assert padding_window(path, "S_PP") == Window(3, 2003, 5, 1505)
    assert sum(read_bytes) < 0.05 * (2004 * 1508 * 3)  # edges only: a few bands and strips


def test_window_copy_of_a_variable_with_transform_moves_its_origin(tmp_path, section):
    image, labels, table = section
    first = tmp_path / "first.nc"
    _write_section(first, image, labels, table)
    with NetcdfWriter(tmp_path / "second.nc") as writer:
        name = writer.copy_variable(first, "S1_Segmentation", window=Window(10, 30, 20, 50))
    read, _table, spacing, origin = read_labelmap(tmp_path / "second.nc", name)
    np.testing.assert_array_equal(read, labels[10:30, 20:50])
    assert spacing == pytest.approx(SPACING)
    assert origin == pytest.approx((ORIGIN[0] - 20 * SPACING, ORIGIN[1] - 10 * SPACING, ORIGIN[2]))


def test_class_names_geoslicer_would_misread_are_refused(tmp_path, section):
    _, labels, _ = section
    comma = ClassTable.from_names_colors(["Quartz", "Mica, white", "Pores"], ["#ffffff", "#00ff00", "#000000"])
    assert "class 2 'Mica, white' has a comma" in (labels_problem(comma) or "")
    bad_color = ClassTable.from_names_colors(["Quartz"], ["red"])
    assert "GeoSlicer needs '#rrggbb'" in (labels_problem(bad_color) or "")
    assert labels_problem(default_class_table()) is None
    path = tmp_path / "out.nc"
    with pytest.raises(ThinSegError) as error, NetcdfWriter(path) as writer:
        writer.add_labelmap("S_labels", np.minimum(labels, 3), comma, SPACING)
    assert error.value.path == path and "labelmap 'S_labels'" in error.value.problem
    assert list(tmp_path.iterdir()) == []  # nothing half-written
