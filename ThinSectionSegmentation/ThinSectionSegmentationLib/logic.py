"""ThinSectionSegmentationLogic: the scriptable MRML logic behind the panel (no Qt).

Console use (slicer.mrmlScene) or any vtkMRMLScene:

    from ThinSectionSegmentationLib import ThinSectionSegmentationLogic
    logic = ThinSectionSegmentationLogic()
    result = logic.segment(ppNode, xpNode)          # in-process: result.labelmap, .table, .chart, ...
    registration = logic.register(ppNode, qemscanNode, (ppPoints, qemscanPoints))
    logic.exportNetcdf([ppNode, xpNode, result.labelmap], "/data/S12.nc")
    imported = logic.importNetcdf("/data/S12.nc")   # imported.nodes, .pp, .xp
    batch = logic.segmentFiles(["/data/well-A"], "/data/results")
    grains = logic.analyzeGrains(result.labelmap)   # grains.grains, .summary, .contacts, .sizeChart, ...
    stitched = logic.stitchTiles(["/data/S1_tiles"], "/data/S1_stitched")  # .ppNode, .xpNode, .tableNode

Every operation returns what it made (a typed result); the logic keeps no "last result" state.
The panel runs the same work in a separate process: prepareX() exports the inputs and writes the
job (nothing in the scene changes), startJob() runs `python -m thinseg.jobs` with
process.BackgroundProcess, and finishX() imports the outputs. Cancelling is discardJob(): the
scene is left exactly as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer

from thinseg import jobs
from thinseg.classes.files import default_class_table, read_model_classes
from thinseg.classes.table import ClassTable
from thinseg.data.mapping import build_mapping, load_mapping_csv
from thinseg.data.section_images import DEFAULT_MM_PER_PIXEL
from thinseg.errors import ThinSegError
from thinseg.io.netcdf import list_variables, open_netcdf_image, read_labelmap
from thinseg.io.pairing import find_affix
from thinseg.jsonio import write_json
from thinseg.pipelines.outputs import safe_file_name
from thinseg.resources import default_model_dir

from . import hierarchy, models, netcdf_nodes, process, results
from .labelmaps import (
    class_table_from_color_node,
    create_labelmap,
    labelmap_class_table,
    labelmap_to_segmentation,
    set_reference,
)
from .netcdf_nodes import find_pp_xp, referenced_images
from .parameters import TrainingRecipe, get_parameter_node
from .registration_nodes import create_transform_node, landmarks_from_markups, residual_table
from .volumes import (
    UNKNOWN_SPACING_MM,
    create_rgb_volume,
    create_scalar_volume,
    label_array,
    require_thin_section_geometry,
    resampling_messages,
    rgb_array,
    section_grid,
)

MODEL_ATTRIBUTE = "ThinSectionSegmentation.Model"
FRACTIONS_REFERENCE = "ThinSectionSegmentation.Fractions"
CHART_REFERENCE = "ThinSectionSegmentation.FractionsChart"


def base_name(node, pp_pattern: str = "PP") -> str:
    """Node name without the PP affix: 'S12_PP' -> 'S12' (results are named after it)."""
    name = node.GetName()
    match = find_affix(name, pp_pattern)
    if match is None:
        return name
    head, tail = name[: match.start()].rstrip("_-. "), name[match.end() :].lstrip("_-. ")
    return "_".join(p for p in (head, tail) if p) or name


@dataclass
class SegmentationOutput:
    """What a segmentation made: the labelmap (named after the input, with the class colours),
    the area fractions table and bar chart, and the confidence map / segmentation when asked for;
    `messages`: what the user should read about this result (e.g. that the map is unreliable)."""

    labelmap: object
    table: object
    chart: object
    confidence: object | None = None
    segmentation: object | None = None
    messages: list[str] = field(default_factory=list)


@dataclass
class RegistrationOutput:
    """What a registration made: the transform node, the QEMSCAN labelmap on the PP grid, the
    landmark residual table (with landmarks), the warnings and the core's summary."""

    transform: object
    labelmap: object
    residuals: object | None = None
    warnings: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    xpAligned: object | None = None  # XP moved onto the PP grid, when the two photographs were offset


@dataclass
class TrainingOutput:
    """A finished training: the new model folder (listed by availableModels from now on) and
    the training summary (best epoch and its validation mean IoU, epochs run, early stop)."""

    modelDir: Path
    summary: dict = field(default_factory=dict)

    @property
    def statusText(self) -> str:
        """One line for the panel: the new model, and how well it validated."""
        scores = self.summary.get("member_val_mean_iou")
        best, epoch = self.summary.get("best_mean_iou"), self.summary.get("best_epoch")
        if scores:
            shown = ", ".join(f"{score:.3f}" for score in scores)
            return f"New model: {self.modelDir} (an average of {len(scores)} trainings; validation mean IoU {shown})"
        if best is not None and epoch is not None:
            return f"New model: {self.modelDir} (epoch {epoch}; validation mean IoU {best:.3f})"
        return f"New model: {self.modelDir}"


@dataclass
class BatchOutput:
    """A batch segmentation of files: the sections segmented, (file, problem) for each that was
    not, and the files imported into the scene (with load=True)."""

    results: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    imported: list[netcdf_nodes.ImportedFile] = field(default_factory=list)


@dataclass
class GrainAnalysisOutput:
    """What a grain analysis made, in one subject-hierarchy folder (`folder`) beside its input:
    the grain table (one row per grain), the per-class summary, the class contact table, the
    cumulative grain-size chart and the modal mineralogy chart; `grainCount` grains in all,
    `statistics` the core's summary (summary.json's content), `nodes` every node made."""

    grains: object
    summary: object
    contacts: object
    sizeChart: object
    modalChart: object
    folder: int
    grainCount: int
    statistics: dict = field(default_factory=dict)
    nodes: list = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


@dataclass
class StitchOutput:
    """What a stitch made: the PP and XP panoramas (vector volumes "<name>_PP", "<name>_XP", read
    from the netCDF written), the tile table "<name> tiles", all in the subject-hierarchy folder
    `hierarchyFolder`; `folder` the output folder on disk and `files` its files by kind (pp_tiff,
    xp_tiff, netcdf, positions, tile_map, summary), `summary` stitch.json's content, `warnings`
    what the user should read, `nodes` every node made."""

    ppNode: object
    xpNode: object | None
    tableNode: object
    folder: Path
    files: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    nodes: list = field(default_factory=list)
    name: str = ""
    hierarchyFolder: int = 0


@dataclass
class Job:
    """A background job: its folder (inputs, job.json, outputs), command and what to import."""

    kind: str  # "segment" | "register" | "train"
    folder: Path
    command: list[str]
    info: dict = field(default_factory=dict)

    def start(self) -> process.BackgroundProcess:
        """Run the job's command in the background (see process.BackgroundProcess)."""
        return process.BackgroundProcess(self.command, cwd=self.folder).start()


class ThinSectionSegmentationLogic:
    """Scene-level operations; `scene` defaults to slicer.mrmlScene."""

    def __init__(self, scene=None) -> None:
        self._scene = scene
        self.messages: list[str] = []

    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        return slicer.mrmlScene

    # -- parameters and models ------------------------------------------------------------------

    def getParameterNode(self):
        """The scene's typed parameter node (see parameters.py), created with its defaults."""
        return get_parameter_node(self.scene)

    def chooseInputImages(self, params) -> None:
        """Fill in PP (and XP) when none is chosen yet: the RGB volumes whose names carry the PP
        and XP affixes, else the first RGB volume as PP."""
        if params.ppVolume is not None:
            return
        images = [
            self.scene.GetNthNodeByClass(i, "vtkMRMLVectorVolumeNode")
            for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLVectorVolumeNode"))
        ]
        pp, xp = find_pp_xp(images, params.ppPattern, (params.xpPattern, "PX"))
        pp = pp or (images[0] if images else None)
        if pp is not None:
            params.ppVolume = pp
        if xp is not None and params.xpVolume is None:
            params.xpVolume = xp

    def modelInfo(self, modelDir) -> models.ModelInfo:
        return models.read_model_info(modelDir)

    def availableModels(
        self, userRoots: Iterable[str] = (), geoslicerRoots: Iterable[str] = ()
    ) -> list[models.ModelInfo]:
        """The model list; `geoslicerRoots`: GeoSlicer's model roots (its "AIModelsPaths" setting)."""
        return models.list_models(userRoots, geoslicerRoots)

    def modelCard(self, modelDir) -> str:
        return models.model_card(modelDir)

    def defaultModelDir(self) -> Path:
        return default_model_dir()

    # -- shared helpers -------------------------------------------------------------------------

    def imageSpacing(self, node, mmPerPixel: float | None = None) -> float:
        """Pixel size (mm) of an image node with square pixels: `mmPerPixel` if given, the
        node's spacing, or the core's default when the node has Slicer's 1 mm placeholder (a
        file without pixel size). Non-square pixels are refused (see imageSpacingYX)."""
        if mmPerPixel:
            return float(mmPerPixel)
        spacing_y, spacing_x = self.imageSpacingYX(node)
        if abs(spacing_y - spacing_x) > 1e-6 * max(spacing_x, spacing_y):
            require_thin_section_geometry(node, "image")  # says which pixel sizes it has
        return spacing_x

    def imageSpacingYX(self, node, mmPerPixel: float | None = None) -> tuple[float, float]:
        """Pixel size (mm) down the rows and across the columns of an image node's picture (as
        Slicer shows it): `mmPerPixel` (square) if given, the node's, or the core's default when
        the node has Slicer's 1 mm placeholder."""
        if mmPerPixel:
            return float(mmPerPixel), float(mmPerPixel)
        spacing_y, spacing_x = section_grid(node, "image").spacing_yx
        if abs(spacing_x - UNKNOWN_SPACING_MM) < 1e-12 and abs(spacing_y - UNKNOWN_SPACING_MM) < 1e-12:
            self.messages.append(
                f"'{node.GetName()}' has no pixel size (1 mm is Slicer's placeholder); using {DEFAULT_MM_PER_PIXEL} mm"
            )
            return DEFAULT_MM_PER_PIXEL, DEFAULT_MM_PER_PIXEL
        return spacing_y, spacing_x

    def _check_xp(self, ppNode, xpNode, needs_xp: bool, model_title: str) -> None:
        if ppNode is None:
            raise ThinSegError("choose a PP image")
        if needs_xp and xpNode is None:
            raise ThinSegError(f"model '{model_title}' needs an XP image as well as PP: choose one")
        if needs_xp:
            pp_h, pp_w = section_grid(ppNode, "PP image").shape
            xp_h, xp_w = section_grid(xpNode, "XP image").shape
            if (pp_h, pp_w) != (xp_h, xp_w):
                raise ThinSegError(
                    f"PP '{ppNode.GetName()}' is {pp_w}x{pp_h} px but XP '{xpNode.GetName()}' is "
                    f"{xp_w}x{xp_h} px; they must be the same size"
                )

    @staticmethod
    def _new_job_folder(kind: str, workDir=None) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"thinseg-{kind}-", dir=workDir))

    @staticmethod
    def startJob(job: Job) -> process.BackgroundProcess:
        """Start a prepared job in a separate process; poll it, then finishX(job) once it is done."""
        return job.start()

    @staticmethod
    def discardJob(job: Job | None) -> None:
        """Remove a job's folder (after import, failure or cancel)."""
        if job is not None:
            shutil.rmtree(job.folder, ignore_errors=True)

    # -- segmentation ---------------------------------------------------------------------------

    def segment(
        self,
        ppNode,
        xpNode=None,
        modelDir=None,
        outputNode=None,
        device: str = "auto",
        confidence: bool = False,
        createSegmentation: bool = False,
        mmPerPixel: float | None = None,
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        show: bool = True,
        tile: int | None = None,
        alignXp: bool = True,
    ) -> SegmentationOutput:
        """Segment PP (+ XP) in this process: a labelmap named after the input, with the colour
        table of the class names, in the input's folder, shown over PP, plus the area fractions
        table and chart (and the confidence map / segmentation when asked for). XP is checked
        against PP first as `thinseg segment` does (alignXp=False: used as it is)."""
        # deferred: these import torch (1-2 s), which the panel loads only when it segments
        from thinseg.inference.confidence import ConfidenceReference, out_of_depth_warning
        from thinseg.inference.engine import InferenceOptions, Segmenter
        from thinseg.inference.resample import resampling_factors, segment_at_model_resolution
        from thinseg.io.images import ArraySource
        from thinseg.model.bundle import load_bundle
        from thinseg.pipelines.segment import (
            AlignedXpSource,
            check_thin_section_model,
            check_xp_alignment,
            model_mm_per_pixel,
        )

        bundle = load_bundle(modelDir or self.defaultModelDir())
        check_thin_section_model(bundle)
        needs_xp = len(bundle.input_names) > 1
        self._check_xp(ppNode, xpNode, needs_xp, bundle.title)
        spacing_y, spacing_x = self.imageSpacingYX(ppNode, mmPerPixel)
        sources = [ArraySource(rgb_array(ppNode, "PP image"), name=ppNode.GetName())]
        if needs_xp:
            xp_source = ArraySource(rgb_array(xpNode, "XP image"), name=xpNode.GetName())
            # the core's PP/XP check: an XP offset or turned by the stage is moved onto the PP grid
            alignment = check_xp_alignment(sources[0], xp_source) if alignXp else None
            if alignment is not None and not alignment.is_identity:
                xp_source = AlignedXpSource(xp_source, alignment)
                self.messages.append(f"{ppNode.GetName()}: {alignment.describe()}")
            sources.append(xp_source)
        options = InferenceOptions(device=device, with_confidence=confidence, tile=tile)
        segmenter = Segmenter(bundle, options)
        self.messages += segmenter.messages
        model_spacing = model_mm_per_pixel(bundle)
        factor = resampling_factors((spacing_x, spacing_y), model_spacing)
        self.messages += resampling_messages(ppNode.GetName(), spacing_y, spacing_x, model_spacing, factor)
        result = segment_at_model_resolution(segmenter, sources, factor, progress=progress, cancel=cancel)
        labels, conf = result.labels, result.confidence
        warning = out_of_depth_warning(
            ppNode.GetName(), result.confidence_histogram, ConfidenceReference.from_meta(bundle.meta)
        )
        output = self._store_segmentation(
            ppNode, xpNode, labels, conf, bundle.class_table, bundle.title, outputNode, createSegmentation, show
        )
        if warning:
            self.messages.append(warning)
            output.messages.append(warning)
        return output

    def _store_segmentation(
        self, ppNode, xpNode, labels, conf, table, model_title, outputNode, createSegmentation, show
    ) -> SegmentationOutput:
        scene = self.scene
        base = base_name(ppNode)
        name = outputNode.GetName() if outputNode is not None else scene.GenerateUniqueName(f"{base}_Segmentation")
        labelmap = create_labelmap(scene, name, labels, table, reference=ppNode, node=outputNode)
        set_reference(labelmap, ppNode, xpNode)
        labelmap.SetAttribute(MODEL_ATTRIBUTE, model_title)
        hierarchy.place_beside(labelmap, ppNode)
        confidence_node = None
        if conf is not None:
            confidence_node = create_scalar_volume(scene, f"{base}_Confidence", conf, reference=ppNode)
            hierarchy.place_beside(confidence_node, ppNode)
        table_node = results.fractions_table(scene, labelmap, labelmap.GetNodeReference(FRACTIONS_REFERENCE), table)
        chart_node = results.fractions_chart(scene, table_node, labelmap, labelmap.GetNodeReference(CHART_REFERENCE))
        labelmap.SetNodeReferenceID(FRACTIONS_REFERENCE, table_node.GetID())
        labelmap.SetNodeReferenceID(CHART_REFERENCE, chart_node.GetID())
        for node in (table_node, chart_node):
            hierarchy.place_beside(node, ppNode)
        segmentation = None
        if createSegmentation:
            segmentation = labelmap_to_segmentation(labelmap, name=f"{name}_Segments")
            hierarchy.place_beside(segmentation, ppNode)
        if show:
            results.show_labelmap(scene, ppNode, labelmap)
        return SegmentationOutput(labelmap, table_node, chart_node, confidence_node, segmentation)

    def prepareSegmentation(
        self,
        ppNode,
        xpNode=None,
        modelDir=None,
        device: str = "auto",
        confidence: bool = False,
        mmPerPixel: float | None = None,
        workDir=None,
        python: str | None = None,
        tile: int | None = None,
    ) -> Job:
        """Export PP (+ XP) to a job folder and write its segmentation job; the scene is not
        changed. Run with startJob(job), then finishSegmentation(job)."""
        model_dir = Path(modelDir) if modelDir else self.defaultModelDir()
        info = models.read_model_info(model_dir)
        if info.problem:
            raise ThinSegError(f"not a usable model folder: {info.problem}", model_dir)
        self._check_xp(ppNode, xpNode, info.needs_xp, info.title)
        spacing_y, spacing_x = self.imageSpacingYX(ppNode, mmPerPixel)
        if abs(spacing_y - spacing_x) > 1e-6 * max(spacing_x, spacing_y):
            model_mm = 1.0 / info.pixels_per_mm if info.pixels_per_mm else None
            self.messages += resampling_messages(ppNode.GetName(), spacing_y, spacing_x, model_mm, True)
        folder = self._new_job_folder("segment", workDir)
        try:
            base = base_name(ppNode)
            nodes = [ppNode] + ([xpNode] if info.needs_xp else [])
            names = {ppNode.GetID(): f"{base}_PP"}
            if info.needs_xp:
                names[xpNode.GetID()] = f"{base}_XP"
            source = folder / f"{safe_file_name(base)}.nc"  # the file stem names the section in the progress
            # the pictures go with the PP's pixel size: its own (square or not), or the one given
            square = spacing_x if spacing_x == spacing_y else None
            spacing = {n.GetID(): square for n in nodes} if square is not None else None
            written = netcdf_nodes.export_nodes(nodes, source, names=names, spacing=spacing)
            job = {
                "inputs": [source.name],
                "output": "output.nc",
                "model_dir": str(model_dir),
                "device": device,
                "probabilities": bool(confidence),
                "tile": int(tile) if tile else None,
                "pp_pattern": "PP",
                "xp_pattern": "XP",
            }
            write_json(folder / "job.json", job)
            command = process.worker_command("segment", folder / "job.json", python=python)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return Job(
            "segment",
            folder,
            command,
            {
                "pp": ppNode.GetID(),
                "xp": xpNode.GetID() if xpNode else None,
                "inputs": list(written.values()),
                "model": info.title,
            },
        )

    def finishSegmentation(
        self, job: Job, outputNode=None, createSegmentation: bool = False, show: bool = True
    ) -> SegmentationOutput:
        """Import the labelmap (and confidence map) written by the job, with its table and chart."""
        out = job.folder / "output.nc"
        variables = [v for v in list_variables(out) if v.name not in job.info["inputs"]]
        labelmap_var = next((v for v in variables if v.kind in ("labelmap", "segmentation")), None)
        if labelmap_var is None:
            raise ThinSegError("the segmentation output holds no labelmap", out)
        labels, table, _mm, _origin = read_labelmap(out, labelmap_var.name)
        conf = None
        conf_var = next((v for v in variables if v.kind == "scalar"), None)
        if conf_var is not None:
            conf = netcdf_nodes._read_scalar(out, conf_var.name)
        ppNode = self.scene.GetNodeByID(job.info["pp"])
        xpNode = self.scene.GetNodeByID(job.info["xp"]) if job.info.get("xp") else None
        if ppNode is None:
            raise ThinSegError("the PP image was removed from the scene while the segmentation ran")
        expected = rgb_array(ppNode).shape[:2]
        if labels.shape != expected:
            raise ThinSegError(
                f"the result is {labels.shape[1]}x{labels.shape[0]} px but PP is {expected[1]}x{expected[0]}", out
            )
        return self._store_segmentation(
            ppNode, xpNode, labels, conf, table, job.info.get("model", ""), outputNode, createSegmentation, show
        )

    def segmentFiles(
        self,
        paths: Sequence[str],
        outputDir: str,
        modelDir=None,
        device: str = "auto",
        probabilities: bool = False,
        overlay: bool = False,
        ppPattern: str = "PP",
        xpPattern: str = "XP",
        mmPerPixel: float = DEFAULT_MM_PER_PIXEL,
        overwrite: bool = False,
        load: bool = False,
        progress=None,
        cluster: str | None = None,
        bandRows: int | None = None,
    ) -> BatchOutput:
        """Batch: segment image files / netCDF files / folders into `outputDir`, like `thinseg
        segment` (one netCDF per section + modal_mineralogy.csv); with load=True each result
        file is imported into the scene. `cluster` ("local:N", "tcp://HOST:PORT" or a scheduler
        file) runs each section as one task on a Dask cluster (`thinseg segment --cluster`), or
        shares each section among the workers in parts of about `bandRows` rows (`--band-rows`;
        by default when there are fewer sections than worker threads, split evenly over them)."""
        # deferred: these import torch (1-2 s), which the panel loads only when it segments
        from thinseg.inference.engine import InferenceOptions
        from thinseg.pipelines.segment import SegmentOptions, segment_files

        options = SegmentOptions(
            pp_pattern=ppPattern,
            xp_pattern=xpPattern,
            mm_per_pixel=mmPerPixel,
            overwrite=overwrite,
            probabilities=probabilities,
            overlay=overlay,
            cluster=cluster,
            band_rows=bandRows,
            inference=InferenceOptions(device=device, with_confidence=probabilities),
        )
        run = segment_files(
            list(paths), options, Path(outputDir), modelDir or self.defaultModelDir(), progress=progress
        )
        imported = [self.importNetcdf(r.netcdf) for r in run.results] if load else []
        return BatchOutput(list(run.results), list(run.failed), imported)

    # -- registration ---------------------------------------------------------------------------

    def loadQemscan(
        self,
        path,
        colorTable=None,
        mmPerPixel: float | None = None,
        name: str | None = None,
        background: str | None = None,
    ):
        """A QEMSCAN map (RGB/paletted/label TIFF or PNG, or netCDF) as a labelmap with its mineral
        colour table (GeoSlicer's QEMSCAN colours when none is given). Pixel size: `mmPerPixel`,
        else the file's, else 0.01 mm (GeoSlicer's QEMSCAN default)."""
        # deferred: thinseg.registration imports SimpleITK, loaded only when registration is used
        from thinseg.registration import load_qemscan

        qemscan = load_qemscan(path, colorTable, background=background)
        spacing = mmPerPixel or qemscan.mm_per_pixel or 0.01
        node = create_labelmap(self.scene, name or Path(path).stem, qemscan.labels, qemscan.table, spacing)
        node.SetAttribute("ThinSectionSegmentation.QemscanFile", str(path))
        return node

    def _landmarks(self, landmarks, ppNode, qemscanNode):
        """(imagePoints, qemscanPoints) markups, LandmarkPairs or (qemscan_px, image_px) arrays."""
        if landmarks is None:
            return None
        # deferred: thinseg.registration imports SimpleITK, loaded only when registration is used
        from thinseg.registration import LandmarkPairs

        if isinstance(landmarks, LandmarkPairs):
            return landmarks
        first, second = landmarks
        if hasattr(first, "GetNumberOfControlPoints"):
            return landmarks_from_markups(first, second, ppNode, qemscanNode)
        return LandmarkPairs(
            np.asarray(first, dtype=np.float64).reshape(-1, 2), np.asarray(second, dtype=np.float64).reshape(-1, 2)
        )

    def register(
        self,
        ppNode,
        qemscanNode,
        landmarks=None,
        refine: bool = True,
        xpNode=None,
        kind: str = "similarity",
        bspline: bool = False,
        mmPerPixel: float | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> RegistrationOutput:
        """Register a QEMSCAN labelmap to PP in this process. `landmarks`: None (automatic search),
        (PP point list, QEMSCAN point list) markups pairing by order, or the core's LandmarkPairs.
        The result holds the transform node, the QEMSCAN labelmap resampled onto the PP grid and
        the landmark residuals."""
        if ppNode is None or qemscanNode is None:
            raise ThinSegError("choose a PP image and a QEMSCAN map")
        pairs = self._landmarks(landmarks, ppNode, qemscanNode)
        pp = rgb_array(ppNode, "PP image")
        xp = rgb_array(xpNode, "XP image") if xpNode is not None else None
        table = labelmap_class_table(qemscanNode)
        q_geometry = require_thin_section_geometry(qemscanNode, "QEMSCAN map")
        # deferred: thinseg.registration imports SimpleITK, loaded only when registration is used
        from thinseg.registration import register_section
        from thinseg.registration.output import landmark_residuals  # deferred as above

        result = register_section(
            pp,
            xp,
            label_array(qemscanNode, "QEMSCAN map"),
            table,
            image_mm_per_pixel=self.imageSpacing(ppNode, mmPerPixel),
            qemscan_mm_per_pixel=q_geometry.mm_per_pixel,
            landmarks=pairs,
            kind=kind,
            refine=refine,
            bspline=bspline,
            progress=progress,
        )
        report = landmark_residuals(result)  # fit and final (refined) residuals side by side
        summary = {
            "warnings": result.warnings,
            "landmarks": report,
            "metric_final": result.metric_final,
            "overlap": result.overlap,
            "kind": result.transform.kind,
        }
        aligned = result.xp if result.xp_was_aligned else None
        return self._store_registration(
            ppNode, xpNode, qemscanNode, result.transform, result.labels, result.table, report, summary, aligned
        )

    def _store_registration(
        self,
        ppNode,
        xpNode,
        qemscanNode,
        transform,
        labels,
        table,
        report,
        summary,
        alignedXp: np.ndarray | None = None,
    ) -> RegistrationOutput:
        """Transform node, registered labelmap (referring to PP and to the XP that matches it
        pixel for pixel: a new aligned XP volume when the photographs were offset), residual table."""
        scene = self.scene
        base = base_name(ppNode)
        transform_node = create_transform_node(
            scene, f"{qemscanNode.GetName()}_to_{base}", transform, ppNode, qemscanNode
        )
        labelmap = create_labelmap(
            scene, scene.GenerateUniqueName(f"{qemscanNode.GetName()}_registered"), labels, table, reference=ppNode
        )
        xp_aligned = None
        if alignedXp is not None and xpNode is not None:
            xp_aligned = create_rgb_volume(
                scene, scene.GenerateUniqueName(f"{xpNode.GetName()}_aligned"), alignedXp, reference=ppNode
            )
            hierarchy.place_beside(xp_aligned, ppNode)
        set_reference(labelmap, ppNode, xp_aligned or xpNode)
        for node in (transform_node, labelmap):
            hierarchy.place_beside(node, ppNode)
        residuals = None
        if report:
            residuals = residual_table(scene, f"{base} landmark residuals", report, self.imageSpacing(ppNode))
            hierarchy.place_beside(residuals, ppNode)
        return RegistrationOutput(
            transform_node, labelmap, residuals, list(summary.get("warnings") or []), summary, xp_aligned
        )

    def prepareRegistration(
        self,
        ppNode,
        qemscanNode,
        landmarks=None,
        refine: bool = True,
        xpNode=None,
        kind: str = "similarity",
        bspline: bool = False,
        mmPerPixel: float | None = None,
        workDir=None,
        python: str | None = None,
    ) -> Job:
        """Export PP/XP/QEMSCAN and the landmark pixels to a job folder for `python -m thinseg.jobs`."""
        if ppNode is None or qemscanNode is None:
            raise ThinSegError("choose a PP image and a QEMSCAN map")
        if landmarks is None and not refine:
            raise ThinSegError(
                "without landmarks the automatic refinement is needed (add landmarks, or use 'Refine automatically')"
            )
        pairs = self._landmarks(landmarks, ppNode, qemscanNode)
        labelmap_class_table(qemscanNode)  # fail now, not in the process, if it has no colour table
        spacing = self.imageSpacing(ppNode, mmPerPixel)
        folder = self._new_job_folder("register", workDir)
        try:
            base = base_name(ppNode)
            nodes = [ppNode, qemscanNode] + ([xpNode] if xpNode is not None else [])
            names = {ppNode.GetID(): f"{base}_PP", qemscanNode.GetID(): "QEMSCAN"}
            if xpNode is not None:
                names[xpNode.GetID()] = f"{base}_XP"
            written = netcdf_nodes.export_nodes(
                nodes,
                folder / "input.nc",
                names=names,
                spacing={ppNode.GetID(): spacing, **({xpNode.GetID(): spacing} if xpNode else {})},
            )
            job = {
                "input": "input.nc",
                "pp": written[ppNode.GetID()],
                "qemscan": written[qemscanNode.GetID()],
                "xp": written.get(xpNode.GetID()) if xpNode is not None else None,
                "image_mm_per_pixel": spacing,
                "kind": kind,
                "refine": bool(refine),
                "bspline": bool(bspline),
                "output": "output.nc",
                "name": "registered",
                "landmarks": None
                if pairs is None
                else {
                    "qemscan_px": pairs.qemscan_px.tolist(),
                    "image_px": pairs.image_px.tolist(),
                    "names": list(pairs.names),
                },
            }
            write_json(folder / "job.json", job)
            command = process.worker_command("register", folder / "job.json", python=python)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return Job(
            "register",
            folder,
            command,
            {"pp": ppNode.GetID(), "xp": xpNode.GetID() if xpNode else None, "qemscan": qemscanNode.GetID()},
        )

    def finishRegistration(self, job: Job) -> RegistrationOutput:
        """Import the job's transform, registered labelmap and landmark residuals."""
        # deferred: thinseg.registration imports SimpleITK, loaded only when registration is used
        from thinseg.registration.output import load_transform

        transform = load_transform(job.folder / "transform.json")
        out = job.folder / "output.nc"
        labels, table, _mm, _origin = read_labelmap(out, "registered")
        summary = json.loads((job.folder / "summary.json").read_text(encoding="utf-8"))
        nodes = [self.scene.GetNodeByID(job.info[k]) if job.info.get(k) else None for k in ("pp", "xp", "qemscan")]
        if nodes[0] is None or nodes[2] is None:
            raise ThinSegError("the PP image or the QEMSCAN map was removed from the scene while registering")
        aligned = None
        if summary.get("xp_aligned_variable"):
            image = open_netcdf_image(out, summary["xp_aligned_variable"])
            try:
                aligned = image.read(0, image.shape[0])
            finally:
                image.close()
        return self._store_registration(
            nodes[0], nodes[1], nodes[2], transform, labels, table, summary.get("landmarks"), summary, aligned
        )

    # -- training -------------------------------------------------------------------------------

    def trainingSectionNodes(self, labelmapNode, ppPattern: str = "PP") -> tuple:
        """(PP, XP, labelmap) of a registered labelmap: its references, else affix matches in its folder."""
        pp, xp = referenced_images(labelmapNode)
        if pp is None:
            siblings = hierarchy.children_nodes(self.scene, hierarchy.parent_item(labelmapNode))
            pp, xp_found = find_pp_xp(siblings, ppPattern)
            xp = xp or xp_found
        if pp is None:
            raise ThinSegError(
                f"no PP image is known for '{labelmapNode.GetName()}': register it first, or put it in "
                "the folder of its PP image"
            )
        return pp, xp, labelmapNode

    def prepareTraining(
        self,
        sections: Sequence,
        modelName: str,
        modelsRoot=None,
        epochs: int = 20,
        initFrom=None,
        device: str = "auto",
        patchSize: int = 256,
        batchSize: int = 8,
        stepsPerEpoch: int = 200,
        valFraction: float = 0.2,
        classes=None,
        mappingCsv=None,
        modelMmPerPixel: float | None = None,
        ppOnly: bool = False,
        recipe: str = "unet",
        workDir=None,
        python: str | None = None,
        **options,
    ) -> Job:
        """Sections: registered labelmap nodes (their PP/XP found via references) and/or GeoSlicer
        netCDF files. The new model goes to <modelsRoot>/ThinSectionEnv/Multiphase/<modelName>
        (numbered if taken), where GeoSlicer lists it too.

        As `thinseg train`: `classes` (a class file or a colour table node; --classes), `mappingCsv`
        (mineral,class rows; --mapping), `modelMmPerPixel` (the model's pixel size, sections are
        resampled to it; --model-mm-per-pixel), `ppOnly` (--pp-only) and `recipe` (--recipe: "unet" or
        "small-data"; the job's epochs and sizes given here still win over the recipe's). Every choice
        is checked here, before anything is written."""
        if not sections:
            raise ThinSegError("choose at least one registered section (a labelmap on a PP image, or a netCDF file)")
        known = [r.value for r in TrainingRecipe]
        if recipe not in known:
            raise ThinSegError(f"unknown training recipe {recipe!r} (known: {', '.join(known)})")
        choices = self._training_choices(initFrom, classes, mappingCsv, modelMmPerPixel, ppOnly)
        root = Path(modelsRoot) if modelsRoot else models.default_user_models_root()
        model_dir = models.new_model_dir(root, modelName)
        folder = self._new_job_folder("train", workDir)
        try:
            files, have_xp = [], True
            for i, item in enumerate(sections):
                if isinstance(item, (str, os.PathLike)):
                    files.append(str(Path(item).resolve()))
                    continue
                pp, xp, labelmap = self.trainingSectionNodes(item)
                have_xp = have_xp and xp is not None
                base = base_name(pp)
                names = {pp.GetID(): f"{base}_PP", labelmap.GetID(): f"{base}_labels"}
                if xp is not None:
                    names[xp.GetID()] = f"{base}_XP"
                spacing = self.imageSpacing(pp)
                nodes = [pp, labelmap] + ([xp] if xp is not None else [])
                target = folder / f"{i:03d}_{safe_file_name(base)}.nc"
                netcdf_nodes.export_nodes(nodes, target, names=names, spacing={n.GetID(): spacing for n in nodes})
                files.append(target.name)
            job = {
                "sections": files,
                "run_dir": str(root / "runs" / model_dir.name),
                "model_dir": str(model_dir),
                "model_name": model_dir.name,
                "title": modelName,
                "epochs": int(epochs),
                "device": device,
                "patch_size": int(patchSize),
                "batch_size": int(batchSize),
                "steps_per_epoch": int(stepsPerEpoch),
                "val_fraction": float(valFraction),
                "recipe": recipe,
                "init_from": str(initFrom) if initFrom else None,
                "description": f"Trained in Thin Section Segmentation on {len(files)} section(s).",
            }
            if not ppOnly and not initFrom and not have_xp:
                self.messages.append("a section has no XP image: the new model takes the PP image only")
                job["inputs"] = ["PP"]
            job.update(choices)
            job.update(options)
            write_json(folder / "job.json", job)
            command = process.worker_command("train", folder / "job.json", python=python)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return Job("train", folder, command, {"model_dir": str(model_dir)})

    @staticmethod
    def _training_choices(initFrom, classes, mappingCsv, modelMmPerPixel: float | None, ppOnly: bool) -> dict:
        """job.json entries for the model's classes, mapping, pixel size and inputs (none for
        what is not chosen); a choice that cannot work fails here, naming the file at fault."""
        choices: dict = {}
        table = None
        if classes is not None and classes != "":
            if initFrom:
                raise ThinSegError(
                    "a fine-tuned model keeps the classes of the model it starts from: clear the classes, "
                    "or train a new model (not from the selected one)"
                )
            if isinstance(classes, (str, os.PathLike)):
                table = read_model_classes(Path(classes))
            elif hasattr(classes, "GetNumberOfColors"):
                table = class_table_from_color_node(classes)
                if not len(table):
                    raise ThinSegError(
                        f"colour table '{classes.GetName()}' lists no classes (entry 0 is 'not classified')"
                    )
            else:
                raise ThinSegError(f"the classes are a class file or a colour table node, not {type(classes).__name__}")
            choices["classes"] = {"names": table.names, "colors": table.colors}
        if ppOnly:
            if initFrom:
                raise ThinSegError(
                    "a fine-tuned model keeps the inputs of the model it starts from: untick PP only, "
                    "or train a new model (not from the selected one)"
                )
            choices["inputs"] = ["PP"]
        if mappingCsv:
            path = Path(mappingCsv).resolve()
            rows = load_mapping_csv(path)
            target = table
            if target is None and initFrom:
                info = models.read_model_info(initFrom)
                target = ClassTable.from_names_colors(info.classes, ["#000000"] * len(info.classes)) or None
            elif target is None:
                target = default_class_table()
            if target is not None:  # every class the table names is one of the model's
                minerals = ClassTable.from_names_colors(list(rows), ["#000000"] * len(rows))
                try:
                    build_mapping(minerals, target, rows)
                except ThinSegError as error:
                    raise ThinSegError(error.problem, path) from None
            choices["mapping_csv"] = str(path)
        if modelMmPerPixel:
            if not modelMmPerPixel > 0:
                raise ThinSegError(f"the model's pixel size must be positive, not {modelMmPerPixel} mm")
            choices["pixels_per_mm"] = 1.0 / float(modelMmPerPixel)
        return choices

    def finishTraining(self, job: Job) -> TrainingOutput:
        """The new model's folder (it is now listed by availableModels) and the training summary."""
        summary = json.loads((job.folder / "summary.json").read_text(encoding="utf-8"))
        return TrainingOutput(Path(summary["model_dir"]), summary)

    def train(self, sections: Sequence, modelName: str, modelsRoot=None, **options) -> TrainingOutput:
        """Train in this process (blocking; for the console)."""
        job = self.prepareTraining(sections, modelName, modelsRoot, **options)
        try:
            spec = json.loads((job.folder / "job.json").read_text(encoding="utf-8"))
            jobs.run_train_job(spec, job.folder, emit=jobs.emit_nothing)
            return self.finishTraining(job)
        finally:
            self.discardJob(job)

    def trainingCurve(self, epochs, tableNode=None, chartNode=None, name: str = "Training"):
        return results.training_curve(self.scene, epochs, tableNode, chartNode, name)

    # -- grain analysis -------------------------------------------------------------------------

    def analyzeGrains(
        self,
        labelmapNode,
        ppNode=None,
        neckRatio: float = 0.7,
        minGrainPixels: int = 12,
        split: bool = True,
        options=None,
        progress: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> GrainAnalysisOutput:
        """Grains of a labelmap (or segmentation) node, as `thinseg analyze` finds them, in this
        process: tables (grains, per-class summary, contacts) and charts (cumulative grain size,
        modal mineralogy) in a folder beside the input. `options`: a thinseg.analysis.GrainOptions
        (then neckRatio, minGrainPixels and split are its own). Cancelling (`cancelled` returns
        True) raises thinseg.analysis.Cancelled and leaves the scene as it was."""
        # deferred: the analysis imports scipy, scikit-image and SimpleITK, loaded when it is used
        from thinseg.analysis import GrainOptions

        from . import grain_nodes  # deferred: imports thinseg.analysis (as above)

        if options is None:
            options = GrainOptions(split=bool(split), neck_ratio=float(neckRatio), min_pixels=int(minGrainPixels))
        analysis, made, messages = grain_nodes.analyze_node(labelmapNode, ppNode, options, progress, cancelled)
        self.messages += messages
        return GrainAnalysisOutput(
            made.grains,
            made.summary,
            made.contacts,
            made.sizeChart,
            made.modalChart,
            made.folder,
            len(analysis.table),
            analysis.summary,
            made.nodes,
            messages,
        )

    # -- stitching -------------------------------------------------------------------------------

    def stitchTiles(
        self,
        tilePaths: Sequence,
        outputFolder,
        name: str | None = None,
        ppPattern: str = "PP",
        xpPattern: str | None = "XP",
        layout: str | None = None,
        overlap: float = 0.15,
        flatField: str = "auto",
        pixelSize: float | None = None,
        overwrite: bool = False,
        options=None,
        progress: Callable[[str, int], Callable[[int, int], None]] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> StitchOutput:
        """Stitch microscope tiles (files or folders; PP and XP by affix) as `thinseg stitch` does,
        in this process, into `outputFolder`, and load the PP and XP panoramas and a tile table
        into a folder of the scene. `layout`: None (grid from the names, else from the images),
        "grid", "auto" or a TileConfiguration file; `flatField`: "auto", "none" or a blank-field
        image; `pixelSize` in mm (None: the tiles' own). `options`: a thinseg StitchOptions (then
        the other settings are its own; its formats must include netcdf). `progress(stage, pixels)`
        returns the update(done, total) of that stage. Cancelling (`cancelled` returns True)
        raises thinseg.stitching.Cancelled, leaving the scene as it was and nothing on disk."""
        # deferred: stitching imports scipy, scikit-image, tifffile and netCDF4, loaded when it is used
        from thinseg.pipelines.stitch import StitchOptions
        from thinseg.stitching.placement import PlacementOptions

        from . import stitch_nodes  # deferred: imports the stitching pipeline (as above)

        if options is None:
            if not tilePaths:
                raise ThinSegError("choose the tiles to stitch (files or a folder)")
            if not str(outputFolder or "").strip():
                raise ThinSegError("choose the output folder of the stitch")
            placement = PlacementOptions(
                layout=layout or None,
                overlap=float(overlap),
                flat_field=flatField or "auto",
                workers=max(1, min(4, os.cpu_count() or 1)),  # threads reading tiles, not processes
            )
            options = StitchOptions(
                inputs=[str(p) for p in tilePaths],
                output=Path(outputFolder),
                name=name or None,
                pp_pattern=ppPattern,
                xp_pattern=xpPattern or None,
                placement=placement,
                mm_per_pixel=pixelSize,
                overwrite=bool(overwrite),
            )
        run = stitch_nodes.stitch_into_scene(self.scene, options, progress, cancelled)
        self.messages += run.messages
        made, result = run.made, run.result
        return StitchOutput(
            made.pp,
            made.xp,
            made.table,
            result.folder,
            dict(result.files),
            result.summary,
            run.messages,
            made.nodes,
            result.name,
            made.folder,
        )

    # -- netCDF ---------------------------------------------------------------------------------

    def exportNetcdf(self, nodes: Sequence, path) -> dict:
        """Write nodes (images, labelmaps, segmentations) to a GeoSlicer netCDF file; returns
        node ID -> variable name."""
        return netcdf_nodes.export_nodes(nodes, path)

    def importNetcdf(
        self, path, ppPattern: str = "PP", xpPatterns: Sequence[str] = ("XP", "PX")
    ) -> netcdf_nodes.ImportedFile:
        """Create nodes for the file's variables (in a folder named after it): the result lists
        them (`nodes`), the PP/XP images found by affix (`pp`, `xp`) and what was skipped."""
        return netcdf_nodes.import_netcdf(self.scene, path, ppPattern, xpPatterns)
