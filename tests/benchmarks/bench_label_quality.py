"""Label quality against the demo corpus ground truth: NER + linking alone vs. after CLIP filtering.

Reads RUN/truth (never read by the pipeline), RUN/ner (candidates = every linked mention:
the unfiltered labels), RUN/score and RUN/labels (the labels the vocab stage kept). Prints
precision and recall of the entity labels for each, the gain, and a threshold sweep of
the run's scores so the default's place on the curve is visible.

    .venv/bin/python tests/benchmarks/bench_label_quality.py --run runs/demo
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import defaultdict

import pyarrow.parquet as pq


def _rows(pattern: str):
    for f in sorted(glob.glob(pattern)):
        yield from pq.read_table(f).to_pylist()


def pr(pred: dict[str, set[str]], truth: dict[str, set[str]]) -> tuple[float, float, int]:
    tp = fp = 0
    for key, ents in pred.items():
        t = truth.get(key, set())
        tp += len(ents & t)
        fp += len(ents - t)
    n_true = sum(len(v) for v in truth.values())
    return (tp / (tp + fp) if tp + fp else 0.0), (tp / n_true if n_true else 0.0), tp + fp


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--run", default="runs/demo", help="run root holding truth/, ner/, score/, labels/"
    )
    ap.add_argument("--truth", default=None, help="truth folder (default RUN/truth)")
    args = ap.parse_args()
    truth_dir = args.truth or os.path.join(args.run, "truth")
    truth = {
        r["key"]: set(r["true_entity_ids"]) for r in _rows(os.path.join(truth_dir, "0*.parquet"))
    }
    if not truth:
        print(f"no truth under {truth_dir}")
        return 1
    unfiltered = {
        r["key"]: {m["entity_id"] for m in r["mentions"] if m["entity_id"]}
        for r in _rows(os.path.join(args.run, "ner", "0*.parquet"))
    }
    kept = {
        r["key"]: set(r["entity_ids"])
        for r in _rows(os.path.join(args.run, "labels", "0*.parquet"))
    }
    scores = defaultdict(list)
    for r in _rows(os.path.join(args.run, "score", "0*.parquet")):
        scores[r["key"]].append((r["similarity"], r["entity_id"]))
    p0, r0, n0 = pr(unfiltered, truth)
    p1, r1, n1 = pr(kept, truth)
    vcfg = json.load(open(os.path.join(args.run, "vocab", "vocab.config.json")))
    print(f"images with truth: {len(truth)}, true labels: {sum(len(v) for v in truth.values())}")
    print(f"{'labels':<34}{'precision':>10}{'recall':>10}{'labels':>9}")
    print(f"{'NER + linking (unfiltered)':<34}{p0:>10.3f}{r0:>10.3f}{n0:>9}")
    print(f"{'after CLIP filtering (labels/)':<34}{p1:>10.3f}{r1:>10.3f}{n1:>9}")
    how = (
        f"threshold={vcfg['threshold']}"
        if vcfg.get("threshold_mode", "absolute") == "absolute"
        else f"calibrated (null_quantile={vcfg['null_quantile']}, "
        f"coherence_weight={vcfg['coherence_weight']})"
    )
    print(f"vocab config: {how} top_k={vcfg['top_k']} min_count={vcfg['min_count']}")
    print("sweep over RUN/score (min_count not applied):")
    for k in (1, 0):
        for thr in (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
            pred = {}
            for key, v in scores.items():
                v = sorted(v, key=lambda x: (-x[0], x[1]))
                v = v[:k] if k else v
                pred[key] = {e for s, e in v if s >= thr}
            p, r, _ = pr(pred, truth)
            print(f"  top_k={k or 'all':<4} threshold={thr:<4} precision={p:.3f} recall={r:.3f}")
    print(
        f"RESULT filtered precision {p1:.3f} (target >= 0.85), gain over unfiltered {p1 - p0:+.3f} (target >= +0.20), recall {r1:.3f} (target >= 0.70)"
    )
    ok = p1 >= 0.85 and p1 - p0 >= 0.2 and r1 >= 0.7
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
