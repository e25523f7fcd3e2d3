"""The module's panel (Qt): its widgets, their binding to the parameter node, the buttons.

The one Qt file of the package besides the module file. It reaches the scene and the core only
through a `PanelLogic` (protocols.py; ThinSectionSegmentationLogic by default, a fake one in a
test), follows background jobs through `session.JobSession`, and keeps its settings in the
typed parameter node (parameters.py): Slicer's parameterNodeWrapper binds the widgets named by
`SlicerParameterName` in the .ui file, guibinding.py the few it has no connector for.
"""

import logging
import os
import traceback
from contextlib import contextmanager
from pathlib import Path

import qt
import slicer
import vtk
from slicer.util import VTKObservationMixin

from thinseg.errors import ThinSegError
from thinseg.jobs import EpochEvent

from . import dependencies, models, parameters
from .guibinding import SLICER_PROPERTY, THINSEG_PROPERTY, GuiBinding, named_widgets
from .logic import ThinSectionSegmentationLogic
from .session import JobSession, status_of

UI_FILE = Path(__file__).resolve().parents[1] / "Resources" / "UI" / "ThinSectionSegmentation.ui"
SETTINGS_MODEL_ROOTS = "ThinSectionSegmentation/ModelRoots"
TITLE = "Thin Section Segmentation"
#: Field -> (combo box, the choices before the file row, the file row's text, the file dialog's
#: title and filter).
STITCH_CHOICES = {
    "stitchFlatField": (
        "stitchFlatFieldComboBox",
        parameters.STITCH_FLAT_FIELDS,
        "Reference image...",
        "Blank-field reference image",
        "Images (*.png *.jpg *.jpeg *.tif *.tiff)",
    ),
    "stitchLayout": (
        "stitchLayoutComboBox",
        parameters.STITCH_LAYOUTS,
        "Tile-position file...",
        "Tile positions (Fiji TileConfiguration)",
        "Tile configurations (*.txt);;All files (*)",
    ),
}


class ThinSectionSegmentationPanel(VTKObservationMixin):
    """The panel: `widget` goes into the module's layout. `logic` defaults to the real one;
    with `showDialogs=False` errors only go to the status line and the log (tests)."""

    def __init__(self, logic=None, showDialogs=True):
        VTKObservationMixin.__init__(self)
        self.logic = logic or ThinSectionSegmentationLogic()
        self.showDialogs = showDialogs
        self.params = None
        self.session = None  # the JobSession while a job runs
        self.completedResult = None  # what the last finished job made (SegmentationOutput, ...)
        self._jobButton = None
        self._jobButtonText = ""
        self._onResult = None
        self._curveNodes = (None, None)
        self._guiTag = None
        self._binding = None
        self._paramObserver = None
        self._dependenciesChecked = False
        self._declinedInstall = False
        self._entered = False
        self._grainCancel = None  # [cancel asked] while a grain analysis runs
        self._stitchCancel = None  # [cancel asked] while a stitch runs

        self.widget = slicer.util.loadUI(str(UI_FILE))
        self.ui = slicer.util.childWidgetVariables(self.widget)
        self.widget.setMRMLScene(slicer.mrmlScene)

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._poll)

        ui = self.ui
        ui.imagePlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        ui.qemscanPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        ui.imageLandmarksSelector.connect("currentNodeChanged(vtkMRMLNode*)", ui.imagePlaceWidget.setCurrentNode)
        ui.qemscanLandmarksSelector.connect("currentNodeChanged(vtkMRMLNode*)", ui.qemscanPlaceWidget.setCurrentNode)
        ui.refreshModelsButton.setIcon(qt.QApplication.style().standardIcon(qt.QStyle.SP_BrowserReload))
        ui.refreshModelsButton.text = ""
        ui.exportTreeView.setMultiSelection(True)
        ui.residualsTableView.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)

        ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        ui.registerButton.connect("clicked(bool)", lambda _checked=False: self.onRegister(refine=False))
        ui.refineButton.connect("clicked(bool)", lambda _checked=False: self.onRegister(refine=True))
        ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        ui.exportButton.connect("clicked(bool)", self.onExportButton)
        ui.importButton.connect("clicked(bool)", self.onImportButton)
        ui.analyzeGrainsButton.connect("clicked(bool)", self.onAnalyzeGrainsButton)
        ui.stitchButton.connect("clicked(bool)", self.onStitchButton)
        ui.stitchFlatFieldComboBox.connect("activated(int)", lambda row: self.onStitchChoice("stitchFlatField", row))
        ui.stitchLayoutComboBox.connect("activated(int)", lambda row: self.onStitchChoice("stitchLayout", row))
        ui.loadQemscanButton.connect("clicked(bool)", self.onLoadQemscan)
        ui.addModelFolderButton.connect("clicked(bool)", self.onAddModelFolder)
        ui.refreshModelsButton.connect("clicked(bool)", lambda _checked=False: self.refreshModels())
        ui.addTrainFilesButton.connect("clicked(bool)", self.onAddTrainFiles)
        ui.removeTrainFilesButton.connect("clicked(bool)", self.onRemoveTrainFiles)
        # activated: the user's choice only, not a scene load or the binding filling the combo box
        ui.trainingRecipeComboBox.connect("activated(int)", self.onRecipeChosen)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.initializeParameterNode()
        self.refreshModels()

    # -- life cycle -----------------------------------------------------------------------------

    def cleanup(self):
        self.cancelJob()
        self.setParameterNode(None)
        self.removeObservers()

    def enter(self):
        self._entered = True
        self.initializeParameterNode()

    def exit(self):
        self._entered = False
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.cancelJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self._entered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event):
        """A loaded scene may bring its own settings (an earlier version's are converted)."""
        if self.params is not None:
            self.initializeParameterNode()

    # -- parameter node -------------------------------------------------------------------------

    def initializeParameterNode(self):
        params = self.logic.getParameterNode()
        self.logic.chooseInputImages(params)
        self.setParameterNode(params)

    def setParameterNode(self, params):
        """Bind the widgets to `params` (None: unbind)."""
        if self.params is not None:
            if self._guiTag is not None:
                self.params.disconnectGui(self._guiTag)
            if self._binding is not None:
                self._binding.disconnect()
            if self._paramObserver is not None:
                self.params.parameterNode.RemoveObserver(self._paramObserver)
        self.params, self._guiTag, self._binding, self._paramObserver = params, None, None, None
        if params is None:
            return
        widgets = list(vars(self.ui).values())
        if hasattr(params, "connectParametersToGui"):  # Slicer's parameterNodeWrapper
            # what connectGui(self.ui) does, but connectGui returns no tag to disconnect with before Slicer 5.10
            self._guiTag = params.connectParametersToGui(named_widgets(widgets, [SLICER_PROPERTY]))
            bound_here = named_widgets(widgets, [THINSEG_PROPERTY])
        else:
            bound_here = named_widgets(widgets, [SLICER_PROPERTY, THINSEG_PROPERTY])
        self._binding = GuiBinding(params, bound_here).connect()
        for index, recipe in enumerate(parameters.TrainingRecipe):  # binding refills the items: tips after it
            self.ui.trainingRecipeComboBox.setItemData(index, recipe.description(), qt.Qt.ToolTipRole)
        self._paramObserver = params.parameterNode.AddObserver(
            vtk.vtkCommand.ModifiedEvent, lambda caller, event: self._onParametersModified()
        )
        self._onParametersModified()

    def _onParametersModified(self):
        if self.params is not None and self.params.modelPath and self.params.modelPath != self._currentModel():
            self._selectModel(self.params.modelPath)
        self._showStitchChoices()
        self._updateButtons()

    def _updateButtons(self):
        running = self.session is not None or self._grainCancel is not None or self._stitchCancel is not None
        for button in (self.ui.segmentButton, self.ui.registerButton, self.ui.refineButton, self.ui.trainButton):
            button.enabled = (not running) or button is self._jobButton
        self.ui.exportButton.enabled = not running
        self.ui.importButton.enabled = not running
        self.ui.analyzeGrainsButton.enabled = self.session is None and self._stitchCancel is None  # Cancel meanwhile
        self.ui.stitchButton.enabled = self.session is None and self._grainCancel is None  # Cancel while stitching

    # -- models ---------------------------------------------------------------------------------

    def _userModelRoots(self):
        roots = [self.params.userModelsRoot if self.params is not None else "", str(models.default_user_models_root())]
        stored = qt.QSettings().value(SETTINGS_MODEL_ROOTS) or []
        roots += [stored] if isinstance(stored, str) else list(stored)
        return [r for r in roots if r]

    def refreshModels(self, select=None):
        wanted = str(select) if select else (self._currentModel() or (self.params.modelPath if self.params else ""))
        selector = self.ui.modelSelector
        wasBlocked = selector.blockSignals(True)
        try:
            selector.clear()
            geoslicerRoots = models.geoslicer_model_roots(
                slicer.app.settings().value(models.GEOSLICER_MODEL_PATHS_SETTING)
            )
            for info in self.logic.availableModels(self._userModelRoots(), geoslicerRoots):
                selector.addItem(info.label, str(info.path))
                selector.setItemData(selector.count - 1, info.description or str(info.path), qt.Qt.ToolTipRole)
        finally:
            selector.blockSignals(wasBlocked)
        if selector.count == 0:
            self.ui.modelCardBrowser.setPlainText("No model found. Add a model folder with the + button.")
            return
        self._selectModel(wanted)
        self.onModelChanged()

    def _selectModel(self, path):
        index = 0
        if path:
            wanted = os.path.realpath(str(path))
            for i in range(self.ui.modelSelector.count):
                if os.path.realpath(str(self.ui.modelSelector.itemData(i))) == wanted:
                    index = i
                    break
        self.ui.modelSelector.setCurrentIndex(index)

    def _currentModel(self):
        """The selected model folder (None when the list is empty)."""
        index = self.ui.modelSelector.currentIndex
        return self.ui.modelSelector.itemData(index) if index >= 0 else None

    def onModelChanged(self, *args):
        path = self._currentModel()
        if not path:
            return
        card = self.logic.modelCard(path)
        if hasattr(self.ui.modelCardBrowser, "setMarkdown"):
            self.ui.modelCardBrowser.setMarkdown(card)
        else:
            self.ui.modelCardBrowser.setPlainText(card)
        info = self.logic.modelInfo(path)
        self.ui.xpSelector.toolTip = (
            "This model needs an XP image." if info.needs_xp else "This model uses PP only; XP is ignored."
        )
        if self.params is not None and self.params.modelPath != path:
            self.params.modelPath = path

    def onAddModelFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), "Folder of models (holding ThinSectionEnv/Multiphase/)"
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
        """Show a failure with the core's message (a dialog unless showDialogs is off), and log it."""
        try:
            yield
        except Exception as error:
            message = str(error) if isinstance(error, ThinSegError) else f"{type(error).__name__}: {error}"
            logging.error(f"{title}: {message}")
            if not isinstance(error, ThinSegError):
                logging.error(traceback.format_exc())
            self.ui.statusLabel.text = f"{title}: {message}"
            if self.showDialogs:
                slicer.util.errorDisplay(f"{title}\n\n{message}", windowTitle=TITLE)

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

    def _start(self, job, button, finish, onResult):
        """Run a prepared job; `finish(job)` imports its outputs, `onResult(result)` shows them."""
        self.session = JobSession(self.logic, job, finish).start()
        self._onResult, self._jobButton = onResult, button
        self._jobButtonText = button.text
        button.text = "Cancel"
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Starting..."
        logging.info(f"{TITLE}: " + " ".join(str(c) for c in getattr(job, "command", [])))
        self._updateButtons()
        self._timer.start()

    def _running(self):
        return self.session is not None

    def onCancel(self):
        if self.session is not None:
            self.ui.statusLabel.text = "Cancelling..."
            self.session.cancel(wait=False)

    def cancelJob(self):
        """Stop a running job now (scene closing, module cleanup); nothing is imported."""
        if self._grainCancel is not None:  # a grain analysis stops at its next band, adding nothing
            self._grainCancel[0] = True
        if self._stitchCancel is not None:  # a stitch stops at its next tile or band, writing nothing
            self._stitchCancel[0] = True
        if self.session is not None:
            self._timer.stop()
            self.session.stop(grace=3.0)
            self._resetJob()

    def _resetJob(self):
        if self._jobButton is not None:
            self._jobButton.text = self._jobButtonText
        self.session = self._jobButton = self._onResult = None
        self._updateButtons()

    def _poll(self):
        if self.session is None:
            self._timer.stop()
            return
        for item in self.session.poll():
            self._show(status_of(item))
            if isinstance(item, EpochEvent):
                self._updateCurve()
        if self.session.finished:
            self._timer.stop()
            self._onFinished()

    def _show(self, status):
        if status.fraction is not None:
            self.ui.progressBar.value = int(1000 * min(1.0, status.fraction))
        if status.text is not None:
            self.ui.statusLabel.text = status.text
        if status.log is not None:
            logging.log(status.level, f"{TITLE}: {status.log}")

    def _updateCurve(self):
        name = (self.params.modelName if self.params is not None else "") or "Training"
        table, chart = self.logic.trainingCurve(self.session.epochs, *self._curveNodes, name=name)
        if self._curveNodes[1] is None:
            self._showChart(chart)
        self._curveNodes = (table, chart)

    def _onFinished(self):
        session, onResult = self.session, self._onResult
        try:
            if session.cancelled:
                session.complete()
                self.ui.statusLabel.text = "Cancelled; nothing was changed."
                self.ui.progressBar.value = 0
                return
            with self._errors(f"{session.kind.capitalize()} failed"):
                with slicer.util.WaitCursor():
                    result = session.complete()
                self.ui.progressBar.value = 1000
                self.completedResult = result
                onResult(result)
        finally:
            self._resetJob()

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

    # -- segment --------------------------------------------------------------------------------

    def onSegmentButton(self):
        if self._running():
            return self.onCancel()
        if not self._ensureDependencies():
            return
        p = self.params
        with self._errors("Cannot start the segmentation"):
            job = self.logic.prepareSegmentation(
                p.ppVolume, p.xpVolume, self._currentModel(), device=p.device.value, confidence=p.confidence
            )
            pp, outputNode, createSegmentation = p.ppVolume, p.outputLabelmap, p.createSegmentation

            def finish(job):
                return self.logic.finishSegmentation(job, outputNode=outputNode, createSegmentation=createSegmentation)

            self._start(job, self.ui.segmentButton, finish, lambda result: self._showSegmentation(result, pp))

    def _showSegmentation(self, result, pp):
        # the output selector is left as it was: the next run makes a new labelmap unless one was chosen
        slicer.util.setSliceViewerLayers(background=pp, label=result.labelmap, labelOpacity=0.5, fit=True)
        self._showChart(result.chart, result.table)
        self.ui.statusLabel.text = f"Done: {result.labelmap.GetName()}"

    # -- register -------------------------------------------------------------------------------

    def onLoadQemscan(self):
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), "QEMSCAN map", "", "QEMSCAN maps (*.tif *.tiff *.png *.nc);;All files (*)"
        )
        if not path or not self._ensureDependencies():
            return
        p = self.params
        with self._errors("Cannot load the QEMSCAN map"), slicer.util.WaitCursor():
            node = self.logic.loadQemscan(path, p.qemscanColorTablePath or None, mmPerPixel=p.qemscanMmPerPixel)
            p.qemscanVolume = node
            self.ui.statusLabel.text = f"Loaded {node.GetName()}"

    def onRegister(self, refine):
        if self._running():
            return self.onCancel()
        if not self._ensureDependencies():
            return
        p = self.params
        with self._errors("Cannot start the registration"):
            imagePoints, qemscanPoints = p.imageLandmarks, p.qemscanLandmarks
            if (imagePoints is None) != (qemscanPoints is None):  # half a pair of lists is a mistake, not "automatic"
                raise ThinSegError(
                    "choose both landmark lists (PP points and QEMSCAN points), or neither for the automatic search"
                )
            landmarks = None
            if imagePoints is not None and imagePoints.GetNumberOfControlPoints() > 0:
                landmarks = (imagePoints, qemscanPoints)
            job = self.logic.prepareRegistration(
                p.ppVolume, p.qemscanVolume, landmarks, refine=refine, xpNode=p.xpVolume, kind=p.transformKind.value
            )
            button, pp = self.ui.refineButton if refine else self.ui.registerButton, p.ppVolume
            self._start(job, button, self.logic.finishRegistration, lambda result: self._showRegistration(result, pp))

    def _showRegistration(self, result, pp):
        self.ui.residualsTableView.setMRMLTableNode(result.residuals)
        slicer.util.setSliceViewerLayers(background=pp, label=result.labelmap, labelOpacity=0.5, fit=True)
        self.ui.trainSectionsSelector.setCheckState(result.labelmap, qt.Qt.Checked)  # ready to train on
        warnings = "; ".join(result.warnings)
        self.ui.statusLabel.text = f"Registered: {result.labelmap.GetName()} ({result.transform.GetName()})" + (
            f". Warning: {warnings}" if warnings else ""
        )
        for warning in result.warnings:
            logging.warning(warning)

    # -- train ----------------------------------------------------------------------------------

    def onAddTrainFiles(self):
        paths = qt.QFileDialog.getOpenFileNames(
            slicer.util.mainWindow(), "Registered sections (netCDF)", "", "netCDF (*.nc *.h5 *.hdf5)"
        )
        files = list(self.params.trainFiles)
        self.params.trainFiles = files + [str(p) for p in paths if str(p) not in files]

    def onRemoveTrainFiles(self):
        selected = {item.text() for item in self.ui.trainFilesList.selectedItems()}
        self.params.trainFiles = [f for f in self.params.trainFiles if f not in selected]

    def onRecipeChosen(self, index):
        """Set the epochs and sizes to the chosen recipe's (the user may change them again)."""
        if self.params is None or not self._ensureDependencies():  # the recipes live with the training code
            return
        with self._errors("Cannot apply the recipe"):
            parameters.choose_recipe(self.params, list(parameters.TrainingRecipe)[index])

    def onTrainButton(self):
        if self._running():
            return self.onCancel()
        if not self._ensureDependencies():
            return
        p = self.params
        with self._errors("Cannot start the training"):
            sections = list(self.ui.trainSectionsSelector.checkedNodes()) + list(p.trainFiles)
            if p.trainClassesPath and p.trainColorTable is not None:
                raise ThinSegError("take the classes from a class file or from a colour table, not both: clear one")
            job = self.logic.prepareTraining(
                sections,
                p.modelName,
                modelsRoot=p.userModelsRoot or None,
                epochs=p.epochs,
                initFrom=self._currentModel() if p.fineTune else None,
                device=p.device.value,
                patchSize=p.patchSize,
                batchSize=p.batchSize,
                stepsPerEpoch=p.stepsPerEpoch,
                valFraction=p.valFraction,
                classes=p.trainClassesPath or p.trainColorTable,
                mappingCsv=p.trainMappingPath or None,
                modelMmPerPixel=p.modelMmPerPixel or None,
                ppOnly=p.ppOnly,
                recipe=p.trainingRecipe.value,
            )
            self._curveNodes = (None, None)
            self._start(job, self.ui.trainButton, self.logic.finishTraining, self._showTraining)

    def _showTraining(self, result):
        self.refreshModels(select=result.modelDir)
        self.ui.statusLabel.text = result.statusText

    # -- grain analysis -------------------------------------------------------------------------

    def onAnalyzeGrainsButton(self):
        """Analyse the chosen labelmap in this process (as `thinseg analyze`, one worker); the
        button is the Cancel button while it runs (the analysis stops between bands of rows)."""
        if self._grainCancel is not None:
            self._grainCancel[0] = True
            self.ui.statusLabel.text = "Cancelling..."
            return
        if not self._ensureDependencies():
            return
        from thinseg.analysis import Cancelled  # deferred: the analysis loads scipy and scikit-image

        p = self.params
        cancel = self._grainCancel = [False]
        button = self.ui.analyzeGrainsButton
        text, button.text = button.text, "Cancel"
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Analysing grains..."
        self._updateButtons()

        def progress(done, total):
            self.ui.progressBar.value = int(1000 * done / max(total, 1))
            slicer.app.processEvents()  # draws the bar and lets a click on Cancel through

        try:
            with self._errors("Grain analysis failed"):
                try:
                    result = self.logic.analyzeGrains(
                        p.grainLabelmap,
                        p.grainPpVolume,
                        neckRatio=p.grainNeckRatio,
                        minGrainPixels=p.grainMinPixels,
                        progress=progress,
                        cancelled=lambda: cancel[0],
                    )
                except Cancelled:
                    self.ui.progressBar.value = 0
                    self.ui.statusLabel.text = "Cancelled; nothing was changed."
                    return
                self.ui.progressBar.value = 1000
                self.completedResult = result
                self._showChart(result.sizeChart, result.summary)
                notes = "; ".join(result.messages)
                self.ui.statusLabel.text = f"Done: {result.grainCount} grains in {result.grains.GetName()}" + (
                    f". Note: {notes}" if notes else ""
                )
        finally:
            self._grainCancel = None
            button.text = text
            self._updateButtons()

    # -- stitching -------------------------------------------------------------------------------

    def _showStitchChoices(self):
        """The flat-field and layout combo boxes show their fields: a choice, or the file row
        titled with the file's name."""
        if self.params is None:
            return
        for name, (combo_name, choices, file_row, _title, _filter) in STITCH_CHOICES.items():
            combo, value = getattr(self.ui, combo_name), getattr(self.params, name)
            is_file = value not in choices
            combo.setItemText(len(choices), f"{Path(value).name}..." if is_file else file_row)
            combo.setItemData(len(choices), value if is_file else "", qt.Qt.ToolTipRole)
            combo.currentIndex = len(choices) if is_file else choices.index(value)

    def onStitchChoice(self, name, row):
        """A choice sets the field; the file row asks for the file (keeping the field on cancel)."""
        _combo, choices, _file_row, title, filters = STITCH_CHOICES[name]
        if row < len(choices):
            setattr(self.params, name, choices[row])
        else:
            path = qt.QFileDialog.getOpenFileName(self.widget, title, self.params.stitchTileFolder, filters)
            if path:
                setattr(self.params, name, str(path))
        self._showStitchChoices()

    def onStitchButton(self):
        """Stitch the tile folder in this process (threads read the tiles) and load the panoramas;
        the button is the Cancel button while it runs (the stitch stops between tiles and bands)."""
        if self._stitchCancel is not None:
            self._stitchCancel[0] = True
            self.ui.statusLabel.text = "Cancelling..."
            return
        if not self._ensureDependencies():
            return
        from thinseg.stitching import Cancelled  # deferred: stitching loads scipy and scikit-image

        p = self.params
        overwrite = False
        if p.stitchOutputFolder and Path(p.stitchOutputFolder).exists():
            question = f"{p.stitchOutputFolder} exists. Replace it with the new stitch?"
            if not (self.showDialogs and slicer.util.confirmYesNoDisplay(question, windowTitle=TITLE)):
                self.ui.statusLabel.text = f"Stitch not started: {p.stitchOutputFolder} exists"
                return
            overwrite = True
        cancel = self._stitchCancel = [False]
        button = self.ui.stitchButton
        text, button.text = button.text, "Cancel"
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Stitching..."
        self._updateButtons()

        def progress(stage, _pixels):
            start, share = (0, 300) if stage.endswith("positions") else (300, 700)
            self.ui.statusLabel.text = f"Stitching {stage}"

            def update(done, total):
                self.ui.progressBar.value = start + int(share * done / max(total, 1))
                slicer.app.processEvents()  # draws the bar and lets a click on Cancel through

            return update

        try:
            with self._errors("Stitch failed"):
                try:
                    result = self.logic.stitchTiles(
                        [p.stitchTileFolder] if p.stitchTileFolder else [],
                        p.stitchOutputFolder,
                        ppPattern=p.ppPattern,
                        xpPattern=p.xpPattern,
                        layout=p.stitchLayout or None,
                        overlap=p.stitchOverlap,
                        flatField=p.stitchFlatField,
                        overwrite=overwrite,
                        progress=progress,
                        cancelled=lambda: cancel[0],
                    )
                except Cancelled:
                    self.ui.progressBar.value = 0
                    self.ui.statusLabel.text = "Cancelled; nothing was changed."
                    return
                self.ui.progressBar.value = 1000
                self.completedResult = result
                p.ppVolume, p.xpVolume = result.ppNode, result.xpNode  # ready to segment
                if slicer.app.layoutManager() is not None:
                    slicer.util.setSliceViewerLayers(background=result.ppNode, fit=True)
                height, width = result.summary["shape"]
                notes = "; ".join(result.warnings)
                self.ui.statusLabel.text = (
                    f"Done: {result.summary['tiles_used']} tiles -> {width} x {height} px in {result.folder}"
                    + (f". Note: {notes}" if notes else "")
                )
        finally:
            self._stitchCancel = None
            button.text = text
            self._updateButtons()

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
            path = self.params.exportPath
            if not path:
                raise ThinSegError("choose the netCDF file to write")
            if not path.lower().endswith(".nc"):
                path += ".nc"
            names = self.logic.exportNetcdf(self.selectedExportNodes(), path)
            self.ui.statusLabel.text = f"Exported {len(names)} variable(s) to {path}"

    def onImportButton(self):
        if not self._ensureDependencies():
            return
        p = self.params
        with self._errors("Import failed"), slicer.util.WaitCursor():
            imported = self.logic.importNetcdf(p.importPath, ppPattern=p.ppPattern)
            if imported.pp is not None:
                p.ppVolume, p.xpVolume = imported.pp, imported.xp
                slicer.util.setSliceViewerLayers(background=imported.pp, fit=True)
            skipped = f" (skipped: {'; '.join(imported.skipped)})" if imported.skipped else ""
            self.ui.statusLabel.text = f"Imported {len(imported.nodes)} node(s) from {Path(p.importPath).name}{skipped}"
