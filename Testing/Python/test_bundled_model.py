"""The bundled model on generated sections: no seams, right classes, GeoSlicer bundle layout."""

import json

import numpy as np
import pytest
import torch

from thinseg.classes.files import default_class_table
from thinseg.inference import InferenceOptions, Segmenter
from thinseg.io.images import ArraySource
from thinseg.model.bundle import load_bundle
from thinseg.resources import default_model_dir
from thinseg.synth import generate_section


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(default_model_dir())


@pytest.fixture(scope="module")
def section():
    return generate_section(768, 1024, seed=31337)  # a seed no training/validation/test set used


def test_bundle_is_what_the_readme_promises(bundle):
    assert bundle.input_names == ["PP", "PX"] and bundle.in_channels == 6
    assert bundle.class_table == default_class_table()
    assert abs(bundle.pixels_per_mm - 1 / 0.00132) < 1e-6
    meta = json.loads((default_model_dir() / "meta.json").read_text())
    assert meta["outputs"]["y"]["class_names"] == list(default_class_table().names)
    assert (default_model_dir() / "MODEL_CARD.md").is_file()


def test_tiled_output_has_no_seams(bundle, section):
    """Tiles blended over the section give the labels of one whole-image forward pass."""
    seg = Segmenter(bundle, InferenceOptions(device="cpu", tile=512, overlap=64, batch_size=2))
    result = seg.segment([ArraySource(section.pp), ArraySource(section.xp)])
    assert result.tiles == 6  # 768 x 1024 with 512 px tiles: 2 x 3 tiles, so seams would show
    tiled = result.labels
    x = bundle.prepare([torch.from_numpy(a).permute(2, 0, 1)[None] for a in (section.pp, section.xp)])
    with torch.inference_mode():
        whole = bundle.logits_to_labels(bundle.network.eval()(x))[0].numpy()
    agreement = (tiled == whole).mean()
    assert agreement > 0.995, agreement
    # and disagreements are not concentrated on tile borders (what a seam would look like)
    differ = tiled != whole
    border = np.zeros_like(differ)
    for y in (256, 512):  # tile edges of the plan are near these rows/columns
        border[max(0, y - 8) : y + 8] = True
    for x in (256, 512, 768):
        border[:, max(0, x - 8) : x + 8] = True
    assert differ[border].mean() < 0.02


def test_model_recognises_the_generated_minerals(bundle, section):
    labels = (
        Segmenter(bundle, InferenceOptions(device="cpu"))
        .segment([ArraySource(section.pp), ArraySource(section.xp)])
        .labels
    )
    accuracy = (labels == section.labels).mean()
    assert accuracy > 0.8, accuracy
    # every class is found where it is present
    for k in range(1, 7):
        truth = section.labels == k
        if truth.sum() > 2000:
            assert (labels[truth] == k).mean() > 0.5, default_class_table().names[k - 1]
