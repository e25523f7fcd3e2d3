"""GeoSlicer's model transforms and model folders, checked against GeoSlicer's own code.

- Every transform name GeoSlicer's model runner (MonaiModelsCLI.py) knows is either accepted
  here or refused with a reason; each accepted one gives GeoSlicer's result, bit for bit, on
  the same arrays (GeoSlicer's MonaiModelsLib/transforms.py and MONAI's MapLabelValued as
  oracles).
- Model folders both ways: GeoSlicer's `assets_utils.get_models_by_tag(["Multiphase"])` lists
  the bundled model and a model trained here, and our model list finds models laid out the way
  GeoSlicer lays them out, leaving out those it cannot run.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import re
import types
from pathlib import Path

import monai.transforms
import pytest
import torch
from geoslicer_reference import load_reference_module, reference_file, reference_root, stand_ins

from thinseg.errors import ThinSegError
from thinseg.model.transforms import REFUSED, TRANSFORMS, parse_transform

CLI_FILE = "src/modules/Segmenter/MonaiModelsCLI/MonaiModelsCLI.py"
#: GeoSlicer's transform classes, shipped beside the runner (not every reference copy carries it).
TRANSFORMS_FILE = "src/modules/Segmenter/MonaiModelsCLI/MonaiModelsLib/transforms.py"
ASSETS_FILE = "src/ltrace/ltrace/assets_utils.py"


def _module(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _geoslicer_transform_names() -> list[str]:
    """The names GeoSlicer's runner resolves transforms by: the arguments of its
    `get_transform = make_get_object_by_name(...)`."""
    tree = ast.parse(reference_file(CLI_FILE).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "get_transform" for t in node.targets):
            assert isinstance(node.value, ast.Call)
            return [arg.id for arg in node.value.args if isinstance(arg, ast.Name)]
    raise AssertionError("get_transform not found in MonaiModelsCLI.py")


@pytest.fixture(scope="module")
def geoslicer_transforms() -> types.ModuleType:
    """GeoSlicer's MonaiModelsLib/transforms.py, with stand-ins for the packages it imports that
    this interpreter lacks (scikit-learn is only used by the quantile-deformation transform)."""
    root = reference_root()
    if root is None or not (root / TRANSFORMS_FILE).is_file():
        pytest.skip(f"{TRANSFORMS_FILE} is not in the GeoSlicer reference folder ({root})")

    def unused(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("stand-in QuantileTransformer was called")

    wanted = {"sklearn": {"__path__": []}, "sklearn.preprocessing": {"QuantileTransformer": unused}}
    missing = {
        name: _module(name, **attrs) for name, attrs in wanted.items() if importlib.util.find_spec("sklearn") is None
    }
    with stand_ins(missing):
        return load_reference_module(TRANSFORMS_FILE, "geoslicer_reference_monai_transforms")


# -- which transforms --------------------------------------------------------------------------


def test_every_transform_geoslicer_can_name_is_accepted_or_refused_with_a_reason():
    names = _geoslicer_transform_names()
    assert "AddConstantTransform" in names and len(names) == len(set(names)) == 21
    assert set(names) == set(TRANSFORMS) | set(REFUSED)
    assert not set(TRANSFORMS) & set(REFUSED)
    for name, reason in REFUSED.items():
        with pytest.raises(ThinSegError, match=re.escape(f"'{name.lower()}' is not supported: it {reason}")):
            parse_transform({"name": name.lower(), "params": {}}, "pre-processing")
    with pytest.raises(ThinSegError, match=r"unsupported post-processing transform 'SharpenTransform' \(supported:"):
        parse_transform({"name": "SharpenTransform", "params": {}}, "post-processing")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "QuantileTransform", "params": {"key": "x"}}, "without quantile_values takes its quantiles"),
        ({"name": "QuantileTransform", "params": {"key": "x", "quantile_values": [5, 5]}}, "empty range"),
        ({"name": "MinMaxTransform", "params": {"key": "x", "move_from": [1, 1]}}, "empty range"),
        ({"name": "ToTensorTransform", "params": {"keys": {"x": "int64"}}}, "dtype 'int64' is not one of"),
        ({"name": "AddConstantTransform", "params": {"keys": ["y"], "constant": "1"}}, "constant must be a number"),
        ({"name": "ArgmaxTransform", "params": {"key": "y", "dim": 2}}, "is not the class axis"),
        ({"name": "MapLabelValued", "params": {"keys": "y", "orig_labels": [1], "target_labels": [1, 2]}}, "same len"),
        ({"name": "MapLabelValued", "params": {"keys": "y", "orig_labels": [1], "target_labels": [1]}}, "to itself"),
        (
            {
                "name": "MapLabelValued",
                "params": {"keys": "y", "orig_labels": [0], "target_labels": [1], "dtype": "U3"},
            },
            "not a numeric",
        ),
        ({"name": "PermuteTransform", "params": {"keys": ["x"], "axes": "021"}}, "axes must be a list"),
        ({"name": "TakeChannelsTransform", "params": {"key": "y", "channels": ["a"]}}, "channel indices"),
        ({"name": "AddAxisTransform", "params": {"keys": ["x"], "axis": 0, "extra": 1}}, "invalid parameters for"),
    ],
)
def test_bad_parameters_are_one_line_refusals(spec, message):
    with pytest.raises(ThinSegError, match=message) as info:
        parse_transform(spec, "pre-processing")
    assert "\n" not in str(info.value)


# -- each transform against GeoSlicer's ----------------------------------------------------------

#: (name, params) on one unbatched (C, H, W) float32 sample {PP, PX}, as GeoSlicer's pre-processing runs.
PRE_CASES = [
    ("IdentityTransform", {}),
    ("ToTensorTransform", {"keys": ["PP"]}),
    ("ToTensorTransform", {"keys": {"PP": "uint8", "PX": None, "absent": "float16"}}),
    ("QuantileTransform", {"key": "PP", "quantile_values": [20.0, 200.0], "move_to": [0.0, 1.0]}),
    ("AddAxisTransform", {"keys": ["PP", "absent"], "axis": 0}),
    ("SwapAxesTransform", {"keys": ["PP"], "axis_0": -1, "axis_1": 0}),
    ("PermuteTransform", {"keys": ["PP", "absent"], "axes": [0, 2, 1]}),
    ("ConcatenateTransform", {"key_groups": {"x": ["PX", "PP"]}, "axis": 0}),
    ("RenameTransform", {"renames": {"PP": "pp", "absent": "z"}}),
    ("RenameTransform", {"renames": {"PX": "PX"}}),
    ("BinarizerTransform", {"key": "PP", "threshold": 100, "dtype": "uint8"}),
    ("MinMaxTransform", {"key": "PP", "move_from": [10, 250], "move_to": [-1.0, 1.0]}),
    ("MinMaxTransform", {"key": "PP"}),
    ("AddConstantTransform", {"keys": ["PP", "PX"], "constant": 3.5}),
    ("TakeChannelsTransform", {"key": "PP", "channels": [0, 2]}),
]
#: (name, params) on a batched network output {y: (B, K, H, W)}, as GeoSlicer's post-processing runs.
POST_CASES = [
    ("ArgmaxTransform", {"key": "y"}),
    ("ArgmaxTransform", {"key": "y", "dtype": "uint8", "dim": 1, "keepdim": True}),
    ("ArgmaxTransform", {"key": "y", "dtype": "float32", "dim": -3, "keepdim": False}),
    ("AddConstantTransform", {"keys": ["y"], "constant": 1}),
    ("AddConstantTransform", {"keys": "y", "constant": -0.25}),
    ("TakeChannelsTransform", {"key": "y", "channels": [3, 1, 2]}),
    ("BinarizerTransform", {"key": "y", "threshold": 0.0}),
    ("MinMaxTransform", {"key": "y", "move_from": [-3, 3], "move_to": [0, 1]}),
    ("QuantileTransform", {"key": "y", "quantile_values": [-2, 2]}),
    ("SwapAxesTransform", {"keys": ["y"]}),
]


def _pre_sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "PP": (torch.rand(3, 5, 7, generator=g) * 255).round(),
        "PX": (torch.rand(3, 5, 7, generator=g) * 255).round(),
    }


def _post_sample() -> dict[str, torch.Tensor]:
    return {"y": torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(8))}


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        value = torch.as_tensor(value)
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize(
    ("name", "params", "stage"), [(*c, "pre") for c in PRE_CASES] + [(*c, "post") for c in POST_CASES]
)
def test_each_transform_gives_geoslicers_result(geoslicer_transforms, name, params, stage):
    sample = _pre_sample() if stage == "pre" else _post_sample()
    theirs = getattr(geoslicer_transforms, name)(**copy.deepcopy(params))(copy.deepcopy(sample))
    ours = parse_transform({"name": name, "params": copy.deepcopy(params)}, f"{stage}-processing")(
        copy.deepcopy(sample)
    )
    _assert_same(ours, theirs)


def test_a_whole_geoslicer_chain_gives_geoslicers_network_input_and_labels(geoslicer_transforms):
    pre = [
        {"name": "ToTensorTransform", "params": {"keys": {"PP": "float32"}}},
        {"name": "QuantileTransform", "params": {"key": "PX", "quantile_values": [5, 250], "move_to": [0, 255]}},
        {"name": "ConcatenateTransform", "params": {"key_groups": {"image": ["PP", "PX"]}, "axis": 0}},
        {"name": "RenameTransform", "params": {"renames": {"image": "x"}}},
        {"name": "MinMaxTransform", "params": {"key": "x", "move_from": [0, 255], "move_to": [-1, 1]}},
        {"name": "AddConstantTransform", "params": {"keys": ["x"], "constant": 0.5}},
    ]
    post = [
        {"name": "ArgmaxTransform", "params": {"key": "y", "dtype": "uint8", "dim": 1, "keepdim": True}},
        {"name": "AddConstantTransform", "params": {"keys": ["y"], "constant": 1}},
    ]

    def run(make, chain, sample):
        for step in chain:
            sample = make(step)(sample)
        return sample

    def theirs(step):
        return getattr(geoslicer_transforms, step["name"])(**copy.deepcopy(step["params"]))

    def ours(step):
        return parse_transform(copy.deepcopy(step), "processing")

    _assert_same(run(ours, pre, _pre_sample()), run(theirs, pre, _pre_sample()))
    _assert_same(run(ours, post, _post_sample()), run(theirs, post, _post_sample()))


@pytest.mark.parametrize(
    "params",
    [
        {"keys": ["y"], "orig_labels": [0, 1, 2, 3], "target_labels": [1, 2, 3, 4], "dtype": "uint8"},
        {"keys": "y", "orig_labels": [3, 1], "target_labels": [1, 3]},
        {
            "keys": ["y", "absent"],
            "orig_labels": [2],
            "target_labels": [7.5],
            "dtype": "float64",
            "allow_missing_keys": True,
        },
    ],
)
def test_map_label_valued_gives_monais_result(params):
    labels = torch.argmax(_post_sample()["y"], dim=1, keepdim=True)
    theirs = monai.transforms.MapLabelValued(**copy.deepcopy(params))({"y": labels.clone()})
    ours = parse_transform({"name": "MapLabelValued", "params": copy.deepcopy(params)}, "post-processing")
    _assert_same(ours({"y": labels.clone()}), {k: torch.as_tensor(v) for k, v in theirs.items()})
    with pytest.raises(ThinSegError, match="MapLabelValued needs 'y'"):
        parse_transform({"name": "MapLabelValued", "params": {**params, "allow_missing_keys": False}}, "post")({})


def test_transforms_without_geoslicers_file_still_do_the_arithmetic():
    """The same results written out, for reference copies without MonaiModelsLib."""
    sample = _pre_sample()
    pp = sample["PP"].clone()
    minmax = parse_transform({"name": "minmaxtransform", "params": {"key": "PP", "move_from": [10, 250]}}, "pre")
    assert torch.equal(minmax(dict(sample))["PP"], (pp - 10) / 240)
    quantile = parse_transform(
        {"name": "QuantileTransform", "params": {"key": "PP", "quantile_values": [20, 200], "move_to": [0, 2]}}, "pre"
    )
    out = quantile({"PP": pp.clone()})["PP"]
    assert torch.equal(out, (pp - 20) / 180 * 2 + 0)
    take = parse_transform({"name": "TakeChannelsTransform", "params": {"key": "PP", "channels": [0, 2]}}, "pre")
    assert take({"PP": pp})["PP"].shape == (3, 2, 7)  # on an unbatched sample, rows (as in GeoSlicer)
    post = _post_sample()["y"]
    argmax = parse_transform({"name": "ArgmaxTransform", "params": {"key": "y", "first_label": 1}}, "post")
    assert torch.equal(argmax({"y": post})["y"], (torch.argmax(post, 1, keepdim=True) + 1).to(torch.int8))
    rename = parse_transform({"name": "RenameTransform", "params": {"renames": {"PX": "PX"}}}, "pre")
    assert list(rename(_pre_sample())) == ["PP"]  # renamed onto itself: gone, as in GeoSlicer


# -- model folders both ways --------------------------------------------------------------------


class _Settings:
    def __init__(self, roots: list[str]) -> None:
        self.roots = roots

    def value(self, key: str, default: object = None) -> object:
        return self.roots if key == "AIModelsPaths" else default


def _get_models_by_tag(roots: list[Path], tags: list[str]) -> list[Path]:
    """GeoSlicer's own listing, with `slicer.app.settings()` holding `roots` as AIModelsPaths."""
    slicer = _module("slicer", app=types.SimpleNamespace(settings=lambda: _Settings([str(r) for r in roots])))
    with stand_ins({"slicer": slicer}):
        assets = load_reference_module(ASSETS_FILE, "geoslicer_reference_assets_utils")
    return sorted(Path(p) for p in assets.get_models_by_tag(tags))


def _geoslicer_bundle(folder: Path, *, spatial_dims: int = 2, channels: int = 3, title: str = "GeoSlicer multiphase"):
    """A model folder as GeoSlicer's trainer writes one: UNetAct, N outputs, Argmax then +1."""
    from thinseg.classes.files import default_class_table
    from thinseg.model.networks import build_network

    classes = default_class_table()
    params = {
        "spatial_dims": 2,
        "in_channels": 2 * channels,
        "out_channels": len(classes),
        "base_channels": 4,
        "scales": 2,
    }
    net = build_network("UNetAct", params)
    meta = {
        "kind": "torch",
        "is_segmentation_model": True,
        "spatial_dims": spatial_dims,
        "input_roi_shape": [16, 16],
        "pixels_per_mm": 500.0,
        "inputs": {
            "PP": {"spatial_dims": 2, "n_channels": channels},
            "PX": {"spatial_dims": 2, "n_channels": channels},
        },
        "pre_processed_inputs": {"image": {"spatial_dims": 2, "n_channels": 2 * channels}},
        "outputs": {
            "labels": {
                "spatial_dims": 2,
                "n_channels": 1,
                "class_indices": list(range(1, len(classes) + 1)),
                "class_names": list(classes.names),
                "class_colors": [c.upper() for c in classes.colors],
            }
        },
    }
    saved = {
        "title": title,
        "model_state_dict": net.state_dict(),
        "config": {
            "meta": meta,
            "model": {"name": "UNetAct", "params": params},
            "transforms": {
                "pre_processing_transforms": [
                    {"name": "ConcatenateTransform", "params": {"key_groups": {"image": ["PP", "PX"]}, "axis": 0}},
                    {"name": "MinMaxTransform", "params": {"key": "image", "move_from": [0, 255], "move_to": [0, 1]}},
                ],
                "post_processing_transforms": [
                    {
                        "name": "ArgmaxTransform",
                        "params": {"key": "labels", "dtype": "uint8", "dim": 1, "keepdim": True},
                    },
                    {"name": "AddConstantTransform", "params": {"keys": ["labels"], "constant": 1}},
                ],
            },
        },
    }
    folder.mkdir(parents=True)
    torch.save(saved, folder / "model.pth")
    (folder / "meta.json").write_text(json.dumps({"title": title, "description": "", **meta}), encoding="utf-8")
    return folder


def test_geoslicer_lists_the_bundled_model_and_a_model_trained_here(tmp_path):
    from thinseg.classes.files import default_class_table
    from thinseg.model.bundle import load_bundle
    from thinseg.model.discovery import multiphase_model_dir
    from thinseg.model.networks import build_network
    from thinseg.resources import default_model_dir, models_root
    from thinseg.training.export import export_bundle

    assert _get_models_by_tag([models_root()], ["Multiphase"]) == [default_model_dir()]
    user_root = tmp_path / "my models"
    target = multiphase_model_dir(user_root, "well A")  # where a trained model goes
    params = {"spatial_dims": 2, "in_channels": 6, "out_channels": 7, "channels": [4, 8], "strides": [2]}
    export_bundle(  # what training writes
        target,
        build_network("UNet", params),
        network_name="UNet",
        network_params=params,
        class_table=default_class_table(),
        roles=("PP", "XP"),
        pixels_per_mm=500.0,
        roi_shape=(64, 64),
        title="well A",
        description="trained here",
        training={"epochs": 0},
        metrics=None,
    )
    listed = _get_models_by_tag([models_root(), user_root], ["Multiphase"])
    assert listed == sorted([default_model_dir(), target])
    assert load_bundle(target).tag == "Multiphase"
    assert _get_models_by_tag([user_root], ["PoreStats"]) == []


def test_the_panel_puts_new_models_where_geoslicer_lists_them(tmp_path):
    from ThinSectionSegmentationLib import models

    target = models.new_model_dir(tmp_path, "well A")
    assert target == tmp_path / "ThinSectionEnv" / "Multiphase" / "well A"
    target.mkdir(parents=True)
    (target / "meta.json").write_text("{}", encoding="utf-8")
    (target / "model.pth").write_bytes(b"")
    assert _get_models_by_tag([tmp_path], ["Multiphase"]) == [target]
    assert models.new_model_dir(tmp_path, "well A").name == "well A_1"


def test_our_list_finds_models_laid_out_the_geoslicer_way(tmp_path):
    from ThinSectionSegmentationLib import models
    from thinseg.model.bundle import load_bundle
    from thinseg.resources import default_model_dir

    root = tmp_path / "GeoSlicer models"
    runnable = _geoslicer_bundle(root / "ThinSectionEnv" / "Multiphase" / "carbonates")
    _geoslicer_bundle(root / "MicroCTEnv" / "Multiphase" / "volume", spatial_dims=3, title="3-D")
    _geoslicer_bundle(root / "ThinSectionEnv" / "Multiphase" / "grey", channels=1, title="grey")
    _geoslicer_bundle(root / "ThinSectionEnv" / "PoreStats" / "pores", title="pores")
    keras = root / "ThinSectionEnv" / "Multiphase" / "keras"
    keras.mkdir(parents=True)
    (keras / "meta.json").write_text(json.dumps({"title": "keras"}), encoding="utf-8")
    (keras / "model.h5").write_bytes(b"")

    geoslicer_lists = _get_models_by_tag([root], ["Multiphase"])
    assert runnable in geoslicer_lists and len(geoslicer_lists) == 4  # carbonates, volume, grey, keras

    found = models.list_models(geoslicer_roots=models.geoslicer_model_roots([str(root)]))
    assert [m.path for m in found] == [default_model_dir(), runnable]
    ours = found[1]
    assert ours.geoslicer and ours.label == "GeoSlicer multiphase (GeoSlicer)" and ours.needs_xp
    assert ours.classes[0] == "Calcite" and ours.pixels_per_mm == 500.0
    assert models.list_models() == found[:1]  # GeoSlicer's folders are searched only when given

    bundle = load_bundle(runnable)  # and it runs: Argmax then +1 is label = channel + 1
    assert bundle.first_label == 1 and bundle.network_input == "image"
    logits = torch.randn(1, 6, 4, 4)
    assert torch.equal(bundle.logits_to_labels(logits), bundle.post_process(logits)[:, 0])


def test_geoslicer_model_roots_setting_values():
    from ThinSectionSegmentationLib import models

    assert models.geoslicer_model_roots(None) == []
    assert models.geoslicer_model_roots("") == []
    assert models.geoslicer_model_roots("/a/b") == [Path("/a/b")]  # Qt gives a one-entry list as a string
    assert models.geoslicer_model_roots(["/a", "/a", "", "/c", 3]) == [Path("/a"), Path("/c")]


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ({"kind": "torch", "spatial_dims": 2, "inputs": {"PP": {"n_channels": 3}, "PX": {"n_channels": 3}}}, None),
        ({"inputs": {"PP": {"n_channels": 3}}}, None),
        ({"inputs": "damaged", "spatial_dims": "2"}, None),  # left to loading, which names the problem
        ({"kind": "keras", "inputs": {"PP": {"n_channels": 3}}}, "a keras model (only torch models run here)"),
        ({"is_segmentation_model": False}, "not a segmentation model"),
        ({"spatial_dims": 3}, "a 3-D model (thin sections are 2-D)"),
        ({"inputs": {"CT": {}}}, "its inputs are not one or two RGB images (CT)"),
        ({"inputs": {"A": {"n_channels": 3}, "B": {"n_channels": 3}, "C": {"n_channels": 3}}}, "its inputs are not"),
    ],
)
def test_which_geoslicer_models_this_package_runs(meta, reason):
    from thinseg.model.meta import cannot_run

    found = cannot_run(meta)
    assert found == reason if reason is None else found is not None and found.startswith(reason)
