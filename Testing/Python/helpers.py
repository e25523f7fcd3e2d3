"""Shared test fixtures: tiny GeoSlicer model bundles, PP/XP files on disk, netCDF inputs, CLI runs.

Everything here writes REAL files (Pillow/tifffile images, netCDF4 files, model folders written by
`save_bundle`), so tests exercise the same readers and writers as users do.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "ThinSectionSegmentation"

#: The usual thin-section scan's pixel size (mm); the tiny models are trained (well, initialised) at this resolution.
MM_PER_PIXEL = 0.00132

#: A MONAI UNet small enough to run a few hundred pixels in a fraction of a second on one core.
TINY_UNET = dict(
    spatial_dims=2, in_channels=6, out_channels=7, channels=[4, 8], strides=[2], num_res_units=1, norm="batch"
)
TINY_ROI = 64


def tiny_network(in_channels: int = 6, out_channels: int = 7, seed: int = 0):
    """A randomly initialised tiny UNet with non-trivial BatchNorm statistics (so folding matters)."""
    import torch

    from thinseg.model.networks import build_network

    params = dict(TINY_UNET, in_channels=in_channels, out_channels=out_channels)
    torch.manual_seed(seed)
    net = build_network("UNet", params)
    with torch.no_grad():
        for name, buffer in net.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return net.eval(), params


def make_bundle(
    folder: Path,
    *,
    inputs: Sequence[str] = ("PP", "PX"),
    seed: int = 0,
    pixels_per_mm: float = 1 / MM_PER_PIXEL,
    roi: int = TINY_ROI,
    title: str | None = None,
) -> Path:
    """Save a tiny GeoSlicer model folder (meta.json + model.pth): 3 channels per RGB input,
    N+1 outputs (output 0 = not classified) for the six default classes."""
    from thinseg.classes.files import default_class_table
    from thinseg.model.bundle import save_bundle

    table = default_class_table()
    net, params = tiny_network(3 * len(inputs), len(table) + 1, seed)
    return save_bundle(
        folder,
        net,
        network_name="UNet",
        network_params=params,
        class_table=table,
        input_names=tuple(inputs),
        pixels_per_mm=pixels_per_mm,
        roi_shape=(roi, roi),
        title=title or f"tiny-{len(inputs) * 3}ch",
        description="test model",
    )


#: Stride 1 and 1x1 kernels make the UNet pointwise: each pixel's answer depends on that pixel
#: alone, so any tiling reproduces the whole-image forward exactly and the network commutes with
#: every flip and rotation of the grid.
POINTWISE_UNET = dict(
    spatial_dims=2,
    in_channels=6,
    out_channels=7,
    channels=[8, 8],
    strides=[1],
    kernel_size=1,
    up_kernel_size=1,
    num_res_units=0,
    norm="batch",
)


def make_pointwise_bundle(folder: Path):
    """Save and load a pointwise UNet bundle (random non-trivial weights, seed 1)."""
    import torch

    from thinseg.classes.files import default_class_table
    from thinseg.model.bundle import load_bundle, save_bundle
    from thinseg.model.networks import build_network

    torch.manual_seed(1)
    net = build_network("UNet", POINTWISE_UNET)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 1)
    save_bundle(
        folder,
        net,
        network_name="UNet",
        network_params=POINTWISE_UNET,
        class_table=default_class_table(),
        pixels_per_mm=757.6,
        roi_shape=(64, 64),
        title="pointwise",
        description="test",
    )
    return load_bundle(folder)


def rewrite_bundle(folder: Path, edit_meta=None, edit_saved=None) -> None:
    """Edit a saved bundle in place: `edit_meta(meta_dict)` for meta.json, `edit_saved(saved)`
    for the dict in model.pth (both edit in place), to build bundles save_bundle would refuse."""
    import torch

    if edit_meta is not None:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        edit_meta(meta)
        (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    if edit_saved is not None:
        from thinseg.model.safe_load import load_torch_file  # deferred: torch, only for the tests that edit bundles

        saved = load_torch_file(folder / "model.pth")
        edit_saved(saved)
        torch.save(saved, folder / "model.pth")


@cache
def _section(height: int, width: int, seed: int):
    from thinseg.synth import generate_section

    s = generate_section(height, width, seed=seed)
    return s.pp, s.xp


def section_images(height: int = 100, width: int = 140, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A realistic synthetic (PP, XP) pair, uint8 (H, W, 3); cached, returned as fresh copies."""
    pp, xp = _section(height, width, seed)
    return pp.copy(), xp.copy()


def write_image(path: Path, array: np.ndarray, **tiff_options) -> Path:
    """Write `array` as PNG/JPEG (Pillow) or TIFF (tifffile; pass bigtiff=True, tile=(64, 64),
    compression=... for the variants) according to the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        photometric = "rgb" if array.ndim == 3 and array.shape[-1] in (3, 4) else "minisblack"
        extra = {"extrasamples": ["unassalpha"]} if array.ndim == 3 and array.shape[-1] == 4 else {}
        tifffile.imwrite(path, array, photometric=photometric, **extra, **tiff_options)
    else:
        from PIL import Image

        kwargs = {"quality": 95} if suffix in (".jpg", ".jpeg") else {}
        Image.fromarray(array).save(path, **kwargs)
    return path


def decoded(path: Path) -> np.ndarray:
    """What a reader gets from an image file (JPEG is lossy: compare against the decoded pixels)."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def write_pair(
    folder: Path,
    stem_pp: str,
    stem_xp: str,
    suffix: str = ".png",
    *,
    height: int = 100,
    width: int = 140,
    seed: int = 0,
    **tiff_options,
) -> tuple[Path, Path]:
    pp, xp = section_images(height, width, seed)
    return (
        write_image(Path(folder) / f"{stem_pp}{suffix}", pp, **tiff_options),
        write_image(Path(folder) / f"{stem_xp}{suffix}", xp, **tiff_options),
    )


def write_geoslicer_netcdf(
    path: Path,
    images: Mapping[str, np.ndarray],
    *,
    mm_per_pixel: float = MM_PER_PIXEL,
    origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
    labelmaps: Mapping[str, np.ndarray] | None = None,
    scalars: Mapping[str, np.ndarray] | None = None,
    attrs: Mapping | None = None,
) -> Path:
    """A GeoSlicer-layout netCDF with RGB images (in the given order), labelmaps and scalar
    images, written by the project's NetcdfWriter."""
    from thinseg.classes.files import default_class_table
    from thinseg.io.netcdf import NetcdfWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with NetcdfWriter(path, attrs=dict(attrs or {"geoslicer_version": "2.5.0"})) as writer:
        for name, array in images.items():
            writer.add_rgb_image(name, array, mm_per_pixel, origin_mm)
        for name, array in (labelmaps or {}).items():
            writer.add_labelmap(
                name, array, default_class_table(), mm_per_pixel, origin_mm, reference=next(iter(images), None)
            )
        for name, array in (scalars or {}).items():
            writer.add_scalar_image(name, array, mm_per_pixel, origin_mm)
    return path


def open_nc(path: Path):
    """The netCDF4 Dataset with masking/scaling off: raw stored values, attributes as written."""
    import netCDF4

    ds = netCDF4.Dataset(path, "r")
    ds.set_auto_maskandscale(False)
    return ds


def data_variables(ds) -> list[str]:
    return [n for n in ds.variables if not (n in ds.dimensions and ds.variables[n].dimensions == (n,))]


def expected_transform(mm_per_pixel: float, origin_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> list[float]:
    s = mm_per_pixel
    ox, oy, oz = origin_mm
    return [-s, 0, 0, ox, 0, -s, 0, oy, 0, 0, s, oz, 0, 0, 0, 1]


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8"))))


def leftovers(folder: Path) -> list[str]:
    """Files in `folder` (recursively) that a failed/interrupted run must not leave: netCDF
    files, *.partial temporaries and hidden files."""
    folder = Path(folder)
    if not folder.exists():
        return []
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.suffix in (".nc", ".partial") or p.name.startswith(".")
    )


def run_main(capsys, *args) -> tuple[int, str, str]:
    """`thinseg.cli.main.main(args)` in-process: (exit code, stdout, stderr)."""
    from thinseg.cli.main import main

    capsys.readouterr()  # drop anything printed before
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*args, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m thinseg ARGS` in a fresh interpreter (the real console entry point)."""
    import os

    env = dict(os.environ, PYTHONPATH=str(MODULE_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "thinseg", *[str(a) for a in args]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("thinseg: error:")]


#: Set this to the folder of the ten real sandstone fields (ppl/, xpl/, masks/) when the shared
#: data is not beside the checkout.
REAL_DATA_VARIABLE = "THINSEG_REAL_DATA"
#: Where the real sandstone fields are looked for: the variable above when it is set (and then
#: only there), else the shared data folder beside the checkout, or one inside it (GPL-3.0:
#: read there, never copied here).
REAL_DATA_CANDIDATES = (
    [Path(os.environ[REAL_DATA_VARIABLE])]
    if os.environ.get(REAL_DATA_VARIABLE)
    else [REPO.parent / "shared" / "data" / "sandstone-ppl-xpl", REPO / "shared" / "data" / "sandstone-ppl-xpl"]
)
REAL_DATA = next((p for p in REAL_DATA_CANDIDATES if (p / "ppl").is_dir()), REAL_DATA_CANDIDATES[0])
REAL_CLASSES = REPO / "Resources" / "ClassTables" / "sandstone_ppl_xpl.csv"


def real_field(field: str) -> dict[str, Path]:
    """Paths of one real field: PPL, XPL and the hand-drawn mask (skips, saying where it looked
    and how to point the tests at the data, when the data is absent)."""
    import pytest

    if not (REAL_DATA / "ppl").is_dir():
        looked = ", ".join(str(p) for p in REAL_DATA_CANDIDATES)
        pytest.skip(f"real sandstone data not found (looked in: {looked}); set {REAL_DATA_VARIABLE}=FOLDER")
    masks = sorted((REAL_DATA / "masks").glob(f"{field}_mascara*.tif*"))
    return {
        "pp": REAL_DATA / "ppl" / f"{field}_paralelos.jpg",
        "xp": REAL_DATA / "xpl" / f"{field}_cruzados.jpg",
        "mask": masks[0],
    }


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def make_refinement_diverge(monkeypatch) -> None:
    """Make the automatic refinement "walk off" by 9 QEMSCAN px after its first level, as a
    diverging optimiser would: registration must refuse the result."""
    import thinseg.registration.refinement as refine_module

    real_climb = refine_module.climb

    def runaway(scene, q0_all, model, theta, levels, **kwargs):
        theta, history = real_climb(scene, q0_all, model, theta, levels[:1], **kwargs)
        theta = theta.copy()
        theta[-2:] += 9.0
        return theta, history

    monkeypatch.setattr(refine_module, "climb", runaway)
