"""Run a command and sample the resident memory of its whole process tree."""

from __future__ import annotations

import subprocess
import threading
import time

import psutil


def run_and_sample(cmd: list[str], interval: float = 0.1, **popen_kw) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, **popen_kw)
    peak_total = peak_single = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_total, peak_single
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                if rss:
                    peak_total = max(peak_total, sum(rss))
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
    }
