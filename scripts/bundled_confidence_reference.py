"""Record the bundled model's confidence on its own validation sections in its meta.json.

`thinseg train` writes `confidence_reference` (see thinseg.inference.confidence) into every
model it exports. The bundled model predates that field; this script measures it the way
training does, without retraining: it regenerates the validation sections of
scripts/train_bundled_model.py (same seeds and size), runs the bundle over them with the
validation settings of training (whole sections, 512 px tiles, 32 px overlap, fp32 on the CPU)
and writes the field into meta.json, leaving model.pth and every other key as they are.

    .venv/bin/python scripts/bundled_confidence_reference.py            # about a minute on a 2-core CPU
    .venv/bin/python scripts/bundled_confidence_reference.py --check    # print, write nothing
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))

from thinseg.jsonio import write_json  # noqa: E402
from thinseg.model.bundle import load_bundle  # noqa: E402
from thinseg.model.meta import check_meta, read_meta  # noqa: E402
from thinseg.resources import default_model_dir  # noqa: E402
from thinseg.training import TrainConfig, synthetic_sections  # noqa: E402
from thinseg.training.export import BUNDLE_INPUT_NAMES  # noqa: E402
from thinseg.training.targets import prepare_sections  # noqa: E402
from thinseg.training.validate import make_val_sections, validate_with_confidence  # noqa: E402

#: What scripts/train_bundled_model.py validates on: 4 generated 1024 px sections from seed 1000.
VAL_SEEDS, VAL_SECTIONS, SIZE = 1000, 4, 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir(), help="the bundle folder")
    parser.add_argument("--check", action="store_true", help="print the reference, change nothing")
    args = parser.parse_args()

    bundle = load_bundle(args.model)
    defaults = TrainConfig(output_dir=Path("unused"), train_sections=[], val_sections=[])
    sections = synthetic_sections(VAL_SECTIONS, SIZE, seed=VAL_SEEDS, name="val")
    prepared = prepare_sections(
        sections,
        bundle.class_table,
        patch_size=None,
        model_mm_per_pixel=1.0 / bundle.pixels_per_mm if bundle.pixels_per_mm else None,
        void_px=0.0,
    )
    roles = [next(role for role, name in BUNDLE_INPUT_NAMES.items() if name == n) for n in bundle.input_names]
    metrics, reference = validate_with_confidence(
        bundle.network,
        make_val_sections(prepared, defaults.void_border_px),
        roles,
        bundle.class_table,
        tile=defaults.val_tile,
        overlap=defaults.val_overlap,
        batch_size=defaults.val_batch_size,
        device="cpu",
        precision="fp32",
        first_label=bundle.first_label,
    )
    if reference is None:
        raise SystemExit("the validation sections gave no pixels")
    field = reference.to_meta()
    print(f"validation mean IoU {metrics.mean_iou:.3f} (as in the model card's training record)")
    print(json.dumps(field, indent=2))
    if args.check:
        return
    meta_path = args.model / "meta.json"
    meta = read_meta(meta_path)
    meta["confidence_reference"] = field
    check_meta(meta, meta_path)
    write_json(meta_path, meta)
    print(f"written to {meta_path}")


if __name__ == "__main__":
    main()
