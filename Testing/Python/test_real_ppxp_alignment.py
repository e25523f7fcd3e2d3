"""The PP/XP check on REAL sandstone fields (the shared PPL/XPL sandstone photographs, see
`helpers.real_field`): the XPL photograph of every field is offset from the PPL one by a stage
shift of about 4 rows and 9 columns (the data's README quotes the correction, (-4, -9)); in
field 5a the stage was also turned by about 3 degrees.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import read_rgb, real_field

from thinseg.registration.ppxp import MIN_SCORE, estimate_xp_alignment, estimate_xp_offset


@pytest.mark.parametrize("field", ["2a", "4a", "8a", "10a"])
def test_the_stage_shift_of_real_fields_is_found_and_undone(field):
    files = real_field(field)
    pp, xp = read_rgb(files["pp"]), read_rgb(files["xp"])
    a = estimate_xp_alignment(pp, xp)
    assert a.reliable and a.angle_deg == 0.0
    # xp[y, x] shows pp[y - dy, x - dx]: XP content sits 3-4 rows lower and 8-10 columns to the right
    assert 3 <= a.dy <= 4 and 8 <= a.dx <= 10, a
    aligned = a.apply(xp)
    dy, dx, _ = estimate_xp_offset(pp, aligned)
    assert (dy, dx) == (0, 0)
    # the correction the data's README quotes: XP read 4 rows down and 9 columns right of each pixel
    assert np.array_equal(aligned[:-10, :-10], xp[int(a.dy) : -10 + int(a.dy), int(a.dx) : -10 + int(a.dx)])


def test_a_turned_stage_is_found_too():
    files = real_field("5a")
    pp, xp = read_rgb(files["pp"]), read_rgb(files["xp"])
    assert not estimate_xp_alignment(pp, xp, max_rotation_deg=0).reliable  # a shift alone does not explain 5a
    a = estimate_xp_alignment(pp, xp)
    assert a.reliable and -4.0 <= a.angle_deg <= -2.5, a
    after = estimate_xp_alignment(pp, a.apply(xp), max_rotation_deg=0)
    assert after.reliable and (after.dy, after.dx) == (0, 0) and after.score > 3 * MIN_SCORE


def test_unrelated_fields_are_not_aligned():
    pp = read_rgb(real_field("2a")["pp"])
    xp = read_rgb(real_field("9a")["xp"])
    a = estimate_xp_alignment(pp, xp)
    assert not a.reliable and a.is_identity
    assert a.apply(xp) is xp
    assert "do not match" in a.describe()
