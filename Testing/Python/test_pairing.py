"""PP/XP pairing by file-name affix, the convention of thin-section photo collections."""

from pathlib import Path

from thinseg.io.pairing import find_affix, pair_inputs, section_base_name


def touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(b"x")


def test_counterpart_found_from_pp_with_other_affix(tmp_path):
    touch(tmp_path, "ABC_3200.5_pp.jpg", "ABC_3200.5_c2.jpg")
    sections, problems = pair_inputs([tmp_path / "ABC_3200.5_pp.jpg"], pp_pattern="PP", xp_pattern="c2")
    assert problems == []
    assert len(sections) == 1
    assert sections[0].pp.name == "ABC_3200.5_pp.jpg" and sections[0].xp.name == "ABC_3200.5_c2.jpg"


def test_directory_pairs_each_file_once(tmp_path):
    touch(tmp_path, "a_PP.png", "a_XP.png", "b_xp.tif", "b_pp.tif", "notes.txt")
    sections, problems = pair_inputs([tmp_path], xp_pattern="XP")
    assert problems == []
    assert sorted((s.pp.name, s.xp.name) for s in sections) == [("a_PP.png", "a_XP.png"), ("b_pp.tif", "b_xp.tif")]


def test_xp_given_first_finds_pp_and_names_section_after_pp(tmp_path):
    touch(tmp_path, "s1_PX.jpg", "s1_PP.jpg")
    sections, _ = pair_inputs([tmp_path / "s1_PX.jpg", tmp_path / "s1_PP.jpg"], xp_pattern="PX")
    assert len(sections) == 1 and sections[0].name == "s1_PP"


def test_affix_is_a_token_not_a_substring():
    assert find_affix("apple_stack", "pp") is None
    assert find_affix("apple_pp", "PP").group(0) == "pp"
    assert find_affix("sample-PP-2", "pp") is not None


def test_missing_counterpart_and_unknown_role_are_reported(tmp_path):
    touch(tmp_path, "lonely_PP.png", "mystery.png")
    sections, problems = pair_inputs([tmp_path / "lonely_PP.png", tmp_path / "mystery.png", tmp_path / "gone_PP.png"])
    assert sections == []
    messages = {p.path.name: p.problem for p in problems}
    assert "XP counterpart not found" in messages["lonely_PP.png"]
    assert "neither affix" in messages["mystery.png"]
    assert messages["gone_PP.png"] == "file not found"


def test_pp_only_model_needs_no_counterpart(tmp_path):
    touch(tmp_path, "x_PP.png", "x_XP.png", "plain.png")
    sections, problems = pair_inputs([tmp_path / "x_PP.png", tmp_path / "plain.png"], needs_xp=False)
    assert [s.pp.name for s in sections] == ["x_PP.png", "plain.png"] and all(s.xp is None for s in sections)
    assert problems == []


def test_netcdf_inputs_are_sections_of_their_own(tmp_path):
    touch(tmp_path, "well_3200.nc")
    sections, problems = pair_inputs([tmp_path])
    assert problems == [] and sections[0].netcdf.name == "well_3200.nc"


def test_base_name_drops_the_affix(tmp_path):
    touch(tmp_path, "ABC_3200.5_pp.jpg", "ABC_3200.5_xp.jpg")
    (section,), _ = pair_inputs([tmp_path / "ABC_3200.5_pp.jpg"])
    assert section_base_name(section, "PP") == "ABC_3200.5"
