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


def tune_heap(mmap_threshold: int = 64 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Fix glibc's heap thresholds for a process that runs the same large tensors again and again.

    By default glibc mmaps blocks over a moving threshold and trims the heap's free top: a
    CPU forward pass then page-faults its activations in again on every batch (measured: half
    of the scoring worker's CPU time was system time). With a fixed mmap threshold above the
    activations' sizes and a high trim threshold, those blocks are served from the heap and
    reused; with every batch of the same shape the reuse is exact, so memory stays flat.
    A value of 0 leaves glibc's default. Returns False where glibc's mallopt is unavailable.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = True
        if mmap_threshold:
            ok = libc.mallopt(m_mmap_threshold, mmap_threshold) == 1
        if trim_threshold:
            ok = libc.mallopt(m_trim_threshold, trim_threshold) == 1 and ok
        return ok
    except (OSError, AttributeError):
        return False


def peak_rss_bytes(pid: int | str = "self") -> int:
    """A process's peak resident set (the kernel's VmHWM); 0 where /proc is missing."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
