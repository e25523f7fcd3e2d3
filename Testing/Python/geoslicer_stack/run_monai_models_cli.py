"""Run GeoSlicer's own MonaiModelsCLI (its unmodified file) on a model bundle, outside GeoSlicer.

    python run_monai_models_cli.py --reference ROOT --model MODEL.pth --output OUT --master PP [--extra1 XP]
                                   [--mrml real|stand-in] [--monai-models-lib DIR]

The CLI file is executed as `__main__` with GeoSlicer's own arguments (`--master`, `--extra1`,
`--outputvolume`, `--xargs`, `--inputmodel`), so its argument parsing, `torch.load`, network
construction, state-dict load, transform chain, sliding window and labelmap writing all run as
written. Only what exists inside GeoSlicer alone is provided here:

- `MonaiModelsLib` (GeoSlicer's transforms and networks, shipped beside the CLI): the four names a
  Concatenate/MinMax/Argmax bundle reaches behave as GeoSlicer 2.8.9's do (steps in order; inputs
  joined along an axis, joined keys dropped; `(x - a) / (b - a) * (d - c) + c`; argmax cast to a
  named dtype). Every other imported name fails when used, so a bundle that needs more cannot
  pass unnoticed. `--monai-models-lib DIR` uses a real copy (DIR holds the `MonaiModelsLib` folder).
- GeoSlicer's patched MONAI: its `sliding_window_inference` takes `geoslicer_progress` (progress
  lines on stdout); the stock one is called without it.
- `ltrace.transforms`: the reference's own file.
- `slicer`, `mrml`, `vtk`: with `--mrml real`, slicer-core's (inputs and output are NRRD files,
  read and written by the real vtkMRMLNRRDStorageNode); with `--mrml stand-in` (an interpreter
  without slicer-core), volumes are `.npy` arrays ordered (K, J, I[, C]) as Slicer's are.
"""

from __future__ import annotations

import argparse
import functools
import json
import runpy
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

CLI_FILE = Path("src/modules/Segmenter/MonaiModelsCLI/MonaiModelsCLI.py")
LTRACE_TRANSFORMS_FILE = Path("src/ltrace/ltrace/transforms.py")

#: Every name the CLI imports from MonaiModelsLib.transforms that a Concatenate/MinMax/Argmax bundle never reaches.
UNUSED_TRANSFORMS = (
    "IdentityTransform",
    "ReadNetCDFTransform",
    "ReadFirstNetCDFVariableTransform",
    "ToTensorTransform",
    "QuantileTransform",
    "QuantileDeformationTransform",
    "ApplyPickledTransform",
    "MultiChannelTransform",
    "AddAxisTransform",
    "SwapAxesTransform",
    "PermuteTransform",
    "RenameTransform",
    "AddBinaryBoundaryMaskTransform",
    "BinarizerTransform",
    "AddConstantTransform",
    "TakeChannelsTransform",
)
UNUSED_NETWORKS = ("UNetAct", "UNetActWithBoundarySupervision")

#: The dtype names GeoSlicer's transforms accept.
TORCH_DTYPES = {
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
}

Sample = dict[str, torch.Tensor]


def module(name: str, **attributes: object) -> types.ModuleType:
    """A module object named `name` holding `attributes` (a package when it has children)."""
    made = types.ModuleType(name)
    made.__path__ = []  # lets `import name.child` find children in sys.modules
    for key, value in attributes.items():
        setattr(made, key, value)
    return made


# -- MonaiModelsLib -------------------------------------------------------------------------------


def get_torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


class ComposedTransform:
    def __init__(self, transforms: Iterable[Callable[[Sample], Sample]]) -> None:
        self.steps = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        return functools.reduce(lambda current, step: step(current), self.steps, sample)


class ConcatenateTransform:
    def __init__(self, key_groups: Mapping[str, list[str]], axis: int = 0) -> None:
        self.key_groups = dict(key_groups)
        self.axis = axis

    def __call__(self, sample: Sample) -> Sample:
        for joined, parts in self.key_groups.items():
            tensors = [sample.pop(part) for part in parts]
            sample[joined] = torch.cat(tensors, dim=self.axis)
        return sample


class MinMaxTransform:
    def __init__(
        self, key: str, move_from: tuple[float, float] = (0, 255), move_to: tuple[float, float] = (0.0, 1.0)
    ) -> None:
        self.key = key
        self.source = tuple(move_from)
        self.target = tuple(move_to)

    def __call__(self, sample: Sample) -> Sample:
        low, high = self.source
        new_low, new_high = self.target
        sample[self.key] = (sample[self.key] - low) / (high - low) * (new_high - new_low) + new_low
        return sample


class ArgmaxTransform:
    def __init__(self, key: str, dtype: str = "int8", dim: int = 1, keepdim: bool = True) -> None:
        self.key = key
        self.dtype = get_torch_dtype(dtype)
        self.dim = dim
        self.keepdim = keepdim

    def __call__(self, sample: Sample) -> Sample:
        sample[self.key] = torch.argmax(sample[self.key], dim=self.dim, keepdim=self.keepdim).to(self.dtype)
        return sample


class NotStoodIn:
    """A host name these stand-ins do not provide: constructing it fails loudly, so a path that
    needs it cannot pass unnoticed."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError(f"{type(self).__name__} is not provided by the stand-ins of {Path(__file__).name}")


def not_stood_in(name: str) -> type:
    return type(name, (NotStoodIn,), {})


def load_from_str(text: str) -> object:
    raise NotImplementedError("load_from_str (pickled transforms) is not provided by the MonaiModelsLib stand-in")


def monai_models_lib_stand_in() -> dict[str, types.ModuleType]:
    transforms = module(
        "MonaiModelsLib.transforms",
        ComposedTransform=ComposedTransform,
        ConcatenateTransform=ConcatenateTransform,
        MinMaxTransform=MinMaxTransform,
        ArgmaxTransform=ArgmaxTransform,
        get_torch_dtype=get_torch_dtype,
        load_from_str=load_from_str,
        **{name: not_stood_in(name) for name in UNUSED_TRANSFORMS},
    )
    unet = module("MonaiModelsLib.models.unet", **{name: not_stood_in(name) for name in UNUSED_NETWORKS})
    models = module("MonaiModelsLib.models", unet=unet)
    return {
        "MonaiModelsLib": module("MonaiModelsLib", transforms=transforms, models=models),
        "MonaiModelsLib.transforms": transforms,
        "MonaiModelsLib.models": models,
        "MonaiModelsLib.models.unet": unet,
    }


def sklearn_stand_in() -> dict[str, types.ModuleType]:
    """GeoSlicer's MonaiModelsLib imports scikit-learn for one transform that these bundles never
    name; where it is not installed, that name fails when used."""
    import importlib.util  # deferred: only needed with a real MonaiModelsLib

    if importlib.util.find_spec("sklearn") is not None:
        return {}
    preprocessing = module("sklearn.preprocessing", QuantileTransformer=not_stood_in("QuantileTransformer"))
    return {"sklearn": module("sklearn", preprocessing=preprocessing), "sklearn.preprocessing": preprocessing}


# -- slicer, mrml, vtk without Slicer -------------------------------------------------------------


class StringArray:
    def __init__(self) -> None:
        self.values: list[str] = []

    def InsertNextValue(self, value: str) -> int:
        self.values.append(value)
        return len(self.values) - 1

    def GetNumberOfValues(self) -> int:
        return len(self.values)

    def GetValue(self, index: int) -> str:
        return self.values[index]


class ImageData:
    """vtkImageData over a (K, J, I[, C]) array: dimensions (I, J, K), point scalars (N[, C])."""

    def __init__(self, voxels: np.ndarray) -> None:
        self.voxels = voxels

    def GetDimensions(self) -> tuple[int, int, int]:
        k, j, i = self.voxels.shape[:3]
        return i, j, k

    def GetPointData(self) -> ImageData:
        return self

    def GetScalars(self) -> np.ndarray:
        k, j, i = self.voxels.shape[:3]
        return self.voxels.reshape((k * j * i, *self.voxels.shape[3:]))


class VolumeNode:
    def __init__(self) -> None:
        self.voxels: np.ndarray | None = None
        self.attributes: dict[str, str] = {}

    def GetImageData(self) -> ImageData | None:
        return None if self.voxels is None else ImageData(self.voxels)

    def SetAndObserveImageData(self, image: None) -> None:
        assert image is None, "the stand-in volume only holds arrays set by updateVolumeFromArray"
        self.voxels = None

    def Copy(self, other: VolumeNode) -> None:
        self.voxels = None if other.voxels is None else other.voxels.copy()
        self.attributes = dict(other.attributes)

    def GetAttributeNames(self, names: StringArray) -> None:
        for name in self.attributes:
            names.InsertNextValue(name)

    def SetAttribute(self, name: str, value: str | None) -> None:
        if value is None:
            self.attributes.pop(name, None)
        else:
            self.attributes[name] = value

    def Modified(self) -> None:
        pass


class ScalarVolumeNode(VolumeNode):
    pass


class LabelMapVolumeNode(ScalarVolumeNode):
    pass


class NRRDStorageNode:
    """Reads and writes the stand-in volumes as `.npy` files (K, J, I[, C])."""

    def __init__(self) -> None:
        self.path = ""

    def SetFileName(self, path: str) -> None:
        self.path = path

    def ReadData(self, node: VolumeNode) -> int:
        node.voxels = np.load(self.path)
        return 1

    def WriteData(self, node: VolumeNode) -> int:
        assert node.voxels is not None, f"nothing to write to {self.path}"
        np.save(self.path, node.voxels)
        return 1


def update_volume_from_array(node: VolumeNode, voxels: np.ndarray) -> None:
    node.voxels = np.array(voxels)


def vtk_to_numpy(scalars: np.ndarray) -> np.ndarray:
    return scalars


def host_stand_ins() -> dict[str, types.ModuleType]:
    numpy_support = module("vtk.util.numpy_support", vtk_to_numpy=vtk_to_numpy)
    util = module("vtk.util", numpy_support=numpy_support)
    slicer_util = module("slicer.util", updateVolumeFromArray=update_volume_from_array)
    return {
        # vtkMatrix4x4 only annotates ltrace.transforms and serves cropping, which the CLI never reaches here
        "vtk": module("vtk", util=util, vtkStringArray=StringArray, vtkMatrix4x4=not_stood_in("vtkMatrix4x4")),
        "vtk.util": util,
        "vtk.util.numpy_support": numpy_support,
        "slicer": module("slicer", util=slicer_util, vtkMRMLNRRDStorageNode=NRRDStorageNode),
        "slicer.util": slicer_util,
        "mrml": module("mrml", vtkMRMLScalarVolumeNode=ScalarVolumeNode, vtkMRMLLabelMapVolumeNode=LabelMapVolumeNode),
    }


def real_host() -> dict[str, types.ModuleType]:
    """slicer-core's modules; inside Slicer `mrml` is MRMLCore's Python module."""
    import slicer  # deferred: only the real-MRML mode needs slicer-core
    import slicer.util  # deferred: as above
    import slicer_core.MRMLCore  # deferred: as above

    return {"mrml": slicer_core.MRMLCore, "slicer": slicer}


# -- GeoSlicer's MONAI patch and ltrace ------------------------------------------------------------


def patch_monai_progress() -> None:
    """GeoSlicer ships MONAI patched so that sliding_window_inference takes `geoslicer_progress`."""
    import importlib  # deferred: MONAI is imported only once the host modules are in place

    inferers = importlib.import_module("monai.inferers")
    stock = inferers.sliding_window_inference

    @functools.wraps(stock)
    def sliding_window_inference(*args: Any, geoslicer_progress: bool = False, **kwargs: Any) -> Any:
        return stock(*args, **kwargs)

    inferers.__dict__["sliding_window_inference"] = sliding_window_inference


def load_file(path: Path, name: str) -> types.ModuleType:
    import importlib.util  # deferred: only needed here

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    spec.loader.exec_module(loaded)
    return loaded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="GeoSlicer reference folder (holding src/)")
    parser.add_argument("--model", type=Path, required=True, help="the bundle's model.pth")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--master", type=Path, required=True)
    parser.add_argument("--extra1", type=Path)
    parser.add_argument("--mrml", choices=("real", "stand-in"), default="stand-in")
    parser.add_argument("--monai-models-lib", type=Path, help="folder holding GeoSlicer's own MonaiModelsLib")
    args = parser.parse_args(argv)

    sys.modules.update(real_host() if args.mrml == "real" else host_stand_ins())
    if args.monai_models_lib is not None:
        assert (args.monai_models_lib / "MonaiModelsLib").is_dir(), f"no MonaiModelsLib in {args.monai_models_lib}"
        sys.path.insert(0, str(args.monai_models_lib))
        sys.modules.update(sklearn_stand_in())
    else:
        sys.modules.update(monai_models_lib_stand_in())
    transforms = load_file(args.reference / LTRACE_TRANSFORMS_FILE, "ltrace.transforms")
    sys.modules["ltrace"] = module("ltrace", transforms=transforms)
    patch_monai_progress()

    cli = args.reference / CLI_FILE
    volumes = ["--master", str(args.master)] + (["--extra1", str(args.extra1)] if args.extra1 else [])
    sys.argv = [str(cli), *volumes, "--outputvolume", str(args.output)]
    sys.argv += ["--xargs", json.dumps({"deterministic": False}), "--inputmodel", str(args.model)]
    runpy.run_path(str(cli), run_name="__main__")
    print(f"MonaiModelsLib: {getattr(sys.modules['MonaiModelsLib'], '__file__', None) or 'stand-in'}")


if __name__ == "__main__":
    main()
