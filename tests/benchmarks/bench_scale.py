"""Cost at scale: each stage's time and per-process memory as the corpus grows, NER and
scoring against knowledge bases of 10k, 200k and 2M entities, and the bookkeeping of a
110,000-shard build. `make bench-scale` runs it (under 30 minutes here).

    .venv/bin/python tests/benchmarks/bench_scale.py [--pairs 2000 4000 16000]
        [--entities 200000 2000000] [--bookkeeping-shards 110000] [--out runs/bench-scale]

1. **Growth in pairs.** One demo corpus of max(--pairs) pairs in shards of 1,000; each size
   is its first N/1000 shards. The smallest size has two shards, so that every size keeps
   both of this machine's cores busy: at 1,000 pairs (one shard) each Spark stage ran one
   task at a time, and a process's peak measured one task's buffers where every larger size
   measured two (vocab's JVM: 0.55 GiB at 1,000 pairs, 0.65 at both 2,000 and 8,000). ner, score (one scorer, bootstrapped once on the smallest
   size), vocab and write run as CLI processes; each is timed and its process tree sampled
   (``_rss.run_and_sample``: every process's exact peak RSS). Per stage: the time exponent
   fitted over the sizes (target <= 1.05) and the largest / smallest peak of each process
   kind (driver, JVM, Spark Python worker, scoring worker; target <= 1.2).
2. **Entities.** The packaged KB (10,355 entities) and synthetic KBs of --entities
   (``_synthetic_kb``: the real entities first, then generated people, places, works...).
   Per KB: the linker index build (once per KB version), a linker process's start-up and
   memory (``--probe``: open the mapped index, load spaCy, link 2,000 captions; PSS and RSS),
   single-process captions/s, and the Spark ner job over the largest corpus (captions/s per
   core over the shards' processing window, and end to end). Then ner and score of the
   smallest corpus with the largest KB (scoring's start-up and memory). Targets: 2M / 10k captions/s >= 0.8; memory per
   process <= 2 GiB and start-up <= 30 s at 2M; NER >= 1,000 captions/s per core.
3. **Bookkeeping.** ``bench_bookkeeping`` over --bookkeeping-shards x 5 stages locally, and
   the S3 request counts at two sizes on moto.
4. **The plan** at 1.1B pairs and 2M entities (``_paper_plan``) from the figures above, the
   storage per pair of the largest growth run, the FLOPs of a training step
   (``bench_train.py --flops-only``) and, when present, ``bench_map_size``'s result.

Prints one RESULT block; the README's "Scale" section is built from it.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from _rss import run_and_sample  # noqa: E402

MOFI = [sys.executable, "-m", "pipeline_tasks.cli"]
LOG = os.environ.get("MOFI_BENCH_LOG", "/tmp/mofi-bench-scale.log")
GiB = 1 << 30


def kind_of(cmd: str, root: bool) -> str:
    if root:
        return "driver"
    # spark-submit is a shell script that execs the JVM: a process first seen as the script
    # (whose --conf names spark.python.worker.reuse) is the JVM when it peaks
    if "java" in cmd.split(" ", 1)[0] or any(
        s in cmd for s in ("org.apache.spark", "bin/spark-submit", "bin/spark-class")
    ):
        return "spark_jvm"
    if "-m pyspark.daemon" in cmd or "-m pyspark.worker" in cmd:
        return "spark_python_worker"
    if "multiprocessing" in cmd or "spawn_main" in cmd:
        return "worker"
    return "other"


def measured(cmd: list[str], env: dict | None = None) -> dict:
    with open(LOG, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        start = log.tell()
        r = run_and_sample(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    with open(LOG) as log:
        log.seek(start)
        text = log.read()
    if r["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {r['rc']}): {text[-2000:]}")
    peaks: dict[str, int] = {}
    with open(LOG, "a") as log:
        for p in r["processes"]:
            k = kind_of(p["cmd"], p["pid"] == r["root_pid"])
            peaks[k] = max(peaks.get(k, 0), p["hwm"])
            log.write(f"# process {k} {p['hwm'] / GiB:.3f} GiB: {p['cmd'][:200]}\n")
    results = {}
    for line in text.splitlines():  # `mofi STAGE` prints "STAGE: {result json}"
        name, sep, rest = line.partition(": {")
        if sep and " " not in name:
            try:
                results[name] = json.loads("{" + rest)
            except ValueError:
                pass
    return {"wall_s": r["wall_s"], "peaks": peaks, "results": results}


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def subset_raw(full: str, out: str, n_shards: int) -> str:
    """The first n shards of a raw corpus (hard links: the same bytes, no copy)."""
    if os.path.isdir(out):
        return out
    os.makedirs(out)
    shards = sorted(glob.glob(os.path.join(full, "0*.parquet")))[:n_shards]
    for pq in shards:
        for f in glob.glob(pq[: -len(".parquet")] + ".*"):
            os.link(f, os.path.join(out, os.path.basename(f)))
    return out


# ---------------------------------------------------------------------- 1. growth in pairs
def growth(args, kb: str, raw_full: str) -> dict:
    sizes = sorted(args.pairs)
    boot_raw = subset_raw(raw_full, f"{args.out}/raw_{sizes[0]}", sizes[0] // 1000)
    scorer = f"{args.out}/scorer/packaged.pt"
    if not os.path.exists(scorer):  # the entity objective trains on ner's links
        subprocess.run(
            [*MOFI, "-q", "ner", "--raw", boot_raw, "--kb", kb, "--run", f"{args.out}/boot",
             "--no-progress"],
            check=True,
        )  # fmt: skip
        subprocess.run(
            [*MOFI, "-q", "scorer-bootstrap", "--raw", boot_raw, "--kb", kb,
             "--run", f"{args.out}/boot", "--out", scorer, "--no-progress"],
            check=True,
        )  # fmt: skip
    table: dict[str, dict[int, dict]] = {}
    for n in sizes:
        raw = subset_raw(raw_full, f"{args.out}/raw_{n}", n // 1000)
        run = f"{args.out}/run_{n}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(f"{args.out}/i2e_{n}", ignore_errors=True)
        steps = {
            "ner": ["ner", "--raw", raw, "--kb", kb, "--run", run],
            "score": ["score", "--raw", raw, "--kb", kb, "--run", run,
                      "--set", f"score.model={scorer}"],
            "vocab": ["vocab", "--run", run, "--kb", kb],
            "write": ["write", "--raw", raw, "--run", run, "--out", f"{args.out}/i2e_{n}"],
        }  # fmt: skip
        for stage, a in steps.items():
            m = measured([*MOFI, "-q", *a, "--no-progress"])
            table.setdefault(stage, {})[n] = m
            peaks = ", ".join(f"{k} {v / GiB:.2f}" for k, v in sorted(m["peaks"].items()))
            print(f"  {n:>6} pairs {stage:<6} {m['wall_s']:7.1f} s  peak GiB: {peaks}", flush=True)
    out = {}
    for stage, by_n in table.items():
        ns = sorted(by_n)
        b = exponent(ns, [by_n[n]["wall_s"] for n in ns])
        kinds = sorted({k for n in ns for k in by_n[n]["peaks"]})
        ratio = {
            k: by_n[ns[-1]]["peaks"].get(k, 0) / max(1, by_n[ns[0]]["peaks"].get(k, 0))
            for k in kinds
            if by_n[ns[0]]["peaks"].get(k) and by_n[ns[-1]]["peaks"].get(k)
        }
        out[stage] = {
            "seconds": {n: round(by_n[n]["wall_s"], 1) for n in ns},
            "exponent": round(b, 3),
            "peak_gib": {k: round(by_n[ns[-1]]["peaks"].get(k, 0) / GiB, 3) for k in kinds},
            "memory_ratio": {k: round(v, 3) for k, v in ratio.items()},
        }
    return out


def _bytes(pattern: str) -> int:
    return sum(os.path.getsize(f) for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))


def storage(out: str, n: int) -> dict:
    """Bytes per pair of each stage's output in the growth run of n pairs; the I2E shards
    against the raw tars; the entity embedding cache per entity."""
    import pyarrow.parquet as pq

    run = f"{out}/run_{n}"
    per = {
        "ner": _bytes(f"{run}/ner/0*.parquet"),
        "score": _bytes(f"{run}/score/0*.parquet"),
        "score_embeddings": _bytes(f"{run}/score/embeddings/**"),
        "vocab": _bytes(f"{run}/vocab/**"),
        "labels": _bytes(f"{run}/labels/0*.parquet"),
    }
    caches = glob.glob(f"{run}/score/_embedding_cache/*/*.parquet")
    ent = sum(pq.ParquetFile(f).metadata.num_rows for f in caches)
    return {
        "pairs": n,
        "bytes_per_pair": {k: v / n for k, v in per.items()},
        "i2e_over_raw": _bytes(f"{out}/i2e_{n}/*") / max(1, _bytes(f"{out}/raw_{n}/*")),
        "entity_cache_bytes_per_entity": _bytes(f"{run}/score/_embedding_cache/**") / ent
        if ent
        else None,
    }


def train_flops(i2e: str) -> float | None:
    """FLOPs of one b16_8gpu training step per image (bench_train --flops-only, CPU)."""
    p = subprocess.run(
        [sys.executable, os.path.join(HERE, "bench_train.py"), "--i2e", i2e, "--config",
         "b16_8gpu", "--device", "cpu", "--precision", "fp32", "--batch-size", "2",
         "--workers", "0", "--flops-only"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    for line in p.stdout.splitlines():
        if "GFLOP per image" in line:
            return float(line.split(":")[-1].split("GFLOP")[0]) * 1e9
    print(f"  bench_train --flops-only failed: {p.stderr[-500:]}", flush=True)
    return None


# ---------------------------------------------------------------------- 2. entities
def probe(index_uri: str, raw: str, n: int) -> dict:
    """In a fresh process: open the linker on a published index, link n captions."""
    import psutil
    import pyarrow.parquet as pq

    from pipeline_tasks.stages.ner.kb_index import open_local
    from pipeline_tasks.stages.ner.linking import EntityLinker, LinkerConfig

    caps = []
    for f in sorted(glob.glob(os.path.join(raw, "0*.parquet"))):
        caps += [
            c for c in pq.read_table(f, columns=["caption"]).column("caption").to_pylist() if c
        ]
    caps = caps[:n]
    t0 = time.perf_counter()
    linker = EntityLinker(open_local(index_uri), LinkerConfig())
    linker.link_texts(caps[:10])
    startup = time.perf_counter() - t0
    from threadpoolctl import threadpool_limits

    # the median of three passes each: one pass's rate moved by 10 % from run to run here
    # (spaCy alone, the same captions: 1,754 and 1,554 captions/s in two KBs' probes)
    rates, ner_rates = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        out = linker.link_texts(caps)
        rates.append(len(caps) / (time.perf_counter() - t0))
        with threadpool_limits(limits=1, user_api="blas"):  # NER alone, as link_texts runs it
            t0 = time.perf_counter()
            for _ in linker.nlp.pipe(caps, batch_size=linker.config.batch_size):
                pass
            ner_rates.append(len(caps) / (time.perf_counter() - t0))
    rate, ner_rate = sorted(rates)[1], sorted(ner_rates)[1]
    info = psutil.Process().memory_full_info()
    return {
        "startup_s": round(startup, 2),
        "captions_per_s": round(rate, 1),
        "ner_alone_captions_per_s": round(ner_rate, 1),
        "rss_gib": round(info.rss / GiB, 3),
        "pss_gib": round(info.pss / GiB, 3),
        "uss_gib": round(info.uss / GiB, 3),
        "linked_mentions": sum(1 for ms in out for m in ms if m["entity_id"]),
    }


def entities(args, kb: str, raw_full: str) -> dict:
    from _synthetic_kb import write as write_kb

    raw = subset_raw(raw_full, f"{args.out}/raw_{max(args.pairs)}", max(args.pairs) // 1000)
    kbs = {10355: kb}
    for n in args.entities:
        kbs[n] = write_kb(n, f"{args.out}/kb_{n}")
    out = {}
    for n, kb_uri in kbs.items():
        from pipeline_tasks.stages.kb.stage import kb_version
        from pipeline_tasks.stages.ner import kb_index
        from pipeline_tasks.stages.ner.linking import load_spacy

        uri = kb_index.published_uri(kb_uri, kb_index.index_key(kb_version(kb_uri)))
        shutil.rmtree(uri, ignore_errors=True)  # time the build, once per KB version
        build = run_and_sample(
            [sys.executable, "-c",
             "import sys; from pipeline_tasks.stages.ner import kb_index;"
             "from pipeline_tasks.stages.kb.stage import kb_version;"
             "from pipeline_tasks.stages.ner.linking import load_spacy;"
             "kb_index.ensure_published(sys.argv[1], kb_version(sys.argv[1]), load_spacy(use_ner=False))",
             kb_uri],
            cwd=ROOT,
        )  # fmt: skip
        assert build["rc"] == 0, build
        del load_spacy
        p = subprocess.run(
            [sys.executable, __file__, "--probe", uri, raw, str(args.probe_captions)],
            check=True, capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        pr = json.loads(p.stdout.strip().splitlines()[-1])
        run = f"{args.out}/ner_kb_{n}"
        shutil.rmtree(run, ignore_errors=True)
        m = measured(
            [*MOFI, "-q", "ner", "--raw", raw, "--kb", kb_uri, "--run", run, "--no-progress"]
        )
        st = [json.load(open(f))["stats"] for f in glob.glob(f"{run}/ner/_markers/ner/*.done.json")]
        captions = sum(s["n_in"] for s in st)
        window = max(s["finished_at"] for s in st) - min(s["started_at"] for s in st)
        linking = sum(s["extra"].get("link_seconds", 0.0) for s in st)
        cores = os.cpu_count() or 1
        mb = (os.path.getsize(f"{uri}/meta.json") and sum(
            os.path.getsize(os.path.join(uri, f)) for f in os.listdir(uri))) / (1 << 20)  # fmt: skip
        out[n] = {
            "index_build_s": round(build["wall_s"], 1),
            "index_build_peak_gib": round(build["peak_single_hwm"] / GiB, 3),
            "index_mib": round(mb, 1),
            "probe": pr,
            "spark_captions": captions,
            "spark_wall_s": round(m["wall_s"], 1),
            "spark_per_core_linking": round(captions / linking, 1) if linking else None,
            "spark_per_core_window": round(captions / window / cores, 1),
            "spark_per_core_end_to_end": round(captions / m["wall_s"] / cores, 1),
            "spark_peak_gib": {k: round(v / GiB, 3) for k, v in m["peaks"].items()},
        }
        print(f"  KB {n:>9,} entities: {json.dumps(out[n])}", flush=True)
    # scoring with the largest KB, over the smallest corpus's ner output made with it
    n_max = max(kbs)
    small = subset_raw(raw_full, f"{args.out}/raw_{min(args.pairs)}", min(args.pairs) // 1000)
    run = f"{args.out}/score_kb_{n_max}"
    shutil.rmtree(run, ignore_errors=True)
    subprocess.run(
        [*MOFI, "-q", "ner", "--raw", small, "--kb", kbs[n_max], "--run", run, "--no-progress"],
        check=True, stdout=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    m = measured(
        [*MOFI, "-q", "score", "--raw", small, "--kb", kbs[n_max], "--run", run,
         "--set", f"score.model={args.out}/scorer/packaged.pt", "--no-progress"]
    )  # fmt: skip
    res = m["results"].get("score", {})
    keep = ("entities", "entities_embedded", "text_seconds", "image_seconds", "startup_s")
    out["score_at_max"] = {
        "entities": n_max,
        "wall_s": round(m["wall_s"], 1),
        "peak_gib": {k: round(v / GiB, 3) for k, v in m["peaks"].items()},
        "result": {k: res.get(k) for k in keep},
    }
    print(f"  score with {n_max:,} entities: {json.dumps(out['score_at_max'])}", flush=True)
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        print(json.dumps(probe(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[2000, 4000, 16000])
    ap.add_argument("--entities", type=int, nargs="+", default=[200_000, 2_000_000])
    ap.add_argument("--probe-captions", type=int, default=2000)
    ap.add_argument("--bookkeeping-shards", type=int, default=110_000)
    ap.add_argument("--s3-shards", type=int, nargs="+", default=[50, 400])
    ap.add_argument("--out", default="runs/bench-scale")
    ap.add_argument(
        "--map-result", default="runs/bench-map/result.json",
        help="bench_map_size.py's result (make bench-map) for the plan's mapped tasks",
    )  # fmt: skip
    ap.add_argument("--skip", nargs="*", default=[], choices=["growth", "entities", "bookkeeping"])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t_all = time.time()
    kb = f"{args.out}/kb"
    if not os.path.exists(f"{kb}/entities.parquet"):
        subprocess.run([*MOFI, "-q", "kb", "--out", kb], check=True)
    raw_full = f"{args.out}/raw_full"
    if not os.path.isdir(raw_full):
        subprocess.run(
            [*MOFI, "-q", "corpus", "--out", raw_full, "--kb", kb, "--pairs",
             str(max(args.pairs)), "--seed", "0", "--config", "demo"],
            check=True,
        )  # fmt: skip
    result: dict = {"section_s": {}}
    t = time.time()
    if "growth" not in args.skip:
        print("1. growth in pairs", flush=True)
        result["growth"] = growth(args, kb, raw_full)
        result["storage"] = storage(args.out, max(args.pairs))
        result["section_s"]["growth"] = round(time.time() - t, 1)
    if "entities" not in args.skip:
        t = time.time()
        print("2. entities", flush=True)
        result["entities"] = entities(args, kb, raw_full)
        result["section_s"]["entities"] = round(time.time() - t, 1)
    if "bookkeeping" not in args.skip:
        import bench_bookkeeping

        t = time.time()
        print("3. bookkeeping", flush=True)
        result["bookkeeping"] = {
            "local": bench_bookkeeping.local_part(args.bookkeeping_shards, ""),
            "s3": bench_bookkeeping.s3_part(args.s3_shards),
        }
        result["section_s"]["bookkeeping"] = round(time.time() - t, 1)
    saved = f"{args.out}/result.json"
    if args.skip and os.path.exists(saved):  # a partial rerun keeps the other sections' figures
        with open(saved) as f:
            prev = json.load(f)
        for key in ("growth", "storage", "entities", "bookkeeping"):
            if key not in result and key in prev:
                result[key] = prev[key]
        for key, v in prev.get("section_s", {}).items():
            result["section_s"].setdefault(key, v)
    if "storage" in result:
        import _paper_plan

        print("4. the plan at 1.1B pairs and 2M entities", flush=True)
        result["train_flops_per_image"] = train_flops(f"{args.out}/i2e_{max(args.pairs)}")
        mapped = None
        if os.path.exists(args.map_result):
            with open(args.map_result) as f:
                mapped = json.load(f)
        rows = _paper_plan.plan(
            json.loads(json.dumps(result)),  # the keys as they are saved (strings)
            result["storage"],
            mapped,
            result["train_flops_per_image"],
            os.cpu_count() or 1,
        )
        result["plan"] = rows
        print(_paper_plan.render(rows), flush=True)
    result["total_s"] = round(time.time() - t_all, 1)
    result["sections_total_s"] = round(sum(result["section_s"].values()), 1)
    with open(f"{args.out}/result.json", "w") as f:
        json.dump(result, f, indent=2, default=str)
    print("RESULT " + json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
