"""Thin Section Segmentation: the Slicer/GeoSlicer module (thin Qt layer over thinseg).

Only Module/Widget/Test live here. Scene work is in ThinSectionSegmentationLib (no Qt, tested
on a real MRML scene with slicer-core), image work in the `thinseg` core library. Long work
(segmentation, registration, training) runs as a separate process with Slicer's Python; this
file only starts it, polls it with a timer, and shows progress, results and errors.
"""

import json
import logging
import os
import tempfile
import time
import traceback
from contextlib import contextmanager

import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from ThinSectionSegmentationLib import (
    ThinSectionSegmentationLogic,
    dependencies,
    models,
    process,
    registration_nodes,
    volumes,
)
from ThinSectionSegmentationLib.netcdf_nodes import find_pp_xp
from ThinSectionSegmentationLib.parameters import Parameters
from thinseg.errors import ThinSegError  # plain Python: importable before anything is installed
from thinseg.resources import default_model_dir, sample_dir

SETTINGS_MODEL_ROOTS = "ThinSectionSegmentation/ModelRoots"
TRANSFORM_KINDS = ("similarity", "affine", "tps")


class ThinSectionSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "Thin Section Segmentation"
        parent.categories = ["Segmentation", "Thin Section"]
        parent.dependencies = []
        parent.contributors = ["ThinSectionSegmentation developers"]
        parent.helpText = (
            "Mineral maps from petrographic thin sections. <b>Segment</b> a plane-polarised (PP) and "
            "cross-polarised (XP) image pair with a U-Net into a labelmap of Calcite, Dolomite, Mg-Clay "
            "minerals, Pores, Quartz and Others, with the mineral area fractions as a table and chart. "
            "<b>Register</b> a QEMSCAN map onto PP from landmark pairs and/or automatically. <b>Train</b> "
            "a new model on registered sections. <b>Export/Import</b> GeoSlicer netCDF files.<br>"
            "Long work runs in the background; the Segment/Register/Train button becomes Cancel meanwhile.<br>"
            "See the README of the ThinSectionSegmentation extension for the command line and the Python API."
        )
        parent.acknowledgementText = (
            "Built on MONAI, PyTorch, SimpleITK and xarray. The netCDF layout and the model bundle format "
            "follow GeoSlicer (LTrace), so results and models move between the two."
        )


# -----------------------------------------------------------------------------------------------


class ThinSectionSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. State lives in the module's parameter node (saved with the scene)."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self._process = None  # process.BackgroundProcess while a job runs
        self._job = None
        self._jobButton = None
        self._jobButtonText = ""
        self._finish = None
        self._epochs = []
        self._curveNodes = (None, None)
        self._dependenciesChecked = False
        self._declinedInstall = False

    # -- set-up ---------------------------------------------------------------------------------

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ThinSectionSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ThinSectionSegmentationLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._poll)

        self.ui.imagePlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.qemscanPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.refreshModelsButton.setIcon(qt.QApplication.style().standardIcon(qt.QStyle.SP_BrowserReload))
        self.ui.refreshModelsButton.text = ""
        self.ui.exportTreeView.setMultiSelection(True)
        self.ui.residualsTableView.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)

        # GUI -> parameter node
        for selector in (
            self.ui.ppSelector,
            self.ui.xpSelector,
            self.ui.outputSelector,
            self.ui.qemscanSelector,
            self.ui.imageLandmarksSelector,
            self.ui.qemscanLandmarksSelector,
        ):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.imageLandmarksSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.ui.imagePlaceWidget.setCurrentNode
        )
        self.ui.qemscanLandmarksSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.ui.qemscanPlaceWidget.setCurrentNode
        )
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.transformTypeComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        for checkBox in (self.ui.confidenceCheckBox, self.ui.createSegmentationCheckBox, self.ui.fineTuneCheckBox):
            checkBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        for spinBox in (
            self.ui.epochsSpinBox,
            self.ui.patchSizeSpinBox,
            self.ui.batchSizeSpinBox,
            self.ui.stepsPerEpochSpinBox,
            self.ui.valFractionSpinBox,
            self.ui.qemscanSpacingSpinBox,
        ):
            spinBox.connect(
                "valueChanged(double)" if isinstance(spinBox, qt.QDoubleSpinBox) else "valueChanged(int)",
                self.updateParameterNodeFromGUI,
            )
        self.ui.modelNameLineEdit.connect("editingFinished()", self.updateParameterNodeFromGUI)
        for pathEdit in (
            self.ui.modelsRootPathLineEdit,
            self.ui.exportPathLineEdit,
            self.ui.importPathLineEdit,
            self.ui.qemscanColorTablePathLineEdit,
        ):
            pathEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)

        # actions
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.registerButton.connect("clicked(bool)", lambda _checked=False: self.onRegister(refine=False))
        self.ui.refineButton.connect("clicked(bool)", lambda _checked=False: self.onRegister(refine=True))
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.importButton.connect("clicked(bool)", self.onImportButton)
        self.ui.loadQemscanButton.connect("clicked(bool)", self.onLoadQemscan)
        self.ui.addModelFolderButton.connect("clicked(bool)", self.onAddModelFolder)
        self.ui.refreshModelsButton.connect("clicked(bool)", lambda _checked=False: self.refreshModels())
        self.ui.addTrainFilesButton.connect("clicked(bool)", self.onAddTrainFiles)
        self.ui.removeTrainFilesButton.connect("clicked(bool)", self.onRemoveTrainFiles)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.refreshModels()

    def cleanup(self):
        self.cancelJob()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.cancelJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node -------------------------------------------------------------------------

    def _params(self):
        return Parameters(self._parameterNode)

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        params = self._params()
        if params.node_ref("PPVolume") is None:
            volumes = slicer.util.getNodesByClass("vtkMRMLVectorVolumeNode")
            pp, xp = find_pp_xp(volumes, params.get("PpPattern"), (params.get("XpPattern"), "PX"))
            pp = pp or (volumes[0] if volumes else None)
            if pp is not None:
                params.set_node_ref("PPVolume", pp)
            if xp is not None and params.node_ref("XPVolume") is None:
                params.set_node_ref("XPVolume", xp)

    def setParameterNode(self, node):
        if self._parameterNode is not None and self.hasObserver(
            self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode
        ):
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            p = self._params()
            self.ui.ppSelector.setCurrentNode(p.node_ref("PPVolume"))
            self.ui.xpSelector.setCurrentNode(p.node_ref("XPVolume"))
            self.ui.outputSelector.setCurrentNode(p.node_ref("OutputLabelmap"))
            self.ui.qemscanSelector.setCurrentNode(p.node_ref("QemscanVolume"))
            self.ui.imageLandmarksSelector.setCurrentNode(p.node_ref("ImageLandmarks"))
            self.ui.qemscanLandmarksSelector.setCurrentNode(p.node_ref("QemscanLandmarks"))
            self.ui.imagePlaceWidget.setCurrentNode(p.node_ref("ImageLandmarks"))
            self.ui.qemscanPlaceWidget.setCurrentNode(p.node_ref("QemscanLandmarks"))
            self._selectModel(p.get("ModelPath"))
            self.ui.deviceComboBox.setCurrentIndex(max(0, self.ui.deviceComboBox.findText(p.get("Device"))))
            kind = p.get("TransformKind")
            self.ui.transformTypeComboBox.setCurrentIndex(TRANSFORM_KINDS.index(kind) if kind in TRANSFORM_KINDS else 0)
            self.ui.confidenceCheckBox.checked = p.bool("Confidence")
            self.ui.createSegmentationCheckBox.checked = p.bool("CreateSegmentation")
            self.ui.fineTuneCheckBox.checked = p.bool("FineTune")
            self.ui.qemscanSpacingSpinBox.value = p.float("QemscanMmPerPixel")
            self.ui.epochsSpinBox.value = p.int("Epochs")
            self.ui.patchSizeSpinBox.value = p.int("PatchSize")
            self.ui.batchSizeSpinBox.value = p.int("BatchSize")
            self.ui.stepsPerEpochSpinBox.value = p.int("StepsPerEpoch")
            self.ui.valFractionSpinBox.value = p.float("ValFraction")
            self.ui.modelNameLineEdit.text = p.get("ModelName")
            self.ui.modelsRootPathLineEdit.currentPath = p.get("UserModelsRoot") or str(
                models.default_user_models_root()
            )
            self.ui.exportPathLineEdit.currentPath = p.get("ExportPath")
            self.ui.importPathLineEdit.currentPath = p.get("ImportPath")
            self.ui.trainFilesList.clear()
            for path in p.lines("TrainFiles"):
                self.ui.trainFilesList.addItem(path)
        finally:
            self._updatingGUI = False
        self._updateButtons()

    def updateParameterNodeFromGUI(self, *args):
        if self._parameterNode is None or self._updatingGUI:
            return
        p = self._params()
        wasModifying = self._parameterNode.StartModify()
        try:
            p.set_node_ref("PPVolume", self.ui.ppSelector.currentNode())
            p.set_node_ref("XPVolume", self.ui.xpSelector.currentNode())
            p.set_node_ref("OutputLabelmap", self.ui.outputSelector.currentNode())
            p.set_node_ref("QemscanVolume", self.ui.qemscanSelector.currentNode())
            p.set_node_ref("ImageLandmarks", self.ui.imageLandmarksSelector.currentNode())
            p.set_node_ref("QemscanLandmarks", self.ui.qemscanLandmarksSelector.currentNode())
            model = self._currentModel()
            if model:
                p.set("ModelPath", model)
            p.set("Device", self.ui.deviceComboBox.currentText)
            p.set("TransformKind", TRANSFORM_KINDS[max(0, self.ui.transformTypeComboBox.currentIndex)])
            p.set("Confidence", self.ui.confidenceCheckBox.checked)
            p.set("CreateSegmentation", self.ui.createSegmentationCheckBox.checked)
            p.set("FineTune", self.ui.fineTuneCheckBox.checked)
            p.set("QemscanMmPerPixel", self.ui.qemscanSpacingSpinBox.value)
            p.set("Epochs", self.ui.epochsSpinBox.value)
            p.set("PatchSize", self.ui.patchSizeSpinBox.value)
            p.set("BatchSize", self.ui.batchSizeSpinBox.value)
            p.set("StepsPerEpoch", self.ui.stepsPerEpochSpinBox.value)
            p.set("ValFraction", self.ui.valFractionSpinBox.value)
            p.set("ModelName", self.ui.modelNameLineEdit.text)
            p.set("UserModelsRoot", self.ui.modelsRootPathLineEdit.currentPath)
            p.set("ExportPath", self.ui.exportPathLineEdit.currentPath)
            p.set("ImportPath", self.ui.importPathLineEdit.currentPath)
            p.set(
                "TrainFiles",
                "\n".join(self.ui.trainFilesList.item(i).text() for i in range(self.ui.trainFilesList.count)),
            )
        finally:
            self._parameterNode.EndModify(wasModifying)
        self._updateButtons()

    def _updateButtons(self):
        running = self._process is not None
        for button in (self.ui.segmentButton, self.ui.registerButton, self.ui.refineButton, self.ui.trainButton):
            button.enabled = (not running) or button is self._jobButton
        self.ui.exportButton.enabled = not running
        self.ui.importButton.enabled = not running

    # -- models ---------------------------------------------------------------------------------

    def _userModelRoots(self):
        p = self._params() if self._parameterNode is not None else None
        roots = [p.get("UserModelsRoot") if p else "", str(models.default_user_models_root())]
        stored = qt.QSettings().value(SETTINGS_MODEL_ROOTS) or []
        roots += [stored] if isinstance(stored, str) else list(stored)
        return [r for r in roots if r]

    def refreshModels(self, select=None):
        wanted = (
            str(select)
            if select
            else (self._currentModel() or (self._params().get("ModelPath") if self._parameterNode else ""))
        )
        self._updatingGUI = True
        try:
            self.ui.modelSelector.clear()
            for info in self.logic.availableModels(self._userModelRoots()):
                self.ui.modelSelector.addItem(info.label, str(info.path))
                self.ui.modelSelector.setItemData(
                    self.ui.modelSelector.count - 1, info.description or str(info.path), qt.Qt.ToolTipRole
                )
        finally:
            self._updatingGUI = False
        if self.ui.modelSelector.count == 0:
            self.ui.modelCardBrowser.setPlainText("No model found. Add a model folder with the + button.")
            return
        self._selectModel(wanted)
        self.onModelChanged()

    def _selectModel(self, path):
        index = -1
        if path:
            wanted = os.path.realpath(str(path))
            for i in range(self.ui.modelSelector.count):
                if os.path.realpath(str(self.ui.modelSelector.itemData(i))) == wanted:
                    index = i
                    break
        wasUpdating, self._updatingGUI = self._updatingGUI, True
        self.ui.modelSelector.setCurrentIndex(index if index >= 0 else 0)
        self._updatingGUI = wasUpdating

    def _currentModel(self):
        """The selected model folder (None when the list is empty)."""
        index = self.ui.modelSelector.currentIndex
        return self.ui.modelSelector.itemData(index) if index >= 0 else None

    def onModelChanged(self, *args):
        path = self._currentModel()
        if path:
            card = self.logic.modelCard(path)
            if hasattr(self.ui.modelCardBrowser, "setMarkdown"):
                self.ui.modelCardBrowser.setMarkdown(card)
            else:
                self.ui.modelCardBrowser.setPlainText(card)
            info = models.read_model_info(path)
            self.ui.xpSelector.toolTip = (
                "This model needs an XP image." if info.needs_xp else "This model uses PP only; XP is ignored."
            )
        self.updateParameterNodeFromGUI()

    def onAddModelFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), "Folder of models (holding ThinSectionEnv/)"
        )
        if not folder:
            return
        settings = qt.QSettings()
        stored = settings.value(SETTINGS_MODEL_ROOTS) or []
        stored = [stored] if isinstance(stored, str) else list(stored)
        if folder not in stored:
            settings.setValue(SETTINGS_MODEL_ROOTS, stored + [folder])
        self.refreshModels()

    # -- errors, dependencies -------------------------------------------------------------------

    @contextmanager
    def _errors(self, title):
        """Show a failure in a dialog with the core's message, and log it."""
        try:
            yield
        except Exception as error:
            message = str(error) if isinstance(error, ThinSegError) else f"{type(error).__name__}: {error}"
            logging.error(f"{title}: {message}")
            if not isinstance(error, ThinSegError):
                logging.error(traceback.format_exc())
            self.ui.statusLabel.text = f"{title}: {message}"
            slicer.util.errorDisplay(f"{title}\n\n{message}", windowTitle="Thin Section Segmentation")

    def _ensureDependencies(self):
        """On first use: ask once, then install the core's requirements into Slicer's Python."""
        if self._dependenciesChecked:
            return True
        if not dependencies.missing_requirements() and not dependencies.torch_missing():
            self._dependenciesChecked = True
            return True
        if self._declinedInstall:
            slicer.util.errorDisplay(
                "Thin Section Segmentation needs its Python packages (PyTorch, MONAI, netCDF4, "
                "...). Reload the module to be asked again."
            )
            return False
        try:
            with slicer.util.WaitCursor():
                ok = dependencies.ensure_installed(confirm=lambda text: slicer.util.confirmOkCancelDisplay(text))
        except ThinSegError as error:
            logging.error(str(error))
            slicer.util.errorDisplay(str(error))
            return False
        if not ok:
            self._declinedInstall = True
            return False
        self._dependenciesChecked = True
        return True

    # -- background jobs ------------------------------------------------------------------------

    def _start(self, job, button, finish):
        self._process = job.start()
        self._job, self._finish, self._jobButton = job, finish, button
        self._jobButtonText = button.text
        button.text = "Cancel"
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Starting..."
        logging.info("Thin Section Segmentation: " + " ".join(job.command))
        self._updateButtons()
        self._timer.start()

    def _running(self):
        return self._process is not None

    def onCancel(self):
        if self._process is not None:
            self.ui.statusLabel.text = "Cancelling..."
            self._process.cancel(wait=False)

    def cancelJob(self):
        """Stop a running job now (scene closing, module cleanup); nothing is imported."""
        if self._process is not None:
            self._process.cancel(grace=3.0, wait=True)
            self._timer.stop()
            self.logic.discardJob(self._job)
            self._resetJob()

    def _resetJob(self):
        if self._jobButton is not None:
            self._jobButton.text = self._jobButtonText
        self._process = self._job = self._finish = self._jobButton = None
        self._updateButtons()

    def _poll(self):
        if self._process is None:
            self._timer.stop()
            return
        for event in self._process.poll():
            self._show(event)
        if self._process.finished:
            self._timer.stop()
            self._onFinished()

    def _show(self, event):
        if isinstance(event, process.Progress):
            self.ui.progressBar.value = int(1000 * min(1.0, event.fraction))
            rate = f", {event.rate}" if event.rate else ""
            self.ui.statusLabel.text = f"{event.name}: {event.done}/{event.total}{rate}"
        elif isinstance(event, process.Epoch):
            self._epochs.append(event)
            table, chart = self.logic.trainingCurve(
                self._epochs, *self._curveNodes, name=self._params().get("ModelName") or "Training"
            )
            if self._curveNodes[1] is None:
                self._showChart(chart)
            self._curveNodes = (table, chart)
            iou = f", validation mean IoU {event.val_mean_iou:.3f}" if event.val_mean_iou is not None else ""
            self.ui.statusLabel.text = f"Epoch {event.epoch}/{event.epochs}: loss {event.loss:.4f}{iou}"
            logging.info(self.ui.statusLabel.text)
        elif isinstance(event, process.Event) and event.kind in ("stage", "warning"):
            self.ui.statusLabel.text = str(event.data.get("text", ""))
            (logging.warning if event.kind == "warning" else logging.info)(self.ui.statusLabel.text)
        elif isinstance(event, process.ErrorLine):
            logging.error(f"thinseg: {event.text}")
        elif isinstance(event, process.Message):
            logging.info(f"thinseg: {event.text}")

    def _onFinished(self):
        proc, job, finish = self._process, self._job, self._finish
        try:
            if proc.cancelled:
                self.ui.statusLabel.text = "Cancelled; nothing was changed."
                self.ui.progressBar.value = 0
                return
            with self._errors(f"{job.kind.capitalize()} failed"):
                proc.check()
                with slicer.util.WaitCursor():
                    finish(job)
                self.ui.progressBar.value = 1000
        finally:
            self.logic.discardJob(job)
            self._resetJob()

    # -- segment --------------------------------------------------------------------------------

    def onSegmentButton(self):
        if self._running():
            return self.onCancel()
        if not self._ensureDependencies():
            return
        with self._errors("Cannot start the segmentation"):
            p = self._params()
            job = self.logic.prepareSegmentation(
                self.ui.ppSelector.currentNode(),
                self.ui.xpSelector.currentNode(),
                self._currentModel(),
                device=p.get("Device"),
                confidence=p.bool("Confidence"),
            )
            self._start(job, self.ui.segmentButton, self._finishSegmentation)

    def _finishSegmentation(self, job):
        labelmap = self.logic.finishSegmentation(
            job,
            outputNode=self.ui.outputSelector.currentNode(),
            createSegmentation=self.ui.createSegmentationCheckBox.checked,
        )
        result = self.logic.lastSegmentation  # the output selector is left as it was: the next run
        pp = self.ui.ppSelector.currentNode()  # makes a new labelmap unless one was chosen
        slicer.util.setSliceViewerLayers(background=pp, label=labelmap, labelOpacity=0.5, fit=True)
        self._showChart(result.chart, result.table)
        self.ui.statusLabel.text = f"Done: {labelmap.GetName()}"

    def _showChart(self, chart, table=None):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        layoutManager.setLayout(
            slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView
            if table is not None
            else slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotView
        )
        slicer.modules.plots.logic().ShowChartInLayout(chart)
        if table is not None:
            selection = slicer.app.applicationLogic().GetSelectionNode()
            selection.SetActiveTableID(table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()

    # -- register -------------------------------------------------------------------------------

    def onLoadQemscan(self):
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), "QEMSCAN map", "", "QEMSCAN maps (*.tif *.tiff *.png *.nc);;All files (*)"
        )
        if not path:
            return
        if not self._ensureDependencies():
            return
        with self._errors("Cannot load the QEMSCAN map"), slicer.util.WaitCursor():
            colors = self.ui.qemscanColorTablePathLineEdit.currentPath or None
            node = self.logic.loadQemscan(path, colors, mmPerPixel=self.ui.qemscanSpacingSpinBox.value)
            self.ui.qemscanSelector.setCurrentNode(node)
            self.ui.statusLabel.text = f"Loaded {node.GetName()}"

    def onRegister(self, refine):
        if self._running():
            return self.onCancel()
        if not self._ensureDependencies():
            return
        with self._errors("Cannot start the registration"):
            imagePoints = self.ui.imageLandmarksSelector.currentNode()
            qemscanPoints = self.ui.qemscanLandmarksSelector.currentNode()
            landmarks = None
            if (imagePoints is None) != (qemscanPoints is None):  # half a pair of lists is a mistake, not "automatic"
                raise ThinSegError(
                    "choose both landmark lists (PP points and QEMSCAN points), or neither for the automatic search"
                )
            if imagePoints is not None and qemscanPoints is not None and imagePoints.GetNumberOfControlPoints() > 0:
                landmarks = (imagePoints, qemscanPoints)
            kind = TRANSFORM_KINDS[max(0, self.ui.transformTypeComboBox.currentIndex)]
            job = self.logic.prepareRegistration(
                self.ui.ppSelector.currentNode(),
                self.ui.qemscanSelector.currentNode(),
                landmarks,
                refine=refine,
                xpNode=self.ui.xpSelector.currentNode(),
                kind=kind,
            )
            self._start(job, self.ui.refineButton if refine else self.ui.registerButton, self._finishRegistration)

    def _finishRegistration(self, job):
        transform, labelmap = self.logic.finishRegistration(job)
        result = self.logic.lastRegistration
        self.ui.residualsTableView.setMRMLTableNode(result.residuals)
        pp = self.ui.ppSelector.currentNode()
        slicer.util.setSliceViewerLayers(background=pp, label=labelmap, labelOpacity=0.5, fit=True)
        self.ui.trainSectionsSelector.setCheckState(labelmap, qt.Qt.Checked)  # ready to train on
        warnings = "; ".join(result.warnings)
        self.ui.statusLabel.text = f"Registered: {labelmap.GetName()} ({transform.GetName()})" + (
            f". Warning: {warnings}" if warnings else ""
        )
        for warning in result.warnings:
            logging.warning(warning)

    # -- train ----------------------------------------------------------------------------------

    def onAddTrainFiles(self):
        paths = qt.QFileDialog.getOpenFileNames(
            slicer.util.mainWindow(), "Registered sections (netCDF)", "", "netCDF (*.nc *.h5 *.hdf5)"
        )
        for path in paths:
            self.ui.trainFilesList.addItem(path)
        self.updateParameterNodeFromGUI()

    def onRemoveTrainFiles(self):
        for item in self.ui.trainFilesList.selectedItems():
            self.ui.trainFilesList.takeItem(self.ui.trainFilesList.row(item))
        self.updateParameterNodeFromGUI()

    def onTrainButton(self):
        if self._running():
            return self.onCancel()
        if not self._ensureDependencies():
            return
        with self._errors("Cannot start the training"):
            p = self._params()
            sections = list(self.ui.trainSectionsSelector.checkedNodes()) + p.lines("TrainFiles")
            initFrom = self._currentModel() if p.bool("FineTune") else None
            job = self.logic.prepareTraining(
                sections,
                p.get("ModelName"),
                modelsRoot=p.get("UserModelsRoot") or None,
                epochs=p.int("Epochs"),
                initFrom=initFrom,
                device=p.get("Device"),
                patchSize=p.int("PatchSize"),
                batchSize=p.int("BatchSize"),
                stepsPerEpoch=p.int("StepsPerEpoch"),
                valFraction=p.float("ValFraction"),
            )
            self._epochs, self._curveNodes = [], (None, None)
            self._start(job, self.ui.trainButton, self._finishTraining)

    def _finishTraining(self, job):
        model = self.logic.finishTraining(job)
        self.refreshModels(select=model)
        self.ui.statusLabel.text = f"New model: {model}"

    # -- export / import ------------------------------------------------------------------------

    def selectedExportNodes(self):
        """Data nodes of the selected subject-hierarchy items (folders contribute their content)."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        ids = vtk.vtkIdList()
        self.ui.exportTreeView.currentItems(ids)
        nodes = []
        for i in range(ids.GetNumberOfIds()):
            item = ids.GetId(i)
            node = shNode.GetItemDataNode(item)
            if node is not None:
                nodes.append(node)
                continue
            children = vtk.vtkIdList()
            shNode.GetItemChildren(item, children, True)
            nodes += [shNode.GetItemDataNode(children.GetId(j)) for j in range(children.GetNumberOfIds())]
        exportable = ("vtkMRMLVolumeNode", "vtkMRMLSegmentationNode")
        return [n for n in nodes if n is not None and any(n.IsA(c) for c in exportable)]

    def onExportButton(self):
        if not self._ensureDependencies():
            return
        with self._errors("Export failed"), slicer.util.WaitCursor():
            path = self.ui.exportPathLineEdit.currentPath
            if not path:
                raise ValueError("choose the netCDF file to write")
            if not path.lower().endswith(".nc"):
                path += ".nc"
            names = self.logic.exportNetcdf(self.selectedExportNodes(), path)
            self.ui.statusLabel.text = f"Exported {len(names)} variable(s) to {path}"

    def onImportButton(self):
        if not self._ensureDependencies():
            return
        with self._errors("Import failed"), slicer.util.WaitCursor():
            path = self.ui.importPathLineEdit.currentPath
            nodes = self.logic.importNetcdf(path, ppPattern=self._params().get("PpPattern"))
            imported = self.logic.lastImport
            if imported.pp is not None:
                self.ui.ppSelector.setCurrentNode(imported.pp)
                self.ui.xpSelector.setCurrentNode(imported.xp)
                slicer.util.setSliceViewerLayers(background=imported.pp, fit=True)
            skipped = f" (skipped: {'; '.join(imported.skipped)})" if imported.skipped else ""
            self.ui.statusLabel.text = f"Imported {len(nodes)} node(s) from {os.path.basename(path)}{skipped}"


# -----------------------------------------------------------------------------------------------


class ThinSectionSegmentationTest(ScriptedLoadableModuleTest):
    """In-Slicer tests: the widget path end to end on the bundled sample (needs Slicer; the MRML
    logic itself is covered by the pytest suite on slicer-core)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_logic_round_trip()
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

    def _wait(self, widget, timeout=600):
        start = time.time()
        while widget._process is not None:
            slicer.app.processEvents()
            time.sleep(0.05)
            self.assertLess(time.time() - start, timeout, "the background job did not finish in time")
        slicer.app.processEvents()

    def test_logic_round_trip(self):
        logic = ThinSectionSegmentationLogic()
        pp, xp = self._sample()
        path = os.path.join(tempfile.mkdtemp(), "sample.nc")
        logic.exportNetcdf([pp, xp], path)
        nodes = logic.importNetcdf(path)
        self.assertEqual(len(nodes), 2)
        self.assertTrue((volumes.rgb_array(nodes[0]) == volumes.rgb_array(pp)).all())
        self.assertEqual(logic.lastImport.pp.GetName(), "sample_PP")
        self.delayDisplay("netCDF round trip passed")

    def test_widget_end_to_end(self):
        self.assertTrue(default_model_dir().is_dir(), "the bundled model is missing")
        slicer.util.selectModule("ThinSectionSegmentation")
        widget = slicer.modules.thinsectionsegmentation.widgetRepresentation().self()
        pp, xp = self._sample()
        widget.ui.ppSelector.setCurrentNode(pp)
        widget.ui.xpSelector.setCurrentNode(xp)
        widget.refreshModels(select=default_model_dir())

        # Cancel leaves the scene as it was
        before = slicer.mrmlScene.GetNumberOfNodes()
        widget.ui.segmentButton.click()
        self.assertEqual(widget.ui.segmentButton.text, "Cancel")
        widget.ui.segmentButton.click()
        self._wait(widget)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.assertEqual(widget.ui.segmentButton.text, "Segment")

        # Segment
        widget.ui.segmentButton.click()
        self._wait(widget)
        self.assertIsNotNone(widget.logic.lastSegmentation)
        labelmap = widget.logic.lastSegmentation.labelmap
        self.assertEqual(labelmap.GetName(), "sample_Segmentation")
        colors = labelmap.GetDisplayNode().GetColorNode()
        self.assertEqual(colors.GetColorName(1), "Calcite")
        self.assertIsNotNone(widget.logic.lastSegmentation.chart)
        self.delayDisplay("Segmentation done")

        # Register with landmarks taken from the sample's true transform
        truth = json.loads((sample_dir() / "sample_truth_transform.json").read_text())
        qemscan = widget.logic.loadQemscan(
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
        widget.ui.qemscanSelector.setCurrentNode(qemscan)
        widget.ui.imageLandmarksSelector.setCurrentNode(lists[0])
        widget.ui.qemscanLandmarksSelector.setCurrentNode(lists[1])
        widget.ui.registerButton.click()
        self._wait(widget)
        result = widget.logic.lastRegistration
        self.assertIsNotNone(result)
        self.assertEqual(result.residuals.GetTable().GetNumberOfRows(), 4)
        registered = volumes.label_array(result.labelmap)
        self.assertEqual(registered.shape, volumes.rgb_array(pp).shape[:2])
        self.delayDisplay("Registration done")

        # Export and import
        path = os.path.join(tempfile.mkdtemp(), "sample_result.nc")
        widget.logic.exportNetcdf([pp, xp, labelmap], path)
        nodes = widget.logic.importNetcdf(path)
        imported = next(n for n in nodes if n.IsA("vtkMRMLLabelMapVolumeNode"))
        self.assertTrue((volumes.label_array(imported) == volumes.label_array(labelmap)).all())
        self.delayDisplay("Test passed")
