"""Thin Section Segmentation: the Slicer/GeoSlicer module.

Module, a thin Widget shell and the in-Slicer Test. The panel (ThinSectionSegmentationLib/panel.py)
holds the widgets and reaches the scene through the MRML logic (ThinSectionSegmentationLib, no Qt,
tested on a real MRML scene with slicer-core); image work is in the `thinseg` core library. Long
work runs as a separate process with Slicer's Python.
"""

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from ThinSectionSegmentationLib import Job, ThinSectionSegmentationLogic, registration_nodes, volumes
from ThinSectionSegmentationLib.host import module_base
from ThinSectionSegmentationLib.panel import ThinSectionSegmentationPanel
from ThinSectionSegmentationLib.scripted_process import ScriptedProcess
from thinseg.classes.files import default_class_table
from thinseg.jobs import ErrorEvent, ProgressEvent, ResultEvent, StageEvent
from thinseg.resources import default_model_dir, sample_dir

#: GeoSlicer's LTracePlugin in GeoSlicer, Slicer's ScriptedLoadableModule elsewhere. GeoSlicer's module
#: finder reads this file as text: it wants the base spelled `LTracePlugin` in the class statement and
#: `self.parent.categories` assigned a literal list ("Thin Section" is its Thin Section environment's category).
LTracePlugin = module_base(ScriptedLoadableModule)


class ThinSectionSegmentation(LTracePlugin):
    SETTING_KEY = "ThinSectionSegmentation"  # GeoSlicer's LTracePlugin requires one

    def __init__(self, parent):
        LTracePlugin.__init__(self, parent)
        self.parent.title = "Thin Section Segmentation"
        self.parent.categories = ["Segmentation", "Thin Section"]
        self.parent.dependencies = []
        self.parent.contributors = ["ThinSectionSegmentation developers"]
        self.parent.helpText = (
            "Mineral maps from petrographic thin sections. <b>Segment</b> a plane-polarised (PP) and "
            "cross-polarised (XP) image pair with a U-Net into a labelmap of Calcite, Dolomite, Mg-Clay "
            "minerals, Pores, Quartz and Others, with the mineral area fractions as a table and chart. "
            "<b>Register</b> a QEMSCAN map onto PP from landmark pairs and/or automatically. <b>Train</b> "
            "a new model on registered sections. <b>Stitch</b> overlapping microscope tiles into one PP and one "
            "XP panorama. <b>Export/Import</b> GeoSlicer netCDF files.<br>"
            "Long work runs in the background; the Segment/Register/Train button becomes Cancel meanwhile.<br>"
            "See the README of the ThinSectionSegmentation extension for the command line and the Python API."
        )
        self.parent.acknowledgementText = (
            "Built on MONAI, PyTorch, SimpleITK and xarray. The netCDF layout and the model bundle format "
            "follow GeoSlicer (LTrace), so results and models move between the two."
        )


# -----------------------------------------------------------------------------------------------


class ThinSectionSegmentationWidget(ScriptedLoadableModuleWidget):
    """Hosts the panel (ThinSectionSegmentationLib.panel), where all of its work is."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.panel = None
        self.logic = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.panel = ThinSectionSegmentationPanel()
        self.logic = self.panel.logic
        self.layout.addWidget(self.panel.widget)

    def cleanup(self):
        if self.panel is not None:
            self.panel.cleanup()

    def enter(self):
        self.panel.enter()

    def exit(self):
        self.panel.exit()


# -----------------------------------------------------------------------------------------------


class _FakeJobLogic(ThinSectionSegmentationLogic):
    """The real logic with its background jobs replaced by scripted events."""

    def __init__(self, batches, error=None):
        super().__init__()
        self.batches, self.error, self.calls = batches, error, []

    def prepareSegmentation(self, ppNode, xpNode=None, modelDir=None, device="auto", confidence=False, **kwargs):
        self.calls.append("prepare")
        return Job("segment", Path(tempfile.mkdtemp()), ["fake"], {"pp": ppNode.GetID()})

    def startJob(self, job):
        self.calls.append("start")
        return ScriptedProcess(self.batches, self.error)

    def finishSegmentation(self, job, outputNode=None, createSegmentation=False, show=True):
        self.calls.append("finish")
        pp = self.scene.GetNodeByID(job.info["pp"])
        labels = np.ones(volumes.rgb_array(pp).shape[:2], np.uint8)
        return self._store_segmentation(pp, None, labels, None, default_class_table(), "fake", None, False, show)

    def discardJob(self, job):
        self.calls.append("discard")
        super().discardJob(job)


class ThinSectionSegmentationTest(ScriptedLoadableModuleTest):
    """In-Slicer tests: the panel on a fake logic, then the widget path end to end on the bundled
    sample (the MRML logic itself is covered by the pytest suite on slicer-core)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_logic_round_trip()
        self.setUp()
        self.test_panel_with_fake_logic()
        self.setUp()
        self.test_widget_end_to_end()

    # helpers
    def _sample(self):
        # deferred: PIL may be missing until the module's requirements are installed
        from thinseg.io.images import open_image

        nodes = []
        for role in ("PP", "XP"):
            source = open_image(sample_dir() / f"sample_{role}.jpg")
            rgb = np.asarray(source.read(0, source.shape[0]))
            nodes.append(volumes.create_rgb_volume(slicer.mrmlScene, f"sample_{role}", rgb, 0.00132))
        return nodes

    def _wait(self, panel, timeout=600):
        start = time.time()
        while panel.session is not None:
            slicer.app.processEvents()
            time.sleep(0.05)
            self.assertLess(time.time() - start, timeout, "the background job did not finish in time")
        slicer.app.processEvents()

    def test_logic_round_trip(self):
        logic = ThinSectionSegmentationLogic()
        pp, xp = self._sample()
        path = os.path.join(tempfile.mkdtemp(), "sample.nc")
        logic.exportNetcdf([pp, xp], path)
        imported = logic.importNetcdf(path)
        self.assertEqual(len(imported.nodes), 2)
        self.assertTrue((volumes.rgb_array(imported.nodes[0]) == volumes.rgb_array(pp)).all())
        self.assertEqual(imported.pp.GetName(), "sample_PP")
        self.delayDisplay("netCDF round trip passed")

    def test_panel_with_fake_logic(self):
        pp = volumes.create_rgb_volume(slicer.mrmlScene, "fake_PP", np.zeros((8, 8, 3), np.uint8), 0.01)
        progress = ProgressEvent("fake", 5, 10, unit="tiles")
        logic = _FakeJobLogic([[StageEvent("segmenting fake"), progress], [ResultEvent("segment", {})]])
        panel = ThinSectionSegmentationPanel(logic, showDialogs=False)
        panel.enter()
        panel.ui.ppSelector.setCurrentNode(pp)
        self.assertIs(panel.params.ppVolume, pp)  # the selector writes the parameter node
        panel.ui.segmentButton.click()
        self.assertEqual(panel.ui.segmentButton.text, "Cancel")
        panel._poll()
        self.assertEqual(panel.ui.progressBar.value, 500)
        self.assertEqual(panel.ui.statusLabel.text, "fake: 5/10 tiles")
        panel._poll()
        self.assertIsNone(panel.session)
        self.assertEqual(logic.calls, ["prepare", "start", "finish", "discard"])
        self.assertEqual(panel.completedResult.labelmap.GetName(), "fake_Segmentation")
        self.assertEqual(panel.ui.segmentButton.text, "Segment")
        panel.cleanup()
        # a failing job: its message on the status line, nothing imported, the folder removed
        failing = _FakeJobLogic([[ErrorEvent("S1.nc: no PP image")]], error="S1.nc: no PP image")
        panel = ThinSectionSegmentationPanel(failing, showDialogs=False)
        panel.enter()
        panel.ui.ppSelector.setCurrentNode(pp)
        before = slicer.mrmlScene.GetNumberOfNodes()
        panel.ui.segmentButton.click()
        panel._poll()
        self.assertEqual(failing.calls, ["prepare", "start", "discard"])
        self.assertEqual(panel.ui.statusLabel.text, "Segment failed: S1.nc: no PP image")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        panel.cleanup()
        self.delayDisplay("Panel on a fake logic passed")

    def test_widget_end_to_end(self):
        self.assertTrue(default_model_dir().is_dir(), "the bundled model is missing")
        slicer.util.selectModule("ThinSectionSegmentation")
        panel = slicer.modules.thinsectionsegmentation.widgetRepresentation().self().panel
        pp, xp = self._sample()
        panel.ui.ppSelector.setCurrentNode(pp)
        panel.ui.xpSelector.setCurrentNode(xp)
        panel.refreshModels(select=default_model_dir())

        # Cancel leaves the scene as it was
        before = slicer.mrmlScene.GetNumberOfNodes()
        panel.ui.segmentButton.click()
        self.assertEqual(panel.ui.segmentButton.text, "Cancel")
        panel.ui.segmentButton.click()
        self._wait(panel)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.assertEqual(panel.ui.segmentButton.text, "Segment")

        # Segment
        panel.ui.segmentButton.click()
        self._wait(panel)
        segmentation = panel.completedResult
        self.assertIsNotNone(segmentation)
        self.assertEqual(segmentation.labelmap.GetName(), "sample_Segmentation")
        colors = segmentation.labelmap.GetDisplayNode().GetColorNode()
        self.assertEqual(colors.GetColorName(1), "Calcite")
        self.assertIsNotNone(segmentation.chart)
        self.delayDisplay("Segmentation done")

        # Grain analysis of the segmentation (in this process; the click returns when it is done)
        panel.ui.grainLabelmapSelector.setCurrentNode(segmentation.labelmap)
        panel.ui.grainPpSelector.setCurrentNode(pp)
        panel.ui.analyzeGrainsButton.click()
        grains = panel.completedResult
        self.assertGreater(grains.grainCount, 0)
        self.assertEqual(grains.grains.GetTable().GetNumberOfRows(), grains.grainCount)
        self.assertEqual(grains.grains.GetName(), "sample_Segmentation grains")
        self.assertEqual(panel.ui.analyzeGrainsButton.text, "Analyze")
        self.delayDisplay("Grain analysis done")

        # Register with landmarks taken from the sample's true transform
        truth = json.loads((sample_dir() / "sample_truth_transform.json").read_text())
        qemscan = panel.logic.loadQemscan(
            sample_dir() / "sample_QEMSCAN.tif",
            sample_dir() / "sample_QEMSCAN.csv",
            mmPerPixel=truth["qemscan_mm_per_pixel"],
        )
        a = np.array(truth["qemscan_to_image"])
        qemscan_px = np.array([[60, 60], [250, 50], [80, 200], [240, 210]], float)
        image_px = (a @ np.c_[qemscan_px, np.ones(4)].T).T[:, :2]
        lists = []
        for name, volume, pixels in (("PP points", pp, image_px), ("QEMSCAN points", qemscan, qemscan_px)):
            markups = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
            to_ras = registration_nodes.ijk_to_ras(volume)
            for x, y in pixels:
                markups.AddControlPoint(*(to_ras @ [x, y, 0, 1])[:3])
            lists.append(markups)
        panel.ui.qemscanSelector.setCurrentNode(qemscan)
        panel.ui.imageLandmarksSelector.setCurrentNode(lists[0])
        panel.ui.qemscanLandmarksSelector.setCurrentNode(lists[1])
        panel.ui.registerButton.click()
        self._wait(panel)
        registration = panel.completedResult
        self.assertIsNotNone(registration.residuals)
        self.assertEqual(registration.residuals.GetTable().GetNumberOfRows(), 4)
        registered = volumes.label_array(registration.labelmap)
        self.assertEqual(registered.shape, volumes.rgb_array(pp).shape[:2])
        self.delayDisplay("Registration done")

        # Export and import
        path = os.path.join(tempfile.mkdtemp(), "sample_result.nc")
        panel.logic.exportNetcdf([pp, xp, segmentation.labelmap], path)
        imported = panel.logic.importNetcdf(path)
        labelmap = next(n for n in imported.nodes if n.IsA("vtkMRMLLabelMapVolumeNode"))
        self.assertTrue((volumes.label_array(labelmap) == volumes.label_array(segmentation.labelmap)).all())

        # Stitch 2 x 2 tiles cut from the sample (in this process; the click returns when it is done)
        tiles, output = self._sampleTiles(pp, xp)
        panel.ui.stitchTileFolderPathLineEdit.currentPath = str(tiles)
        panel.ui.stitchOutputFolderPathLineEdit.currentPath = str(output)
        panel.ui.stitchOverlapSpinBox.value = 0.2
        panel.ui.stitchButton.click()
        stitched = panel.completedResult
        self.assertEqual((stitched.ppNode.GetName(), stitched.xpNode.GetName()), ("tiles_PP", "tiles_XP"))
        self.assertEqual(stitched.tableNode.GetTable().GetNumberOfRows(), 4)
        self.assertEqual(volumes.rgb_array(stitched.ppNode).shape, (1080, 1440, 3))  # exact crops: exact positions
        self.assertTrue((volumes.rgb_array(stitched.ppNode) == volumes.rgb_array(pp)[:1080, :1440]).all())
        self.assertIs(panel.params.ppVolume, stitched.ppNode)  # ready to segment
        self.assertEqual(panel.ui.stitchButton.text, "Stitch")
        self.delayDisplay("Test passed")

    def _sampleTiles(self, pp, xp):
        """2 x 2 tiles of 800 x 600 px, 20 % overlap, cut from the sample: tiles_r<row>_c<col>_PP/XP.png."""
        from PIL import Image  # deferred: Pillow may be missing until the module's requirements are installed

        folder = Path(tempfile.mkdtemp())
        tiles = folder / "tiles"
        tiles.mkdir()
        for role, node in (("PP", pp), ("XP", xp)):
            picture = volumes.rgb_array(node)
            for row in range(2):
                for col in range(2):
                    tile = picture[row * 480 : row * 480 + 600, col * 640 : col * 640 + 800]
                    Image.fromarray(tile).save(tiles / f"tiles_r{row:02d}_c{col:02d}_{role}.png")
        return tiles, folder / "stitched"
