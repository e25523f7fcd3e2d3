"""GeoSlicer model bundles (meta.json + model.pth): load, run-prepare, save, discover.

The names below are resolved on first use, so `thinseg.model.discovery` (model selectors list
folders at start-up) imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "THIN_SECTION_TAG": "thinseg.model.bundle",
    "ModelBundle": "thinseg.model.bundle",
    "find_bundles": "thinseg.model.bundle",
    "load_bundle": "thinseg.model.bundle",
    "save_bundle": "thinseg.model.bundle",
    "SUPPORTED_NETWORKS": "thinseg.model.networks",
    "UNetAct": "thinseg.model.networks",
    "UNetActWithBoundarySupervision": "thinseg.model.networks",
    "build_network": "thinseg.model.networks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'thinseg.model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
