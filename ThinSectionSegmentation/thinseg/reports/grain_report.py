"""The grain analysis as people look at it: an overview picture and a self-contained HTML report.

(Placeholder: the overview is the class map with grain outlines; the report lists the summary.)
"""

from __future__ import annotations

import html

import numpy as np
import numpy.typing as npt

from thinseg import jsonio
from thinseg.analysis import GrainAnalysis


def grain_overview_image(analysis: GrainAnalysis, pp_overview: npt.NDArray[np.uint8] | None) -> npt.NDArray[np.uint8]:
    """The overview (class colours, or the PP where given) with grain outlines in white."""
    scan = analysis.scan
    lut = np.array(analysis.source.classes.lut((0, 0, 0)), np.uint8)
    image = lut[scan.overview_labels] if pp_overview is None else pp_overview.copy()
    image = image[: scan.overview_outlines.shape[0], : scan.overview_outlines.shape[1]]
    image[scan.overview_outlines[: image.shape[0], : image.shape[1]]] = 255
    return np.ascontiguousarray(image)


def grain_report_html(analysis: GrainAnalysis, pp_overview: npt.NDArray[np.uint8] | None) -> str:
    """A self-contained HTML page of the analysis."""
    del pp_overview
    return f"<html><body><pre>{html.escape(jsonio.dumps(analysis.summary, indent=1))}</pre></body></html>"
