"""Grain statistics of a mineral map (labelmap) by petroscope, as a yardstick for `thinseg analyze`.

petroscope (PyPI `petroscope`, https://github.com/xubiker/petroscope) ships a GPL-3.0 licence file. It is used
here only as an independent yardstick: it runs from its own virtualenv outside this project, and thinseg neither
imports it nor contains code of it. This script imports nothing from thinseg, so it runs in that virtualenv alone.

What petroscope computes (0.0.12): `MaskPolygonProcessor.extract_polygon_data` turns every 8-connected region of each
non-zero mask value into one polygon (OpenCV contours through pixel centres, simplified by 0.5 px; regions and holes
under 30 px² of polygon area dropped; touching grains of one mineral are NOT split, grains cut by the image edge are
kept); `SegmentationStatisticsAnalyzer.analyze` then gives per class the grain count, areas, area share of the image
and of all grains, small/medium/large counts (global 33rd/67th area percentiles) and connected groups (polygons of any
class closer than 2 px, keyed by their set of classes). Value 0 is background: it gets no polygons, and its area is
the image area minus all polygon areas. petroscope measures areas only: the equivalent circular diameter
sqrt(4A/pi), perimeter and circularity 4 pi A / P² below are computed here from petroscope's polygons (shapely).

Setup (Python >= 3.10; petroscope imports torch only for its models, which this script does not load):
  python3.11 -m venv PETROSCOPE_VENV && PETROSCOPE_VENV/bin/pip install petroscope shapely
Run:
  PETROSCOPE_VENV/bin/python bench/petroscope_yardstick.py MASK.tiff OUT.json --pixel-size 0.001
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
import types
from importlib import metadata
from pathlib import Path
from typing import Any

#: Mask values of the sandstone PPL/XPL dataset (0 is matrix, cement and pores: petroscope's background).
DEFAULT_CLASSES = "0=Background,1=K-feldspar,2=Lithic fragments,3=Plagioclase,4=Quartz"
#: petroscope wants a colour per class; only its plots use them.
PALETTE = ["#000000", "#e41a1c", "#4daf4a", "#377eb8", "#ffff33", "#984ea3", "#ff7f00", "#a65628", "#f781bf"]


class YardstickError(Exception):
    """A problem with the input, reported as one line naming the file."""


def parse_classes(text: str) -> dict[int, str]:
    """`0=Background,1=Quartz` into {0: "Background", 1: "Quartz"}."""
    classes: dict[int, str] = {}
    for item in text.split(","):
        code, sep, name = item.partition("=")
        if not sep or not code.strip().isdigit() or not name.strip():
            raise argparse.ArgumentTypeError(f"expected CODE=NAME pairs separated by commas, got {item!r}")
        classes[int(code)] = name.strip()
    return classes


def import_petroscope() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType, float]:
    """petroscope's geometry, statistics and classes modules, and the seconds the import took.

    Without torch, `import petroscope.segmentation` exits the interpreter (its data balancer subclasses a torch
    Dataset at import). The analysis needs only `petroscope.segmentation.classes`, so the package is then registered
    bare (its `__init__` not run) and its submodules load from their files unchanged. petroscope also opens a log file
    in the working directory at import: the import runs in a temporary directory and that sink is removed after.
    """
    os.environ.setdefault("TQDM_DISABLE", "1")
    start = time.perf_counter()
    spec = importlib.util.find_spec("petroscope")
    if spec is None or spec.origin is None:
        raise YardstickError(f"{sys.executable}: petroscope is not installed in this environment")
    if importlib.util.find_spec("torch") is None:
        package = types.ModuleType("petroscope.segmentation")
        package.__path__ = [str(Path(spec.origin).parent / "segmentation")]
        sys.modules["petroscope.segmentation"] = package
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            from petroscope.analysis import geometry  # deferred: needs the shim above
            from petroscope.analysis import statistics as stats  # deferred: needs the shim above
            from petroscope.segmentation import classes  # deferred: needs the shim above
        finally:
            logger_module = sys.modules.get("petroscope.utils.logger")
            if logger_module is not None:
                logger_module.logger.remove()
                logger_module.logger.add(sys.stderr, level="WARNING")
            os.chdir(cwd)
    return geometry, stats, classes, time.perf_counter() - start


def read_mask(path: Path) -> Any:
    """The mask as a 2-D integer array (TIFF through tifffile, other formats through OpenCV as petroscope does)."""
    import cv2  # deferred: petroscope's environment only
    import numpy as np  # deferred: petroscope's environment only

    if not path.is_file():
        raise YardstickError(f"{path}: no such file")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile  # deferred: petroscope's environment only

        try:
            mask = tifffile.imread(str(path))
        except Exception as error:
            raise YardstickError(f"{path}: not a readable TIFF ({error})") from error
    else:
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if mask is None:
            raise YardstickError(f"{path}: not an image OpenCV can read")
    mask = np.squeeze(np.asarray(mask))
    if mask.ndim != 2:
        raise YardstickError(f"{path}: expected a single-channel label map, got shape {tuple(mask.shape)}")
    if not np.issubdtype(mask.dtype, np.integer) or mask.min() < 0 or mask.max() > 255:
        raise YardstickError(
            f"{path}: expected integer class values 0..255, got {mask.dtype} {mask.min()}..{mask.max()}"
        )
    return mask.astype(np.uint8)


def polygon_measures(polygon: Any, pixel_mm: float, shape: tuple[int, int]) -> dict[str, Any]:
    """One grain from petroscope's polygon (coordinates in pixels, through pixel centres)."""
    area_px = float(polygon.area)
    perimeter_px = float(polygon.length)  # outline plus the outlines of the holes petroscope kept
    min_x, min_y, max_x, max_y = polygon.bounds
    return {
        "area_mm2": area_px * pixel_mm**2,
        "ecd_mm": math.sqrt(4.0 * area_px / math.pi) * pixel_mm,
        "perimeter_mm": perimeter_px * pixel_mm,
        "exterior_perimeter_mm": float(polygon.exterior.length) * pixel_mm,
        "circularity": 4.0 * math.pi * area_px / perimeter_px**2 if perimeter_px > 0 else None,
        "holes": len(polygon.interiors),
        "touches_image_edge": bool(min_x <= 0 or min_y <= 0 or max_x >= shape[1] - 1 or max_y >= shape[0] - 1),
    }


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def analyse(mask_path: Path, pixel_mm: float, names: dict[int, str], options: argparse.Namespace) -> dict[str, Any]:
    """Run petroscope on the mask and gather its statistics per class, in mm."""
    import numpy as np  # deferred: petroscope's environment only

    geometry, stats, classes_module, import_s = import_petroscope()
    mask = read_mask(mask_path)
    values = sorted(int(v) for v in np.unique(mask))
    unknown = [v for v in values if v not in names]
    if unknown:
        raise YardstickError(f"{mask_path}: mask values {unknown} have no name in --classes")
    class_set = classes_module.ClassSet(
        [
            classes_module.Class(label=name, color=PALETTE[i % len(PALETTE)], code=code, name=name)
            for i, (code, name) in enumerate(sorted(names.items()))
        ]
    )
    microns_per_pixel = pixel_mm * 1000.0  # petroscope's `pixels_to_microns` is the pixel size in µm
    um2_to_mm2 = 1e-6

    start = time.perf_counter()
    processor = geometry.MaskPolygonProcessor(classes=class_set, pixels_to_microns=microns_per_pixel)
    polygon_data = processor.extract_polygon_data(
        mask=mask,
        apply_morphology_closing=options.closing,
        min_area_threshold_pixels=options.min_area_px,
        simplify_tolerance=options.simplify_px,
    )
    polygons_s = time.perf_counter() - start
    start = time.perf_counter()
    analyzer = stats.SegmentationStatisticsAnalyzer(contact_distance_pixels=options.contact_px)
    results = analyzer.analyze(polygon_data)
    statistics_s = time.perf_counter() - start

    start = time.perf_counter()
    shape = (int(mask.shape[0]), int(mask.shape[1]))
    image_mm2 = shape[0] * shape[1] * pixel_mm**2
    pixel_counts = np.bincount(mask.ravel(), minlength=256)
    individual = set(results.individual_objects or [])
    bins = results.classes_distribution.area_bins
    per_class: dict[str, Any] = {}
    for code, name in sorted(names.items()):
        if code == 0:
            continue
        polygons = polygon_data.polygons_by_class.get(code, [])
        grains = [polygon_measures(p.polygon, pixel_mm, shape) for p in polygons]
        class_stats = results.class_statistics.get(code)
        ecds = [g["ecd_mm"] for g in grains]
        circularities = [g["circularity"] for g in grains if g["circularity"] is not None]
        per_class[name] = {
            "code": code,
            "grain_count": class_stats.count if class_stats else 0,
            "total_area_mm2": class_stats.total_area * um2_to_mm2 if class_stats else 0.0,
            "area_fraction_of_image": class_stats.area_prc_of_image / 100.0 if class_stats else 0.0,
            "area_fraction_of_grains": class_stats.area_prc_of_classes / 100.0 if class_stats else 0.0,
            "mean_area_mm2": float(class_stats.mean_area) * um2_to_mm2 if class_stats else None,
            "std_area_mm2": float(class_stats.std_area) * um2_to_mm2 if class_stats else None,
            "area_bins": {size: int(bins.get(size, {}).get(code, 0)) for size in ("small", "medium", "large")},
            "individual_grain_count": sum(1 for p in polygons if p.id in individual),
            "derived_from_petroscope_polygons": {
                "mean_ecd_mm": _mean(ecds),
                "median_ecd_mm": _median(ecds),
                "mean_perimeter_mm": _mean([g["perimeter_mm"] for g in grains]),
                "mean_exterior_perimeter_mm": _mean([g["exterior_perimeter_mm"] for g in grains]),
                "mean_circularity": _mean(circularities),
                "median_circularity": _median(circularities),
                "grains_touching_image_edge": sum(1 for g in grains if g["touches_image_edge"]),
            },
            "mask_pixels_reference": {
                "area_mm2": int(pixel_counts[code]) * pixel_mm**2,
                "area_fraction_of_image": int(pixel_counts[code]) / (shape[0] * shape[1]),
            },
            "grains": grains,
        }
    background = results.class_statistics.get(0)
    groups = []
    for combination, group in (results.connected_object_groups_statistics or {}).items():
        groups.append(
            {
                "classes": [names[int(c)] for c in sorted(combination)],
                "group_count": group.connected_objects_count,
                "grain_count": sum(
                    len(ids) for ids in results.connected_object_groups.groups_by_class_combination[combination]
                ),
                "total_area_mm2": group.total_area * um2_to_mm2,
                "area_fraction_of_image": group.area_prc_of_image / 100.0,
                "mean_group_area_mm2": float(group.mean_connected_object_area) * um2_to_mm2,
                "class_area_fraction_within_group": {
                    names[int(c)]: share / 100.0 for c, share in sorted(group.class_area_prc_within_group.items())
                },
            }
        )
    groups.sort(key=lambda g: -g["total_area_mm2"])
    derived_s = time.perf_counter() - start

    return {
        "tool": "petroscope",
        "petroscope_version": metadata.version("petroscope"),
        "petroscope_licence": licence_title(),
        "mask": str(mask_path),
        "image_shape": list(shape),
        "pixel_size_mm": pixel_mm,
        "image_area_mm2": image_mm2,
        "parameters": {
            "min_area_threshold_pixels": options.min_area_px,
            "simplify_tolerance_pixels": options.simplify_px,
            "apply_morphology_closing": options.closing,
            "contact_distance_pixels": options.contact_px,
        },
        "classes": per_class,
        "background": {
            "name": names.get(0, "Background"),
            "area_mm2": background.total_area * um2_to_mm2 if background else None,
            "area_fraction_of_image": background.area_prc_of_image / 100.0 if background else None,
            "mask_pixels_reference_area_fraction": int(pixel_counts[0]) / (shape[0] * shape[1]),
        },
        "connected_groups": groups,
        "individual_grain_count": len(individual),
        "grain_count": len(polygon_data.polygons),
        "timing_s": {
            "import": import_s,
            "polygons": polygons_s,
            "statistics": statistics_s,
            "derived_measures": derived_s,
            "analysis_total": polygons_s + statistics_s,
        },
    }


def licence_title() -> str:
    """The first line of the licence file petroscope's wheel installs (GPL-3.0 for 0.0.12)."""
    for file in metadata.distribution("petroscope").files or []:
        if Path(str(file)).name.upper().startswith(("LICENSE", "LICENCE", "COPYING")):
            text = Path(str(file.locate())).read_text(encoding="utf-8", errors="replace")
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            return " ".join(lines[:2]) if lines else ""
    return "no licence file installed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mask", type=Path, help="label map (TIFF or PNG), one integer value per class")
    parser.add_argument("output", type=Path, help="JSON file to write")
    parser.add_argument("--pixel-size", type=float, default=0.001, help="pixel size in mm (default 0.001, assumed)")
    parser.add_argument("--classes", type=parse_classes, default=parse_classes(DEFAULT_CLASSES), help="CODE=NAME,...")
    parser.add_argument("--min-area-px", type=float, default=30.0, help="petroscope's minimum grain/hole area (px²)")
    parser.add_argument("--simplify-px", type=float, default=0.5, help="petroscope's polygon simplification (px)")
    parser.add_argument("--contact-px", type=float, default=2.0, help="petroscope's contact distance for groups (px)")
    parser.add_argument("--closing", action="store_true", help="petroscope's optional 3x3 closing per class")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    options = parser.parse_args(argv)
    try:
        if not (options.pixel_size > 0 and math.isfinite(options.pixel_size)):
            raise YardstickError(f"{options.mask}: --pixel-size must be a positive number of mm")
        if options.output.exists() and not options.overwrite:
            raise YardstickError(f"{options.output}: exists (use --overwrite)")
        report = analyse(options.mask, options.pixel_size, options.classes, options)
        options.output.parent.mkdir(parents=True, exist_ok=True)
        partial = options.output.with_name(options.output.name + ".partial")
        partial.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        os.replace(partial, options.output)
    except YardstickError as error:
        print(f"petroscope_yardstick: error: {error}", file=sys.stderr)
        return 2
    summary = {name: (c["grain_count"], round(c["total_area_mm2"], 4)) for name, c in report["classes"].items()}
    print(f"{options.output}: petroscope {report['petroscope_version']}, grains and mm² per class {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
