"""Scoring: end-to-end images/s vs. the bare model forward, text passes, and memory vs. shard count.

    .venv/bin/python tests/benchmarks/bench_score.py --raw RAW --run RUN --kb KB [--backend open_clip --model ViT-B-32]

RUN must hold finished ner output for RAW (ideally 20+ shards). The benchmark
1. runs `mofi score --reference-every 2` on the first 2 shards and on the first 20 shards
   in fresh run roots (copies of the ner shards and their markers): after every second
   batch the scoring worker also times one forward pass on a preloaded uint8 batch (same
   process, batch size, device, threads and heap), so the bare forward and the end-to-end
   rate are measured in the same minutes of this shared, drifting machine;
2. also measures the bare forward in this process right before and after each run (the
   same settings), as a second reference;
3. prints images/s end to end (JPEG decode included) against the bare forward, the number
   of entity text passes against the number of distinct candidate entities, and the peak
   RSS ratio 20 shards / 2 shards (the worker's own VmHWM; the tree's PSS is sampled every
   2 s for information).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _rss import run_and_sample  # noqa: E402

GIB = 1024**3


def _subset(raw: str, run: str, n: int, work: str) -> tuple[str, str]:
    from pipeline_tasks.runtime import raw as raw_mod

    shards, _ = raw_mod.discover(raw)
    shards = shards[:n]
    r, u = os.path.join(work, f"raw{n}"), os.path.join(work, f"run{n}")
    os.makedirs(r)
    os.makedirs(os.path.join(u, "ner", "_markers", "ner"))
    for s in shards:
        for src in (s.tar, s.parquet):
            os.symlink(os.path.abspath(src), os.path.join(r, os.path.basename(src)))
        shutil.copy(os.path.join(run, "ner", f"{s.shard}.parquet"), os.path.join(u, "ner"))
        shutil.copy(
            os.path.join(run, "ner", "_markers", "ner", f"{s.shard}.done.json"),
            os.path.join(u, "ner", "_markers", "ner"),
        )
    with open(os.path.join(u, "ner", "_markers", "ner", "_plan.json"), "w") as f:
        json.dump({"stage": "ner", "shards": [s.shard for s in shards]}, f)
    return r, u


def synthesize_mentions(raw: str, truth: str, run: str) -> None:
    """Stand-in ner output from the corpus truth (true + distractor entities as candidates),
    for hosts without spaCy/Spark such as the GPU machine. Only for throughput figures."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline_tasks.runtime import markers
    from pipeline_tasks.runtime import raw as raw_mod
    from pipeline_tasks.stages.ner.linking import MENTION_TYPE

    shards, _ = raw_mod.discover(raw)
    store = markers.MarkerStore(os.path.join(run, "ner"), "ner")
    store.write_plan([s.shard for s in shards])
    for s in shards:
        rows = pq.read_table(os.path.join(truth, f"{s.shard}.parquet")).to_pylist()
        keys, ms = [], []
        for r in rows:
            ents = list(r["true_entity_ids"]) + list(r["distractor_entity_ids"])
            if ents:
                keys.append(r["key"])
                ms.append(
                    [
                        {
                            "text": e,
                            "label": "KB",
                            "start": 0,
                            "end": 1,
                            "entity_id": e,
                            "link_score": 1.0,
                        }
                        for e in ents
                    ]
                )
        pq.write_table(
            pa.table({"key": keys, "mentions": pa.array(ms, pa.list_(MENTION_TYPE))}),
            os.path.join(run, "ner", f"{s.shard}.parquet"),
        )
        store.mark_done(s.shard, markers.ShardStats(n_in=len(rows), n_out=len(keys)))


def main() -> int:
    from pipeline_tasks.cli.common import Overrides

    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", required=True)
    ap.add_argument("--run", required=True, help="run root with finished ner output for RAW")
    ap.add_argument("--kb", required=True)
    ap.add_argument("--config", default="demo")
    ov = Overrides(ap)  # the CLI's own flags for the score config, and --set
    ov.flag("--backend", "score.backend")
    ov.flag(
        "--model", "score.model", help="checkpoint (default: RUN/scorer/packaged.pt for packaged)"
    )
    ov.flag("--devices", "score.devices")
    ov.flag("--batch-size", "score.batch_size", type=int)
    ov.flag("--loader-workers", "score.loader_workers", type=int)
    ov.flag("--decode", "score.decode", choices=["auto", "processes", "threads"])
    ap.add_argument("--shards", default="2,20", help="the two shard counts compared for memory")
    ap.add_argument(
        "--reference-every",
        type=int,
        default=2,
        help="the worker times a bare forward after every N batches",
    )
    ap.add_argument(
        "--mentions-from-truth",
        default=None,
        metavar="TRUTH",
        help="write stand-in ner output from the corpus truth first (hosts without spaCy/Spark)",
    )
    args = ap.parse_args()
    if args.reference_every < 1:
        ap.error(
            "--reference-every must be >= 1: the ratio uses the worker's interleaved reference"
        )
    if args.mentions_from_truth:
        synthesize_mentions(args.raw, args.mentions_from_truth, args.run)
    import torch

    from pipeline_tasks.cli.common import pipeline_config
    from pipeline_tasks.runtime.layout import RunLayout
    from pipeline_tasks.stages.score import backends as scoring
    from pipeline_tasks.stages.score.worker import resolve_devices
    from training.core.device import pick_device, tune_heap

    c = pipeline_config(args).score
    if c.backend == "packaged" and not c.model:
        c = c.replace(model=RunLayout(args.run).scorer_checkpoint)
    device = pick_device(resolve_devices(c.devices)[0])
    # the reference runs with the worker's own settings: threads and heap thresholds
    tune_heap(c.heap_mmap_threshold_mb << 20, c.heap_trim_threshold_mb << 20)
    torch.set_num_threads(c.torch_threads or os.cpu_count() or 1)
    backend = scoring.build_backend(c, args.run, device)
    # The reference is measured right before and right after each scoring run and the two
    # are averaged, so drift of the shared machine favours neither side.
    n_bare = 20 if device.type == "cpu" else 30
    bare_runs = [scoring.bare_forward_rate(backend, c.batch_size, batches=n_bare)]
    print(
        f"device {device}, batch {c.batch_size}, image size {backend.image_size}, precision {backend.dtype}"
    )
    small, large = (int(x) for x in args.shards.split(","))
    work = tempfile.mkdtemp(prefix="mofi-bench-score-")
    results = {}
    try:
        for n in (small, large):
            raw_n, run_n = _subset(args.raw, args.run, n, work)
            cmd = [
                sys.executable,
                "-m",
                "pipeline_tasks.cli",
                "-q",
                "score",
                "--raw",
                raw_n,
                "--run",
                run_n,
                "--kb",
                args.kb,
                "--config",
                args.config,
                "--no-progress",
                "--backend",
                c.backend,
                "--model",
                c.model,
                "--batch-size",
                str(c.batch_size),
            ]
            cmd += ["--devices", c.devices, "--decode", c.decode]
            cmd += ["--loader-workers", str(c.loader_workers)]
            cmd += ["--reference-every", str(args.reference_every)]
            out_path = os.path.join(work, f"out{n}.txt")
            with open(out_path, "w") as out:
                r = run_and_sample(cmd, pss_interval=2.0, stdout=out, stderr=out)
            text = open(out_path).read()
            if r["rc"] != 0:
                print(text[-3000:])
                return 1
            res = json.loads(text.split("score: ", 1)[1].splitlines()[0])
            bare_runs.append(scoring.bare_forward_rate(backend, c.batch_size, batches=n_bare))
            res["bare"] = (bare_runs[-2] + bare_runs[-1]) / 2
            results[n] = {**r, **res}
            print(
                f"{n:>3} shards: {res['images']:6d} images, {res['images_per_s_steady']:8.1f} images/s end to end, decode included "
                f"({res['images_per_s']:.1f} counting worker start-up), "
                f"entities {res['entities']} / text passes {res['entities_embedded']}, worker peak RSS {res['worker_peak_rss_bytes'] / GIB:.2f} GiB, "
                f"tree PSS {r['peak_total_rss'] / GIB:.2f} GiB; "
                f"decode in {' '.join(res['decode'])}; model {res['model_seconds']:.1f}s, waiting for decoded batches {res['loader_wait_seconds']:.1f}s; "
                f"bare forward interleaved {res['bare_forward_images_per_s']:.1f} images/s, around this run {res['bare']:.1f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    big = results[large]
    bare = big["bare_forward_images_per_s"]
    print(
        f"bare forward on preloaded tensors: {bare:9.1f} images/s interleaved with the {large}-shard run; "
        f"in this process around the runs: {', '.join(f'{b:.1f}' for b in bare_runs)}"
    )
    ratio = big["end_to_end_over_bare"]
    # the scoring worker's own peak (VmHWM, reported by the worker process itself)
    mem = results[large]["worker_peak_rss_bytes"] / results[small]["worker_peak_rss_bytes"]
    tree = results[large]["peak_total_rss"] / results[small]["peak_total_rss"]
    once = all(r["entities"] == r["entities_embedded"] for r in results.values())
    print(
        f"RESULT end-to-end / bare forward = {ratio:.2f} (target >= 0.85; against the bare forward around the run: "
        f"{big['images_per_s_steady'] / big['bare']:.2f}; with worker start-up {big['images_per_s'] / bare:.2f})"
    )
    print(f"RESULT text passes == distinct entities: {once}")
    print(
        f"RESULT scoring worker peak RSS (VmHWM) {large} shards / {small} shards = {mem:.3f} (target <= 1.15); sampled PSS of the whole tree: {tree:.3f}"
    )
    return 0 if ratio >= 0.85 and once and mem <= 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())
