"""GeoSlicer model bundles (meta.json + model.pth): load, run-prepare, save, discover.

`bundle` (loading and saving), `networks` and `safe_load` (reading torch files) import torch;
`discovery` (finding model folders) and `meta` (checking their descriptions) do not, so model
selectors list folders at start-up without it. The names below are resolved on first use for
the same reason.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MULTIPHASE_TAG": "thinseg.model.discovery",
    "THIN_SECTION_ENV": "thinseg.model.discovery",
    "ModelBundle": "thinseg.model.bundle",
    "find_bundles": "thinseg.model.discovery",
    "find_thin_section_models": "thinseg.model.discovery",
    "multiphase_model_dir": "thinseg.model.discovery",
    "load_torch_file": "thinseg.model.safe_load",
    "load_bundle": "thinseg.model.bundle",
    "save_bundle": "thinseg.model.bundle",
    "SUPPORTED_NETWORKS": "thinseg.model.networks",
    "UNetAct": "thinseg.model.networks",
    "UNetActWithBoundarySupervision": "thinseg.model.networks",
    "build_network": "thinseg.model.networks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the module behind `name` on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'thinseg.model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
