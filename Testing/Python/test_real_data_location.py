"""The real-data tests find the shared sandstone fields wherever the repository is cloned, and
say where they looked (and which variable to set) instead of skipping in silence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REAL_DATA, REAL_DATA_VARIABLE

HERE = Path(__file__).resolve().parent


def _collect_skips(data_dir: str) -> str:
    env = dict(os.environ, **{REAL_DATA_VARIABLE: data_dir})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_real_ppxp_alignment.py"],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
    )
    return proc.stdout


def test_a_missing_folder_is_named_with_the_variable_that_points_elsewhere(tmp_path):
    missing = tmp_path / "no-such-folder"
    out = _collect_skips(str(missing))
    assert f"looked in: {missing}" in out and f"set {REAL_DATA_VARIABLE}=FOLDER" in out, out
    assert " passed" not in out


def test_the_variable_points_the_tests_at_the_data():
    if not (REAL_DATA / "ppl").is_dir():
        pytest.skip(f"real sandstone data not found; set {REAL_DATA_VARIABLE}=FOLDER")
    out = _collect_skips(str(REAL_DATA))
    assert "6 passed" in out and "skipped" not in out, out
