"""What the panel needs from the logic and from a running job, as Protocols (no Qt).

The panel (panel.py) reaches the scene and the core only through `PanelLogic`, so it can run on
a fake logic in a test; ThinSectionSegmentationLogic is the real one (a test checks that every
method here exists there with these parameters). A job in progress is a `JobProcess`, which
process.BackgroundProcess is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from thinseg.jobs import ResultEvent

from .models import ModelInfo
from .netcdf_nodes import ImportedFile
from .process import ProcessOutput


class JobProcess(Protocol):
    """A job running in the background."""

    cancelled: bool

    @property
    def finished(self) -> bool: ...

    def poll(self) -> list[ProcessOutput]:
        """Events and output lines received since the last call; never blocks."""
        ...

    def cancel(self, grace: float = 5.0, wait: bool = True) -> None: ...

    def check(self) -> ResultEvent:
        """The result event; ThinSegError with the job's message if it failed or was cancelled."""
        ...


class PanelLogic(Protocol):
    """The operations behind the panel's buttons and selectors."""

    def getParameterNode(self) -> Any: ...

    def chooseInputImages(self, params: Any) -> None: ...

    def availableModels(self, userRoots: Iterable[str] = (), geoslicerRoots: Iterable[str] = ()) -> list[ModelInfo]: ...

    def modelCard(self, modelDir: Any) -> str: ...

    def modelInfo(self, modelDir: Any) -> ModelInfo: ...

    def prepareSegmentation(
        self, ppNode: Any, xpNode: Any = None, modelDir: Any = None, device: str = "auto", confidence: bool = False
    ) -> Any: ...

    def finishSegmentation(
        self, job: Any, outputNode: Any = None, createSegmentation: bool = False, show: bool = True
    ) -> Any: ...

    def loadQemscan(self, path: Any, colorTable: Any = None, mmPerPixel: float | None = None) -> Any: ...

    def prepareRegistration(
        self,
        ppNode: Any,
        qemscanNode: Any,
        landmarks: Any = None,
        refine: bool = True,
        xpNode: Any = None,
        kind: str = "similarity",
    ) -> Any: ...

    def finishRegistration(self, job: Any) -> Any: ...

    def prepareTraining(
        self,
        sections: Sequence[Any],
        modelName: str,
        modelsRoot: Any = None,
        epochs: int = 20,
        initFrom: Any = None,
        device: str = "auto",
        patchSize: int = 256,
        batchSize: int = 8,
        stepsPerEpoch: int = 200,
        valFraction: float = 0.2,
        classes: Any = None,
        mappingCsv: Any = None,
        modelMmPerPixel: float | None = None,
        ppOnly: bool = False,
        recipe: str = "unet",
    ) -> Any: ...

    def finishTraining(self, job: Any) -> Any: ...

    def trainingCurve(
        self, epochs: Any, tableNode: Any = None, chartNode: Any = None, name: str = "Training"
    ) -> Any: ...

    def startJob(self, job: Any) -> JobProcess: ...

    def discardJob(self, job: Any) -> None: ...

    def analyzeGrains(
        self,
        labelmapNode: Any,
        ppNode: Any = None,
        neckRatio: float = 0.7,
        minGrainPixels: int = 12,
        split: bool = True,
        options: Any = None,
        progress: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Any: ...

    def stitchTiles(
        self,
        tilePaths: Sequence[Any],
        outputFolder: Any,
        name: str | None = None,
        ppPattern: str = "PP",
        xpPattern: str | None = "XP",
        layout: str | None = None,
        overlap: float = 0.15,
        flatField: str = "auto",
        pixelSize: float | None = None,
        overwrite: bool = False,
        options: Any = None,
        progress: Callable[[str, int], Callable[[int, int], None]] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Any: ...

    def exportNetcdf(self, nodes: Sequence[Any], path: Any) -> dict: ...

    def importNetcdf(
        self, path: Any, ppPattern: str = "PP", xpPatterns: Sequence[str] = ("XP", "PX")
    ) -> ImportedFile: ...
