"""Thin Section Segmentation: the Slicer/GeoSlicer module (thin Qt layer over thinseg).

Only Module/Widget/Test live here; scene logic is in ThinSectionSegmentationLib (no Qt) and
all image work in the `thinseg` core library.
"""

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


class ThinSectionSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "Thin Section Segmentation"
        parent.categories = ["Segmentation", "Thin Section"]
        parent.dependencies = []
        parent.contributors = ["ThinSectionSegmentation developers"]
        parent.helpText = (
            "Segment petrographic thin sections (PP and XP images) into mineral maps with a U-Net, "
            "register QEMSCAN maps, retrain, and export GeoSlicer netCDF. "
            "See the README of the ThinSectionSegmentation extension."
        )
        parent.acknowledgementText = (
            "Built on MONAI, PyTorch, SimpleITK and xarray. netCDF and model bundle formats follow GeoSlicer."
        )


class ThinSectionSegmentationWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)


class ThinSectionSegmentationTest(ScriptedLoadableModuleTest):
    def runTest(self):
        slicer.mrmlScene.Clear()
