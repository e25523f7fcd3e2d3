"""GeoSlicer model bundles: round trips, GeoSlicer-format bundles, safe loading on every torch,
transform chains, and every refusal path.

Networks are tiny (a few hundred weights, 16 px inputs) so the whole file runs in seconds. It
runs on both stacks: torch 2.x (which restricts loading itself) and GeoSlicer's torch 1.12
(whose torch.load has no `weights_only`: the restricted unpickler is all there is).
"""

from __future__ import annotations

import builtins
import json
import os
from collections import OrderedDict
from pathlib import Path

import monai
import numpy as np
import pytest
import torch

from thinseg.classes.files import default_class_table
from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.model import build_network, find_bundles, load_bundle, save_bundle
from thinseg.model.bundle import WEIGHTS_FILE
from thinseg.model.discovery import find_geoslicer_models, find_thin_section_models, multiphase_model_dir
from thinseg.model.safe_load import (
    NUMPY_SCALAR_GLOBALS,
    allowed_globals,
    load_torch_file,
    numpy_globals,
    torch_restricts_loading,
)
from thinseg.training.checkpoint import load_checkpoint, save_checkpoint

torch.manual_seed(0)

# Bundles written here have one output per class plus output 0 = "not classified".
TINY_UNET = {
    "spatial_dims": 2,
    "in_channels": 6,
    "out_channels": 7,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 1,
}
# UNetAct params the way GeoSlicer's trainer writes them (base_channels/scales, not channels).
GEOSLICER_UNETACT = {
    "spatial_dims": 2,
    "in_channels": 6,
    "out_channels": 6,
    "base_channels": 4,
    "scales": 3,
    "act": "prelu",
    "last_act": None,
    "stride": 2,
    "channel_multiplier": 2,
    "num_res_units": 1,
}


def _classes(n: int = 6) -> ClassTable:
    table = default_class_table()
    return ClassTable(table.classes[:n])


def _images(batch: int = 2, size: int = 16, inputs: int = 2) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8) for _ in range(inputs)]


def _save_tiny(tmp_path: Path, name: str = "tiny", **kw) -> tuple[Path, torch.nn.Module]:
    params = kw.pop("network_params", TINY_UNET)
    net = build_network(kw.pop("network_name", "UNet"), params)
    folder = save_bundle(
        multiphase_model_dir(tmp_path, name),
        net,
        network_name=kw.pop("save_name", "UNet"),
        network_params=params,
        class_table=kw.pop("class_table", _classes(params["out_channels"] - 1)),
        pixels_per_mm=kw.pop("pixels_per_mm", 200.0),
        roi_shape=(16, 16),
        title="Tiny test model",
        description="for tests",
        **kw,
    )
    return folder, net


# -- GeoSlicer's own structure, rebuilt independently of thinseg (reference for key names) ----


class _GeoSlicerUNetAct(torch.nn.Module):
    """Mirrors GeoSlicer MonaiModelsLib/models/unet.py UNetAct: `.unet` + lambda last_act."""

    def __init__(
        self,
        spatial_dims,
        in_channels,
        out_channels,
        base_channels,
        scales,
        act,
        last_act,
        stride,
        channel_multiplier,
        num_res_units,
    ):
        super().__init__()
        self.unet = monai.networks.nets.UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=[base_channels * channel_multiplier**i for i in range(scales)],
            strides=[stride for _ in range(scales - 1)],
            num_res_units=num_res_units,
        )
        self.last_act = lambda x: x

    def forward(self, x):
        return self.last_act(self.unet(x))


class _GeoSlicerBoundary(_GeoSlicerUNetAct):
    """Mirrors UNetActWithBoundarySupervision: two ResidualUnit heads + main_model Sequential."""

    def __init__(self, **p):
        super().__init__(**p)
        from monai.networks.blocks.convolutions import ResidualUnit

        def head(out):
            return ResidualUnit(
                spatial_dims=p["spatial_dims"],
                in_channels=p["in_channels"],
                out_channels=out,
                strides=1,
                kernel_size=3,
                subunits=p["num_res_units"],
                act=self.unet.act,
                norm=self.unet.norm,
                dropout=self.unet.dropout,
            )

        self.segmentation_head = head(p["out_channels"])
        self.boundary_head = head(1)
        self.main_model = torch.nn.Sequential(self.unet, self.segmentation_head)

    def forward(self, x):
        return self.segmentation_head(self.unet(x))


def _geoslicer_saved_model(net: torch.nn.Module, name: str, params: dict, inputs=("PP", "PX")) -> tuple[dict, dict]:
    """model.pth dict and meta.json dict as GeoSlicer's trainer and instructions write them."""
    n_in = 3 * len(inputs)
    classes = _classes(params["out_channels"])
    outputs = OrderedDict(
        y={
            "spatial_dims": 2,
            "n_channels": 1,
            "class_indices": list(range(1, len(classes) + 1)),
            "class_names": classes.names,
            "class_colors": [c.upper() for c in classes.colors],
        }
    )
    meta = {
        "kind": "torch",
        "is_segmentation_model": True,
        "spatial_dims": 2,
        "input_roi_shape": (16, 16),
        "pixels_per_mm": 100,
        "inputs": OrderedDict((k, {"spatial_dims": 2, "n_channels": 3}) for k in inputs),
        "pre_processed_inputs": OrderedDict(pre_processed_input_1={"spatial_dims": 2, "n_channels": n_in}),
        "outputs": outputs,
    }
    saved = {
        "title": "GeoSlicer model",
        "model_state_dict": net.state_dict(),
        "config": {
            "meta": meta,
            "model": {"name": name, "params": params},
            "transforms": {
                "pre_processing_transforms": [
                    {
                        "name": "ConcatenateTransform",
                        "params": {"key_groups": {"pre_processed_input_1": list(inputs)}, "axis": 0},
                    },
                    {
                        "name": "MinMaxTransform",
                        "params": {"key": "pre_processed_input_1", "move_from": (0, 255), "move_to": (0, 1)},
                    },
                ],
                "post_processing_transforms": [
                    {
                        "name": "ArgmaxTransform",
                        "params": {
                            "key": "y",
                            "dim": 1,
                            "dtype": "int8",
                            "keepdim": True,
                            "first_label": 1,
                            "batch_dim": True,
                        },
                    },
                ],
            },
        },
    }
    meta_json = {"title": "GeoSlicer model", "description": "made by hand", **json.loads(json.dumps(meta))}
    return saved, meta_json


def _write(folder: Path, saved: dict, meta: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(saved, folder / "model.pth")
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def _geoslicer_inference(net: torch.nn.Module, pp: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """GeoSlicer's MonaiModelsCLI path for one tile: float32 sample, concat, MinMax, argmax."""
    sample = {"PP": pp.to(torch.float32), "PX": px.to(torch.float32)}
    x = torch.concat([sample["PP"], sample["PX"]], dim=0)
    old_min, old_max, new_min, new_max = 0, 255, 0, 1
    x = (x - old_min) / (old_max - old_min) * (new_max - new_min) + new_min
    with torch.no_grad():
        y = net.eval()(x[None])
    return torch.argmax(y, dim=1, keepdim=True).to(torch.int8)[0, 0]


# -- round trip and GeoSlicer compatibility ----------------------------------------------------


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    folder, net = _save_tiny(tmp_path)
    bundle = load_bundle(folder)
    assert bundle.title == "Tiny test model" and bundle.description == "for tests"
    assert bundle.input_names == ["PP", "PX"] and bundle.input_channels == [3, 3] and bundle.in_channels == 6
    assert bundle.class_table == _classes() and bundle.first_label == 0
    assert bundle.pixels_per_mm == 200.0 and bundle.roi_shape == (16, 16)
    assert bundle.input_range == (0.0, 255.0, 0.0, 1.0)
    assert bundle.tag == "Multiphase"
    assert not bundle.network.training
    x = bundle.prepare(_images())
    with torch.no_grad():
        assert torch.equal(bundle.network(x), net.eval()(x))


def test_saved_files_follow_geoslicer_format_and_are_plain(tmp_path):
    folder, _ = _save_tiny(tmp_path, extra_meta={"model_type": "Multiphase"})
    saved = load_torch_file(folder / WEIGHTS_FILE)

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (str, bool, int, float, torch.Tensor))

    assert plain(saved) and set(saved) == {"title", "model_state_dict", "config"}
    cmeta = saved["config"]["meta"]
    assert cmeta["kind"] == "torch" and cmeta["is_segmentation_model"] is True and cmeta["spatial_dims"] == 2
    assert cmeta["input_roi_shape"] == [16, 16] and cmeta["pixels_per_mm"] == 200.0
    assert list(cmeta["inputs"]) == ["PP", "PX"] and cmeta["pre_processed_inputs"] == {
        "x": {"spatial_dims": 2, "n_channels": 6}
    }
    out = cmeta["outputs"]["y"]
    assert out["class_indices"] == [1, 2, 3, 4, 5, 6] and all(
        c.startswith("#") and c == c.upper() for c in out["class_colors"]
    )
    assert saved["config"]["model"] == {"name": "UNet", "params": TINY_UNET}
    pre = saved["config"]["transforms"]["pre_processing_transforms"]
    assert [t["name"] for t in pre] == ["ConcatenateTransform", "MinMaxTransform"]
    assert pre[0]["params"] == {"key_groups": {"x": ["PP", "PX"]}, "axis": 0}
    (post,) = saved["config"]["transforms"]["post_processing_transforms"]
    # no first_label: the stored GeoSlicer source's ArgmaxTransform takes only these four
    assert post["name"] == "ArgmaxTransform" and set(post["params"]) == {"key", "dim", "dtype", "keepdim"}
    assert post["params"]["dim"] == 1
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["title"] == "Tiny test model" and meta["kind"] == "torch" and meta["model_type"] == "Multiphase"
    assert meta["inputs"] == cmeta["inputs"] and meta["outputs"] == cmeta["outputs"]
    assert [p.name for p in folder.parent.iterdir()] == ["tiny"]  # no temporary folders left


@pytest.mark.parametrize(
    "name, reference",
    [
        ("UNetAct", _GeoSlicerUNetAct),
        ("unetact", _GeoSlicerUNetAct),
        ("UNetActWithBoundarySupervision", _GeoSlicerBoundary),
    ],
)
def test_geoslicer_bundle_loads_and_runs_unchanged(tmp_path, name, reference):
    net = reference(**GEOSLICER_UNETACT)
    saved, meta = _geoslicer_saved_model(net, name, GEOSLICER_UNETACT)
    bundle = load_bundle(_write(tmp_path / "ThinSectionEnv" / "gs", saved, meta))
    assert list(bundle.network.state_dict()) == list(net.state_dict())
    pp, px = _images(batch=1, size=16)
    x = bundle.prepare([pp, px])
    expected_x = (torch.concat([pp[0], px[0]]).float() - 0) / 255 * 1 + 0
    assert torch.equal(x[0], expected_x)
    with torch.no_grad():
        labels = bundle.logits_to_labels(bundle.network(x))
    assert torch.equal(labels[0], _geoslicer_inference(net, pp[0], px[0]).to(torch.uint8) + 1)
    assert bundle.pixels_per_mm == 100.0 and bundle.network_input == "pre_processed_input_1"


def test_pp_only_bundle(tmp_path):
    params = {**TINY_UNET, "in_channels": 3}
    folder, net = _save_tiny(tmp_path, "pp", network_params=params, input_names=("PP",))
    bundle = load_bundle(folder)
    assert bundle.input_names == ["PP"] and bundle.input_channels == [3] and bundle.in_channels == 3
    (image,) = _images(inputs=1)
    x = bundle.prepare([image])
    assert x.shape == (2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(bundle.network(x), net.eval()(image.float() / 255))
    with pytest.raises(ThinSegError, match="needs 1 images"):
        bundle.prepare(_images())


def test_prepare_scales_uint8_and_puts_pp_before_px(tmp_path):
    bundle = load_bundle(_save_tiny(tmp_path)[0])
    pp = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    px = torch.zeros((1, 3, 4, 4), dtype=torch.uint8)
    x = bundle.prepare([pp, px])
    assert x.dtype == torch.float32 and torch.all(x[:, :3] == 1) and torch.all(x[:, 3:] == 0)
    ramp = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(bundle.prepare([ramp, ramp])[0, 0], torch.arange(256).float().reshape(16, 16) / 255)
    with pytest.raises(ThinSegError, match=r"\(B, 3, H, W\)"):
        bundle.prepare([pp[:, :1], px])


def test_logits_to_labels_adds_first_label(tmp_path):
    bundle = load_bundle(_save_tiny(tmp_path)[0])
    logits = torch.zeros(2, 7, 3, 3)
    logits[0, 1] = 5  # class 1 everywhere in the first tile
    logits[1, 6, 1, 1] = 5  # class 6 in the middle of the second
    logits[1, 0, 0, 0] = 5  # output 0 wins: not classified
    labels = bundle.logits_to_labels(logits)
    assert labels.dtype == torch.uint8 and labels.shape == (2, 3, 3)
    assert torch.all(labels[0] == 1) and labels[1, 1, 1] == 6 and labels[1, 0, 0] == 0
    assert torch.equal(bundle.logits_to_labels((logits, torch.zeros(2, 1, 3, 3))), labels)


def test_find_bundles_in_tag_folders(tmp_path):
    for tag, name in [
        ("ThinSectionEnv", "b"),
        ("ThinSectionEnv", "a"),
        ("MicroCTEnv", "c"),
        ("ThinSectionEnv/Multiphase", "d"),
        ("ThinSectionEnv/PoreStats", "e"),
        ("Elsewhere/Multiphase", "f"),
    ]:
        folder = tmp_path / tag / name
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text("{}")
        (folder / "model.pth").write_bytes(b"")
    (tmp_path / "ThinSectionEnv" / "incomplete").mkdir()
    (tmp_path / "ThinSectionEnv" / "incomplete" / "meta.json").write_text("{}")
    (tmp_path / "ThinSectionEnv" / ".a.x.tmp").mkdir()
    (tmp_path / "ThinSectionEnv" / ".a.x.tmp" / "meta.json").write_text("{}")
    (tmp_path / "ThinSectionEnv" / ".a.x.tmp" / "model.pth").write_bytes(b"")
    assert find_bundles(tmp_path) == [
        tmp_path / "Elsewhere" / "Multiphase" / "f",
        tmp_path / "MicroCTEnv" / "c",
        tmp_path / "ThinSectionEnv" / "Multiphase" / "d",
        tmp_path / "ThinSectionEnv" / "PoreStats" / "e",
        tmp_path / "ThinSectionEnv" / "a",
        tmp_path / "ThinSectionEnv" / "b",
    ]
    assert find_bundles(tmp_path, tags=["ThinSectionEnv"]) == [
        tmp_path / "ThinSectionEnv" / "a",
        tmp_path / "ThinSectionEnv" / "b",
    ]
    # GeoSlicer's layout and the older one; GeoSlicer's own search: the Multiphase tag anywhere
    assert find_thin_section_models(tmp_path) == [
        tmp_path / "Elsewhere" / "Multiphase" / "f",
        tmp_path / "ThinSectionEnv" / "Multiphase" / "d",
        tmp_path / "ThinSectionEnv" / "a",
        tmp_path / "ThinSectionEnv" / "b",
    ]
    assert find_geoslicer_models(tmp_path) == [
        tmp_path / "Elsewhere" / "Multiphase" / "f",
        tmp_path / "ThinSectionEnv" / "Multiphase" / "d",
    ]
    assert multiphase_model_dir(tmp_path, "d") == tmp_path / "ThinSectionEnv" / "Multiphase" / "d"
    assert find_bundles(tmp_path / "missing") == []


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    folder, _ = _save_tiny(tmp_path)
    with pytest.raises(ThinSegError, match="already exists"):
        _save_tiny(tmp_path)
    params = {**TINY_UNET, "out_channels": 4}
    _save_tiny(tmp_path, network_params=params, overwrite=True)
    assert len(load_bundle(folder).class_table) == 3
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]


def test_save_refuses_weights_that_do_not_fit_params(tmp_path):
    net = build_network("UNet", TINY_UNET)
    with pytest.raises(ThinSegError, match="do not match"):
        save_bundle(
            tmp_path / "m",
            net,
            network_name="UNet",
            network_params={**TINY_UNET, "channels": [8, 16]},
            class_table=_classes(),
            pixels_per_mm=100,
            title="t",
            description="d",
        )
    assert not (tmp_path / "m").exists()


# -- refusals ----------------------------------------------------------------------------------


class _Payload:
    """Pickles as a call of `function(*args)`: what a malicious model.pth carries."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def _payloads(marker: Path) -> dict[str, tuple[_Payload, str]]:
    """Each writes `marker` when unpickled the ordinary way; with the global a refusal names."""
    return {
        "open": (_Payload(open, str(marker), "w"), "io.open"),
        "os.system": (_Payload(os.system, f"touch '{marker}'"), f"{os.system.__module__}.system"),
        "builtins.exec": (_Payload(builtins.exec, f"open({str(marker)!r}, 'w').write('ran')"), "builtins.exec"),
    }


#: None: whatever this torch supports (its own restricted loader from torch 2.6); True: the
#: restricted unpickler that torch 1.12 gets, on this torch too.
LOADERS = [pytest.param(None, id="this-torch"), pytest.param(True, id="restricted-unpickler")]


@pytest.mark.parametrize("restricted", LOADERS)
@pytest.mark.parametrize("payload", ["open", "os.system", "builtins.exec"])
def test_a_model_that_would_run_code_is_refused_and_runs_nothing(tmp_path, monkeypatch, payload, restricted):
    marker = tmp_path / "marker-was-written"
    evil, name = _payloads(marker)[payload]
    folder, _ = _save_tiny(tmp_path)
    saved = load_torch_file(folder / WEIGHTS_FILE)
    saved["config"]["meta"]["evil"] = evil
    torch.save(saved, folder / WEIGHTS_FILE)
    original = load_torch_file
    monkeypatch.setattr(
        "thinseg.model.bundle.load_torch_file", lambda path: original(path, restricted=restricted), raising=True
    )
    with pytest.raises(ThinSegError) as info:
        load_bundle(folder)
    assert not marker.exists()
    assert info.value.path == folder / WEIGHTS_FILE and "\n" not in str(info.value)
    assert info.value.problem == (
        f"model.pth is refused as unsafe: it names {name}, a global that is not allowed (only tensors, plain values "
        "and numbers are read; nothing in the file was run)"
    )


@pytest.mark.parametrize("restricted", LOADERS)
def test_numpy_scalars_in_a_bundle_load_as_plain_values(tmp_path, restricted):
    """GeoSlicer's saved dicts can hold numpy numbers; they load safely and come back as Python's."""
    folder, net = _save_tiny(tmp_path)
    saved = load_torch_file(folder / WEIGHTS_FILE)
    cmeta = saved["config"]["meta"]
    cmeta["pixels_per_mm"] = np.float64(200.0)
    cmeta["input_roi_shape"] = [np.int64(16), np.int32(16)]
    cmeta["inputs"]["PP"]["n_channels"] = np.uint8(3)
    cmeta["is_segmentation_model"] = np.bool_(True)
    saved["config"]["extra"] = {"float32": np.float32(0.25), "complex": np.complex128(1 - 2j), "int16": np.int16(-7)}
    torch.save(saved, folder / WEIGHTS_FILE)
    loaded = load_torch_file(folder / WEIGHTS_FILE, restricted=restricted)
    plain = loaded["config"]
    assert plain["extra"] == {"float32": 0.25, "complex": 1 - 2j, "int16": -7}
    assert [type(v) for v in plain["extra"].values()] == [float, complex, int]
    assert type(plain["meta"]["pixels_per_mm"]) is float and type(plain["meta"]["input_roi_shape"][0]) is int
    assert plain["meta"]["is_segmentation_model"] is True
    bundle = load_bundle(folder)
    assert bundle.pixels_per_mm == 200.0 and bundle.roi_shape == (16, 16) and bundle.input_channels == [3, 3]
    x = bundle.prepare(_images())
    with torch.no_grad():
        assert torch.equal(bundle.network(x), net.eval()(x))


@pytest.mark.parametrize("restricted", LOADERS)
def test_numpy_arrays_and_object_dtypes_are_refused(tmp_path, restricted):
    path = tmp_path / "array.pth"
    torch.save({"a": np.arange(3)}, path)
    with pytest.raises(ThinSegError, match=r"it names numpy\.(_core|core)\.multiarray\._reconstruct"):
        load_torch_file(path, restricted=restricted)
    torch.save({"a": np.dtype(object)}, path)
    with pytest.raises(ThinSegError, match=r"it names numpy\.dtype\('O8'\), a global that is not"):
        load_torch_file(path, restricted=restricted)
    torch.save({"a": np.str_("text")}, path)
    with pytest.raises(ThinSegError, match=r"it names numpy\.dtype\('U4'\), a global that is not"):
        load_torch_file(path, restricted=restricted)


def test_one_allow_list_for_both_loaders():
    """The restricted unpickler's list is the one torch's own loader gets: its torch entries are
    among what torch allows by itself, the numpy entries are added for the load."""
    names = set(allowed_globals())
    assert set(numpy_globals()) == {*NUMPY_SCALAR_GLOBALS, "numpy.dtype"}
    assert {"torch._utils._rebuild_tensor_v2", "collections.OrderedDict", "_codecs.encode", "torch.float32"} <= names
    assert not {n for n in names if n.startswith(("os.", "posix.", "subprocess.")) or n == "builtins.exec"}
    if torch_restricts_loading():
        from torch._weights_only_unpickler import _get_allowed_globals

        assert names - set(numpy_globals()) <= set(_get_allowed_globals())


@pytest.mark.parametrize("restricted", LOADERS)
def test_a_training_checkpoint_loads_safely_with_every_loader(tmp_path, monkeypatch, restricted):
    net = build_network("UNet", TINY_UNET)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.rand(1, 6, 16, 16)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)
    state = {
        "epoch": 3,
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": [{"epoch": 1, "loss": 0.5, "val": None}],
        "rng": {"torch": torch.get_rng_state()},
        "identity": {"network": "UNet", "params": TINY_UNET, "roles": ["PP", "XP"]},
    }
    path = save_checkpoint(tmp_path / "checkpoint.pt", state)
    original = load_torch_file
    monkeypatch.setattr("thinseg.training.checkpoint.load_torch_file", lambda p: original(p, restricted=restricted))
    back = load_checkpoint(path)
    assert back["epoch"] == 3 and back["history"] == state["history"] and back["identity"] == state["identity"]
    assert all(torch.equal(back["model"][k], v) for k, v in state["model"].items())
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    fresh = torch.optim.Adam(build_network("UNet", TINY_UNET).parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    assert fresh.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    marker = tmp_path / "marker"
    torch.save({**state, "evil": _payloads(marker)["builtins.exec"][0]}, path)
    with pytest.raises(ThinSegError, match=r"checkpoint cannot be loaded: checkpoint.pt is refused as unsafe"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_or_truncated_weights(tmp_path, damage):
    folder, _ = _save_tiny(tmp_path)
    pth = folder / WEIGHTS_FILE
    data = pth.read_bytes()
    pth.write_bytes({"truncate": data[: len(data) // 2], "garbage": bytes(range(256)) * 4, "empty": b""}[damage])
    with pytest.raises(ThinSegError, match="corrupt") as info:
        load_bundle(folder)
    assert info.value.path == pth and "\n" not in str(info.value)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(ThinSegError, match="model folder not found"):
        load_bundle(tmp_path / "nope")
    folder, _ = _save_tiny(tmp_path)
    (folder / "model.pth").unlink()
    with pytest.raises(ThinSegError, match="model.pth is missing"):
        load_bundle(folder)
    (folder / "meta.json").unlink()
    with pytest.raises(ThinSegError, match="meta.json is missing"):
        load_bundle(folder)


def test_invalid_meta_json(tmp_path):
    folder, _ = _save_tiny(tmp_path)
    (folder / "meta.json").write_text('{"title": "x",', encoding="utf-8")
    with pytest.raises(ThinSegError, match="meta.json is not valid JSON"):
        load_bundle(folder)


def _edit_saved(folder: Path, edit) -> None:
    pth = folder / WEIGHTS_FILE
    saved = load_torch_file(pth)
    edit(saved)
    torch.save(saved, pth)


def test_unknown_network_name(tmp_path):
    folder, _ = _save_tiny(tmp_path)
    _edit_saved(folder, lambda s: s["config"]["model"].update(name="SegFormer"))
    with pytest.raises(
        ThinSegError,
        match=r"unsupported network 'SegFormer' \(supported: UNet, UNetAct, UNetActWithBoundarySupervision, "
        r"LiteUNet, LiteUNetEnsemble\)",
    ):
        load_bundle(folder)


def test_unknown_transform_name(tmp_path):
    folder, _ = _save_tiny(tmp_path)
    _edit_saved(
        folder,
        lambda s: s["config"]["transforms"]["pre_processing_transforms"].append(
            {"name": "SharpenTransform", "params": {"key": "x"}}
        ),
    )
    with pytest.raises(ThinSegError, match="unsupported pre-processing transform 'SharpenTransform'"):
        load_bundle(folder)
    _edit_saved(folder, lambda s: s["config"]["transforms"].update(pre_processing_transforms="ConcatenateTransform"))
    with pytest.raises(
        ThinSegError,
        match="model.pth config.transforms.pre_processing_transforms: 'ConcatenateTransform' is not of type",
    ):
        load_bundle(folder)


def test_mismatched_state_dict(tmp_path):
    folder, _ = _save_tiny(tmp_path)

    def edit(saved):
        state = saved["model_state_dict"]
        state.pop(next(iter(state)))
        state["head.extra.weight"] = torch.zeros(1)

    _edit_saved(folder, edit)
    with pytest.raises(ThinSegError, match="1 missing .* 1 unexpected \\(head.extra.weight\\)") as info:
        load_bundle(folder)
    assert "\n" not in str(info.value)


def test_non_contiguous_class_indices(tmp_path):
    folder, _ = _save_tiny(tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    meta["outputs"]["y"]["class_indices"] = [1, 2, 3, 4, 5, 7]
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ThinSegError, match="not contiguous 1..6"):
        load_bundle(folder)


def test_meta_json_and_config_disagree(tmp_path):
    folder, _ = _save_tiny(tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    meta["outputs"]["y"]["class_names"][0] = "Anhydrite"
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ThinSegError, match="disagree on the classes"):
        load_bundle(folder)
    meta["outputs"]["y"]["class_names"][0] = "Calcite"
    del meta["inputs"]["PX"]
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        ThinSegError, match=r"disagree on the inputs: meta.json has PP\(3\), model.pth has PP\(3\), PX\(3\)"
    ):
        load_bundle(folder)


def test_class_count_must_match_network(tmp_path):
    geoslicer_unet = {**TINY_UNET, "out_channels": 6}  # GeoSlicer style: 6 outputs, first_label 1
    net = build_network("UNet", geoslicer_unet)
    saved, meta = _geoslicer_saved_model(net, "UNet", geoslicer_unet)
    for m in (meta["outputs"]["y"], saved["config"]["meta"]["outputs"]["y"]):
        for key in ("class_names", "class_colors", "class_indices"):
            m[key] = m[key][:5]
    with pytest.raises(ThinSegError, match="6 outputs with first_label 1 but the bundle names 5 classes"):
        load_bundle(_write(tmp_path / "m", saved, meta))


def test_seed_style_model_without_first_label_loads(tmp_path):
    """Older GeoSlicer: 7 outputs for 6 classes, output 0 = background, ArgmaxTransform without
    first_label. Labels must come out 1..6 exactly as GeoSlicer would write them."""
    seed_unet = {**TINY_UNET, "out_channels": 7}
    net = build_network("UNet", seed_unet)
    saved, meta = _geoslicer_saved_model(net, "UNet", {**seed_unet, "out_channels": 6})
    saved["config"]["model"]["params"] = seed_unet
    post = saved["config"]["transforms"]["post_processing_transforms"][0]["params"]
    del post["first_label"], post["batch_dim"]
    bundle = load_bundle(_write(tmp_path / "ThinSectionEnv" / "seed", saved, meta))
    assert bundle.first_label == 0 and len(bundle.class_table) == 6
    logits = torch.zeros(1, 7, 2, 2)
    logits[0, 3] = 1
    assert torch.all(bundle.logits_to_labels(logits) == 3)
    # and the same bundle with first_label 1 would put labels past the class table: refused
    post["first_label"] = 1
    with pytest.raises(ThinSegError, match="7 outputs with first_label 1"):
        load_bundle(_write(tmp_path / "ThinSectionEnv" / "seed2", saved, meta))


def test_a_geoslicer_unetact_model_segments_a_geoslicer_file_through_the_command(tmp_path, capsys):
    """GeoSlicer's own UNetAct bundle, unchanged, on a GeoSlicer netCDF (PP + PX) through `thinseg
    segment`: one tile covers the image, so the labels equal GeoSlicer's own inference exactly."""
    import numpy as np
    from helpers import open_nc, run_main

    from thinseg.io.netcdf import NetcdfWriter

    torch.manual_seed(3)
    net = _GeoSlicerUNetAct(**GEOSLICER_UNETACT)
    saved, meta = _geoslicer_saved_model(net, "UNetAct", GEOSLICER_UNETACT)
    model = _write(tmp_path / "ThinSectionEnv" / "gs", saved, meta)
    pp, px = (t[0] for t in _images(batch=1, size=16))
    source = tmp_path / "S7.nc"
    with NetcdfWriter(source) as writer:
        writer.add_rgb_image("S7_PP", pp.permute(1, 2, 0).numpy(), 0.01)
        writer.add_rgb_image("S7_PX", px.permute(1, 2, 0).numpy(), 0.01)
    code, _, err = run_main(
        capsys,
        "segment",
        source,
        "--xp-pattern",
        "PX",
        "--model",
        model,
        "--output",
        tmp_path / "out.nc",
        "--quiet",
        "--precision",
        "fp32",
    )
    assert code == 0, err
    with open_nc(tmp_path / "out.nc") as ds:
        labelmap = next(v for v in ds.variables.values() if getattr(v, "type", None) == "labelmap")
        labels = labelmap[0]
    assert np.array_equal(labels, _geoslicer_inference(net.eval(), pp, px).numpy().astype(np.uint8) + 1)


# -- transform chains -----------------------------------------------------------------------------

ARGMAX = {"name": "ArgmaxTransform", "params": {"key": "y", "dim": 1, "dtype": "int8", "keepdim": True}}
PLUS_ONE = {"name": "AddConstantTransform", "params": {"keys": ["y"], "constant": 1}}


def _chain_bundle(tmp_path: Path, name: str, *, pre=None, post=None) -> Path:
    """A GeoSlicer-style bundle (UNetAct, 6 outputs for 6 classes) with other transform chains."""
    net = _GeoSlicerUNetAct(**GEOSLICER_UNETACT)
    saved, meta = _geoslicer_saved_model(net, "UNetAct", GEOSLICER_UNETACT)
    transforms = saved["config"]["transforms"]
    if pre is not None:
        transforms["pre_processing_transforms"] = pre
    if post is not None:
        transforms["post_processing_transforms"] = post
    return _write(multiphase_model_dir(tmp_path, name), saved, meta)


def test_geoslicer_2_8_bundles_label_with_argmax_then_add_constant(tmp_path):
    """GeoSlicer 2.8's ArgmaxTransform has no first_label: its models add 1 afterwards."""
    torch.manual_seed(5)
    net = _GeoSlicerUNetAct(**GEOSLICER_UNETACT)
    saved, meta = _geoslicer_saved_model(net, "UNetAct", GEOSLICER_UNETACT)
    saved["config"]["transforms"]["post_processing_transforms"] = [ARGMAX, PLUS_ONE]
    bundle = load_bundle(_write(multiphase_model_dir(tmp_path, "gs28"), saved, meta))
    assert bundle.first_label == 1
    pp, px = _images(batch=1, size=16)
    with torch.no_grad():
        logits = bundle.network(bundle.prepare([pp, px]))
    labels = bundle.logits_to_labels(logits)
    assert torch.equal(labels[0], _geoslicer_inference(net, pp[0], px[0]).to(torch.uint8) + 1)
    assert torch.equal(labels, bundle.post_process(logits)[:, 0].to(torch.uint8))


@pytest.mark.parametrize(
    "post",
    [
        [
            {"name": "ArgmaxTransform", "params": {"key": "y", "keepdim": False}},
            {"name": "AddAxisTransform", "params": {"keys": ["y"], "axis": 1}},
            PLUS_ONE,
        ],
        [
            {"name": "argmaxtransform", "params": {"key": "y", "dtype": "uint8"}},
            {
                "name": "MapLabelValued",
                "params": {"keys": "y", "orig_labels": list(range(6)), "target_labels": list(range(1, 7))},
            },
        ],
        [
            {"name": "MinMaxTransform", "params": {"key": "y", "move_from": [-10, 10], "move_to": [0, 1]}},
            {"name": "AddConstantTransform", "params": {"keys": ["y"], "constant": 5}},
            {"name": "RenameTransform", "params": {"renames": {"y": "scores"}}},
            {"name": "ArgmaxTransform", "params": {"key": "scores", "dtype": "uint8"}},
            {"name": "RenameTransform", "params": {"renames": {"scores": "y"}}},
            {"name": "ToTensorTransform", "params": {"keys": {"y": "float32"}}},
            {"name": "IdentityTransform", "params": {}},
            PLUS_ONE,
        ],
        [{"name": "ArgmaxTransform", "params": {"key": "y", "dim": 0, "batch_dim": False, "first_label": 1}}],
    ],
    ids=["keepdim-false-add-axis", "map-label-valued", "rescale-rename-cast", "first-label"],
)
def test_post_processing_chains_that_label_channel_plus_one(tmp_path, post):
    bundle = load_bundle(_chain_bundle(tmp_path, "chain", post=post))
    assert bundle.first_label == 1 and [type(t).__name__.lower() for t in bundle.post_transforms] == [
        s["name"].lower() for s in post
    ]
    logits = torch.randn(2, 6, 5, 7)
    expected = bundle.post_process(logits.clone())
    assert expected.shape == (2, 1, 5, 7)
    assert torch.equal(bundle.logits_to_labels(logits), expected[:, 0].to(torch.uint8))


def _t(name: str, **params) -> dict:
    return {"name": name, "params": params}


@pytest.mark.parametrize(
    ("post", "message"),
    [
        (
            [_t("TakeChannelsTransform", key="y", channels=[1, 2, 3, 4, 5]), ARGMAX, PLUS_ONE],
            "post-processing TakeChannelsTransform before the ArgmaxTransform is not supported",
        ),
        (
            [_t("MinMaxTransform", key="y", move_from=[0, 1], move_to=[1, 0]), ARGMAX, PLUS_ONE],
            "post-processing MinMaxTransform before the ArgmaxTransform is not supported",
        ),
        ([ARGMAX, _t("BinarizerTransform", key="y")], "BinarizerTransform after the ArgmaxTransform is not supported"),
        (
            [ARGMAX, _t("MapLabelValued", keys="y", orig_labels=[0, 1, 2, 3, 4, 5], target_labels=[2, 1, 3, 4, 5, 6])],
            r"labels output channels 0..5 as \[2, 1, 3, 4, 5, 6\]; supported: channel \+ a constant",
        ),
        (
            [_t("ArgmaxTransform", key="y", keepdim=False), PLUS_ONE],
            r"gives \(1, 1, 6\) for a \(1, 6, 1, 6\) output, not the \(B, 1, H, W\) label map",
        ),
        ([PLUS_ONE], "post-processing has no ArgmaxTransform on the model output 'y'"),
        ([ARGMAX, ARGMAX], "more than one ArgmaxTransform"),
        ([ARGMAX], "6 outputs with first_label 0 but the bundle names 6 classes"),
        ([ARGMAX, _t("AddConstantTransform", keys=["y"], constant=-1)], r"as \[-1, 0, 1, 2, 3, 4\]"),
        ([ARGMAX, _t("AddConstantTransform", keys=["z"], constant=1)], "AddConstantTransform needs 'z'"),
        ([ARGMAX, PLUS_ONE, _t("RenameTransform", renames={"y": "labels"})], "leaves no model output 'y'"),
        ([_t("ArgmaxTransform", key="y", dtype="int8", first_label=200)], r"as \[-56, -55"),
    ],
)
def test_post_processing_that_is_not_channel_plus_a_constant_is_refused(tmp_path, post, message):
    with pytest.raises(ThinSegError, match=message) as info:
        load_bundle(_chain_bundle(tmp_path, "chain", post=post))
    assert info.value.path.name == "model.pth" and "\n" not in str(info.value)


CONCAT = _t("ConcatenateTransform", key_groups={"pre_processed_input_1": ["PP", "PX"]}, axis=0)


def test_pre_processing_chains_run_as_geoslicer_runs_them(tmp_path):
    pre = [
        _t("ToTensorTransform", keys={"PP": "float32"}),
        _t("AddConstantTransform", keys=["PP", "PX"], constant=-127.5),
        CONCAT,
        _t("QuantileTransform", key="pre_processed_input_1", quantile_values=[-127.5, 127.5], move_to=[0, 1]),
        _t("IdentityTransform"),
    ]
    bundle = load_bundle(_chain_bundle(tmp_path, "pre", pre=pre))
    assert bundle.fused_pre_processing() is None and bundle.input_range is None
    pp, px = _images(batch=2, size=8)
    x = bundle.prepare([pp, px])
    joined = torch.cat([pp, px], dim=1).float() - 127.5
    assert torch.equal(x, (joined - -127.5) / 255.0 * 1 + 0)
    simple = load_bundle(_chain_bundle(tmp_path, "simple", pre=[_t("IdentityTransform"), *_chain_pre_default()]))
    assert simple.fused_pre_processing() == ([0, 1], simple.pre_transforms[2:]) and simple.input_range == (
        0.0,
        255.0,
        0.0,
        1.0,
    )


def _chain_pre_default() -> list[dict]:
    return [CONCAT, _t("MinMaxTransform", key="pre_processed_input_1", move_from=[0, 255], move_to=[0, 1])]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            _t("TakeChannelsTransform", key="pre_processed_input_1", channels=[0, 1, 2]),
            r"turns 4 x 7 images into a \(6, 3, 7\) network input",
        ),
        (
            _t("SwapAxesTransform", keys=["pre_processed_input_1"], axis_0=-1, axis_1=-2),
            r"turns 3 x 5 images into a \(6, 5, 3\) network input",
        ),
        (_t("AddAxisTransform", keys=["pre_processed_input_1"], axis=0), r"into a \(1, 6, 3, 5\) network input"),
        (_t("ToTensorTransform", keys={"pre_processed_input_1": "uint8"}), "gives a torch.uint8 network input"),
        (_t("RenameTransform", renames={"pre_processed_input_1": "x"}), "does not produce the network input"),
        (_t("AddConstantTransform", keys=["PP"], constant=1), "AddConstantTransform needs 'PP'"),
    ],
)
def test_pre_processing_that_leaves_the_image_grid_is_refused(tmp_path, extra, message):
    with pytest.raises(ThinSegError, match=message) as info:
        load_bundle(_chain_bundle(tmp_path, "pre", pre=[*_chain_pre_default(), extra]))
    assert info.value.path.name == "model.pth" and "\n" not in str(info.value)
