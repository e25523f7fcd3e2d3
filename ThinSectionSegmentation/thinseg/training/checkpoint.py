"""Per-epoch checkpoints: everything needed to continue a run exactly where it stopped.

Written all or nothing (a temporary file renamed at the end), so Ctrl-C or a killed process
mid-write leaves the previous checkpoint intact: an interruption costs at most the epoch in
progress. Contents are tensors and plain values only, so it loads through
`thinseg.model.safe_load` (nothing it names beyond those is called, on every torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from thinseg.errors import ThinSegError
from thinseg.io.atomic import atomic_output
from thinseg.model.safe_load import load_torch_file

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """`torch.save(state)` to `path`; an interrupted write leaves the previous file as it was."""
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`, loaded safely onto the CPU."""
    try:
        state = load_torch_file(path)
    except ThinSegError as exc:
        raise ThinSegError(f"checkpoint cannot be loaded: {exc.problem}", path) from None
    if not isinstance(state, dict) or "epoch" not in state or "model" not in state:
        raise ThinSegError("not a thinseg training checkpoint", path)
    return state


def rng_state() -> dict[str, Any]:
    """The torch (and CUDA) random generator states, so a resumed run draws what it would have."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what `rng_state` saved (CUDA states only where CUDA is available)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
