"""Device choice with an explicit fallback message instead of a crash on machines without CUDA."""

from __future__ import annotations

from typing import Literal

import torch

from thinseg.errors import ThinSegError


def select_device(requested: str = "auto") -> tuple[torch.device, str | None]:
    """Return the device to run on and, when we fell back or chose for the user, a message saying so."""
    requested = (requested or "auto").lower()
    if requested not in {"auto", "cpu", "cuda"} and not requested.startswith("cuda:"):
        raise ThinSegError(f"unknown device {requested!r} (use auto, cpu or cuda)")
    if requested == "cpu":
        return torch.device("cpu"), None
    if torch.cuda.is_available():
        return torch.device("cuda" if requested == "auto" else requested), None
    if requested == "auto":
        return torch.device("cpu"), "no CUDA GPU found: running on the CPU"
    return torch.device("cpu"), f"{requested} requested but no CUDA GPU is available: falling back to the CPU"


def cpu_has_native_bf16() -> bool:
    """bf16 autocast only pays off on CPUs with AVX512-BF16/AMX; elsewhere it is several times slower."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(device: torch.device) -> Literal["bf16", "fp32"]:
    """ "bf16" where it is fast (GPUs with bf16, CPUs with AVX512-BF16/AMX), else "fp32".

    bf16 changes under 0.5% of the bundled model's labels against fp32 (bench/bench_segment.py
    measures the agreement on the benchmark image); `--precision fp32` keeps exact fp32.
    """
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"
