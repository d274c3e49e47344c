"""Label quality at every corpus size: precision and recall against the demo corpus truth,
before filtering (NER + linking alone) and after (the labels the vocab stage kept), for
corpora of several sizes and seeds, each built from scratch with the demo config (its own
bootstrapped scorer, the calibrated threshold).

    .venv/bin/python tests/benchmarks/bench_label_quality_sizes.py [--sizes 500:101,1000:102,...]

Target: after filtering, precision >= 0.85 and recall >= 0.70 at every size. A corpus too
small to calibrate on must be refused with a clear message (``--too-small 100:13`` shows it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_label_quality import _rows, pr  # noqa: E402

DEFAULT_SIZES = "500:101,600:11,1000:102,5000:103,20000:104"


def _mofi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline_tasks.cli", "-q", *args], capture_output=True, text=True
    )


def _forget_other_filter(work: str) -> None:
    """A work folder kept from a run with another vocab config: drop its filter's outputs (and
    the I2E written from them) so the build re-filters with today's config; corpus, NER,
    scorer and scores are reused."""
    from pipeline_tasks import recipes

    saved = os.path.join(work, "run", "vocab", "vocab.config.json")
    if os.path.exists(saved):
        with open(saved) as f:
            if f.read().strip() != recipes.get("demo").vocab.to_json().strip():
                for d in ("run/vocab", "run/labels", "i2e"):
                    shutil.rmtree(os.path.join(work, d), ignore_errors=True)


def build(work: str, kb: str, pairs: int, seed: int) -> tuple[subprocess.CompletedProcess, float]:
    raw = os.path.join(work, "raw")
    shard = str(min(1000, max(100, pairs // 5)))
    r = _mofi(
        "corpus", "--out", raw, "--kb", kb, "--pairs", str(pairs), "--seed", str(seed),
        "--shard-size", shard, "--config", "demo", "--no-progress",
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    _forget_other_filter(work)
    t0 = time.time()
    b = _mofi(
        "build-i2e", "--raw", raw, "--kb", kb, "--run", os.path.join(work, "run"),
        "--out", os.path.join(work, "i2e"), "--config", "demo", "--no-progress",
    )  # fmt: skip
    return b, time.time() - t0


def quality(work: str) -> tuple[float, float, float, float, int]:
    truth = {r["key"]: set(r["true_entity_ids"]) for r in _rows(f"{work}/truth/0*.parquet")}
    ner = {
        r["key"]: {m["entity_id"] for m in r["mentions"] if m["entity_id"]}
        for r in _rows(f"{work}/run/ner/0*.parquet")
    }
    kept = {r["key"]: set(r["entity_ids"]) for r in _rows(f"{work}/run/labels/0*.parquet")}
    p0, r0, _ = pr(ner, truth)
    p1, r1, n1 = pr(kept, truth)
    return p0, r0, p1, r1, n1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="PAIRS:SEED,...")
    ap.add_argument("--too-small", default="100:13", help="PAIRS:SEED that must be refused")
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="mofi-bench-quality-")
    kb = os.path.join(work, "kb")
    if not os.path.exists(os.path.join(kb, "entities.parquet")):
        r = _mofi("kb", "--out", kb)
        if r.returncode != 0:
            print(r.stderr)
            return 1
    rows, ok = [], True
    for spec in a.sizes.split(","):
        pairs, seed = (int(x) for x in spec.split(":"))
        d = os.path.join(work, f"p{pairs}_s{seed}")
        b, secs = build(d, kb, pairs, seed)
        if b.returncode != 0:
            print(f"{pairs:>6} pairs, seed {seed}: build failed: {b.stderr.strip()[-400:]}")
            ok = False
            continue
        p0, r0, p1, r1, n1 = quality(d)
        meets = p1 >= 0.85 and r1 >= 0.70
        ok &= meets
        rows.append((pairs, seed, p0, r0, p1, r1, n1, secs, meets))
        print(
            f"{pairs:>6} pairs, seed {seed}: before p={p0:.3f} r={r0:.3f} | after p={p1:.3f} "
            f"r={r1:.3f} ({n1} labels) | build {secs:.0f}s | {'ok' if meets else 'MISSED'}",
            flush=True,
        )
    print()
    print(
        f"{'pairs':>6} {'seed':>5}  {'before p':>8} {'before r':>8}  {'after p':>8} {'after r':>8} {'labels':>7}"
    )
    for pairs, seed, p0, r0, p1, r1, n1, _, meets in rows:
        print(
            f"{pairs:>6} {seed:>5}  {p0:>8.3f} {r0:>8.3f}  {p1:>8.3f} {r1:>8.3f} {n1:>7}  {'' if meets else 'MISSED'}"
        )
    if a.too_small:
        pairs, seed = (int(x) for x in a.too_small.split(":"))
        b, _ = build(os.path.join(work, f"small_p{pairs}_s{seed}"), kb, pairs, seed)
        refused = b.returncode != 0 and "cannot calibrate" in b.stderr
        ok &= refused
        print(f"\n{pairs} pairs (seed {seed}): exit {b.returncode}: {b.stderr.strip()[-500:]}")
    print(
        f"\ntarget (precision >= 0.85 and recall >= 0.70 at every size; too small refused): {'met' if ok else 'MISSED'}"
    )
    print(f"work folder: {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
