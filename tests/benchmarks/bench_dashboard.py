"""The dashboard at scale: one build version with 10,000 shards in each of five stages.

    .venv/bin/python tests/benchmarks/bench_dashboard.py [--shards 10000] [--reads 5]

Writes a fake root in a temp folder, as the stages leave it: per stage a plan and 10,000
markers (done markers with stats, drops and the outputs they vouch for, whose files exist
with the recorded sizes; a few failed shards and live claims), 50,000 markers in all. Then
times ``GET /api/snapshot`` (the page's JSON, through the FastAPI app, snapshot cache off):
the first read (cold reader: every marker parsed) and the following reads (markers cached by
version; only listings and stats are redone), and ``GET /metrics`` once warm. Prints the
times and first / later. Target: later reads under 2 s on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# (folder inside the version, stage name, output file pattern)
STAGES = [
    ("raw", "corpus", "{}.tar"),
    ("i2e_run/ner", "ner", "{}.parquet"),
    ("i2e_run/score", "score", "{}.parquet"),
    ("i2e_run/labels", "vocab", "{}.parquet"),
    ("i2e", "write", "{}.tar"),
]


def build_root(base: str, shards: int, finished: bool = False) -> str:
    """``finished``: every shard of every stage done (no failed shards, no live claims)."""
    from pipeline_tasks.runtime import markers

    version = os.path.join(base, "v=2026-11-23")
    now = time.time()
    me = {"host": os.uname().nodename, "pid": os.getpid()}
    for folder, stage, pattern in STAGES:
        root = os.path.join(version, folder)
        store = markers.MarkerStore(root, stage)
        ids = [markers.shard_id(i) for i in range(shards)]
        store.write_plan(ids)
        os.makedirs(store.dir, exist_ok=True)
        for i, sid in enumerate(ids):
            if not finished and stage == "write" and i % 200 == 7:  # 50 failed
                rec = {"shard": sid, "state": "failed", "error": f"OSError: shard {sid}: disk full",
                       "stats": markers.ShardStats().to_dict()}  # fmt: skip
                name = f"{sid}.failed.json"
            elif not finished and stage == "write" and i % 200 == 9:  # 50 in flight
                rec = {"shard": sid, "started_at": now - 5, "heartbeat_at": now, "token": sid, **me}
                name = f"{sid}.running.json"
            else:
                out = pattern.format(sid)
                size = 1000 + i % 97
                with open(os.path.join(root, out), "wb") as f:
                    f.truncate(size)
                st = markers.ShardStats(
                    n_in=10_000, n_out=9_000 + i % 900,
                    drops={"caption_empty": 400, "image_corrupt": 600 - i % 600, "no_linked_mention": i % 7},
                    bytes_out=size, duration_s=30.0 + i % 11, started_at=now - 3600 + i * 0.3,
                    finished_at=now - 3570 + i * 0.3, host="worker-3",
                    extra={"captions_truncated": i % 3},
                    outputs={out: {"size": size, "sha256": f"{i:064x}"}},
                )  # fmt: skip
                rec = {"shard": sid, "state": "done", "stats": st.to_dict()}
                name = f"{sid}.done.json"
            with open(os.path.join(store.dir, name), "w") as f:
                json.dump(rec, f, indent=None if finished else 2)
    return base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=10_000, help="shards per stage (5 stages)")
    ap.add_argument("--reads", type=int, default=5, help="reads after the first")
    ap.add_argument("--keep", default="", help="build the root here and keep it")
    args = ap.parse_args()
    from fastapi.testclient import TestClient

    from pipeline_tasks.dashboard.app import create_app
    from pipeline_tasks.dashboard.config import DashboardConfig

    base = args.keep or tempfile.mkdtemp(prefix="mofi-bench-dashboard-")
    try:
        t0 = time.time()
        if not os.path.exists(os.path.join(base, "v=2026-11-23")):
            build_root(base, args.shards)
        n = sum(len(fs) for d, _, fs in os.walk(base) if "_markers" in d)
        print(f"root {base}: {n:,} marker files ({time.time() - t0:.1f} s to write)")
        config = DashboardConfig(roots=(base,), max_age_s=0)
        client = TestClient(create_app(config))

        def read() -> tuple[float, int]:
            t = time.perf_counter()
            r = client.get("/api/snapshot")
            r.raise_for_status()
            return time.perf_counter() - t, len(r.content)

        first, size = read()
        snap = client.get("/api/snapshot").json()
        (run,) = snap["runs"]
        tot = run["totals"]
        assert tot["shards_total"] == 5 * args.shards, tot
        print(f"snapshot: {len(run['stages'])} stages, {tot['done']:,} done, {tot['failed']} failed, "
              f"{tot['running']} running; {size:,} bytes of JSON")  # fmt: skip
        later = [read()[0] for _ in range(args.reads)]
        t = time.perf_counter()
        client.get("/metrics").raise_for_status()
        metrics_s = time.perf_counter() - t
        med = statistics.median(later)
        print(f"first read      {first:7.3f} s")
        print(f"later reads     median {med:.3f} s, max {max(later):.3f} s ({args.reads} reads)")
        print(f"/metrics (warm) {metrics_s:7.3f} s")
        print(f"first / later   {first / med:.1f}x")
        print(f"target: later reads < 2 s: {'met' if max(later) < 2.0 else 'MISSED'}")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
