"""Run a command and sample the memory of its whole process tree.

``peak_total_rss`` sums the proportional set size (PSS) of the tree: pages shared between a
parent and its forked loader workers count once, split between them, instead of once per
process as plain RSS sums would. ``peak_single_rss`` is the largest single process's RSS
as sampled; ``peak_single_hwm`` the largest single process's exact peak (the kernel's VmHWM),
which no sampling interval can miss.
"""

from __future__ import annotations

import subprocess
import threading
import time

import psutil

from training.core.device import peak_rss_bytes


def run_and_sample(
    cmd: list[str], interval: float = 0.1, pss_interval: float = 0.1, **popen_kw
) -> dict:
    """Every ``interval`` s each process's RSS and VmHWM (cheap: /proc/PID/status), every
    ``pss_interval`` s the tree's PSS (the kernel walks every page table for it: ~10 ms of CPU
    per GiB, which a throughput measurement must not pay ten times a second)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, **popen_kw)
    peak_total = peak_single = 0
    hwm: dict[int, int] = {}
    names: dict[int, str] = {}
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_total, peak_single
        root = psutil.Process(proc.pid)
        next_pss = 0.0
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                with_pss = time.perf_counter() >= next_pss
                pss, rss = [], []
                for p in procs:
                    try:
                        h = peak_rss_bytes(p.pid)
                        grew = h > hwm.get(p.pid, 0)
                        hwm[p.pid] = max(hwm.get(p.pid, 0), h)
                        if grew or not names.get(p.pid):
                            # the command line it grew under: a script that execs the JVM
                            # shows the script first, and an empty line mid-exec
                            names[p.pid] = " ".join(p.cmdline())[:300] or names.get(p.pid, "")
                        if with_pss:
                            info = p.memory_full_info()
                            pss.append(getattr(info, "pss", info.rss))
                            rss.append(info.rss)
                        else:
                            rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                if pss:
                    peak_total = max(peak_total, sum(pss))
                    next_pss = time.perf_counter() + pss_interval
                if rss:
                    peak_single = max(peak_single, max(rss))
            except psutil.Error:
                pass
            stop.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    stop.set()
    th.join()
    return {
        "rc": rc,
        "wall_s": time.perf_counter() - t0,
        "peak_total_rss": peak_total,
        "peak_single_rss": peak_single,
        "peak_single_hwm": max(hwm.values(), default=0),
        # every process of the tree: its command line and exact peak RSS (VmHWM)
        "processes": [{"pid": pid, "cmd": names.get(pid, "?"), "hwm": n} for pid, n in hwm.items()],
        "root_pid": proc.pid,
    }
