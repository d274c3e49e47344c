"""`mofi corpus` memory and speed: peak RSS of the whole process tree at N and 10xN pairs.

Prints the ratio of the two peaks measured in one run (bounded memory means ~1.0) and the
absolute peak at the large size against the 2 GiB budget.

    .venv/bin/python tests/benchmarks/bench_corpus_memory.py --pairs 100000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _rss import run_and_sample  # noqa: E402

GIB = 1024**3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--work", default=None, help="scratch folder (default: a temp dir, removed after)"
    )
    ap.add_argument("--budget-gib", type=float, default=2.0)
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="mofi-bench-corpus-")
    mofi = [sys.executable, "-m", "pipeline_tasks.cli", "-q"]
    try:
        kb = os.path.join(work, "kb")
        r = run_and_sample([*mofi, "kb", "--out", kb])
        assert r["rc"] == 0, "mofi kb failed"
        results = {}
        for n in (max(1000, args.pairs // 10), args.pairs):
            out = os.path.join(work, f"raw{n}")
            shutil.rmtree(out, ignore_errors=True)
            cmd = [
                *mofi,
                "corpus",
                "--out",
                out,
                "--kb",
                kb,
                "--pairs",
                str(n),
                "--workers",
                str(args.workers),
                "--no-progress",
                "--eval-out",
                os.path.join(work, f"eval{n}"),
                "--truth-out",
                os.path.join(work, f"truth{n}"),
            ]
            results[n] = res = run_and_sample(cmd)
            if res["rc"] != 0:
                print(f"mofi corpus --pairs {n} failed (rc={res['rc']})")
                return 1
            size = sum(
                os.path.getsize(os.path.join(out, f))
                for f in os.listdir(out)
                if f.endswith((".tar", ".parquet"))
            )
            print(
                f"pairs={n:>7}  wall={res['wall_s']:7.1f}s  {n / res['wall_s']:7.0f} pairs/s  "
                f"peak RSS tree={res['peak_total_rss'] / GIB:5.2f} GiB  largest process={res['peak_single_rss'] / GIB:5.2f} GiB  "
                f"output={size / GIB:5.2f} GiB"
            )
            shutil.rmtree(out, ignore_errors=True)
        small, large = sorted(results)
        ratio = results[large]["peak_total_rss"] / results[small]["peak_total_rss"]
        peak = results[large]["peak_total_rss"] / GIB
        print(f"RESULT peak RSS ratio {large}/{small} pairs = {ratio:.2f} (bounded memory: ~1.0)")
        print(
            f"RESULT peak RSS at {large} pairs = {peak:.2f} GiB (budget {args.budget_gib} GiB): {'OK' if peak < args.budget_gib else 'OVER BUDGET'}"
        )
        return 0 if peak < args.budget_gib else 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
