"""Hostile model bundles: each a few kilobytes that would exhaust the machine, crash the run,
run code or label nothing, refused in one line naming the file, with exit 2, no traceback,
nothing written and (where the point is memory) a bounded peak.

The same refusals hold wherever a bundle or a checkpoint is loaded: `segment`, `evaluate`,
`train --init-from` and `train --resume`. The bundles are the tiny ones of helpers.make_bundle,
edited after saving (meta.json as text, model.pth through torch or byte by byte).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from helpers import MM_PER_PIXEL, make_bundle, rewrite_bundle, section_images, write_image
from hostile import REFUSAL_PEAK_MB, Run, assert_nothing_left, assert_refused, snapshot, thinseg

from thinseg.classes.files import default_class_table
from thinseg.errors import ThinSegError
from thinseg.io.netcdf import NetcdfWriter
from thinseg.jsonio import MAX_JSON_DEPTH, JSONBoundError, loads
from thinseg.model.bundle import load_bundle
from thinseg.model.safe_load import load_torch_file
from thinseg.synth import generate_section


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """One valid tiny bundle, a PP/XP pair of PNGs and two labelled netCDF sections."""
    root = tmp_path_factory.mktemp("hostile-bundles")
    pp, xp = section_images(48, 64)
    table = default_class_table()
    (root / "data").mkdir()
    for name, seed in (("A", 3), ("B", 4)):
        s = generate_section(64, 64, seed=seed, mm_per_pixel=MM_PER_PIXEL)
        with NetcdfWriter(root / "data" / f"{name}.nc") as writer:
            reference = writer.add_rgb_image(f"{name}_PP", s.pp, MM_PER_PIXEL)
            writer.add_rgb_image(f"{name}_XP", s.xp, MM_PER_PIXEL)
            writer.add_labelmap(f"{name}_labels", s.labels.astype("uint8"), table, MM_PER_PIXEL, reference=reference)
    return {
        "bundle": make_bundle(root / "valid"),
        "pp": write_image(root / "PP.png", pp),
        "xp": write_image(root / "XP.png", xp),
        "data": root / "data",
    }


def _copy(base: dict[str, Path], folder: Path) -> Path:
    return Path(shutil.copytree(base["bundle"], folder))


def _segment(base: dict[str, Path], model: Path, out: Path) -> Run:
    return thinseg("segment", base["pp"], "--xp", base["xp"], "-o", out, "--model", model, "-q")


def _refused_everywhere_in_segment(base, model: Path, tmp_path: Path, file: str, mentions: list[str]) -> str:
    """`thinseg segment` with `model`: exit 2, one line naming `file` of the bundle, nothing left."""
    out = tmp_path / "out"
    run = _segment(base, model, out)
    line = assert_refused(run, code=2, mentions=[str(model / file), *mentions])
    assert "weights_only" not in run.stderr
    assert_nothing_left(out)
    assert run.peak_mb < REFUSAL_PEAK_MB, run.describe()
    return line


# -- the network a bundle describes ------------------------------------------------------------


def _params(**changes):
    return lambda saved: saved["config"]["model"]["params"].update(changes)


NETWORK_CASES = {
    "negative channels": (_params(channels=[-4, 8]), "a channel count -4 is outside the sane range 1 to 4096"),
    "zero strides": (_params(strides=[0]), "a stride 0 is outside the sane range 1 to 8"),
    "1.6M channels": (
        _params(channels=[1_600_000, 1_600_000]),
        "a channel count 1600000 is outside the sane range 1 to 4096",
    ),
    "layers within bounds, network beyond the parameter limit": (
        _params(channels=[4096, 4096, 4096], strides=[1, 1]),
        "more than the 500,000,000 a model may have",
    ),
    "weights far smaller than the declared network": (
        _params(channels=[256, 512]),
        "model_state_dict holds 2,069 values but that network has",
    ),
}


@pytest.mark.parametrize("case", list(NETWORK_CASES))
def test_a_network_the_weights_cannot_be_is_refused_before_it_is_built(base, tmp_path, case):
    edit, problem = NETWORK_CASES[case]
    model = _copy(base, tmp_path / "model")
    rewrite_bundle(model, edit_saved=edit)
    _refused_everywhere_in_segment(base, model, tmp_path, "model.pth", [problem])


# -- meta.json ---------------------------------------------------------------------------------


def test_meta_json_nested_100000_deep_is_refused_without_recursion(base, tmp_path):
    model = _copy(base, tmp_path / "model")
    (model / "meta.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    _refused_everywhere_in_segment(
        base, model, tmp_path, "meta.json", ["meta.json nests arrays and objects 100000 levels deep"]
    )


def test_meta_json_with_a_5000_digit_integer_is_refused_on_every_python(base, tmp_path):
    model = _copy(base, tmp_path / "model")
    text = (model / "meta.json").read_text(encoding="utf-8")
    assert text.count('"pixels_per_mm": ') == 1
    (model / "meta.json").write_text(
        text.replace('"pixels_per_mm": ', '"pixels_per_mm": ' + "9" * 5000 + ', "was": '), encoding="utf-8"
    )
    _refused_everywhere_in_segment(
        base, model, tmp_path, "meta.json", ["meta.json holds an integer of 5000 digits (at most 32 are read)"]
    )


def test_json_bounds_hold_in_process():
    """The bound is exact and leaves strings alone; the errors are ValueErrors, as a parse error is."""
    assert loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None
    with pytest.raises(JSONBoundError, match=f"{MAX_JSON_DEPTH + 1} levels deep"):
        loads("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    assert loads('{"a": "[[[[\\"{{{{", "b": [-12345678901234567890]}') == {
        "a": '[[[["{{{{',
        "b": [-12345678901234567890],
    }
    with pytest.raises(ValueError, match="integer of 40 digits"):
        loads("[" + "1" * 40 + "]")


def test_a_meta_json_of_5_mb_is_refused_unread(base, tmp_path):
    model = _copy(base, tmp_path / "model")
    (model / "meta.json").write_text('{"title": "' + "x" * (5 * 1024 * 1024) + '"}', encoding="utf-8")
    with pytest.raises(ThinSegError) as info:
        load_bundle(model)
    assert info.value.path == model / "meta.json"
    assert info.value.problem == "meta.json is larger than 4,194,304 bytes, more than a JSON file of this kind holds"


# -- transforms and resolution -----------------------------------------------------------------


def _pre_minmax(**changes):
    return lambda saved: saved["config"]["transforms"]["pre_processing_transforms"][1]["params"].update(changes)


def _config_meta(**changes):
    return lambda saved: saved["config"]["meta"].update(changes)


VALUE_CASES = {
    "NaN MinMax range": (_pre_minmax(move_from=[float("nan"), 255]), "move_from must hold finite numbers"),
    "infinite pixels_per_mm": (_config_meta(pixels_per_mm=float("inf")), "pixels_per_mm must be a positive number"),
    "1e-6 pixels_per_mm": (_config_meta(pixels_per_mm=1e-6), "pixels_per_mm 1e-06 is outside the sane range"),
    "1e9 px tile": (_config_meta(input_roi_shape=[10**9, 10**9]), "input_roi_shape [1000000000, 1000000000]"),
}
#: The same refusals in more variants, checked in this process (load_bundle), not through the CLI.
MORE_CASES = {
    "3-D network": (_params(spatial_dims=3), "the network is 3-D"),
    "UNetAct scales 10^6": (
        lambda saved: saved["config"]["model"].update(name="UNetAct", params={"spatial_dims": 2, "scales": 10**6}),
        "scales 1000000 is outside the sane range 2 to 12",
    ),
    "kernel size 0": (_params(kernel_size=0), "kernel_size 0 is outside the sane range 1 to 15"),
    "infinite MinMax target": (_pre_minmax(move_to=[0, float("inf")]), "move_to must hold finite numbers"),
    "empty MinMax range": (_pre_minmax(move_from=[7, 7]), "move_from [7, 7] is an empty range"),
    "MinMax range wider than a float": (_pre_minmax(move_from=[-1e308, 1e308]), "wider than a float can say"),
    "NaN pixels_per_mm": (_config_meta(pixels_per_mm=float("nan")), "pixels_per_mm must be a positive number"),
    "10^5 pixels_per_mm": (_config_meta(pixels_per_mm=1e5), "pixels_per_mm 100000.0 is outside the sane range"),
    "300 classes": (
        lambda saved: saved["config"]["meta"]["outputs"]["y"].update(class_names=["c"] * 300),
        "names 300 classes; label maps hold at most 255",
    ),
    "an input of 10^9 channels": (
        lambda saved: saved["config"]["meta"]["inputs"]["PP"].update(n_channels=10**9),
        "at most 16 images of at most 4096 channels each",
    ),
}


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_a_bundle_whose_numbers_would_label_nothing_is_refused(base, tmp_path, case):
    edit, problem = VALUE_CASES[case]
    model = _copy(base, tmp_path / "model")
    rewrite_bundle(model, edit_saved=edit)
    _refused_everywhere_in_segment(base, model, tmp_path, "model.pth", [problem])


@pytest.mark.parametrize("case", list(MORE_CASES))
def test_more_hostile_descriptions_are_refused_when_loaded(base, tmp_path, case):
    edit, problem = MORE_CASES[case]
    model = _copy(base, tmp_path / "model")
    rewrite_bundle(model, edit_saved=edit)
    with pytest.raises(ThinSegError) as info:
        load_bundle(model)
    assert info.value.path == model / "model.pth" and problem in info.value.problem, info.value


# -- the weights file itself -------------------------------------------------------------------


class _Call:
    """Pickles as `function(*args)`: what a malicious model.pth carries."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def _replace_pickle(pth: Path, data: bytes) -> None:
    """Put `data` in place of a torch zip archive's data.pkl, every other entry as it was."""
    with zipfile.ZipFile(pth) as archive:
        entries = [(info.filename, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(pth, "w") as archive:
        for name, content in entries:
            archive.writestr(name, data if name.endswith("/data.pkl") else content)


class _StorageRef:
    def __init__(self, elements: int):
        self.elements = elements


class _TorchPickler(pickle.Pickler):
    """Writes storages as torch does: a persistent id naming the record `data/0`."""

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.elements)
        return None


def _torch_pickle(value) -> bytes:
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(value)
    return buffer.getvalue()


def _tensor(elements: int, size: tuple[int, ...], stride: tuple[int, ...]) -> _Call:
    return _Call(torch._utils._rebuild_tensor_v2, _StorageRef(elements), 0, size, stride, False, OrderedDict())


def test_a_model_that_would_run_os_system_is_refused_as_unsafe_and_runs_nothing(base, tmp_path):
    marker = tmp_path / "marker-was-written"
    model = _copy(base, tmp_path / "model")
    saved = load_torch_file(model / "model.pth")
    saved["config"]["meta"]["evil"] = _Call(os.system, f"touch '{marker}'")
    torch.save(saved, model / "model.pth")
    line = _refused_everywhere_in_segment(
        base, model, tmp_path, "model.pth", [f"is refused as unsafe: it names {os.system.__module__}.system"]
    )
    assert "a global that is not allowed" in line and "nothing in the file was run" in line
    assert not marker.exists()


#: Through the CLI: peak memory bounded.
BOMB_CASES = {
    "bytearray of a terabyte": (
        lambda pth: _replace_pickle(pth, pickle.dumps({"x": _Call(bytearray, 10**12)}, protocol=2)),
        "it names builtins.bytearray(1000000000000)",
    ),
    "storage declaring 40 GB over 16 bytes": (
        lambda pth: _replace_pickle(pth, _torch_pickle({"t": _tensor(10**10, (10**10,), (1,))})),
        "storage '0' declares 40,000,000,000 bytes but holds",
    ),
}


#: In this process (load_torch_file), on this torch's loader and on the restricted unpickler.
MORE_BOMBS = {
    "tensor of 10^10 values over 4 stored": (
        lambda pth: _replace_pickle(pth, _torch_pickle({"t": _tensor(4, (10**5, 10**5), (0, 0))})),
        "a tensor of shape [100000, 100000] needs more values than its storage holds (4)",
    ),
    "torch.FloatTensor(n), which torch's own list admits": (
        lambda pth: _replace_pickle(pth, _torch_pickle({"t": _Call(torch.FloatTensor, 10**12)})),
        "it names torch.FloatTensor",
    ),
    "memo index 2^32 - 16": (
        lambda pth: _replace_pickle(pth, pickle.dumps({"x": 1}, protocol=2).replace(b"q\x00", b"r\xf0\xff\xff\xff", 1)),
        "memo index 4294967280",
    ),
    "compressed entries": (
        lambda pth: _recompress(pth),
        "its entries are compressed or larger than the file",
    ),
}


def _recompress(pth: Path) -> None:
    with zipfile.ZipFile(pth) as archive:
        entries = [(info.filename, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(pth, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries:
            archive.writestr(name, content)


@pytest.mark.parametrize("case", list(BOMB_CASES))
def test_a_weights_file_declaring_more_than_it_holds_is_refused_as_unsafe(base, tmp_path, case):
    damage, problem = BOMB_CASES[case]
    model = _copy(base, tmp_path / "model")
    damage(model / "model.pth")
    assert (model / "model.pth").stat().st_size < 100_000
    _refused_everywhere_in_segment(base, model, tmp_path, "model.pth", ["is refused as unsafe", problem])


@pytest.mark.parametrize("restricted", [None, True], ids=["this-torch", "restricted-unpickler"])
@pytest.mark.parametrize("case", list(MORE_BOMBS))
def test_more_weights_files_declaring_more_than_they_hold_are_refused(base, tmp_path, case, restricted):
    damage, problem = MORE_BOMBS[case]
    pth = Path(shutil.copy(base["bundle"] / "model.pth", tmp_path / "model.pth"))
    damage(pth)
    with pytest.raises(ThinSegError) as info:
        load_torch_file(pth, restricted=restricted)
    assert info.value.problem.startswith("model.pth is refused as unsafe: ") and problem in info.value.problem


def test_a_truncated_model_is_reported_corrupt_not_unsafe(base, tmp_path):
    model = _copy(base, tmp_path / "model")
    data = (model / "model.pth").read_bytes()
    (model / "model.pth").write_bytes(data[: len(data) // 2])
    line = _refused_everywhere_in_segment(
        base, model, tmp_path, "model.pth", ["model.pth is corrupt, truncated or not a torch file"]
    )
    assert "unsafe" not in line


# -- the other commands that load bundles and checkpoints --------------------------------------

TINY_TRAIN = ["--epochs", "1", "--steps-per-epoch", "1", "--patch-size", "32", "--batch-size", "1"]
TINY_TRAIN += ["--base-channels", "2", "--depth", "2", "--device", "cpu", "--precision", "fp32", "-q"]


def _hostile_network(base, folder: Path) -> Path:
    model = _copy(base, folder)
    rewrite_bundle(model, edit_saved=_params(channels=[1_600_000, 1_600_000]))
    return model


def test_evaluate_refuses_a_hostile_bundle_in_one_line(base, tmp_path):
    model = _hostile_network(base, tmp_path / "model")
    out = tmp_path / "report"
    run = thinseg("evaluate", "--model", model, base["data"] / "A.nc", "--output", out, "-q")
    assert_refused(run, code=2, mentions=[str(model / "model.pth"), "a channel count 1600000"])
    assert_nothing_left(out)
    assert run.peak_mb < REFUSAL_PEAK_MB, run.describe()


def test_train_init_from_refuses_a_hostile_bundle_in_one_line(base, tmp_path):
    model = _hostile_network(base, tmp_path / "model")
    out = tmp_path / "run"
    data = base["data"]
    run = thinseg("train", data / "A.nc", "--val", data / "B.nc", "--output", out, "--init-from", model, *TINY_TRAIN)
    assert_refused(run, code=2, mentions=[str(model / "model.pth"), "a channel count 1600000"])
    assert_nothing_left(out)
    assert run.peak_mb < REFUSAL_PEAK_MB, run.describe()


def test_train_resume_refuses_a_checkpoint_that_would_run_code(base, tmp_path):
    marker = tmp_path / "marker-was-written"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"epoch": 1, "model": {}, "evil": _Call(os.system, f"touch '{marker}'")}, out / "checkpoint.pt")
    before, size = snapshot(out), (out / "checkpoint.pt").stat().st_size
    data = base["data"]
    run = thinseg("train", data / "A.nc", "--val", data / "B.nc", "--output", out, "--resume", *TINY_TRAIN)
    line = assert_refused(run, code=2, mentions=[str(out / "checkpoint.pt"), "is refused as unsafe"])
    assert "weights_only" not in run.stderr and "nothing in the file was run" in line
    assert not marker.exists()
    assert (out / "checkpoint.pt").stat().st_size == size
    left = snapshot(out) - before
    assert not [p for p in left if Path(p).name.startswith(".") or p.endswith(".partial") or "model" in p], left


def test_the_unedited_bundle_segments(base, tmp_path):
    """The control: the bundle every case starts from is accepted, so each refusal is the edit's."""
    out = tmp_path / "out"
    run = _segment(base, base["bundle"], out)
    assert run.returncode == 0 and not run.error_lines(), run.describe()
    assert sorted(p.suffix for p in out.iterdir() if p.is_file())
    meta = json.loads((base["bundle"] / "meta.json").read_text(encoding="utf-8"))
    assert loads((base["bundle"] / "meta.json").read_text(encoding="utf-8")) == meta
