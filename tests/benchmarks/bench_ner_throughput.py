"""NER throughput: the Spark job (spark-submit, JVM start and Arrow included) against a
single-process spaCy ``nlp.pipe`` loop over the same captions, on this machine.

    .venv/bin/python tests/benchmarks/bench_ner_throughput.py --raw RAW --kb KB

RAW should hold 100,000 captions (``mofi corpus --pairs 100000``). Prints captions/s of
(a) bare ``nlp.pipe`` (tok2vec + ner, the components the job loads), (b) the job's own
per-caption work (NER + KB matcher + linking) in one process, on a subset, and (c) the
Spark job; the ratio (c)/(a) is the target (>= 1.0).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time

import pyarrow.parquet as pq


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", required=True)
    ap.add_argument("--kb", required=True)
    ap.add_argument(
        "--linker-subset",
        type=int,
        default=20000,
        help="captions for the single-process linker figure",
    )
    ap.add_argument("--master", default="local[*]")
    args = ap.parse_args()
    from pipeline_tasks.runtime.spark import SparkConfig
    from pipeline_tasks.stages.kb.stage import load_kb
    from pipeline_tasks.stages.ner.linking import EntityLinker, LinkerConfig, load_spacy
    from pipeline_tasks.stages.ner.stage import NerConfig, run_ner

    caps = []
    for f in sorted(glob.glob(os.path.join(args.raw, "0*.parquet"))):
        caps += [
            c for c in pq.read_table(f, columns=["caption"]).column("caption").to_pylist() if c
        ]
    n = len(caps)
    print(f"captions: {n}")
    lc = LinkerConfig()
    nlp = load_spacy()
    t0 = time.perf_counter()
    for _ in nlp.pipe(caps, batch_size=lc.batch_size):
        pass
    t_pipe = time.perf_counter() - t0
    print(
        f"(a) single-process nlp.pipe ({'+'.join(nlp.pipe_names)}): {n / t_pipe:8.0f} captions/s ({t_pipe:.1f}s)"
    )
    t0 = time.perf_counter()
    linker = EntityLinker(load_kb(args.kb), lc, nlp=nlp)
    t_build = time.perf_counter() - t0
    sub = caps[: args.linker_subset]
    t0 = time.perf_counter()
    linker.link_texts(sub)
    t_link = time.perf_counter() - t0
    print(
        f"(b) single-process NER + KB matcher + linking: {len(sub) / t_link:8.0f} captions/s on {len(sub)} (matcher build {t_build:.1f}s)"
    )
    work = tempfile.mkdtemp(prefix="mofi-bench-ner-")
    try:
        cfg = NerConfig(spark=SparkConfig(master=args.master))
        t0 = time.perf_counter()
        res = run_ner(cfg, args.raw, args.kb, work, progress=False)
        t_spark = time.perf_counter() - t0
        assert not res["failed"], res["failed"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"(c) Spark job, {args.master}, {os.cpu_count()} cores, end to end: {n / t_spark:8.0f} captions/s ({t_spark:.1f}s)"
    )
    ratio = (n / t_spark) / (n / t_pipe)
    print(
        f"RESULT Spark / single-process nlp.pipe = {ratio:.2f} (target >= 1.0); Spark / single-process full linking = {(n / t_spark) / (len(sub) / t_link):.2f}"
    )
    return 0 if ratio >= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
