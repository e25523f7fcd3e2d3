"""Class files that name the codes of a mask (`value,name,color`): parsing, applying, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import REAL_CLASSES

from thinseg.classes.files import is_value_class_file, read_model_classes, read_value_classes
from thinseg.errors import ThinSegError


def write(tmp_path, text, name="classes.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_the_sandstone_class_file_maps_codes_0_to_4_onto_labels_1_to_5():
    classes = read_value_classes(REAL_CLASSES)
    assert classes.table.names == ["Matrix", "K-feldspar", "Lithic fragments", "Plagioclase", "Quartz"]
    assert classes.table.colors[0] == "#8c6e5a"
    codes = np.array([[0, 1, 2], [3, 4, 0]], np.uint8)
    assert classes.apply(codes).tolist() == [[1, 2, 3], [4, 5, 1]]
    assert classes.table.geoslicer_labels()[1] == "Matrix,1,#8c6e5a"


def test_several_codes_one_class_ignore_and_semicolons(tmp_path):
    path = write(tmp_path, "Value;Name;Color\n7;Quartz;#FFFF00\n9;Calcite;#00ffff\n8;quartz;#ffff00\n255;ignore;\n")
    classes = read_value_classes(path)
    assert classes.table.names == ["Quartz", "Calcite"]
    assert classes.table.colors == ["#ffff00", "#00ffff"]
    assert classes.apply(np.array([7, 8, 9, 255], np.uint8)).tolist() == [1, 1, 2, 0]


def test_a_code_missing_from_the_file_is_refused_with_the_values(tmp_path):
    classes = read_value_classes(write(tmp_path, "value,name,color\n0,Matrix,#000001\n1,Quartz,#ffff00\n"))
    with pytest.raises(ThinSegError, match=r"mask.tif: label values 2, 9 are not in the class file classes.csv"):
        classes.apply(np.array([0, 1, 2, 9], np.uint8), "mask.tif")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("name,color\nQuartz,#ffff00\n", "header with the columns value,name,color"),
        ("value,name,color\nx,Quartz,#ffff00\n", "line 2: value 'x' is not an integer"),
        ("value,name,color\n300,Quartz,#ffff00\n", "value 300 is outside 0..255"),
        ("value,name,color\n1,Quartz,#ffff00\n1,Calcite,#00ffff\n", "line 3: value 1 is listed twice"),
        ("value,name,color\n1,Quartz,yellow\n", "class 'Quartz' needs a colour as #rrggbb"),
        ("value,name,color\n1,ignore,\n", "names no class"),
    ],
)
def test_bad_class_files_are_refused_naming_the_file_and_line(tmp_path, text, problem):
    with pytest.raises(ThinSegError, match="classes.csv: .*" + problem.replace("(", r"\(").replace(")", r"\)")):
        read_value_classes(write(tmp_path, text))


def test_model_classes_come_from_either_kind_of_file(tmp_path):
    assert is_value_class_file(REAL_CLASSES)
    assert read_model_classes(REAL_CLASSES).names[-1] == "Quartz"
    plain = write(tmp_path, "Quartz,#ffff00\nPores,#0000ff\n", "plain.csv")
    assert not is_value_class_file(plain)
    assert read_model_classes(plain).names == ["Quartz", "Pores"]
    with pytest.raises(ThinSegError, match="class file not found"):
        read_model_classes(tmp_path / "missing.csv")
