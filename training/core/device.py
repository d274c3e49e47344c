"""Device and precision choice in one place."""

from __future__ import annotations

import contextlib

import torch


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but CUDA is not available")
    return dev


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: full fp32). 'auto' is bf16 on CUDA and on CPUs with native bf16."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 autocast needs CUDA; use bf16 or fp32 on CPU")
        return torch.float16
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else None
    raise ValueError(f"unknown precision {precision!r}: auto, fp32, bf16 or fp16")


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def limit_heap_growth(mmap_threshold: int = 4 << 20) -> bool:
    """Make glibc return large freed blocks to the OS right away.

    glibc raises its mmap threshold after large blocks are freed, so later large tensors come
    from the heap and stay resident: a long-running worker's RSS then creeps with the number
    of batches it has seen, not with what it holds. A fixed threshold keeps every block over
    ``mmap_threshold`` mmapped (freed memory goes back to the OS) and the peak flat.
    Returns False where glibc's mallopt is unavailable.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, mmap_threshold) == 1
        libc.mallopt(m_trim_threshold, mmap_threshold)
        return ok
    except (OSError, AttributeError):
        return False
