"""GeoSlicer model bundles (meta.json + model.pth): load, run-prepare, save, discover.

See ../shared/specs/geoslicer-model-bundle.md for the format.
"""

from thinseg.model.bundle import (
    THIN_SECTION_TAG,
    ModelBundle,
    find_bundles,
    load_bundle,
    save_bundle,
)
from thinseg.model.networks import (
    SUPPORTED_NETWORKS,
    UNetAct,
    UNetActWithBoundarySupervision,
    build_network,
)

__all__ = [
    "ModelBundle",
    "load_bundle",
    "save_bundle",
    "find_bundles",
    "build_network",
    "UNetAct",
    "UNetActWithBoundarySupervision",
    "SUPPORTED_NETWORKS",
    "THIN_SECTION_TAG",
]
