"""Device choice with an explicit fallback message instead of a crash on machines without CUDA."""

from __future__ import annotations

from typing import Literal

import torch

from thinseg.errors import ThinSegError


def select_device(requested: str = "auto") -> tuple[torch.device, str | None]:
    """Return the device to run on and, when "auto" chose the CPU, a note saying so.

    "cuda" (or "cuda:N") without that GPU is an error rather than a silent fall-back: whoever asked
    for the GPU would otherwise wait hours on the CPU without knowing it.
    """
    requested = (requested or "auto").lower()
    if requested not in {"auto", "cpu", "cuda"} and not requested.startswith("cuda:"):
        raise ThinSegError(f"unknown device {requested!r} (use auto, cpu or cuda)")
    if requested == "cpu":
        return torch.device("cpu"), None
    available = torch.cuda.is_available()
    if requested == "auto":
        if available:
            return torch.device("cuda"), None
        return torch.device("cpu"), "no CUDA GPU found: running on the CPU (device auto)"
    if not available:
        raise ThinSegError(
            f"device {requested} needs a CUDA GPU but {_no_gpu_reason()}; choose device auto (the CPU when "
            "there is no GPU) or cpu"
        )
    device = torch.device(requested)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ThinSegError(
            f"device {requested}: there is no such GPU (this machine has {torch.cuda.device_count()}, "
            "numbered from cuda:0)"
        )
    return device, None


def _no_gpu_reason() -> str:
    """Why torch sees no GPU, in the words a user can act on."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    return "torch finds none on this machine"


def _cpu_flags() -> str:
    """/proc/cpuinfo as text ("" where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            return f.read()
    except OSError:
        return ""


def cpu_has_native_bf16() -> bool:
    """bf16 autocast only pays off on CPUs with AVX512-BF16/AMX; elsewhere it is several times slower."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_amx() -> bool:
    """Whether the CPU exposes AMX tiles for bf16 (Intel Sapphire Rapids and later, where the
    hypervisor passes them through)."""
    return "amx_bf16" in _cpu_flags()


def auto_precision(device: torch.device) -> Literal["bf16", "fp32"]:
    """ "bf16" where it is fast (GPUs with bf16, CPUs with AVX512-BF16/AMX), else "fp32".

    bf16 changes under 0.5% of the bundled model's labels against fp32 (bench/bench_segment.py
    measures the agreement on the benchmark image); `--precision fp32` keeps exact fp32.
    """
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"
