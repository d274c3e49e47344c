"""Every GPU figure of the scoring and training data paths in one run (`gpu_check.sh` runs it).

    python3 tests/benchmarks/gpu_check.py --kb KB --stamps STAMPS --work DIR [--device cuda]

1. a production-sized corpus (224-512 px JPEGs) from the carried pictures and KB, and stand-in
   ner output from its truth (the GPU host has no Spark or spaCy);
2. scoring with open_clip ViT-B-32 (random init, seeded: the same weights in every process),
   bf16, batch 256: PIL decode in loader processes, then decode on the device; each with the
   worker's interleaved bare forward, start-up included and excluded;
3. the same labels either way: the largest similarity difference between the two paths and
   the share of images whose best candidate is the same;
4. one shard of about 2,000 images against the many-shard rate, start-up included, and where
   the start-up time goes;
5. training throughput and MFU (open_clip ViT-B/16 towers, batch 256, bf16, torch.compile),
   trainer against the bare loop;
6. the sharded entity head at 2,000,000 classes against 10,000, with and without sampling.

On a CPU (``--device cpu`` with small ``--pairs``) it runs the same steps at toy sizes: that
is how the script itself is tested before a GPU is spent on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def score(run_root: str, raw: str, kb: str, shards: list[str], a, decode: str, only=None) -> dict:
    from pipeline_tasks import recipes
    from pipeline_tasks.stages.score import stage as score_stage

    c = recipes.get("production").score.replace(
        model=a.model,
        devices=a.device,
        batch_size=a.batch,
        decode=decode,
        precision="bf16" if a.device == "cuda" else "fp32",
        loader_workers=a.loaders if decode == "processes" else 0,
    )
    t0 = time.time()
    res = score_stage.run_score(
        c, raw, run_root, kb, progress=False, reference_every=2, only=only
    ).to_dict()
    res["wall_s"] = round(time.time() - t0, 2)
    return res


def copy_ner(src_run: str, dst_run: str) -> None:
    shutil.copytree(os.path.join(src_run, "ner"), os.path.join(dst_run, "ner"))


def compare(run_a: str, run_b: str) -> dict:
    import glob

    import pyarrow.parquet as pq

    def load(run):
        rows = {}
        for f in sorted(glob.glob(os.path.join(run, "score", "0*.parquet"))):
            for r in pq.read_table(f).to_pylist():
                rows[(r["key"], r["entity_id"])] = r["similarity"]
        return rows

    a, b = load(run_a), load(run_b)
    common = a.keys() & b.keys()
    diff = max((abs(a[k] - b[k]) for k in common), default=float("nan"))

    def best(rows):
        per = {}
        for (key, e), s in rows.items():
            per.setdefault(key, []).append((s, e))
        return {k: max(v)[1] for k, v in per.items()}

    ba, bb = best(a), best(b)
    keys = ba.keys() & bb.keys()
    same = sum(ba[k] == bb[k] for k in keys) / max(1, len(keys))
    return {
        "pairs_a": len(a),
        "pairs_b": len(b),
        "max_abs_similarity_diff": round(diff, 5),
        "same_best_entity": round(same, 5),
        "images_compared": len(keys),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kb", required=True)
    ap.add_argument("--stamps", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", default=None, help="JSON report (default WORK/gpu_check.json)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--pairs", type=int, default=30000)
    ap.add_argument("--shard-size", type=int, default=2000)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--loaders", type=int, default=15)
    ap.add_argument("--train-model", default="openclip:ViT-B-16")
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--head-classes", default="10000,2000000")
    ap.add_argument("--skip", default="", help="comma list of steps to skip: train,head")
    a = ap.parse_args()
    report: dict = {"device": a.device}
    out = a.out or os.path.join(a.work, "gpu_check.json")
    os.makedirs(a.work, exist_ok=True)
    py = sys.executable
    try:
        import torch

        report["torch"] = torch.__version__
        if a.device == "cuda":
            report["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001
        report["torch_error"] = str(exc)

    # 1. corpus + stand-in ner output
    raw = os.path.join(a.work, "raw")
    t0 = time.time()
    r = subprocess.run(
        [py, "-m", "pipeline_tasks.cli", "-q", "corpus", "--out", raw, "--kb", a.kb,
         "--pairs", str(a.pairs), "--shard-size", str(a.shard_size), "--config", "production",
         "--workers", str(os.cpu_count() or 1), "--stamps", a.stamps, "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    if r.returncode != 0:
        print(r.stderr[-3000:])
        return 1
    say(f"corpus: {a.pairs} pairs in {time.time() - t0:.0f}s")
    from bench_score import synthesize_mentions

    base = os.path.join(a.work, "base")
    synthesize_mentions(raw, os.path.join(a.work, "truth"), base)
    from pipeline_tasks.runtime.layout import RunLayout
    from pipeline_tasks.stages.ner.stage import planned_raw_shards

    shards = [s.shard for s in planned_raw_shards(RunLayout(base))[0]]

    # 2-3. the two decode paths on every shard, then the labels compared
    results = {}
    for decode in ("processes", "device"):
        run = os.path.join(a.work, f"score_{decode}")
        copy_ner(base, run)
        # warm caches first: the entity texts embedded once, as a rebuild would find them
        score(run, raw, a.kb, shards, a, decode, only=[shards[0]])
        shutil.rmtree(os.path.join(run, "score", "_markers"), ignore_errors=True)
        res = score(run, raw, a.kb, shards, a, decode)
        results[decode] = res
        say(
            f"scoring decode={decode}: {res.get('images')} images, "
            f"{res.get('images_per_s_steady')} img/s steady, {res.get('images_per_s')} counting "
            f"start-up; bare {res.get('bare_forward_images_per_s')}; ratio "
            f"{res.get('end_to_end_over_bare')}; start-up {res.get('startup_s')}"
        )
    report["scoring"] = results
    report["labels"] = compare(
        os.path.join(a.work, "score_processes"), os.path.join(a.work, "score_device")
    )
    say(f"labels, device vs PIL: {report['labels']}")

    # 4. one shard, start-up included
    run = os.path.join(a.work, "score_single")
    copy_ner(base, run)
    score(run, raw, a.kb, shards, a, "device", only=[shards[1]])  # warm the entity cache
    shutil.rmtree(os.path.join(run, "score", "_markers"), ignore_errors=True)
    single = score(run, raw, a.kb, shards, a, "device", only=[shards[0]])
    many = results["device"]
    report["single_shard"] = {
        **{
            k: single.get(k)
            for k in (
                "images",
                "images_per_s",
                "images_per_s_steady",
                "startup_s",
                "text_seconds",
                "wall_s",
            )
        },
        "images_per_s_whole_task": round(single["images"] / single["wall_s"], 1),
        "over_many_shard_rate": round(
            single["images"] / single["wall_s"] / max(1e-9, many["images_per_s_steady"]), 3
        ),
    }
    say(f"single shard: {report['single_shard']}")

    # 5. training throughput and MFU
    if "train" not in a.skip:
        from mofi_testdata import make_i2e

        i2e = make_i2e(os.path.join(a.work, "i2e"), n_shards=8, per_shard=1024, n_classes=200)
        cmd = [py, os.path.join(HERE, "bench_train.py"), "--i2e", i2e, "--device", a.device,
               "--image-tower", a.train_model, "--text-tower", a.train_model,
               "--steps", str(a.train_steps), "--warmup", str(max(3, a.train_steps // 4))]  # fmt: skip
        if a.device == "cuda":
            cmd += ["--image-size", "224", "--batch-size", "256", "--workers", "8",
                    "--precision", "bf16", "--compile"]  # fmt: skip
        else:
            cmd += ["--image-size", "64", "--batch-size", "8", "--workers", "1"]
        t = subprocess.run(cmd, capture_output=True, text=True)
        report["train"] = {"rc": t.returncode, "output": t.stdout[-1500:] or t.stderr[-1500:]}
        say(f"training:\n{t.stdout[-800:] or t.stderr[-1500:]}")

    # 6. the head at the paper's scale
    if "head" not in a.skip:
        cmd = [py, os.path.join(HERE, "bench_head_scale.py"), "--device", a.device,
               "--classes", a.head_classes, "--ranks", "1" if a.device == "cuda" else "2"]  # fmt: skip
        if a.device == "cuda":
            cmd += ["--batch", "1024", "--dim", "512"]
        h = subprocess.run(cmd, capture_output=True, text=True)
        report["head"] = {"rc": h.returncode, "output": h.stdout[-1500:] or h.stderr[-1500:]}
        say(f"head:\n{h.stdout[-800:] or h.stderr[-1500:]}")

    with open(out, "w") as f:
        json.dump(report, f, indent=2, default=str)
    say(f"report -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
