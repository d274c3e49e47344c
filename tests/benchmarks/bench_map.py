"""Retrieval mAP at GPR1200 scale: 12,000 random 512-d features (1,200 classes x 10).

    .venv/bin/python tests/benchmarks/bench_map.py

Prints the chunked implementation's time on this CPU, the process's peak RSS growth while it
runs (features excluded), and its largest difference from the brute-force reference
(one query at a time, float64, after GPR1200's evaluate.py) over all 12,000 queries.
"""

from __future__ import annotations

import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    from evaluation.retrieval import average_precisions, reference_average_precisions

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((12000, 512)).astype(np.float32)
    labels = np.repeat(np.arange(1200), 10)
    import torch

    torch.ones(1)  # torch's own start-up allocations before the baseline
    base = _peak_mib()
    t0 = time.time()
    ap = average_precisions(feats, labels)
    dt = time.time() - t0
    grew = _peak_mib() - base
    t1 = time.time()
    ref = reference_average_precisions(feats, labels)
    dt_ref = time.time() - t1
    print(
        f"mAP {ap.mean():.6f} over 12,000 queries in {dt:.2f} s ({torch.get_num_threads()} threads)"
    )
    print(
        f"peak RSS growth while computing: {grew:.0f} MiB (features: {feats.nbytes / 2**20:.0f} MiB)"
    )
    print(f"brute-force reference: mAP {ref.mean():.6f} in {dt_ref:.1f} s")
    print(
        f"max |AP - reference| = {np.abs(ap - ref).max():.2e}; |mAP - reference| = {abs(ap.mean() - ref.mean()):.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
