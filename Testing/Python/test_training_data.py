"""Training data path: sections, QEMSCAN mapping, split, caches, balanced sampler, augmentation,
void borders in the loss. Small and fast: no network is trained here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from thinseg.classes.files import default_class_table
from thinseg.classes.table import ClassTable
from thinseg.data.mapping import mapping_for
from thinseg.data.sections import open_section, synthetic_sections
from thinseg.errors import ThinSegError
from thinseg.io.netcdf import NetcdfImageSource, NetcdfWriter
from thinseg.metrics import void_border_mask
from thinseg.training import ArraySection, build_mapping, load_mapping_csv, load_split, save_split, split_names
from thinseg.training.augment import IDENTITY_JITTER, class_mix, colour_jitter, draw_augment, turn, turned_window
from thinseg.training.cache import ArrayCache, cache_key
from thinseg.training.config import AugmentConfig
from thinseg.training.dataset import PatchStream, make_loader
from thinseg.training.losses import dice_ce_loss, lovasz_softmax
from thinseg.training.sampler import PatchIndex, build_patch_index, index_cache_params
from thinseg.training.targets import prepare_section, prepare_sections, target_cache_params

TABLE = default_class_table()
NAMES = TABLE.names  # Calcite, Dolomite, Mg-Clay minerals, Pores, Quartz, Others


def _table(names: list[str]) -> ClassTable:
    return ClassTable.from_names_colors(names, ["#112233"] * len(names))


@pytest.fixture(scope="module")
def sections() -> list[ArraySection]:
    # calcite-dominated sections: the sampler must dig out the rare classes
    return synthetic_sections(2, 384, seed=3, class_weights=(0.70, 0.06, 0.06, 0.06, 0.06, 0.06))


def _stream(prepared, strength=0.75, seed=0, steps=4, roles=("PP", "XP"), augment=None, patch=64, batch=4):
    return PatchStream(
        prepared,
        roles,
        len(TABLE),
        patch_size=patch,
        batch_size=batch,
        steps=steps,
        balancing_strength=strength,
        augment=augment or AugmentConfig.none(),
        seed=seed,
    )


@pytest.fixture(scope="module")
def prepared(sections):
    return prepare_sections(sections, TABLE, patch_size=64, model_mm_per_pixel=sections[0].mm_per_pixel, void_px=1.0)


# -- QEMSCAN mapping -------------------------------------------------------------------------------


def test_qemscan_names_map_to_model_classes():
    source = _table(
        [
            "Calcita (0% a 1%MgO)",
            "Quartz",
            "Pyrite",
            "Unknown",
            "Dolomita",
            "Poros",
            "Outside sample",
            "Hematite",
            "Mg-Clay minerals",
            "Calcite (0-1% MgO)",
        ]
    )
    mapping = build_mapping(source, TABLE)
    got = dict(mapping.assignments)
    assert got == {
        "Calcita (0% a 1%MgO)": "Calcite",
        "Quartz": "Quartz",
        "Pyrite": "Others",
        "Unknown": "ignore",
        "Dolomita": "Dolomite",
        "Poros": "Pores",
        "Outside sample": "ignore",
        "Hematite": "Others",
        "Mg-Clay minerals": "Mg-Clay minerals",
        "Calcite (0-1% MgO)": "Calcite",
    }
    labels = np.arange(0, 11, dtype=np.uint8)[None, :]
    assert mapping.apply(labels).tolist() == [[0, 1, 5, 6, 0, 2, 4, 0, 6, 3, 1]]  # 0 stays ignored


def test_mapping_csv_overrides_and_rejects_unknown_classes(tmp_path):
    csv = tmp_path / "map.csv"
    csv.write_text(
        "Mineral;Class\nHematite;Quartz\nPyrite;ignore\n  calcita (0% a 1%mgo) ; Dolomite\n", encoding="utf-8"
    )
    table = load_mapping_csv(csv)
    mapping = mapping_for(_table(["Hematite", "Pyrite", "Calcita (0% a 1%MgO)", "Gypsum"]), TABLE, csv)
    assert [t for _, t in mapping.assignments] == ["Quartz", "ignore", "Dolomite", "Others"]
    assert table["hematite"] == "Quartz"
    bad = tmp_path / "bad.csv"
    bad.write_text("Hematite,Iron oxides\n", encoding="utf-8")
    with pytest.raises(ThinSegError, match="not a model class"):
        mapping_for(_table(["Hematite"]), TABLE, bad)


def test_sections_already_in_model_classes_map_to_themselves():
    mapping = mapping_for(TABLE, TABLE, None)
    assert mapping.is_identity or mapping.lut[: len(TABLE) + 1].tolist() == list(range(len(TABLE) + 1))


# -- split by section --------------------------------------------------------------------------------


def test_split_by_section_is_seeded_disjoint_and_saved(tmp_path):
    names = [f"s{i}" for i in range(10)]
    split = split_names(names, val_fraction=0.2, test_fraction=0.1, seed=7)
    assert split == split_names(list(reversed(names)), 0.2, 0.1, seed=7)  # order of input irrelevant
    assert len(split["val"]) == 2 and len(split["test"]) == 1 and len(split["train"]) == 7
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(names)
    assert split != split_names(names, 0.2, 0.1, seed=8)
    path = save_split(tmp_path / "split.json", split, seed=7)
    assert load_split(path) == split
    with pytest.raises(ThinSegError, match="unique"):
        split_names(["a", "a", "b"], 0.3)


# -- caches --------------------------------------------------------------------------------------------


def test_cache_keys_change_with_every_parameter(sections, tmp_path):
    s0, s1 = sections
    csv = tmp_path / "m.csv"
    csv.write_text("Pyrite;Quartz\n", encoding="utf-8")
    base = target_cache_params(s0, TABLE, None, 2.0, 1.0)
    variants = [
        target_cache_params(s1, TABLE, None, 2.0, 1.0),  # other data
        target_cache_params(s0, _table(NAMES[:5]), None, 2.0, 1.0),  # other classes
        target_cache_params(s0, TABLE, csv, 2.0, 1.0),  # other mapping table
        target_cache_params(s0, TABLE, None, 3.0, 1.0),  # other void width
        target_cache_params(s0, TABLE, None, 2.0, 1.5),  # other resolution
    ]
    keys = {cache_key("target", p) for p in [base, *variants]}
    assert len(keys) == 6
    csv.write_text("Pyrite;Calcite\n", encoding="utf-8")  # same file name, new content
    assert cache_key("target", target_cache_params(s0, TABLE, csv, 2.0, 1.0)) not in keys

    ibase = index_cache_params("t", 6, 64, 8)
    ivariants = [
        index_cache_params("u", 6, 64, 8),
        index_cache_params("t", 5, 64, 8),
        index_cache_params("t", 6, 96, 8),
        index_cache_params("t", 6, 64, 16),
    ]
    assert len({cache_key("patch-index", p) for p in [ibase, *ivariants]}) == 5
    assert cache_key("target", base) == cache_key("target", dict(reversed(list(base.items()))))


def test_cached_targets_and_maps_are_reused(sections, tmp_path):
    cache = ArrayCache(tmp_path / "cache")
    a = prepare_section(sections[0], TABLE, patch_size=64, model_mm_per_pixel=None, void_px=1.0, cache=cache)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2  # target .npy + patch index .npz
    b = prepare_section(sections[0], TABLE, patch_size=64, model_mm_per_pixel=None, void_px=1.0, cache=cache)
    assert isinstance(b.target, np.memmap)  # read lazily from disk
    assert np.array_equal(np.asarray(a.target), np.asarray(b.target))
    assert np.array_equal(a.index.weights, b.index.weights) and np.array_equal(a.index.row_cdf, b.index.row_cdf)
    prepare_section(sections[0], TABLE, patch_size=64, model_mm_per_pixel=None, void_px=2.0, cache=cache)
    assert len(list((tmp_path / "cache").iterdir())) == 4


# -- balanced sampler ---------------------------------------------------------------------------------


def test_probability_maps_find_a_rare_class():
    target = np.ones((200, 300), np.uint8)
    target[150:160, 40:52] = 3  # one small grain of class 3 near the bottom left
    index = build_patch_index(target, 6, footprint=64, cell=8)
    assert index.totals[1] == 0 and index.totals[2] > 0 and index.totals[0] > index.totals[2]
    rng = np.random.default_rng(0)
    for _ in range(50):
        y, x = index.position(*index.sample_cell(2, rng), rng)
        assert (target[y : y + 64, x : x + 64] == 3).any()
    # a cached index round-trips through plain arrays
    again = PatchIndex.from_arrays(index.to_arrays())
    assert again.grid == index.grid and np.array_equal(again.weights, index.weights)


def _emitted_shares(prepared, strength: float, seed: int = 0) -> np.ndarray:
    stream = _stream(prepared, strength=strength, seed=seed, steps=40, batch=4)
    counts = np.zeros(len(TABLE), np.int64)
    for _image, target, _jitter in stream.stream():
        counts += np.bincount(target.numpy().ravel(), minlength=len(TABLE) + 1)[1:]
    assert np.array_equal(counts, stream.last_stats.class_pixels)  # the accumulator saw the same
    return counts / counts.sum()


def test_balancing_moves_class_shares_towards_uniform(prepared):
    natural = _emitted_shares(prepared, 0.0)
    balanced = _emitted_shares(prepared, 1.0)
    uniform = np.full(len(TABLE), 1 / len(TABLE))
    assert natural[0] > 0.5  # calcite dominates random patches
    assert np.abs(balanced - uniform).sum() < 0.6 * np.abs(natural - uniform).sum()
    assert balanced.min() > 2 * natural.min()
    assert balanced[0] < natural[0] - 0.2


def test_streams_are_reproducible_and_differ_per_seed_and_epoch(prepared):
    def batch_list(stream):
        return [(i.clone(), t.clone(), j.clone()) for i, t, j in stream.stream()]

    a, b = batch_list(_stream(prepared, seed=5)), batch_list(_stream(prepared, seed=5))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) for x, y in zip(a, b))
    c = batch_list(_stream(prepared, seed=6))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))
    s = _stream(prepared, seed=5)
    s.set_epoch(1)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, batch_list(s)))


def test_two_workers_run_different_streams_reproducibly(prepared):
    def run() -> list[tuple[torch.Tensor, torch.Tensor]]:
        stream = _stream(prepared, seed=11, steps=4, augment=AugmentConfig())
        loader = make_loader(stream, num_workers=2)
        return [(images.clone(), target.clone()) for images, target, _ in loader]

    first, second = run(), run()
    assert len(first) == 4 and all(b[0].shape == (4, 6, 64, 64) for b in first)
    for (i1, t1), (i2, t2) in zip(first, second):
        assert torch.equal(i1, i2) and torch.equal(t1, t2)
    # batch 0 comes from worker 0, batch 1 from worker 1: different streams
    assert not torch.equal(first[0][0], first[1][0])
    # worker 0's stream is the single-process stream 0 of 2
    single = list(_stream(prepared, seed=11, steps=4, augment=AugmentConfig()).stream(worker=0, n_workers=2))
    assert torch.equal(torch.stack([s[0] for s in single[:4]]), first[0][0])


# -- augmentation --------------------------------------------------------------------------------------


def _coded_section(size: int = 96) -> ArraySection:
    """PP/XP encode the label value, so that any misregistered transform shows."""
    rng = np.random.default_rng(0)
    labels = np.kron(rng.integers(1, 7, (size // 8, size // 8)), np.ones((8, 8), np.int64)).astype(np.uint8)
    pp = np.repeat((labels * 30)[..., None], 3, axis=2).astype(np.uint8)
    xp = (255 - pp).astype(np.uint8)
    return ArraySection("coded", pp, labels, xp, class_table=TABLE)


def test_geometry_moves_pp_xp_and_labels_together():
    prepared = prepare_sections([_coded_section()], TABLE, patch_size=48, model_mm_per_pixel=None, void_px=0.0)
    cfg = AugmentConfig(brightness=0, contrast=0, saturation=0, channel_gain=0, scale=0)
    stream = _stream(prepared, strength=0.5, steps=8, augment=cfg, patch=48, batch=4)
    seen_rotations = set()
    rng = np.random.default_rng(1)
    for _ in range(12):
        aug = draw_augment(rng, cfg, 2)
        seen_rotations.add((aug.k90, aug.flip))
        image, target = stream.read_patch(prepared[0], 16, 24, aug)
        assert np.array_equal(image[0], target * 30) and np.array_equal(image[3], 255 - target * 30)
    assert len(seen_rotations) > 3


def test_zoom_resizes_images_and_labels_consistently():
    prepared = prepare_sections([_coded_section(128)], TABLE, patch_size=48, model_mm_per_pixel=None, void_px=0.0)
    stream = _stream(prepared, patch=48)
    aug = draw_augment(np.random.default_rng(0), AugmentConfig(scale=0.1), 2)
    aug.zoom = 1.1
    image, target = stream.read_patch(prepared[0], 20, 20, aug)
    assert image.shape == (6, 48, 48) and target.shape == (48, 48)
    agree = np.mean(np.abs(image[0].astype(int) - target.astype(int) * 30) <= 1)
    assert agree > 0.8  # bilinear images vs nearest labels differ only at block edges


def test_turn_is_exact_for_right_angles_and_cuts_the_centre():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 6, (40, 40)).astype(np.uint8)
    image = rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)
    assert np.array_equal(turn(labels, 0.0, 20, labels=True), labels[10:30, 10:30])
    assert np.array_equal(turn(labels, 90.0, 40, labels=True), np.rot90(labels))  # counter-clockwise
    assert np.array_equal(turn(labels, -90.0, 20, labels=True), np.rot90(labels, -1)[10:30, 10:30])
    # bilinear at pixel centres: the same pixels, up to PIL's fixed-point rounding
    diff = turn(image, 180.0, 40, labels=False).astype(int) - image[::-1, ::-1].astype(int)
    assert np.abs(diff).max() <= 1
    assert turned_window(100, 0.0) >= 100 and turned_window(100, 45.0) >= int(100 * np.sqrt(2))


def test_free_turn_moves_pp_xp_and_labels_together():
    prepared = prepare_sections([_coded_section(160)], TABLE, patch_size=48, model_mm_per_pixel=None, void_px=0.0)
    cfg = AugmentConfig(brightness=0, contrast=0, saturation=0, channel_gain=0, scale=0, rotation=45.0)
    stream = _stream(prepared, strength=0.5, steps=8, augment=cfg, patch=48, batch=4)
    plain = draw_augment(np.random.default_rng(5), cfg, 2)
    plain.angle = 0.0
    for angle in (-40.0, 17.0, 45.0):
        aug = draw_augment(np.random.default_rng(5), cfg, 2)
        aug.angle = angle
        image, target = stream.read_patch(prepared[0], 56, 56, aug)
        assert image.shape == (6, 48, 48) and target.shape == (48, 48)
        assert np.all(target > 0)  # the widened window covers the turned patch: no fill inside a section
        assert np.mean(np.abs(image[0].astype(int) - target.astype(int) * 30) <= 1) > 0.8
        assert np.mean(np.abs(image[3].astype(int) - (255 - target.astype(int) * 30)) <= 1) > 0.8
        assert not np.array_equal(target, stream.read_patch(prepared[0], 56, 56, plain)[1])
    # at the section's corner the window is cut: what the turn cannot fill is ignored, and black
    aug.angle = 45.0
    image, target = stream.read_patch(prepared[0], 0, 0, aug)
    assert np.all((target == 0) <= (image[0] == 0))


def test_free_turn_angles_are_drawn_last_in_range():
    base = AugmentConfig(gamma=0.2, blur=1.0)
    turned = AugmentConfig(gamma=0.2, blur=1.0, rotation=30.0)
    angles = []
    for seed in range(40):
        a, b = draw_augment(np.random.default_rng(seed), base, 2), draw_augment(np.random.default_rng(seed), turned, 2)
        # the other draws are unchanged: runs without turns keep their random streams
        assert (a.k90, a.flip, a.zoom, a.angle) == (b.k90, b.flip, b.zoom, 0.0) and np.array_equal(a.jitter, b.jitter)
        angles.append(b.angle)
    assert -30.0 <= min(angles) < -10.0 and 10.0 < max(angles) <= 30.0


def test_colour_jitter_matches_its_stepwise_definition():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.uniform(0, 255, (2, 6, 8, 8)).astype(np.float32))
    params = torch.tensor([[[1.03, 0.97, 1.0, 1.1, 12.0, 0.8], [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]]] * 2)
    out = colour_jitter(x.clone(), params).numpy()
    img = x[0, :3].numpy().transpose(1, 2, 0).astype(np.float64)
    g = img * np.array([1.03, 0.97, 1.0])
    g = (g - g.mean()) * 1.1 + g.mean() + 12.0
    grey = g.mean(axis=2, keepdims=True)
    g = np.clip(grey + (g - grey) * 0.8, 0, 255)
    assert np.allclose(out[0, :3].transpose(1, 2, 0), g, atol=1e-3)
    assert np.allclose(out[0, 3:], x[0, 3:].numpy())  # identity jitter on the second image
    ident = torch.from_numpy(np.tile(IDENTITY_JITTER, (2, 2, 1)))
    assert torch.equal(colour_jitter(x, ident), x)


def test_gamma_and_blur_follow_their_definitions():
    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.uniform(0, 255, (1, 6, 40, 40)).astype(np.float32))
    params = torch.from_numpy(np.tile(IDENTITY_JITTER, (1, 2, 1)))
    params[0, 0, 6] = 1.3  # gamma on PP only
    out = colour_jitter(x.clone(), params).numpy()
    assert np.allclose(out[0, :3], 255.0 * (x[0, :3].numpy() / 255.0) ** 1.3, atol=1e-2)
    assert np.allclose(out[0, 3:], x[0, 3:].numpy(), atol=1e-4)
    params = torch.from_numpy(np.tile(IDENTITY_JITTER, (1, 2, 1)))
    params[0, 1, 7] = 0.8  # blur on XP only
    out = colour_jitter(x.clone(), params).numpy()
    assert np.allclose(out[0, :3], x[0, :3].numpy(), atol=1e-4)
    reach = int(np.ceil(2.5 * float(np.float32(0.8))))  # the kernel's reach, as the float32 sigma gives it
    ref = gaussian_filter1d(
        x[0, 3:].numpy().astype(np.float64), 0.8, axis=1, truncate=(reach + 0.4) / 0.8, mode="mirror"
    )
    ref = gaussian_filter1d(ref, 0.8, axis=2, truncate=(reach + 0.4) / 0.8, mode="mirror")
    assert np.allclose(out[0, 3:], ref, atol=1e-2)
    # six colour parameters alone still work (older callers), and draws without gamma/blur stay identity
    assert torch.equal(colour_jitter(x, torch.from_numpy(np.tile(IDENTITY_JITTER[:6], (1, 2, 1)))), x)
    plain = draw_augment(np.random.default_rng(0), AugmentConfig(), 2)
    assert np.all(plain.jitter[:, 6] == 1.0) and np.all(plain.jitter[:, 7] == 0.0)
    drawn = [draw_augment(np.random.default_rng(s), AugmentConfig(gamma=0.2, blur=1.0), 2) for s in range(20)]
    gammas = np.array([d.jitter[:, 6] for d in drawn])
    sigmas = np.array([d.jitter[:, 7] for d in drawn])
    assert gammas.min() >= 0.8 - 1e-6 and gammas.max() <= 1.2 + 1e-6 and gammas.std() > 0.05
    assert 0.2 < np.mean(sigmas > 0) < 0.8 and sigmas.max() <= 1.0


def _blob_batch(rng: np.random.Generator, batch: int = 8, side: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches of square grains of classes 1-5 (0 between some), images coding patch and class."""
    cells = rng.integers(0, 6, (batch, side // 8, side // 8))
    target = torch.from_numpy(np.kron(cells, np.ones((8, 8), np.int64)).astype(np.uint8))
    images = torch.from_numpy(rng.integers(0, 256, (batch, 6, side, side)).astype(np.uint8))
    return images, target


def test_class_mix_pastes_whole_classes_of_another_patch_reproducibly():
    images, target = _blob_batch(np.random.default_rng(0))
    before = images.clone(), target.clone()
    mixed, labels = class_mix(images, target, 1.0, np.random.default_rng(7))
    assert torch.equal(images, before[0]) and torch.equal(target, before[1])  # the inputs are left alone
    again = class_mix(images, target, 1.0, np.random.default_rng(7))
    assert torch.equal(again[0], mixed) and torch.equal(again[1], labels)
    changed = 0
    for i in range(len(target)):
        moved = (labels[i] != target[i]) | (mixed[i] != images[i]).any(0)
        if not moved.any():
            continue
        changed += 1
        # every moved pixel came from one other patch, image and label from the same pixel
        sources = [j for j in range(len(target)) if j != i and torch.equal(mixed[i][:, moved], images[j][:, moved])]
        assert len(sources) == 1
        j = sources[0]
        assert torch.equal(labels[i][moved], target[j][moved])
        # whole classes: every pixel of a pasted class of the source is pasted, and nothing else
        pasted = torch.unique(target[j][moved])
        assert 0 not in pasted.tolist()
        assert torch.equal(moved, torch.isin(target[j], pasted))  # (random images: a pasted pixel always differs)
    assert changed >= 4  # share 1: most patches take something
    none = class_mix(images, target, 0.0, np.random.default_rng(7))
    assert none[0] is images and none[1] is target
    with pytest.raises(ThinSegError, match="ClassMix share"):
        class_mix(images, target, 1.5, np.random.default_rng(7))


def test_class_mix_carries_the_void_band_around_pasted_grains():
    target = torch.ones(2, 32, 32, dtype=torch.uint8)
    target[1] = 3
    target[1, 7:17, 7:17] = 0
    target[1, 8:16, 8:16] = 2  # a grain of class 2 ringed by 1 px of void, in a patch of class 3
    images = torch.stack(
        [torch.full((3, 32, 32), 10, dtype=torch.uint8), torch.full((3, 32, 32), 200, dtype=torch.uint8)]
    )
    for seed in range(40):  # until patch 0 takes class 2 alone from patch 1
        rng = np.random.default_rng(seed)
        mixed, labels = class_mix(images, target, 1.0, rng, edge=2)
        if set(torch.unique(labels[0]).tolist()) == {0, 1, 2}:
            break
    else:
        pytest.fail("no draw pasted class 2 alone")
    assert (labels[0, 8:16, 8:16] == 2).all() and (labels[0, 7:17, 7:17] != 1).all()
    assert int((labels[0] == 0).sum()) == 10 * 10 - 8 * 8  # the band came along, ignored
    # edge 2 reaches past the band, but only void moves with the grain: no class 3 comes along
    assert (mixed[0][:, 7:17, 7:17] == 200).all() and int((mixed[0] == 200).sum()) == 3 * 10 * 10
    plain = class_mix(images, target, 1.0, np.random.default_rng(seed), edge=0)[1]
    assert int((plain[0] == 0).sum()) == 0  # without an edge only the grain moves


def test_class_mix_keeps_a_batchs_expected_class_shares():
    rng = np.random.default_rng(1)
    before, after = np.zeros(6), np.zeros(6)
    for _ in range(300):
        images, target = _blob_batch(rng)
        mixed = class_mix(images, target, 0.5, rng)[1]
        before += np.bincount(target.flatten().numpy(), minlength=6)
        after += np.bincount(mixed.flatten().numpy(), minlength=6)
    shares_before, shares_after = before[1:] / before[1:].sum(), after[1:] / after[1:].sum()
    assert np.abs(shares_after - shares_before).max() < 0.005
    assert (after != before).any()


def test_pp_only_stream_feeds_three_channels(prepared):
    image, target, jitter = next(iter(_stream(prepared, roles=("PP",)).stream()))
    assert image.shape == (3, 64, 64) and jitter.shape == (1, 8)


def test_missing_xp_is_refused_for_pp_xp_models():
    s = _coded_section()
    pp_only = ArraySection("pp-only", s.source("PP").array, s.read_labels(), class_table=TABLE)
    prepared = prepare_sections([pp_only], TABLE, patch_size=48, model_mm_per_pixel=None)
    with pytest.raises(ThinSegError, match="no XP image"):
        _stream(prepared, patch=48)
    _stream(prepared, roles=("PP",), patch=48)  # fine for a PP-only model


# -- void borders --------------------------------------------------------------------------------------


def test_void_band_is_excluded_from_the_loss():
    torch.manual_seed(0)
    labels = np.ones((32, 32), np.uint8)
    labels[:, 16:] = 2
    keep = void_border_mask(labels, 2.0)
    assert not keep[:, 14:18].any() and keep[:, :14].all() and keep[:, 18:].all()
    target = torch.from_numpy(np.where(keep, labels, 0).astype(np.int64))[None]
    logits = torch.randn(1, 7, 32, 32, requires_grad=True)
    loss = dice_ce_loss(logits, target)
    loss.backward()
    band = torch.from_numpy(~keep)
    assert torch.all(logits.grad[0][:, band] == 0)  # no gradient from the band
    assert torch.any(logits.grad[0][:, ~band] != 0)
    changed = logits.detach().clone()
    changed[0][:, band] = torch.randn(7, int(band.sum())) * 50  # anything inside the band
    assert torch.allclose(dice_ce_loss(changed, target), loss.detach())
    # and the training targets carry the band as ignored pixels
    section = ArraySection("band", np.zeros((32, 32, 3), np.uint8), labels, class_table=TABLE)
    prepared = prepare_section(section, TABLE, patch_size=16, model_mm_per_pixel=None, void_px=2.0)
    assert np.array_equal(np.asarray(prepared.target) > 0, keep)


def test_loss_ignores_label_zero_and_handles_empty_batches():
    logits = torch.randn(2, 7, 8, 8, requires_grad=True)
    empty = torch.zeros(2, 8, 8, dtype=torch.long)
    loss = dice_ce_loss(logits, empty)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(logits.grad == 0)
    # a GeoSlicer-layout network (N outputs, first_label 1) scores label k on channel k - 1
    target = torch.full((1, 4, 4), 3, dtype=torch.long)
    good = torch.zeros(1, 6, 4, 4)
    good[:, 2] = 10.0
    assert float(dice_ce_loss(good, target, first_label=1)) < 0.01


def test_focal_term_scales_each_pixel_by_its_error():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 6, 6)
    target = torch.randint(0, 4, (2, 6, 6))  # some pixels 0: ignored
    uniform = torch.ones(4)
    weights = torch.tensor([0.0, 1.0, 3.0, 0.5])
    for gamma in (0.0, 2.0):
        for w in (None, weights):
            loss = dice_ce_loss(logits, target, dice_weight=0.0, focal_gamma=gamma, class_weights=w)
            expected = _focal_reference(logits, target, uniform if w is None else w, gamma)
            assert torch.allclose(loss, expected, atol=1e-6), (gamma, w)
    # every pixel's term shrinks: well-classified ones most
    assert float(dice_ce_loss(logits, target, dice_weight=0.0, focal_gamma=2.0)) < float(
        dice_ce_loss(logits, target, dice_weight=0.0)
    )


def _focal_reference(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, gamma: float) -> torch.Tensor:
    """Focal cross-entropy from its definition: sum of w * -(1 - p)^gamma log p over labelled pixels / sum of w."""
    valid = target > 0
    p_true = torch.softmax(logits, 1).gather(1, target.unsqueeze(1)).squeeze(1)[valid]
    w = weights[target][valid]
    return (w * -((1 - p_true) ** gamma) * p_true.log()).sum() / w.sum()


def test_lovasz_term_is_one_minus_iou_on_hard_predictions():
    """On one-hot predictions the Lovasz extension equals the Jaccard loss it extends, exactly."""
    rng = np.random.default_rng(4)
    truth = torch.from_numpy(rng.integers(0, 4, (2, 9, 9)))  # channel index; 0 = not classified
    valid = torch.from_numpy(rng.random((2, 9, 9)) < 0.8)
    predicted = torch.from_numpy(rng.integers(0, 4, (2, 9, 9)))
    predicted[~valid] = 3  # ignored pixels' predictions must not count
    probs = torch.nn.functional.one_hot(predicted, 4).permute(0, 3, 1, 2).double()
    ious = []
    for c in torch.unique(truth[valid]).tolist():
        t, p = (truth == c) & valid, (predicted == c) & valid
        ious.append(float((t & p).sum()) / float((t | p).sum()))
    assert float(lovasz_softmax(probs, truth, valid)) == pytest.approx(1 - np.mean(ious), abs=1e-12)
    # a perfect prediction scores 0, and the term is positive otherwise
    perfect = torch.nn.functional.one_hot(truth, 4).permute(0, 3, 1, 2).double()
    assert float(lovasz_softmax(perfect, truth, valid)) == 0.0


def test_lovasz_term_ignores_unlabelled_pixels_and_pulls_towards_the_truth():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    target = torch.randint(0, 5, (2, 8, 8))
    loss = dice_ce_loss(logits, target, dice_weight=0.0, ce_weight=0.0, lovasz_weight=1.0)
    loss.backward()
    ignored = target == 0
    grad = logits.grad.permute(1, 0, 2, 3)
    assert torch.all(grad[:, ignored] == 0)
    # the term samples every other row and column: labelled pixels there pull, the others do not
    lattice = torch.zeros_like(ignored)
    lattice[:, ::2, ::2] = True
    assert torch.all(grad[:, ~lattice] == 0)
    assert torch.all(grad[:, lattice & ~ignored].abs().sum(0) > 0)
    step = logits.detach() - 5.0 * logits.grad  # plain gradient descent lowers the term
    assert float(dice_ce_loss(step, target, dice_weight=0.0, ce_weight=0.0, lovasz_weight=1.0)) < float(loss.detach())
    both = dice_ce_loss(logits, target, lovasz_weight=0.5)  # added to Dice + CE with its weight
    off_lattice = torch.zeros_like(target)
    off_lattice[:, 1::2, 1::2] = 2  # labels only where the term does not look: it adds nothing
    assert torch.equal(dice_ce_loss(logits, off_lattice, lovasz_weight=1.0), dice_ce_loss(logits, off_lattice))
    assert torch.allclose(both, dice_ce_loss(logits, target) + 0.5 * loss.detach())


def test_label_smoothing_spreads_over_real_classes_only():
    torch.manual_seed(3)
    logits = torch.randn(2, 6, 5, 5)
    target = torch.randint(0, 6, (2, 5, 5))
    # GeoSlicer layout (channel k scores label k + 1): the same as torch's own label smoothing
    loss = dice_ce_loss(logits, target, dice_weight=0.0, first_label=1, label_smoothing=0.1)
    expected = torch.nn.functional.cross_entropy(logits, target - 1, ignore_index=-1, label_smoothing=0.1)
    assert torch.allclose(loss, expected, atol=1e-6)
    # our layout: channel 0 ("not classified") gets none of the spread
    loss = dice_ce_loss(logits, target, dice_weight=0.0, label_smoothing=0.1)
    valid = target > 0
    logp = torch.log_softmax(logits, 1)
    true = -logp.gather(1, target.unsqueeze(1)).squeeze(1)[valid]
    spread = -logp[:, 1:].mean(1)[valid]
    assert torch.allclose(loss, (0.9 * true + 0.1 * spread).mean(), atol=1e-6)
    assert torch.equal(
        dice_ce_loss(logits, target, label_smoothing=0.0), dice_ce_loss(logits, target)
    )  # off: the plain path, bit for bit


# -- sections on disk ----------------------------------------------------------------------------------


def test_netcdf_section_reads_lazily_and_maps_qemscan_names(tmp_path):
    s = synthetic_sections(1, 128, seed=9)[0]
    qem = _table(["Calcita (0% a 1%MgO)", "Dolomita", "Mg-Argilominerais", "Poros", "Quartzo", "Pirita", "Unknown"])
    labels = s.read_labels().copy()
    labels[:8] = 7  # "Unknown" -> ignored
    path = tmp_path / "sec.nc"
    with NetcdfWriter(path) as w:
        pp = w.add_rgb_image("sec_PP", s.source("PP").array, s.mm_per_pixel)
        w.add_rgb_image("sec_PX", s.source("XP").array, s.mm_per_pixel)
        w.add_labelmap("sec_qemscan", labels, qem, s.mm_per_pixel, reference=pp)
    section = open_section(path)
    assert section.vars == {"PP": "sec_PP", "XP": "sec_PX"} and section.shape == (128, 128)
    assert section.mm_per_pixel == pytest.approx(s.mm_per_pixel)
    assert np.array_equal(section.source("XP").read(10, 20, 5, 9), s.source("XP").array[10:20, 5:9])
    prepared = prepare_section(section, TABLE, patch_size=64, model_mm_per_pixel=None, void_px=0.0)
    expected = s.read_labels().copy()
    expected[:8] = 0
    assert np.array_equal(np.asarray(prepared.target), expected)
    # patches are read as regions of the file, never the whole image
    regions = []
    real_read = NetcdfImageSource.read

    def recording_read(self, y0, y1, x0=0, x1=None):
        out = real_read(self, y0, y1, x0, x1)
        regions.append(out.shape[:2])
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(NetcdfImageSource, "read", recording_read)
        list(_stream([prepared], seed=3, steps=2).stream(worker=0, n_workers=1))
    assert regions and max(h * w for h, w in regions) <= 64 * 64 < 128 * 128  # a patch, not the section
    # worker processes reopen the file themselves and read the same patches
    stream = _stream([prepared], seed=2, steps=2)
    single = [image for image, _t, _j in stream.stream(worker=1, n_workers=2)]
    batches = [images for images, _t, _j in make_loader(stream, num_workers=2)]
    assert torch.equal(batches[1], torch.stack(single))


def test_folder_section_with_label_image(tmp_path):
    s = synthetic_sections(1, 96, seed=4)[0]
    folder = tmp_path / "sec1"
    folder.mkdir()
    Image.fromarray(s.source("PP").array).save(folder / "sec1_PP.png")
    Image.fromarray(s.source("XP").array).save(folder / "sec1_XP.png")
    Image.fromarray(s.read_labels()).save(folder / "sec1_labels.png")
    section = open_section(folder)
    assert section.name == "sec1" and section.class_table.names == NAMES
    assert np.array_equal(section.read_labels(), s.read_labels())
    assert np.array_equal(section.source("XP").read(0, 96), s.source("XP").array)
    with pytest.raises(ThinSegError, match="not found"):
        open_section(tmp_path / "missing.nc")
