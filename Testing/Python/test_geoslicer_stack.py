"""Across the two stacks: this project's Python (.venv) and GeoSlicer 2.8's (Python 3.9, torch 1.12,
MONAI 1.1, numpy 1.23, xarray 2022.12, netCDF4 1.5.4), named by THINSEG_GEOSLICER_PYTHON.

- `thinseg segment` on both stacks labels the bundled sample alike (same files, same model).
- GeoSlicer's own MonaiModelsCLI (its unmodified file, run by geoslicer_stack/run_monai_models_cli.py
  with the smallest stand-ins for what only GeoSlicer has) runs the bundled model and labels like
  `thinseg segment`; under slicer-core its NRRD input/output is real and the labelmap it writes
  has the PP's geometry.
- GeoSlicer's own netCDF importer, on a real MRML scene, reads what `thinseg segment` writes on
  either stack: a labelmap with the classes' names and colours, the PP's geometry and its pixels.

The GeoSlicer stack runs in subprocesses; without THINSEG_GEOSLICER_PYTHON those tests skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from geoslicer_reference import geoslicer_netcdf, reference_file
from helpers import MODULE_DIR, open_nc

from thinseg.classes.table import hex_to_rgb
from thinseg.model.discovery import find_bundles
from thinseg.model.meta import read_meta
from thinseg.resources import default_model_dir, models_root, sample_dir

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).resolve().parent / "geoslicer_stack" / "run_monai_models_cli.py"
MONAI_MODELS_CLI = "src/modules/Segmenter/MonaiModelsCLI/MonaiModelsCLI.py"
#: GeoSlicer 2.8.9's pins that make its stack what it is (src/ltrace/requirements.txt there).
GEOSLICER_PINS = {"torch": "1.12.0", "monai": "1.1.0", "numpy": "1.23.1", "xarray": "2022.12.0", "netCDF4": "1.5.4"}
#: Largest share of pixels whose labels may differ between two runs of the same model on the same section.
MAX_DISAGREEMENT = 0.005
#: thinseg's pixel size for images that carry none (the bundled model's resolution).
MM_PER_PIXEL = 0.00132


# -- what the runs produce -------------------------------------------------------------------------


@dataclass
class Segmented:
    """One section as a `thinseg segment` netCDF file holds it."""

    path: Path
    pp_name: str
    pp: np.ndarray  # (H, W, 3) uint8
    xp: np.ndarray
    labels: np.ndarray  # (H, W) uint8
    label_attrs: dict[str, Any]
    seconds: float


def run(command: Sequence[object], timeout: float = 900) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a command with the checkout's module folder on PYTHONPATH; fail with its output."""
    env = dict(os.environ, PYTHONPATH=str(MODULE_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    done = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done, seconds


def bundled_model() -> Path:
    """The bundled model, found the way GeoSlicer finds models (a folder under its tag folder)."""
    found = [folder for folder in find_bundles(models_root()) if folder.name == default_model_dir().name]
    assert found == [default_model_dir()], f"bundled model not found under {models_root()}: {found}"
    return found[0]


def segment_with(python: Path | str, output: Path, *options: str) -> Segmented:
    """`thinseg segment` on the bundled sample (PP + XP beside it) with `python`."""
    sample = sample_dir() / "sample_PP.jpg"
    command = [python, "-m", "thinseg", "segment", sample, "--model", bundled_model(), "--output", output]
    _, seconds = run([*command, *options, "--quiet"])
    with open_nc(output) as ds:
        (label_name,) = [name for name, var in ds.variables.items() if getattr(var, "type", None) == "labelmap"]
        variable = ds[label_name]
        pp_name = str(variable.reference)
        (xp_name,) = [n for n, v in ds.variables.items() if v.ndim == 4 and n != pp_name]
        return Segmented(
            path=output,
            pp_name=pp_name,
            pp=np.asarray(ds[pp_name][:])[0],
            xp=np.asarray(ds[xp_name][:])[0],
            labels=np.asarray(variable[:])[0],
            label_attrs={key: variable.getncattr(key) for key in variable.ncattrs()},
            seconds=seconds,
        )


def disagreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, f"label maps of different sizes: {a.shape} and {b.shape}"
    return float(np.count_nonzero(a != b) / a.size)


def ijk_to_ras(node: Any) -> np.ndarray:
    """A volume node's IJK-to-RAS matrix (spacing, directions, origin) as a 4 x 4 array."""
    import vtk  # deferred: VTK only where slicer-core is installed

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def model_classes() -> list[tuple[str, str]]:
    """(name, "#rrggbb") per class as the bundle's meta.json gives them (what GeoSlicer lists)."""
    meta = read_meta(bundled_model() / "meta.json")
    (output,) = meta["outputs"].values()
    return list(zip(output["class_names"], output["class_colors"]))


def monai_models_cli_reference() -> Path:
    """The GeoSlicer reference folder holding MonaiModelsCLI.py (the test skips without it)."""
    return reference_file(MONAI_MODELS_CLI).parents[4]


#: Exact fp32 on the CPU, whatever the machine: the same arithmetic on both stacks.
EXACT = ("--precision", "fp32", "--device", "cpu")


@pytest.fixture(scope="module")
def main_run(tmp_path_factory: pytest.TempPathFactory) -> Segmented:
    return segment_with(sys.executable, tmp_path_factory.mktemp("main") / "sample.nc", *EXACT)


@pytest.fixture(scope="module")
def geoslicer_run(geoslicer_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Segmented:
    return segment_with(geoslicer_python, tmp_path_factory.mktemp("geoslicer") / "sample.nc", *EXACT)


@pytest.fixture(scope="module")
def cli_inputs(main_run: Segmented, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The PP and XP of the main run's file as the stand-in volume files: (K, J, I, C) arrays."""
    folder = tmp_path_factory.mktemp("monai_cli")
    for name, image in (("PP", main_run.pp), ("XP", main_run.xp)):
        np.save(folder / f"{name}.npy", image[np.newaxis])
    return folder


def run_geoslicer_cli(python: Path, inputs: Path, output: Path, lib: str, *options: object) -> np.ndarray:
    """GeoSlicer's MonaiModelsCLI on the bundled model in `python`, with stand-in volume files;
    `lib` says which MonaiModelsLib it must have run with ("stand-in" or a folder)."""
    done, seconds = run(
        [python, RUNNER, "--reference", monai_models_cli_reference(), "--model", bundled_model() / "model.pth"]
        + ["--output", output, "--master", inputs / "PP.npy", "--extra1", inputs / "XP.npy", *options]
    )
    assert "Done" in done.stdout and f"MonaiModelsLib: {lib}" in done.stdout, done.stdout
    print(f"GeoSlicer's MonaiModelsCLI (MonaiModelsLib: {lib}) in {python}: {seconds:.1f} s")
    voxels = np.load(output)
    assert voxels.dtype == np.uint8 and voxels.ndim == 3 and voxels.shape[0] == 1
    return np.asarray(voxels[0])


@pytest.fixture(scope="module")
def geoslicer_cli_labels(geoslicer_python: Path, cli_inputs: Path, main_run: Segmented) -> np.ndarray:
    """GeoSlicer's MonaiModelsCLI on GeoSlicer's stack, given the PP and XP of the main run's file."""
    labels = run_geoslicer_cli(geoslicer_python, cli_inputs, cli_inputs / "labels.npy", "stand-in")
    assert labels.shape == main_run.labels.shape
    return labels


# -- the stacks themselves -----------------------------------------------------------------------


def test_geoslicer_python_is_geoslicers_stack(geoslicer_python: Path) -> None:
    """The figures below compare against GeoSlicer's stack only if the interpreter really is it."""
    code = "import json, sys; from importlib.metadata import version as v; "
    code += f"print(json.dumps([sys.version_info[:2], {{n: v(n) for n in {sorted(GEOSLICER_PINS)!r}}}]))"
    done, _ = run([geoslicer_python, "-c", code])
    python, versions = json.loads(done.stdout)
    assert tuple(python) == (3, 9)
    assert {name: version.split("+")[0] for name, version in versions.items()} == GEOSLICER_PINS


# -- thinseg segment on both stacks -------------------------------------------------------------


def test_thinseg_segment_labels_alike_on_both_stacks(main_run: Segmented, geoslicer_run: Segmented) -> None:
    """Exact fp32 on both: the same images, classes and geometry in the files, and the labels."""
    assert np.array_equal(main_run.pp, geoslicer_run.pp) and np.array_equal(main_run.xp, geoslicer_run.xp)
    assert main_run.label_attrs["labels"] == geoslicer_run.label_attrs["labels"]
    assert np.array_equal(main_run.label_attrs["transform"], geoslicer_run.label_attrs["transform"])
    share = disagreement(main_run.labels, geoslicer_run.labels)
    print(f"thinseg segment, main vs GeoSlicer stack: {share:.4%} of pixels differ")
    print(f"times: main {main_run.seconds:.1f} s, GeoSlicer stack {geoslicer_run.seconds:.1f} s")
    assert share < MAX_DISAGREEMENT


def test_thinseg_segment_defaults_label_alike_on_both_stacks(geoslicer_python: Path, tmp_path: Path) -> None:
    """With no options each stack picks its device and precision (bf16 where the CPU has it)."""
    main = segment_with(sys.executable, tmp_path / "main.nc")
    geoslicer = segment_with(geoslicer_python, tmp_path / "geoslicer.nc")
    share = disagreement(main.labels, geoslicer.labels)
    print(f"thinseg segment with its defaults, main vs GeoSlicer stack: {share:.4%} of pixels differ")
    print(f"times: main {main.seconds:.1f} s, GeoSlicer stack {geoslicer.seconds:.1f} s")
    assert share < MAX_DISAGREEMENT


# -- GeoSlicer's MonaiModelsCLI on the bundled model ---------------------------------------------


def whole_section_labels(pp: np.ndarray, xp: np.ndarray) -> np.ndarray:
    """The bundle's network over the whole section in one pass (no windows, so no seams), built
    by MONAI from the bundle's own config: PP then XP, 0-255 -> 0-1, argmax = label."""
    import torch  # deferred: only this test runs a network in the test process
    from monai.networks.nets.unet import UNet  # deferred: as above

    saved = torch.load(bundled_model() / "model.pth", map_location="cpu", weights_only=True)
    assert saved["config"]["model"]["name"] == "UNet"
    network = UNet(**saved["config"]["model"]["params"])
    network.load_state_dict(saved["model_state_dict"])
    image = torch.from_numpy(np.concatenate([pp, xp], axis=2)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        return torch.argmax(network.eval()(image), dim=1)[0].numpy().astype(np.uint8)


def test_geoslicer_monai_models_cli_labels_like_thinseg(main_run: Segmented, geoslicer_cli_labels: np.ndarray) -> None:
    """GeoSlicer's own inference path (torch.load, network by name, strict state dict, the
    bundle's transforms, MONAI's sliding window over 512 px windows) agrees with ours. What
    differs is GeoSlicer's window seams: against the seamless whole-section answer, its labels
    differ more than thinseg's, whose tiles are blended with weights that vanish at their edges."""
    assert set(np.unique(geoslicer_cli_labels)) <= set(range(len(model_classes()) + 1))
    share = disagreement(main_run.labels, geoslicer_cli_labels)
    whole = whole_section_labels(main_run.pp, main_run.xp)
    theirs_off, ours_off = disagreement(geoslicer_cli_labels, whole), disagreement(main_run.labels, whole)
    print(f"GeoSlicer's MonaiModelsCLI vs thinseg segment: {share:.4%} of pixels differ")
    print(f"against one whole-section pass: GeoSlicer's CLI {theirs_off:.4%}, thinseg {ours_off:.4%}")
    assert share < MAX_DISAGREEMENT
    assert ours_off < theirs_off
    for label in range(1, len(model_classes()) + 1):  # every class is found, by both, in like amounts
        ours, theirs = np.count_nonzero(main_run.labels == label), np.count_nonzero(geoslicer_cli_labels == label)
        assert ours > 0 and abs(ours - theirs) < MAX_DISAGREEMENT * main_run.labels.size


#: A section placed away from the origin, so that a CLI dropping the geometry cannot pass.
PLACED_ORIGIN = (1.25, -0.75, 0.5)


@dataclass
class RealMrmlRun:
    """What GeoSlicer's CLI wrote through slicer-core's storage nodes, and the PP it was given."""

    labels: np.ndarray  # (H, W) uint8
    labelmap_ijk_to_ras: np.ndarray
    pp_ijk_to_ras: np.ndarray


@pytest.fixture(scope="module")
def real_mrml_cli(main_run: Segmented, tmp_path_factory: pytest.TempPathFactory) -> RealMrmlRun:
    """GeoSlicer's MonaiModelsCLI on this stack with slicer-core, as GeoSlicer runs it on our
    file: the netCDF opened by GeoSlicer's importer, PP and XP written to NRRD by Slicer's storage
    node (how Slicer hands volumes to a CLI), the labelmap NRRD read back by it."""
    import slicer  # deferred: slicer-core loads VTK and MRML
    import slicer.util  # deferred: as above

    folder = tmp_path_factory.mktemp("monai_cli_real_mrml")
    scene = slicer.vtkMRMLScene()
    with geoslicer_netcdf(scene) as netcdf:
        nodes = {node.GetName(): node for node in netcdf.import_file(main_run.path)}
    pp = nodes[main_run.pp_name]
    (xp,) = [node for node in nodes.values() if node.IsA("vtkMRMLVectorVolumeNode") and node is not pp]
    for node, name in ((pp, "PP"), (xp, "XP")):
        node.SetOrigin(*PLACED_ORIGIN)
        storage = slicer.vtkMRMLNRRDStorageNode()
        storage.SetFileName(str(folder / f"{name}.nrrd"))
        assert storage.WriteData(node) == 1
    done, seconds = run(
        [sys.executable, RUNNER, "--mrml", "real", "--reference", monai_models_cli_reference()]
        + ["--model", bundled_model() / "model.pth", "--output", folder / "labels.nrrd"]
        + ["--master", folder / "PP.nrrd", "--extra1", folder / "XP.nrrd"]
    )
    assert "MonaiModelsLib: stand-in" in done.stdout and "Done" in done.stdout, done.stdout
    print(f"GeoSlicer's MonaiModelsCLI on this stack with slicer-core: {seconds:.1f} s")
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    storage = slicer.vtkMRMLNRRDStorageNode()
    storage.SetFileName(str(folder / "labels.nrrd"))
    assert storage.ReadData(labelmap) == 1
    voxels = slicer.util.arrayFromVolume(labelmap)
    assert voxels.dtype == np.uint8 and voxels.shape == (1, *main_run.labels.shape)
    return RealMrmlRun(np.array(voxels[0]), ijk_to_ras(labelmap), ijk_to_ras(pp))


def test_geoslicer_monai_models_cli_with_real_mrml(main_run: Segmented, real_mrml_cli: RealMrmlRun) -> None:
    """The labelmap GeoSlicer's CLI writes lies on the PP's grid and labels like thinseg."""
    assert np.allclose(real_mrml_cli.pp_ijk_to_ras[:3, 3], PLACED_ORIGIN, rtol=0, atol=1e-12)
    assert np.allclose(real_mrml_cli.labelmap_ijk_to_ras, real_mrml_cli.pp_ijk_to_ras, rtol=0, atol=1e-12)
    assert disagreement(real_mrml_cli.labels, main_run.labels) < MAX_DISAGREEMENT


def test_geoslicer_monai_models_cli_alike_on_both_stacks(
    real_mrml_cli: RealMrmlRun, geoslicer_cli_labels: np.ndarray
) -> None:
    """GeoSlicer's CLI on GeoSlicer's stack (volume files stood in) and on this one (real
    slicer-core files, torch 2 and a newer MONAI): the stand-ins change nothing, nor do the stacks."""
    share = disagreement(real_mrml_cli.labels, geoslicer_cli_labels)
    print(f"GeoSlicer's MonaiModelsCLI, this stack + slicer-core vs GeoSlicer stack: {share:.4%} of pixels differ")
    assert share <= 1e-4  # measured: identical


def test_monai_models_lib_stand_ins_act_as_geoslicers(
    geoslicer_python: Path, cli_inputs: Path, geoslicer_cli_labels: np.ndarray
) -> None:
    """Where the reference folder also carries GeoSlicer's MonaiModelsLib (beside the CLI in
    GeoSlicer's source), the CLI run with it labels exactly as with the stand-ins."""
    folder = reference_file(MONAI_MODELS_CLI).parent
    if not (folder / "MonaiModelsLib" / "transforms.py").is_file():
        pytest.skip(f"GeoSlicer's MonaiModelsLib is not in the reference folder ({folder})")
    lib = folder / "MonaiModelsLib"
    output = cli_inputs / "labels_with_geoslicers_lib.npy"
    labels = run_geoslicer_cli(geoslicer_python, cli_inputs, output, str(lib), "--monai-models-lib", folder)
    assert np.array_equal(labels, geoslicer_cli_labels)


# -- GeoSlicer's netCDF importer on thinseg's files ----------------------------------------------


@pytest.mark.parametrize("stack", ["main", "geoslicer"])
def test_geoslicer_imports_thinseg_netcdf(stack: str, request: pytest.FixtureRequest) -> None:
    """What GeoSlicer shows after opening a `thinseg segment` file: a labelmap over the PP with
    the model's class names and colours (entry 0 = background), the PP's pixels and geometry."""
    import slicer  # deferred: slicer-core loads VTK and MRML
    import slicer.util  # deferred: as above

    segmented: Segmented = request.getfixturevalue(f"{stack}_run")
    scene = slicer.vtkMRMLScene()
    with geoslicer_netcdf(scene) as netcdf:
        nodes = netcdf.import_file(segmented.path)
    by_name = {node.GetName(): node for node in nodes}
    (labelmap,) = [node for node in nodes if node.IsA("vtkMRMLLabelMapVolumeNode")]
    pp = by_name[segmented.pp_name]
    assert pp.IsA("vtkMRMLVectorVolumeNode")
    assert np.array_equal(slicer.util.arrayFromVolume(pp)[0], segmented.pp)
    assert np.array_equal(slicer.util.arrayFromVolume(labelmap)[0], segmented.labels)

    expected = np.diag([-MM_PER_PIXEL, -MM_PER_PIXEL, MM_PER_PIXEL, 1.0])  # no origin in a JPEG
    assert np.allclose(ijk_to_ras(pp), expected, rtol=0, atol=1e-12)
    assert np.allclose(ijk_to_ras(labelmap), ijk_to_ras(pp), rtol=0, atol=1e-12)
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert labelmap.GetNodeReferenceID(role) == pp.GetID()

    colors = labelmap.GetDisplayNode().GetColorNode()
    shown = []
    for index in range(colors.GetNumberOfColors()):
        rgba = [0.0] * 4
        colors.GetColor(index, rgba)
        shown.append((colors.GetColorName(index), tuple(round(c * 255) for c in rgba)))
    assert shown == [("Background", (0, 0, 0, 0))] + [(name, (*hex_to_rgb(c), 255)) for name, c in model_classes()]
