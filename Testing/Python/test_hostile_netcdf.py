"""Hostile netCDF files, spacings and resampling: each case runs the real `thinseg segment` in a
fresh process (`hostile.thinseg`) and checks the promise a refusal keeps: the exit code, one
`thinseg: error:` line naming the file and the problem, no traceback, nothing left behind and,
where a bomb or a wrong spacing would allocate gigabytes, a bounded peak memory.

The bombs are real netCDF4 files of a few KB: variables declaring 100k x 100k pixels whose
chunks were never written. The readers that training and evaluation use are checked in-process
on the same files.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
from helpers import MM_PER_PIXEL, make_bundle, open_nc, section_images, write_geoslicer_netcdf, write_image
from hostile import REFUSAL_PEAK_MB, assert_batch_partial, assert_nothing_left, assert_refused, snapshot, thinseg

from thinseg.data.sections import open_section
from thinseg.errors import ThinSegError
from thinseg.inference.resample import ResampledSource, resampling_factor, resampling_factors
from thinseg.io.images import ArraySource
from thinseg.io.netcdf import NetcdfWriter, open_netcdf_image, read_labelmap
from thinseg.limits import MAX_RESAMPLING_FACTOR
from thinseg.pipelines.segment import SegmentOptions, segment_files

H, W = 100, 140
BOMB_SIDE = 100_000


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("models") / "ThinSectionEnv" / "tiny", inputs=("PP", "PX"))


def write_section(path: Path, mm_per_pixel: float = MM_PER_PIXEL, seed: int = 0) -> Path:
    """A small, valid PP/XP section with a labelmap, as GeoSlicer exports it."""
    pp, xp = section_images(H, W, seed)
    labels = (np.arange(H * W).reshape(H, W) % 7).astype(np.uint8)
    return write_geoslicer_netcdf(
        path, {"S_PP": pp, "S_XP": xp}, mm_per_pixel=mm_per_pixel, labelmaps={"S_labels": labels}
    )


def edit_grid(path: Path, edit) -> Path:
    """Apply `edit(ds, variable)` to every image and labelmap variable of a written file."""
    import netCDF4

    with netCDF4.Dataset(path, "a") as ds:
        for name in ("S_PP", "S_XP", "S_labels"):
            edit(ds, name)
    return path


def without_transform(ds, name: str) -> None:
    ds.variables[name].delncattr("transform")


def index_coordinates(ds, name: str) -> None:
    """Coordinates 0, 1, 2, ... and no transform: what an array saved without a grid carries."""
    without_transform(ds, name)
    for axis in "yx":
        coord = ds.variables[f"{axis}_{name}"]
        coord[:] = np.arange(coord.shape[0], dtype=np.float64)


def write_bomb(path: Path, *, transform: bool = True) -> Path:
    """PP, XP and a labelmap each declaring 100k x 100k px, chunked and never written: a few KB."""
    import netCDF4

    path.parent.mkdir(parents=True, exist_ok=True)
    with netCDF4.Dataset(path, "w", format="NETCDF4") as ds:
        ds.createDimension("c", 3)
        for name, rgb in (("S_PP", True), ("S_XP", True), ("S_labels", False)):
            dims = tuple(f"{a}_{name}" for a in "zyx")
            for dim, size in zip(dims, (1, BOMB_SIDE, BOMB_SIDE)):
                ds.createDimension(dim, size)
            shape = dims + (("c",) if rgb else ())
            chunks = (1, 512, 512, 3) if rgb else (1, 512, 512)
            variable = ds.createVariable(name, "u1", shape, chunksizes=chunks, zlib=True)
            if transform:
                s = MM_PER_PIXEL
                variable.transform = np.array([-s, 0, 0, 0, 0, -s, 0, 0, 0, 0, s, 0, 0, 0, 0, 1], dtype=np.float64)
            if not rgb:
                variable.type = "labelmap"
                variable.setncattr_string("labels", ["Name,Index,Color", "Calcite,1,#ff0000"])
    assert path.stat().st_size < 64 * 1024  # the bomb is small; what it declares is not
    return path


def segment(src: Path, out: Path, model: Path, *extra: object, **kwargs):
    return thinseg("segment", src, "-o", out, "--model", model, "-q", *extra, **kwargs)


# ---------------------------------------------------------------------------------------------
# declared size


def test_netcdf_declaring_100k_squared_pixels_is_refused_before_reading(tmp_path, model):
    bomb = write_bomb(tmp_path / "bomb.nc")
    run = segment(bomb, tmp_path / "out", model)
    line = assert_refused(run, mentions=["bomb.nc", "S_PP", f"{BOMB_SIDE} x {BOMB_SIDE} px", "--max-pixels"])
    assert line.startswith(f"thinseg: error: {bomb}:"), line
    assert run.peak_mb < REFUSAL_PEAK_MB, run.peak_mb
    assert_nothing_left(tmp_path / "out")


def test_netcdf_bomb_is_refused_by_the_training_and_evaluation_readers(tmp_path):
    bomb = write_bomb(tmp_path / "bomb.nc")
    with pytest.raises(ThinSegError, match=f"S_PP': the image declares {BOMB_SIDE} x {BOMB_SIDE} px"):
        open_section(bomb)  # train / evaluate / compare open their sections this way
    with pytest.raises(ThinSegError, match="S_labels': the image declares"):
        read_labelmap(bomb, "S_labels")
    with pytest.raises(ThinSegError, match="S_XP': the image declares"):
        open_netcdf_image(bomb, "S_XP", crop_padding=True)  # before the padding scan reads anything


# ---------------------------------------------------------------------------------------------
# spacings


@pytest.mark.parametrize(
    ("mm_per_pixel", "named"),
    [
        (1.0, "at 1 mm/px"),  # in the sane range, but 758x the model's resolution per axis
        (1e6, "1000000.0 mm/px"),  # would hang building the tile list
        (1e-9, "1e-09 mm/px"),  # would segment one pixel and report "Calcite 100%"
    ],
)
def test_netcdf_spacing_far_from_any_thin_section_is_refused(tmp_path, model, mm_per_pixel, named):
    src = write_section(tmp_path / "in" / "odd.nc", mm_per_pixel)
    run = segment(src, tmp_path / "out", model)
    assert_refused(run, mentions=["odd.nc", named, "most likely wrong"])
    assert run.peak_mb < REFUSAL_PEAK_MB, run.peak_mb
    assert_nothing_left(tmp_path / "out")


def test_netcdf_index_coordinates_without_transform_are_refused_as_1_mm_per_pixel(tmp_path, model):
    src = edit_grid(write_section(tmp_path / "in" / "index.nc"), index_coordinates)
    run = segment(src, tmp_path / "out", model)
    assert_refused(run, mentions=["index.nc", "at 1 mm/px", f"beyond the limit of {MAX_RESAMPLING_FACTOR:g}"])
    assert run.peak_mb < REFUSAL_PEAK_MB, run.peak_mb
    assert_nothing_left(tmp_path / "out")


def test_netcdf_nan_coordinates_are_refused_in_one_line(tmp_path, model):
    def nan_x(ds, name):
        without_transform(ds, name)
        coord = ds.variables[f"x_{name}"]
        values = coord[:]
        values[7] = np.nan
        coord[:] = values

    src = edit_grid(write_section(tmp_path / "in" / "nan.nc"), nan_x)
    run = segment(src, tmp_path / "out", model)
    assert_refused(run, mentions=["nan.nc", "S_PP", "x coordinates are not finite"])
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize(
    ("mm_per_pixel", "named"),
    [
        ("1e-9", ["--mm-per-pixel", "1e-09 mm/px", "outside the sane range"]),
        ("0.5", ["F_PP.png", "at 0.5 mm/px", "most likely wrong"]),  # in range, but 379x the model's per axis
    ],
)
def test_image_input_with_a_wrong_mm_per_pixel_is_refused(tmp_path, model, mm_per_pixel, named):
    pp, xp = section_images(H, W)
    src = write_image(tmp_path / "in" / "F_PP.png", pp)
    write_image(tmp_path / "in" / "F_XP.png", xp)
    run = segment(src, tmp_path / "out", model, "--mm-per-pixel", mm_per_pixel)
    assert_refused(run, mentions=named)
    assert run.peak_mb < REFUSAL_PEAK_MB, run.peak_mb
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize("mm_per_pixel", [1e-9, 1e6, float("nan")])
def test_segment_pipeline_refuses_an_insane_image_pixel_size_before_any_work(tmp_path, model, mm_per_pixel):
    """The library call (the Slicer logic's) checks the range too, not only the option parser."""
    with pytest.raises(ThinSegError, match=f"--mm-per-pixel {mm_per_pixel!r} mm/px is outside the sane range"):
        segment_files([tmp_path / "F_PP.png"], SegmentOptions(mm_per_pixel=mm_per_pixel), tmp_path / "out", model)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# a batch with bad files among good ones


def test_batch_with_bad_netcdf_files_finishes_the_good_ones(tmp_path, model):
    folder = tmp_path / "in"
    write_section(folder / "good_a.nc", seed=1)
    write_section(folder / "good_b.nc", seed=2)
    write_bomb(folder / "bomb_padded.nc", transform=False)  # no transform: the padding scan path

    def nan_transform(ds, name):
        t = np.array(ds.variables[name].getncattr("transform"), dtype=np.float64)
        t[5] = np.inf
        ds.variables[name].setncattr("transform", t)

    def back_and_forth(ds, name):
        without_transform(ds, name)
        coord = ds.variables[f"y_{name}"]
        values = coord[:]
        values[[3, 4]] = values[[4, 3]]
        coord[:] = values

    def zero_step(ds, name):
        without_transform(ds, name)
        coord = ds.variables[f"x_{name}"]
        values = coord[:]
        values[1] = values[0]
        coord[:] = values

    edit_grid(write_section(folder / "inf_transform.nc"), nan_transform)
    edit_grid(write_section(folder / "back_and_forth.nc"), back_and_forth)
    edit_grid(write_section(folder / "zero_step.nc"), zero_step)
    out = tmp_path / "out"
    run = segment(folder, out, model)
    assert_batch_partial(run, ["bomb_padded.nc", "inf_transform.nc", "back_and_forth.nc", "zero_step.nc"])
    named = [Path(line[len("thinseg: error: ") :].split(": ", 1)[0]).name for line in run.error_lines()]
    assert sorted(named) == ["back_and_forth.nc", "bomb_padded.nc", "inf_transform.nc", "zero_step.nc"], run.describe()
    by_name = dict(zip(named, run.error_lines()))
    assert f"{BOMB_SIDE} x {BOMB_SIDE} px" in by_name["bomb_padded.nc"]
    assert "transform attribute holds NaN or infinite values: coordinates are not finite" in by_name["inf_transform.nc"]
    assert "y coordinates are not monotonic" in by_name["back_and_forth.nc"]
    assert "x coordinates repeat a value" in by_name["zero_step.nc"]
    assert run.peak_mb < REFUSAL_PEAK_MB, run.peak_mb
    assert sorted(p.name for p in out.iterdir()) == ["good_a.nc", "good_b.nc", "modal_mineralogy.csv"]
    for name in ("good_a", "good_b"):
        with open_nc(out / f"{name}.nc") as ds:
            labels = ds.variables[f"{name}_Segmentation"][:]
            assert labels.shape == (1, H, W) and labels.any()


# ---------------------------------------------------------------------------------------------
# a full disk while writing


def test_full_disk_while_writing_keeps_the_older_result(tmp_path, model):
    src = write_section(tmp_path / "in" / "S.nc")
    out = tmp_path / "out"
    first = segment(src, out / "S.nc", model)
    assert first.returncode == 0, first.describe()
    older = (out / "S.nc").read_bytes()
    before = snapshot(out)
    # RLIMIT_FSIZE: the kernel fails the write with EFBIG, the same path as a full disk's ENOSPC
    run = segment(src, out / "S.nc", model, "--overwrite", max_file_bytes=len(older) // 3)
    assert (out / "S.nc").read_bytes() == older
    assert_nothing_left(out, before)
    # HDF5 1.10 (GeoSlicer 2.8's netCDF4 1.5.4) would retry the failed close at exit, print its
    # error stack and crash: the process ends itself first, so the exit code and the one line hold
    line = assert_refused(run, code=2, mentions=["cannot write the output (disk full or file too large?)"])
    assert line.startswith(f"thinseg: error: {out / 'S.nc'}:"), line


def test_netcdf_writer_turns_a_failed_write_into_one_error_naming_the_output(tmp_path):
    """In-process, with the kernel's file size limit: netCDF4 raises a bare RuntimeError."""
    import resource

    target = tmp_path / "result.nc"
    target.write_bytes(b"older result")
    image = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)  # 120 KB
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        failed = pytest.raises(ThinSegError, match=r"cannot write the output \(disk full or file too large\?\)")
        with failed as raised, NetcdfWriter(tmp_path / ".tmp.nc", shown_as=target) as writer:
            writer.add_rgb_image("S_PP", image, MM_PER_PIXEL)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert raised.value.path == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.nc"]
    assert target.read_bytes() == b"older result"


def test_netcdf_writer_leaves_a_callers_own_error_as_it_is(tmp_path):
    """Only the writer's netCDF calls are reported as a failed write; a bug elsewhere keeps its type."""
    with pytest.raises(RuntimeError, match="not a write"), NetcdfWriter(tmp_path / "out.nc") as writer:
        writer.add_rgb_image("S_PP", np.zeros((8, 8, 3), np.uint8), MM_PER_PIXEL)
        raise RuntimeError("not a write")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# resampling bound


def test_resampling_beyond_the_bound_is_refused_before_allocating():
    model = MM_PER_PIXEL
    ok = model * (MAX_RESAMPLING_FACTOR * 0.99)
    assert resampling_factor(ok, model) == pytest.approx(MAX_RESAMPLING_FACTOR * 0.99)
    assert resampling_factors((ok, model), model) == (1.0, pytest.approx(MAX_RESAMPLING_FACTOR * 0.99))
    with pytest.raises(ThinSegError, match=r"at 1 mm/px \(the model's is 0.00132 mm/px\) would be resampled"):
        resampling_factor(1.0, model, "S.nc")
    with pytest.raises(ThinSegError, match="pixels 1e-05 mm high"):
        resampling_factors((model, 1e-5), model)  # one axis 132x finer: refused for that axis
    with pytest.raises(ThinSegError, match="would be resampled by a factor of 758"):
        ResampledSource(ArraySource(np.zeros((4, 4, 3), np.uint8)), 1.0 / model)
