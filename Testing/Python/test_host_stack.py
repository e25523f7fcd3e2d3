"""The Python stacks the module must run on: requirements that GeoSlicer 2.8's pins already meet,
the GeoSlicer stack itself (Python 3.9, torch 1.12, ... in .venv-geoslicer) kept exactly at its pins,
sources free of Python 3.10+ constructs (GeoSlicer 2.8 and Slicer 5.8 run Python 3.9), and the
parameter node's annotations evaluated on Python 3.9 as Slicer's parameterNodeWrapper evaluates them."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "ThinSectionSegmentation" / "thinseg" / "requirements.txt"
GEOSLICER_PINS = REPO / "constraints" / "geoslicer-2.8.txt"
DEV_PINS = REPO / "constraints" / "dev.txt"
CHECK_PINS = REPO / "constraints" / "check_pins.py"
CHECK_TYPE_HINTS = REPO / "Testing" / "Python" / "geoslicer_stack" / "check_type_hints.py"
PARAMETERS_LIB = REPO / "ThinSectionSegmentation" / "ThinSectionSegmentationLib"
#: Every Python file that GeoSlicer's / Slicer's Python 3.9 may run or that the suite runs there.
SOURCE_ROOTS = ("ThinSectionSegmentation", "Testing/Python", "scripts", "bench", "constraints")

sys.path.insert(0, str(REPO / "constraints"))
import check_pins  # noqa: E402


def _sources() -> list[Path]:
    return sorted(p for root in SOURCE_ROOTS for p in (REPO / root).rglob("*.py") if "__pycache__" not in p.parts)


def _requirements() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def _python39_environment() -> dict[str, str]:
    return {"python_version": "3.9", "python_full_version": "3.9.18", "implementation_name": "cpython"}


# --- requirements: lower bounds that GeoSlicer 2.8 already meets --------------------------------


def test_requirements_are_lower_bounds_only():
    from packaging.requirements import Requirement

    for line in _requirements():
        requirement = Requirement(line)
        operators = {spec.operator for spec in requirement.specifier}
        assert operators == {">="}, f"{line}: a library states lower bounds only (exact stacks live in constraints/)"


def test_geoslicer_pins_meet_every_requirement_that_applies_on_python_39():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = check_pins.read_pins(GEOSLICER_PINS)
    applying = [Requirement(line) for line in _requirements()]
    applying = [r for r in applying if r.marker is None or r.marker.evaluate(_python39_environment())]
    names = {canonicalize_name(r.name) for r in applying}
    # GeoSlicer's own packages that the core needs: each must be required, and met by the pin
    assert {"torch", "numpy", "scipy", "monai", "netcdf4", "zarr"} <= names & set(pins)
    for requirement in applying:
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is not None:
            assert requirement.specifier.contains(pin), f"GeoSlicer 2.8 pins {requirement.name}=={pin}: {requirement}"
    # tifffile and zarr come in pairs (see requirements.txt): exactly one line of each per Python
    for environment in (_python39_environment(), {"python_version": "3.12", "python_full_version": "3.12.1"}):
        for name in ("tifffile", "zarr"):
            lines = [Requirement(line) for line in _requirements() if canonicalize_name(Requirement(line).name) == name]
            applying_here = [r for r in lines if r.marker is None or r.marker.evaluate(environment)]
            assert len(applying_here) == 1, (name, environment["python_version"], [str(r) for r in lines])


def test_check_pins_names_a_drifted_and_a_missing_distribution(tmp_path):
    """The drift check itself, in a real process over this interpreter's real metadata."""
    from importlib import metadata

    pytest_version = metadata.version("pytest")
    good = tmp_path / "good.txt"
    good.write_text(f"# comment\npytest=={pytest_version}  # trailing comment\nnot-a-pin>=1\n", encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_text(f"PyTest=={pytest_version}\npytest_not_installed_here==1.0\nPACKAGING==0.0.1\n", encoding="utf-8")

    ok = subprocess.run([sys.executable, str(CHECK_PINS), str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{good}: all 1 pins installed exactly"

    drift = subprocess.run([sys.executable, str(CHECK_PINS), str(bad)], capture_output=True, text=True)
    assert drift.returncode == 1
    assert drift.stderr.splitlines() == [
        f"{bad}: packaging: pinned 0.0.1, installed {metadata.version('packaging')}",
        f"{bad}: pytest-not-installed-here: pinned 1.0, not installed",
    ]


def test_the_dev_stack_runs_the_torch_that_constraints_dev_pins():
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("only .venv is installed with constraints/dev.txt")
    assert check_pins.read_pins(DEV_PINS)["torch"] == "2.13.0"
    assert check_pins.drifted(check_pins.read_pins(DEV_PINS)) == []


# --- the GeoSlicer 2.8 stack (.venv-geoslicer, named by THINSEG_GEOSLICER_PYTHON) ----------------


def _run(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=str(REPO), timeout=600)


def test_the_geoslicer_stack_holds_every_pin_exactly(geoslicer_python):
    pins = _run(geoslicer_python, str(CHECK_PINS), str(GEOSLICER_PINS))
    assert pins.returncode == 0, pins.stderr
    check = _run(geoslicer_python, "-m", "pip", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    versions = _run(
        geoslicer_python,
        "-c",
        "import sys, json, torch, numpy, thinseg; "
        "print(json.dumps([list(sys.version_info[:2]), torch.__version__, numpy.__version__, thinseg.__file__]))",
    )
    assert versions.returncode == 0, versions.stderr
    python, torch_version, numpy_version, thinseg_file = json.loads(versions.stdout)
    assert python == [3, 9] and torch_version.split("+")[0] == "1.12.0" and numpy_version == "1.23.1"
    assert Path(thinseg_file).resolve().is_relative_to(REPO)  # this checkout, installed editable


def test_every_core_module_imports_on_the_geoslicer_stack(geoslicer_python):
    code = (
        "import importlib, json, pkgutil, thinseg\n"
        "names = [m.name for m in pkgutil.walk_packages(thinseg.__path__, 'thinseg.')]\n"
        "names = [name for name in names if name != 'thinseg.__main__']  # __main__ runs the command\n"
        "failed = {}\n"
        "for name in names:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as error:\n"
        "        failed[name] = f'{type(error).__name__}: {error}'\n"
        "print(json.dumps([len(names), failed]))\n"
    )
    result = _run(geoslicer_python, "-c", code)
    assert result.returncode == 0, result.stderr
    count, failed = json.loads(result.stdout)
    assert failed == {}
    assert count >= 60


def test_every_source_compiles_on_python_39(geoslicer_python):
    """Syntax (match, parenthesised context managers, ...) as Python 3.9 itself reads it."""
    code = (
        "import json, sys\n"
        "bad = []\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        compile(open(path, encoding='utf-8').read(), path, 'exec')\n"
        "    except SyntaxError as error:\n"
        "        bad.append(f'{path}:{error.lineno}: {error.msg}')\n"
        "print(json.dumps(bad))\n"
    )
    sources = [str(p) for p in _sources()]
    result = _run(geoslicer_python, "-c", code, *sources)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    assert len(sources) > 100


# --- Python 3.10+ constructs that compile on 3.9 but fail when they run --------------------------

#: typing names that Python 3.9's typing lacks (import them from typing_extensions under TYPE_CHECKING)
TYPING_310 = {"TypeAlias", "TypeGuard", "ParamSpec", "Concatenate", "ParamSpecArgs", "ParamSpecKwargs", "is_typeddict"}
TYPING_311 = {"Self", "Never", "LiteralString", "assert_never", "assert_type", "reveal_type", "Required", "NotRequired"}
TYPING_311 |= {"TypeVarTuple", "Unpack", "dataclass_transform", "get_overloads", "clear_overloads"}
BUILTIN_TYPES = {"int", "str", "float", "bool", "bytes", "list", "dict", "tuple", "set", "frozenset", "type", "object"}


def _is_type_expression(node: ast.expr) -> bool:
    """A name that reads as a type: a builtin type, None or a CapWords name (not an ALL_CAPS constant)."""
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.Subscript):
        return _is_type_expression(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _is_type_expression(node.left) or _is_type_expression(node.right)
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name in BUILTIN_TYPES or (name[:1].isupper() and not name.isupper())


class _Runtime310(ast.NodeVisitor):
    """Collects 3.10+ constructs in code that runs (annotations are strings under PEP 563)."""

    def __init__(self, path: Path, tree: ast.Module, root: Path = REPO) -> None:
        self.path, self.root = path, root
        self.problems: list[str] = []
        self.future_annotations = any(
            isinstance(node, ast.ImportFrom)
            and node.module == "__future__"
            and any(a.name == "annotations" for a in node.names)
            for node in tree.body
        )
        self.type_checking_only = False

    def report(self, node: ast.AST, what: str) -> None:
        self.problems.append(f"{self.path.relative_to(self.root)}:{getattr(node, 'lineno', 0)}: {what}")

    def annotation(self, node: ast.expr | None) -> None:
        if node is None:
            return
        if not self.future_annotations and any(
            isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(node)
        ):
            self.report(node, "`X | Y` annotation evaluated at runtime (add `from __future__ import annotations`)")

    def visit_If(self, node: ast.If) -> None:
        test = ast.unparse(node.test)
        if test in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            self.type_checking_only, before = True, self.type_checking_only
            for statement in node.body:
                self.visit(statement)
            self.type_checking_only = before
            for statement in node.orelse:
                self.visit(statement)
        else:
            self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "typing" and not self.type_checking_only:
            late = sorted({a.name for a in node.names} & (TYPING_310 | TYPING_311))
            if late:
                self.report(node, f"typing.{', '.join(late)} does not exist on Python 3.9")
        if node.module == "itertools" and any(a.name == "pairwise" for a in node.names):
            self.report(node, "itertools.pairwise is Python 3.10+")

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.annotation(node.annotation)
        if node.value is not None:
            self.visit(node.value)

    def visit_arg(self, node: ast.arg) -> None:
        self.annotation(node.annotation)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        self.visit(node.args)  # each argument through visit_arg, then the defaults
        self.annotation(node.returns)
        for statement in node.body:
            self.visit(statement)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr == "pairwise" and isinstance(node.value, ast.Name) and node.value.id == "itertools":
            self.report(node, "itertools.pairwise is Python 3.10+")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = ast.unparse(node.func)
        keywords = {k.arg for k in node.keywords}
        if func == "zip" and "strict" in keywords:
            self.report(node, "zip(strict=) is Python 3.10+")
        if func.split(".")[-1] == "dataclass" and keywords & {"slots", "kw_only", "match_args"}:
            self.report(
                node, f"dataclass({', '.join(sorted(keywords & {'slots', 'kw_only', 'match_args'}))}=) is Python 3.10+"
            )
        if func in ("isinstance", "issubclass") and len(node.args) == 2 and isinstance(node.args[1], ast.BinOp):
            self.report(node, f"{func}(x, X | Y) is Python 3.10+")
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if isinstance(node.op, ast.BitOr) and _is_type_expression(node.left) and _is_type_expression(node.right):
            self.report(node, f"`{ast.unparse(node)}` evaluated at runtime (Python 3.10+)")
            return
        self.generic_visit(node)


def runtime_310_problems(path: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    visitor = _Runtime310(path, tree, root)
    visitor.visit(tree)
    return visitor.problems


def test_no_python_310_construct_runs_in_any_source():
    problems = [problem for path in _sources() for problem in runtime_310_problems(path)]
    assert problems == []


def test_the_310_scan_finds_each_construct(tmp_path):
    """The scan above is only worth its silence if it sees each construct it looks for."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import itertools\n"
        "from dataclasses import dataclass\n"
        "from typing import TYPE_CHECKING, TypeAlias\n"
        "if TYPE_CHECKING:\n"
        "    from typing import TypeGuard\n"
        "Number = int | float\n"
        "FLAGS = A_FLAG | B_FLAG\n"
        "def f(x: int | None) -> str | None:\n"
        "    return isinstance(x, int | str), list(zip(x, x, strict=True)), itertools.pairwise(x)\n"
        "@dataclass(slots=True)\n"
        "class C:\n"
        "    y: list[int] | None = None\n",
        encoding="utf-8",
    )
    assert sorted(runtime_310_problems(sample, tmp_path)) == sorted(
        [
            "sample.py:3: typing.TypeAlias does not exist on Python 3.9",
            "sample.py:6: `int | float` evaluated at runtime (Python 3.10+)",
            "sample.py:8: `X | Y` annotation evaluated at runtime (add `from __future__ import annotations`)",
            "sample.py:8: `X | Y` annotation evaluated at runtime (add `from __future__ import annotations`)",
            "sample.py:9: isinstance(x, X | Y) is Python 3.10+",
            "sample.py:9: `int | str` evaluated at runtime (Python 3.10+)",
            "sample.py:9: zip(strict=) is Python 3.10+",
            "sample.py:9: itertools.pairwise is Python 3.10+",
            "sample.py:10: dataclass(slots=) is Python 3.10+",
            "sample.py:12: `X | Y` annotation evaluated at runtime (add `from __future__ import annotations`)",
        ]
    )


# --- the parameter node's annotations, evaluated on Python 3.9 ------------------------------------
# `from __future__ import annotations` keeps `int | None` a string at import, so the scan above lets
# it pass; Slicer's parameterNodeWrapper then evaluates it (typing.get_type_hints) and 3.9 fails.

#: typing.get_type_hints of ThinSectionSegmentationParameters, as check_type_hints.py writes types.
PARAMETER_HINTS = {
    "ppVolume": "slicer.vtkMRMLVectorVolumeNode",
    "xpVolume": "slicer.vtkMRMLVectorVolumeNode",
    "outputLabelmap": "slicer.vtkMRMLLabelMapVolumeNode",
    "modelPath": "builtins.str",
    "device": "ThinSectionSegmentationLib.parameters.Device",
    "confidence": "builtins.bool",
    "createSegmentation": "builtins.bool",
    "ppPattern": "builtins.str",
    "xpPattern": "builtins.str",
    "qemscanVolume": "slicer.vtkMRMLLabelMapVolumeNode",
    "qemscanColorTablePath": "builtins.str",
    "qemscanMmPerPixel": "builtins.float",
    "imageLandmarks": "slicer.vtkMRMLMarkupsFiducialNode",
    "qemscanLandmarks": "slicer.vtkMRMLMarkupsFiducialNode",
    "transformKind": "ThinSectionSegmentationLib.parameters.TransformKind",
    "trainFiles": "builtins.list[builtins.str]",
    "modelName": "builtins.str",
    "userModelsRoot": "builtins.str",
    "trainingRecipe": "ThinSectionSegmentationLib.parameters.TrainingRecipe",
    "epochs": "builtins.int",
    "patchSize": "builtins.int",
    "batchSize": "builtins.int",
    "stepsPerEpoch": "builtins.int",
    "valFraction": "builtins.float",
    "fineTune": "builtins.bool",
    "trainClassesPath": "builtins.str",
    "trainColorTable": "slicer.vtkMRMLColorTableNode",
    "trainMappingPath": "builtins.str",
    "modelMmPerPixel": "builtins.float",
    "ppOnly": "builtins.bool",
    "grainLabelmap": "slicer.vtkMRMLLabelMapVolumeNode",
    "grainPpVolume": "slicer.vtkMRMLVectorVolumeNode",
    "grainNeckRatio": "builtins.float",
    "grainMinPixels": "builtins.int",
    "stitchTileFolder": "builtins.str",
    "stitchOutputFolder": "builtins.str",
    "stitchOverlap": "builtins.float",
    "stitchFlatField": "builtins.str",
    "stitchLayout": "builtins.str",
    "exportPath": "builtins.str",
    "importPath": "builtins.str",
}
#: The class wrapper_class() hands to Slicer's wrapper: the same, numbers limited to their spin box ranges.
WRAPPER_HINTS = {
    **PARAMETER_HINTS,
    "qemscanMmPerPixel": "Annotated[builtins.float, WithinRange(1e-05, 10.0)]",
    "epochs": "Annotated[builtins.int, WithinRange(1, 1000)]",
    "patchSize": "Annotated[builtins.int, WithinRange(32, 2048)]",
    "batchSize": "Annotated[builtins.int, WithinRange(1, 256)]",
    "stepsPerEpoch": "Annotated[builtins.int, WithinRange(1, 100000)]",
    "valFraction": "Annotated[builtins.float, WithinRange(0.0, 0.9)]",
    "modelMmPerPixel": "Annotated[builtins.float, WithinRange(0.0, 10.0)]",
    "grainNeckRatio": "Annotated[builtins.float, WithinRange(0.05, 0.99)]",
    "grainMinPixels": "Annotated[builtins.int, WithinRange(1, 1000000)]",
    "stitchOverlap": "Annotated[builtins.float, WithinRange(0.0, 0.89)]",
}


def _type_hints(python: Path, lib: Path = PARAMETERS_LIB) -> tuple[int, dict[str, Any]]:
    result = _run(python, str(CHECK_TYPE_HINTS), "--lib", str(lib))
    assert result.stdout, result.stderr  # the modules imported and the report was written
    return result.returncode, json.loads(result.stdout)


def test_the_parameter_node_annotations_evaluate_on_python_39(geoslicer_python):
    returncode, report = _type_hints(geoslicer_python)
    assert report["python"] == [3, 9]
    assert report["errors"] == {}
    assert returncode == 0
    hints = report["hints"]
    assert hints["ThinSectionSegmentationParameters"] == PARAMETER_HINTS
    assert hints["ThinSectionSegmentationParameterNode"] == WRAPPER_HINTS
    # every other class of parameters.py and guibinding.py evaluates too (none declares fields today)
    assert {name: fields for name, fields in hints.items() if not name.startswith("ThinSectionSegmentationParam")} == {
        "Device": {},
        "TransformKind": {},
        "TrainingRecipe": {},
        "PlainParameterNode": {},
        "GuiBinding": {},
    }


#: One field written with a Python 3.10 union, as parameters.py might be edited (old line -> new line).
UNION_FIELDS = {
    "int | None": ('    importPath: str = ""\n', '    importPath: str = ""\n    retries: int | None = None\n'),
    "node | None": (
        "    ppVolume: vtkMRMLVectorVolumeNode = None\n",
        "    ppVolume: vtkMRMLVectorVolumeNode | None = None\n",
    ),
    "int | str": ('    importPath: str = ""\n', '    importPath: str = ""\n    seed: int | str = 0\n'),
}


@pytest.mark.parametrize("union", sorted(UNION_FIELDS))
def test_the_annotation_check_fails_on_a_310_union(geoslicer_python, tmp_path, union):
    """A copy of parameters.py with one `X | Y` field: it imports on 3.9 and the scan of runtime
    constructs stays silent (the annotation is a string), but its hints do not evaluate."""
    old, new = UNION_FIELDS[union]
    lib = tmp_path / "ThinSectionSegmentationLib"
    lib.mkdir()
    (lib / "guibinding.py").write_text((PARAMETERS_LIB / "guibinding.py").read_text(encoding="utf-8"), encoding="utf-8")
    source = (PARAMETERS_LIB / "parameters.py").read_text(encoding="utf-8")
    assert source.count(old) == 1
    (lib / "parameters.py").write_text(source.replace(old, new), encoding="utf-8")
    assert runtime_310_problems(lib / "parameters.py", tmp_path) == []

    returncode, report = _type_hints(geoslicer_python, lib)
    assert returncode == 1
    assert report["python"] == [3, 9]
    assert sorted(report["errors"]) == ["ThinSectionSegmentationParameterNode", "ThinSectionSegmentationParameters"]
    assert all(error.startswith("TypeError: unsupported operand type(s) for |") for error in report["errors"].values())
    assert sorted(report["hints"]) == ["Device", "GuiBinding", "PlainParameterNode", "TrainingRecipe", "TransformKind"]
