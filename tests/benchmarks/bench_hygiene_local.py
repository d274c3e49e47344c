"""Time and memory of the hygiene stage's one-process engine (``stages/hygiene/local.py``) at
its default limit, on a synthetic pool with many copies (what ``hygiene.local_max_images``
lets through), in a fresh process per size:

    .venv/bin/python tests/benchmarks/bench_hygiene_local.py [--sizes 15000,50000] [--dim 1280]

Each image is one of ``images / 17`` random pictures plus noise (cosine ~0.92 to the other
copies of its picture: above the 0.90 threshold, so most buckets are shared and every copy
pair is found and grouped), with a random hash and no NSFW score; production settings less
decontamination. Prints the seconds of ``find_drops``, the copy pairs found, the drops and
the peak RSS above the peak reached while the pool was made (its features twice: the
array and the Arrow table).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(n: int, dim: int) -> dict:
    import numpy as np
    import pyarrow as pa

    from pipeline_tasks import recipes
    from pipeline_tasks.stages.hygiene import local, lsh

    rng = np.random.default_rng(0)
    base = rng.standard_normal((max(1, n // 17), dim)).astype(np.float32)
    emb = base[rng.integers(0, len(base), n)]
    emb += 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    t = pa.table(
        {
            "shard": [f"{i // 2000:05d}" for i in range(n)],
            "key": [f"{i:09d}" for i in range(n)],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim),
            "sha256": pa.array([f"s{i}" for i in range(n)]),
            "nsfw": pa.nulls(n, pa.float32()),
            "phash": pa.array(rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)),
        }
    )
    del emb, base
    conf = recipes.production().hygiene.replace(decontaminate=False)
    c = {**conf.to_dict(), "lsh_tables": conf.lsh_tables()}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    pool = local._Pool(t)
    planes = lsh.planes(dim, c["lsh_bits"], c["lsh_tables"], c["seed"])
    drops, n_pairs = local.find_drops(c, pool, None, planes, {})
    secs = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "images": n,
        "dim": dim,
        "seconds": round(secs, 2),
        "copy_pairs": int(n_pairs),
        "drops": len(drops),
        "peak_rss_above_pool_gib": round((peak - before) / 2**20, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="15000,50000")
    ap.add_argument("--dim", type=int, default=1280, help="1,280: the packaged scorer's features")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.dim)))
        return 0
    for n in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--dim", str(args.dim)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['images']:,} images x {r['dim']} floats: {r['seconds']} s, "
              f"{r['copy_pairs']:,} copy pairs, {r['drops']:,} drops, peak RSS "
              f"{r['peak_rss_above_pool_gib']} GiB above the pool")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
