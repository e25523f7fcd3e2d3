"""thinseg: thin-section (PP/XP) mineral segmentation, the Qt-free core of ThinSectionSegmentation.

Nothing in this package imports Slicer or Qt, so it runs from a shell, from a notebook and
inside Slicer's Python alike.
"""

from thinseg.errors import ThinSegError

__version__ = "0.4.0"
__all__ = ["ThinSegError", "__version__"]
