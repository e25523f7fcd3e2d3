"""PP/XP pairing by file-name affix, the convention of thin-section photo collections."""

from pathlib import Path

import pytest

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


# ---------------------------------------------------------------------------------------------
# --xp FILE: one pair given explicitly, names decide nothing


def test_explicit_xp_pairs_any_names(tmp_path):
    touch(tmp_path, "field 7 plane.png", "crossed-7.jpg")
    sections, problems = pair_inputs([tmp_path / "field 7 plane.png"], xp=tmp_path / "crossed-7.jpg")
    assert problems == []
    assert [(s.name, s.pp, s.xp) for s in sections] == [
        ("field 7 plane", tmp_path / "field 7 plane.png", tmp_path / "crossed-7.jpg")
    ]


def test_explicit_xp_wins_over_affixes(tmp_path):
    """`--xp` is the XP image even when the name of INPUT says XP and a PP counterpart exists."""
    touch(tmp_path, "s_XP.png", "s_PP.png", "other.png")
    sections, problems = pair_inputs([tmp_path / "s_XP.png"], xp=tmp_path / "other.png")
    assert problems == [] and (sections[0].pp.name, sections[0].xp.name) == ("s_XP.png", "other.png")


@pytest.mark.parametrize(
    "inputs, xp, needs_xp, expected",
    [
        (["a.png", "b.png"], "x.png", True, "--xp pairs one PP image (PNG, JPEG or TIFF) with XP; INPUT gave 2 files"),
        (["."], "x.png", True, "--xp pairs one PP image (PNG, JPEG or TIFF) with XP; INPUT gave 4 files"),
        (["s.nc"], "x.png", True, "--xp pairs one PP image (PNG, JPEG or TIFF) with XP; INPUT gave a .nc file"),
        (["a.png"], "gone.png", True, "XP image file (--xp) not found"),
        (["a.png"], "a.png", True, "--xp names the PP image itself"),
        (["a.png"], "s.nc", True, "unsupported XP file type '.nc' (PNG, JPEG or TIFF expected)"),
        (["a.png"], "x.png", False, "this model takes the PP image only: leave out --xp"),
    ],
)
def test_explicit_xp_refuses_what_it_cannot_pair(tmp_path, inputs, xp, needs_xp, expected):
    touch(tmp_path, "a.png", "b.png", "x.png", "s.nc")
    sections, problems = pair_inputs([tmp_path / i for i in inputs], xp=tmp_path / xp, needs_xp=needs_xp)
    assert sections == [] and [p.problem for p in problems] == [expected]


# ---------------------------------------------------------------------------------------------
# PP and XP in separate folders (ppl/ and xpl/ of one collection)


def collection(tmp_path: Path, layout: dict[str, list[str]]) -> Path:
    for folder, names in layout.items():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        touch(tmp_path / folder, *names)
    return tmp_path


def test_xp_found_in_a_folder_beside_the_pp_folder(tmp_path):
    root = collection(tmp_path, {"ppl": ["s1_PP.jpg", "s2_PP.jpg"], "xpl": ["s1_XP.jpg", "s2_XP.jpg"], "masks": []})
    sections, problems = pair_inputs([root / "ppl"])
    assert problems == []
    assert [(s.pp, s.xp) for s in sections] == [
        (root / "ppl" / "s1_PP.jpg", root / "xpl" / "s1_XP.jpg"),
        (root / "ppl" / "s2_PP.jpg", root / "xpl" / "s2_XP.jpg"),
    ]


def test_both_folders_given_pair_each_section_once(tmp_path):
    root = collection(tmp_path, {"ppl": ["s1_PP.jpg", "s2_PP.jpg"], "xpl": ["s1_XP.jpg", "s2_XP.jpg"]})
    sections, problems = pair_inputs([root / "xpl", root / "ppl"])
    assert problems == []
    assert sorted((s.name, s.pp.parent.name, s.xp.parent.name) for s in sections) == [
        ("s1_PP", "ppl", "xpl"),
        ("s2_PP", "ppl", "xpl"),
    ]


def test_counterpart_beside_the_file_wins_over_other_folders(tmp_path):
    root = collection(tmp_path, {"ppl": ["s1_PP.jpg", "s1_XP.jpg"], "xpl": ["s1_XP.jpg"]})
    sections, _ = pair_inputs([root / "ppl" / "s1_PP.jpg"])
    assert sections[0].xp == root / "ppl" / "s1_XP.jpg"


def test_counterpart_in_two_sibling_folders_is_refused_and_xp_dir_decides(tmp_path):
    root = collection(tmp_path, {"ppl": ["s1_PP.jpg"], "xpl": ["s1_XP.jpg"], "xpl_old": ["s1_XP.jpg"]})
    sections, problems = pair_inputs([root / "ppl" / "s1_PP.jpg"])
    assert sections == []
    assert problems[0].problem == (
        f"XP counterpart found in several folders ({root / 'xpl' / 's1_XP.jpg'}, {root / 'xpl_old' / 's1_XP.jpg'}): "
        "give the folder with --xp-dir or the file with --xp"
    )
    sections, problems = pair_inputs([root / "ppl" / "s1_PP.jpg"], xp_dir=root / "xpl_old")
    assert problems == [] and sections[0].xp == root / "xpl_old" / "s1_XP.jpg"


def test_xp_dir_anywhere_and_a_missing_one(tmp_path):
    root = collection(tmp_path, {"photos/plane": ["s1_PP.jpg"], "elsewhere/crossed": ["s1_XP.jpg"]})
    sections, problems = pair_inputs([root / "photos" / "plane"], xp_dir=root / "elsewhere" / "crossed")
    assert problems == [] and sections[0].xp == root / "elsewhere" / "crossed" / "s1_XP.jpg"
    touch(root / "photos" / "plane", "s2_PP.jpg")
    sections, problems = pair_inputs([root / "photos" / "plane" / "s2_PP.jpg"], xp_dir=root / "elsewhere" / "crossed")
    assert sections == [] and problems[0].problem == (
        f"XP counterpart not found (expected s2_XP.jpg beside it or in {root / 'elsewhere' / 'crossed'})"
    )
    sections, problems = pair_inputs([root / "photos" / "plane"], xp_dir=root / "nowhere")
    assert sections == [] and [(p.path, p.problem) for p in problems] == [
        (root / "nowhere", "XP folder (--xp-dir) not found")
    ]


def test_pp_found_in_a_sibling_folder_for_an_xp_input(tmp_path):
    root = collection(tmp_path, {"ppl": ["s1_PP.jpg"], "xpl": ["s1_XP.jpg"]})
    sections, problems = pair_inputs([root / "xpl" / "s1_XP.jpg"])
    assert problems == [] and (sections[0].pp, sections[0].xp) == (
        root / "ppl" / "s1_PP.jpg",
        root / "xpl" / "s1_XP.jpg",
    )


# ---------------------------------------------------------------------------------------------
# a missing counterpart: the message says which affix would have found it


def alone(tmp_path: Path) -> Path:
    """A folder with no other folder beside it: only the folder itself is searched."""
    folder = tmp_path / "photos"
    folder.mkdir()
    return folder


def test_missing_xp_suggests_the_affix_of_the_file_that_is_there(tmp_path):
    folder = alone(tmp_path)
    touch(folder, "S1_PP.tif", "S1_PX.tif")
    _, problems = pair_inputs([folder / "S1_PP.tif"])
    assert problems[0].problem == (
        "XP counterpart not found (expected S1_XP.tif beside it); found S1_PX.tif: use --xp-pattern PX"
    )


def test_missing_xp_suggestion_looks_in_sibling_folders_and_names_them(tmp_path):
    root = collection(tmp_path, {"ppl": ["a_PP_01.png"], "xpl": ["a_c2_01.png"]})
    _, problems = pair_inputs([root / "ppl" / "a_PP_01.png"])
    assert problems[0].problem == (
        "XP counterpart not found (expected a_XP_01.png beside it); found xpl/a_c2_01.png: use --xp-pattern c2"
    )


def test_missing_pp_suggests_the_pp_affix(tmp_path):
    folder = alone(tmp_path)
    touch(folder, "S2_XP.png", "S2_PPL.png")
    _, problems = pair_inputs([folder / "S2_XP.png"])
    assert problems[0].problem == (
        "PP counterpart not found (expected S2_PP.png beside it); found S2_PPL.png: use --pp-pattern PPL"
    )


def test_several_candidates_are_listed_and_the_photo_type_preferred(tmp_path):
    folder = alone(tmp_path)
    touch(folder, "S3_PP.png", "S3_PX.tif", "S3_c2.tif", "S3_mask.tif")
    _, problems = pair_inputs([folder / "S3_PP.png"])
    assert problems[0].problem == (
        "XP counterpart not found (expected S3_XP.png beside it); found S3_PX.tif, S3_c2.tif, S3_mask.tif: "
        "give the counterpart's affix with --xp-pattern"
    )
    touch(folder, "S4_PP.jpg", "S4_PX.jpg", "S4_mask.tif")  # photographs share a type, a mask does not
    _, problems = pair_inputs([folder / "S4_PP.jpg"])
    assert problems[0].problem.endswith("found S4_PX.jpg: use --xp-pattern PX")


def test_no_suggestion_when_nothing_is_named_alike(tmp_path):
    folder = alone(tmp_path)
    touch(folder, "S5_PP.png", "S6_XP.png")
    _, problems = pair_inputs([folder / "S5_PP.png"])
    assert problems[0].problem == "XP counterpart not found (expected S5_XP.png beside it)"


def test_name_with_neither_affix_gets_both_options_suggested(tmp_path):
    root = collection(tmp_path, {"ppl": ["2a_paralelos.jpg"], "xpl": ["2a_cruzados.jpg"], "masks": ["2a_mascara.tiff"]})
    _, problems = pair_inputs([root / "ppl" / "2a_paralelos.jpg"])
    assert problems[0].problem == (
        "cannot tell whether this is PP or XP: its name has neither affix 'PP' nor 'XP' "
        "(see --pp-pattern/--xp-pattern); found xpl/2a_cruzados.jpg: use --pp-pattern paralelos --xp-pattern cruzados"
    )
    sections, problems = pair_inputs([root / "ppl"], pp_pattern="paralelos", xp_pattern="cruzados")
    assert problems == [] and sections[0].xp == root / "xpl" / "2a_cruzados.jpg"


def test_a_folder_among_many_is_not_a_collection(tmp_path):
    """Beside a home folder's Desktop lie Documents, Downloads ...: an XP image named alike in one
    of them is not taken (a wrong pair is worse than none); --xp-dir or --xp says where it is."""
    names = ["Desktop", "Documents", "Downloads", "Music", "Pictures", "Public", "Templates", "Videos", "Books", "work"]
    root = collection(tmp_path, {name: [] for name in names})
    touch(root / "Desktop", "S1_PP.tif")
    touch(root / "Downloads", "S1_XP.tif")
    sections, problems = pair_inputs([root / "Desktop" / "S1_PP.tif"])
    assert sections == [] and problems[0].problem == (
        "XP counterpart not found (expected S1_XP.tif beside it; the more than 8 folders beside its folder are "
        "not searched: give the XP folder with --xp-dir)"
    )
    sections, problems = pair_inputs([root / "Desktop" / "S1_PP.tif"], xp_dir=root / "Downloads")
    assert problems == [] and sections[0].xp == root / "Downloads" / "S1_XP.tif"
    (root / "work").rmdir()  # eight folders beside it: one collection's
    sections, problems = pair_inputs([root / "Desktop" / "S1_PP.tif"])
    assert problems == [] and sections[0].xp == root / "Downloads" / "S1_XP.tif"
