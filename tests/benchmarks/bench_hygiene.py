"""The hygiene stage on planted cases (``_planted``): recall per planted kind, false removal of
genuinely different pictures, the thresholds' calibration, and its cost against scoring.

    .venv/bin/python tests/benchmarks/bench_hygiene.py [--sizes 120,240,480] [--out DIR]

For each size (photos drawn; about 1.6x as many pool images with the copies) it runs the real
stages on a fresh run: ner (Spark), score (the packaged scorer, bootstrapped once on the
largest corpus and reused), hygiene with the production recipe's settings and the planted
evaluation folder registered, twice: the Spark job (``local_max_images`` 0), then as
configured (one process up to 50,000 images), whose drops must be the same. Prints per size:

* recall per planted kind (a copy of a pool original must be dropped; a copy of an
  evaluation photo must be dropped as ``eval_copy``) and false removal (pool originals
  dropped, over all pool originals: each is a genuinely different picture);
* the calibration tables: from the score stage's embeddings and perceptual hashes, the
  recall and the false removal every near-duplicate threshold would give, by the features
  alone (a planted copy is found when its cosine to its source reaches the threshold; an
  original is falsely removed when its cosine to another original does) and with the hash
  rule of the production settings (or else within ``phash_distance`` bits at cosine
  ``phash_min_cosine``);
* seconds of hygiene (both engines) against seconds of score on the same corpus, and the
  growth exponents of their times over the sizes.

With ``--demo-pairs N``: the same cost on a demo corpus of N pairs (its own scorer, as
`make demo` bootstraps it), and the share of it the near-duplicate rule would drop at
0.85-0.95 (the demo renders each picture many times on purpose: its threshold's reason).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)


def _planted():
    spec = importlib.util.spec_from_file_location("_planted", os.path.join(HERE, "_planted.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _embeddings(run: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(id or eval file -> unit embedding, -> perceptual hash) of a run's scored images."""
    out, hashes = {}, {}
    files = [
        (f, "key", os.path.basename(f).removesuffix(".parquet") + "/")
        for f in sorted(glob.glob(os.path.join(run, "score", "embeddings", "*.parquet")))
    ] + [(f, "file", "") for f in glob.glob(os.path.join(run, "score", "eval", "*.parquet"))]
    for f, name, prefix in files:
        t = pq.read_table(f).to_pydict()
        for k, e, h in zip(t[name], t["embedding"], t["phash"], strict=True):
            out[prefix + k] = np.asarray(e, np.float32)
            hashes[prefix + k] = h
    return {k: v / max(np.linalg.norm(v), 1e-12) for k, v in out.items()}, hashes


def calibration(run: str, truth: dict, rule: tuple[int, float] = (-1, 1.0)) -> list[dict]:
    """Recall per kind and false removal at each threshold: a pair is a copy when its cosine
    reaches the threshold, or it is within ``rule`` (hash bits, cosine); (-1, _): the
    embeddings alone."""
    from pipeline_tasks.stages.score.phash import hamming

    emb, hashes = _embeddings(run)
    max_bits, floor = rule

    def by_hash(cos, bits):
        return (np.asarray(bits) <= max_bits) & (np.asarray(cos) >= floor)

    pairs_by_kind: dict[str, list[tuple[float, int]]] = {}
    for i, (kind, src) in truth["copies"].items():
        if i in emb and src in emb:
            bits = int(hamming(hashes[i], hashes[src]))
            pairs_by_kind.setdefault(kind, []).append((float(emb[i] @ emb[src]), bits))
    orig = [i for i in truth["originals"] if i in emb]
    x = np.stack([emb[i] for i in orig])
    sims = x @ x.T
    h = np.asarray([hashes[i] for i in orig], np.int64)
    hashed = by_hash(sims, hamming(h[:, None], h[None, :]))
    np.fill_diagonal(sims, -1.0)
    np.fill_diagonal(hashed, False)
    nearest = sims.max(axis=1)  # each original's most similar other original
    rows = []
    for t in THRESHOLDS:
        row = {"threshold": t}
        for kind, v in sorted(pairs_by_kind.items()):
            cos, bits = np.asarray(v).T
            row[kind] = round(float(np.mean((cos >= t) | by_hash(cos, bits))), 3)
        # a pair of originals above the threshold loses its larger id: count pairs' losers
        ia, ib = np.nonzero(np.triu((sims >= t) | hashed))
        lost = {max(orig[a], orig[b]) for a, b in zip(ia, ib, strict=True)}
        row["false_removal"] = round(len(lost) / len(orig), 4)
        row["originals_with_a_neighbour"] = round(
            float(np.mean((nearest >= t) | hashed.any(axis=1))), 4
        )
        rows.append(row)
    return rows


def score_drops(run: str, truth: dict) -> dict:
    t = pq.read_table(os.path.join(run, "hygiene", "dropped.parquet")).to_pylist()
    dropped = {f"{r['shard']}/{r['key']}": r for r in t}
    out: dict = {"kinds": {}}
    for i, (kind, src) in truth["copies"].items():
        k = out["kinds"].setdefault(kind, {"planted": 0, "dropped": 0, "wrong_match": 0})
        k["planted"] += 1
        r = dropped.get(i)
        ok = r is not None and (r["reason"] == "eval_copy") == kind.startswith("eval_")
        k["dropped"] += ok
        k["wrong_match"] += bool(ok and r["matched"] != src)
    for k in out["kinds"].values():
        k["recall"] = round(k["dropped"] / k["planted"], 4)
    lost = [i for i in truth["originals"] if i in dropped]
    out["originals"] = len(truth["originals"])
    out["originals_dropped"] = len(lost)
    out["false_removal"] = round(len(lost) / len(truth["originals"]), 4)
    out["reasons"] = {}
    for r in dropped.values():
        out["reasons"][r["reason"]] = out["reasons"].get(r["reason"], 0) + 1
    return out


def _stages(raw: str, kb: str, run: str, scorer: str | None, hc) -> tuple:
    """ner, score (with NSFW) and hygiene (``hc``) on a fresh run: (seconds, the score
    result, the hygiene result, the cost ratios)."""
    from pipeline_tasks import recipes
    from pipeline_tasks.runtime.layout import HYGIENE, RunLayout
    from pipeline_tasks.runtime.markers import WHOLE_STAGE
    from pipeline_tasks.stages.hygiene.stage import run_hygiene
    from pipeline_tasks.stages.ner.stage import run_ner
    from pipeline_tasks.stages.score.stage import ensure_scorer, run_score

    shutil.rmtree(run, ignore_errors=True)
    p = recipes.demo()
    secs = {}
    t0 = time.time()
    run_ner(p.ner, raw, kb, run, False, None).raise_if_failed()
    secs["ner"] = time.time() - t0
    # the NSFW score is computed by the score workers: its seconds are the step's too
    score_c = (p.score.replace(model=scorer) if scorer else p.score).replace(nsfw=True)
    if not scorer:
        t0 = time.time()
        ensure_scorer(p.score, p.bootstrap, raw, kb, run, False)
        secs["scorer_bootstrap"] = time.time() - t0
    t0 = time.time()
    sres = run_score(score_c, raw, run, kb, False)
    sres.raise_if_failed()
    secs["score"] = time.time() - t0
    # the Spark job first (local_max_images 0), then the stage as configured (one process
    # at these sizes): the same drops, row for row, each timed from the stage's call
    t0 = time.time()
    sparked = run_hygiene(hc.replace(local_max_images=0), score_c, run, progress=False)
    secs["hygiene_spark"] = time.time() - t0
    dropped = os.path.join(run, "hygiene", "dropped.parquet")
    spark_rows = pq.read_table(dropped)
    shutil.rmtree(os.path.join(run, "score", "eval"), ignore_errors=True)  # both embed them
    # the same settings would keep the Spark job's result: withdraw it to compute again
    RunLayout(run).store(HYGIENE).unmark_done(WHOLE_STAGE)
    t0 = time.time()
    hres = run_hygiene(hc, score_c, run, progress=False)
    secs["hygiene"] = time.time() - t0
    if hres.extra["skipped"] or not hres.processed:
        raise RuntimeError("the configured hygiene run computed nothing: its time would be 0")
    nsfw_s = float(sres.extra.get("nsfw_seconds", 0.0))
    phash_s = float(sres.extra.get("phash_seconds", 0.0))
    score_alone = secs["score"] - nsfw_s - phash_s  # the score stage without hygiene's parts
    cost = {
        "pool_images": int(hres.extra["images_in"]),
        "engine": hres.extra["engine"],
        "engines_agree": spark_rows.equals(pq.read_table(dropped)),
        "seconds": {k: round(v, 1) for k, v in secs.items()},
        "score_without_nsfw_and_phash": round(score_alone, 1),
        "nsfw_seconds_in_score": round(nsfw_s, 1),
        "phash_seconds_in_score": round(phash_s, 2),
        "job_over_score": round(secs["hygiene"] / score_alone, 3),
        "spark_over_score": round(secs["hygiene_spark"] / score_alone, 3),
        "nsfw_over_score": round(nsfw_s / score_alone, 3),
        "phash_over_score": round(phash_s / score_alone, 4),
        # the step without NSFW (the demo recipe's) and with it (the production recipe's)
        "without_nsfw_over_score": round((secs["hygiene"] + phash_s) / score_alone, 3),
        "hygiene_over_score": round((secs["hygiene"] + nsfw_s + phash_s) / score_alone, 3),
        "job_phase_seconds": hres.extra.get("phase_seconds"),
        "spark_phase_seconds": sparked.extra.get("phase_seconds"),
    }
    return hres, cost


def run_size(n: int, args, kb: str, records, photos_dir: str, scorer: str | None) -> dict:
    from pipeline_tasks import recipes
    from pipeline_tasks.runtime.layout import RunLayout

    root = os.path.join(args.out, f"n{n}")
    shutil.rmtree(root, ignore_errors=True)
    truth = _planted().make_corpus(photos_dir, records, root, n, seed=args.seed)
    raw, run = os.path.join(root, "raw"), os.path.join(root, "run")
    hc = recipes.production().hygiene.replace(eval_folders=(os.path.join(root, "eval"),))
    if args.near_threshold:
        hc = hc.replace(near_threshold=args.near_threshold)
    hres, cost = _stages(raw, kb, run, scorer, hc)
    res = {
        "photos": n,
        **cost,
        "pairs_compared": hres.extra.get("pairs_compared"),
        "settings": hres.extra.get("settings"),
        **score_drops(run, truth),
        "calibration": calibration(run, truth),
        "calibration_with_hash": calibration(run, truth, (hc.phash_distance, hc.phash_min_cosine)),
    }
    return res, RunLayout(run).scorer_checkpoint


DEMO_THRESHOLDS = (0.85, 0.90, 0.92, 0.95)


def drop_rates(run: str, rule: tuple[int, float]) -> dict[str, dict[float, float]]:
    """The share of a run's images the near-duplicate rule would drop at each threshold
    (all but one of each connected group of copy pairs), by the features alone and with the
    hash ``rule`` (bits, cosine)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from pipeline_tasks.stages.score.phash import hamming

    emb, hashes = _embeddings(run)
    ids = sorted(emb)
    x = np.stack([emb[i] for i in ids])
    sims = x @ x.T
    h = np.asarray([hashes[i] for i in ids], np.int64)
    hashed = (hamming(h[:, None], h[None, :]) <= rule[0]) & (sims >= rule[1])
    out: dict[str, dict[float, float]] = {"features": {}, "with_hash": {}}
    for name, extra in (("features", False), ("with_hash", hashed)):
        for t in DEMO_THRESHOLDS:
            a, b = np.nonzero(np.triu((sims >= t) | extra, 1))
            graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(ids), len(ids)))
            n_groups = connected_components(graph, directed=False)[0]
            out[name][t] = round(1 - n_groups / len(ids), 4)
    return out


def nsfw_against_production_scorer(n: int = 64) -> dict:
    """ms per image of Open NSFW and of the production recipe's scorer architecture's image
    tower (open_clip, random init, fp32), each on the same uint8 batch of ``n`` 224 px
    images, on this machine's CPU (the median of three timed calls after one warm-up)."""
    import torch

    from pipeline_tasks import recipes
    from pipeline_tasks.stages.score.nsfw import NsfwScorer
    from training.core.compat import import_open_clip

    arch = recipes.production().score.model.split(":")[0]
    batch = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8)
    nsfw = NsfwScorer("cpu")
    model = import_open_clip().create_model(arch, pretrained=None).eval()

    def ms(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[1] / n * 1e3

    with torch.inference_mode():
        a = ms(lambda: nsfw(batch))
        b = ms(lambda: model.encode_image(batch.float() / 255))
    return {"arch": arch, "nsfw_ms": round(a, 2), "image_tower_ms": round(b, 2),
            "nsfw_over_image_tower": round(a / b, 3)}  # fmt: skip


def cost_point(pairs: int, args) -> dict:
    """The cost alone on a demo corpus of ``pairs`` (rendered once, kept under ``--out``),
    with its own packaged scorer bootstrapped as `make demo` does: the same stages and
    settings, without evaluation folders; and the share of it the near-duplicate rule
    would drop at each threshold (the demo renders each picture many times on purpose)."""
    from pipeline_tasks import recipes
    from pipeline_tasks.demo import corpus
    from pipeline_tasks.demo import recipes as demo_recipes
    from pipeline_tasks.stages.kb.stage import ENTITIES_FILE, build_kb

    root = os.path.join(args.out, f"demo{pairs}")
    raw, kb = os.path.join(root, "raw"), os.path.join(root, "kb")
    if not os.path.exists(os.path.join(kb, ENTITIES_FILE)):
        build_kb(recipes.get("demo").kb, kb)
    c = demo_recipes.demo().replace(pairs=pairs, seed=args.seed)
    corpus.build_corpus(c, raw, kb, progress=False).raise_if_failed()  # skips what is done
    hc, run = recipes.production().hygiene, os.path.join(root, "run")
    _, cost = _stages(raw, kb, run, None, hc)
    rates = drop_rates(run, (hc.phash_distance, hc.phash_min_cosine))
    return {"demo_pairs": pairs, **cost, "demo_drop_rates": rates}


def print_cost(r: dict) -> None:
    print(f"seconds {r['seconds']} (inside score: NSFW {r['nsfw_seconds_in_score']} s, pHash "
          f"{r['phash_seconds_in_score']} s); over the score stage without them: job "
          f"({r['engine']}) {r['job_over_score']}, Spark job {r['spark_over_score']}, NSFW "
          f"{r['nsfw_over_score']}, pHash {r['phash_over_score']}; the step without NSFW "
          f"{r['without_nsfw_over_score']}, with it {r['hygiene_over_score']}")  # fmt: skip
    print(f"the same drops from both engines: {r['engines_agree']}; phases (s): "
          f"{r['engine']} {r['job_phase_seconds']}, Spark {r['spark_phase_seconds']}")  # fmt: skip


def print_size(r: dict) -> None:
    print(f"\n== {r['photos']} photos, {r['pool_images']} pool images ==")
    print(f"{'kind':<14}{'planted':>8}{'dropped':>8}{'recall':>8}{'wrong match':>12}")
    for kind, k in sorted(r["kinds"].items()):
        print(f"{kind:<14}{k['planted']:>8}{k['dropped']:>8}{k['recall']:>8.3f}"
              f"{k['wrong_match']:>12}")  # fmt: skip
    print(f"false removal: {r['originals_dropped']} of {r['originals']} originals "
          f"= {r['false_removal']:.4f}; drops by reason {r['reasons']}")  # fmt: skip
    print_cost(r)
    rule = r["settings"]["phash_distance"], r["settings"]["phash_min_cosine"]
    for name, title in (
        ("calibration", "by the features alone"),
        ("calibration_with_hash", f"or within {rule[0]} hash bits at cosine >= {rule[1]}"),
    ):
        cols = [k for k in r[name][0] if k != "threshold"]
        print(f"calibration ({title}):\nthr   " + " ".join(f"{c[:12]:>12}" for c in cols))
        for row in r[name]:
            print(f"{row['threshold']:.2f}  " + " ".join(f"{row[c]:>12}" for c in cols))


def _fit(runs: list[dict], job: str, name: str) -> dict:
    """Seconds per further image (smallest to largest run) and the least-squares lines
    (seconds = fixed + per image x images) of ``job`` and score: where the job reaches 0.15
    of the score stage, if both stay linear."""
    n = [r["pool_images"] for r in runs]
    lo, hi = runs[0], runs[-1]
    per = {k: (hi[k] - lo[k]) / (hi["pool_images"] - lo["pool_images"]) for k in (job, "score")}
    print(f"marginal seconds per image {n[0]} -> {n[-1]}: {name} {per[job]:.4f}, "
          f"score {per['score']:.4f} (ratio {per[job] / per['score']:.3f})")  # fmt: skip
    (bh, ah), (bs, as_) = (np.polyfit(n, [r[k] for r in runs], 1) for k in (job, "score"))
    # a job's time cannot fall with more images: a slope below 0 is this machine's noise,
    # and the crossing is then the one of a job with no per-image cost (a lower bound)
    per_image = max(bh, 0.0)
    cross = (ah - 0.15 * as_) / (0.15 * bs - per_image) if 0.15 * bs > per_image else float("inf")
    cross = max(cross, 0.0)  # below 0: the lines say every size
    print(f"fitted: {name} {ah:.1f} s + {bh * 1e3:.2f} ms/image, score {as_:.1f} s + "
          f"{bs * 1e3:.2f} ms/image: {name} is <= 0.15 of score "
          + (f"from about {cross:,.0f} images" if cross > 0 else "at every size")
          + (" (at least: the job's fitted slope is below 0, taken as 0)"
             if bh < 0 else ""))  # fmt: skip
    return {f"{job}_marginal_seconds_per_image": per, f"{job}_at_0.15_of_score_from_images": cross}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="120,240,480", help="photos per corpus")
    ap.add_argument("--out", default="runs/bench-hygiene")
    ap.add_argument("--photos", default=None, help="photo cache (default: the demo's)")
    ap.add_argument("--near-threshold", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--demo-pairs",
        default="",
        help="also the cost alone on demo corpora of these sizes (comma-separated; rendered "
        "once under --out, about 2 min per 1,000 pairs here)",
    )
    args = ap.parse_args()
    from pipeline_tasks.demo import photos
    from pipeline_tasks.stages.kb.stage import KBConfig, build_kb

    photos_dir = photos.ensure_photos(args.photos)
    records = photos.read_index(photos_dir)
    os.makedirs(args.out, exist_ok=True)
    kb = os.path.join(args.out, "kb")
    if not os.path.exists(kb):
        table = _planted().kb_table(records, os.path.join(args.out, "foods.jsonl"))
        build_kb(KBConfig(sources=(table,)), kb)
    sizes = sorted((int(s) for s in args.sizes.split(",")), reverse=True)
    results, scorer = [], None
    for n in sizes:
        r, ckpt = run_size(n, args, kb, records, photos_dir, scorer)
        scorer = scorer or ckpt
        print_size(r)
        results.append(r)
    for pairs in sorted(int(s) for s in args.demo_pairs.split(",") if s):
        r = cost_point(pairs, args)
        print(f"\n== cost on a demo corpus: {pairs} pairs, {r['pool_images']} pool images ==")
        print_cost(r)
        for name, rates in r["demo_drop_rates"].items():
            print(f"near-duplicate drops by threshold ({name}): {rates}")
        results.append(r)
    prod = nsfw_against_production_scorer()
    print(f"\nOpen NSFW {prod['nsfw_ms']} ms/image against the production scorer's image tower "
          f"({prod['arch']}, fp32, CPU) {prod['image_tower_ms']} ms/image: "
          f"{prod['nsfw_over_image_tower']}")  # fmt: skip
    results.sort(key=lambda r: r["pool_images"])
    for r in results:  # the seconds the marginal cost compares
        r["hygiene"], r["score"] = r["seconds"]["hygiene"], r["score_without_nsfw_and_phash"]
        r["spark"] = r["seconds"]["hygiene_spark"]
    runs = list(results)
    if len(runs) >= 2:
        n = [r["pool_images"] for r in runs]
        for stage in ("hygiene", "spark", "score"):
            ys = [math.log(r[stage]) for r in runs]
            slope = float(np.polyfit([math.log(x) for x in n], ys, 1)[0])
            print(f"\n{stage} time growth exponent over {n} pool images: {slope:.2f}")
            results.append({f"{stage}_growth_exponent": round(slope, 3)})
        for job, name in (("hygiene", "the job as configured"), ("spark", "the Spark job")):
            results.append(_fit(runs, job, name))
    results.append({"nsfw_against_production_scorer": prod})
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
