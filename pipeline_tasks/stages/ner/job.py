"""spark-submit entry point of `mofi ner` (see ``stage``). Usage: job.py SPEC.json

One row per raw shard is spread over the executors; ``mapInPandas`` reads each shard's
captions through the storage API (local or s3://, no Hadoop S3 connector needed), runs the
linker in spaCy batches and emits Arrow batches of mentions. The linker (spaCy model and the
KB index the driver published, memory-mapped) is built once per Python worker and reused
across tasks. A shuffle groups
the rows by shard and ``applyInPandas`` publishes each shard's Parquet, then its done marker.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import pandas as pd

ROW_SCHEMA = (
    "shard string, key string, status string, t_start double, t_link double, "
    "mentions array<struct<text:string,label:string,start:int,end:int,entity_id:string,link_score:float>>"
)
STATS_SCHEMA = "shard string, state string, n_in long, n_out long, drops string, error string"
SENTINEL = "__shard__"  # one per shard, so even an empty shard reaches the writer
FAILED = "__failed__"

_LINKER = {}  # per Python worker: (index uri, config json) -> EntityLinker


def _linker(spec: dict):
    key = (spec["index_uri"], json.dumps(spec["config"]["linker"], sort_keys=True))
    if key not in _LINKER:
        from pipeline_tasks.stages.ner.kb_index import open_local
        from pipeline_tasks.stages.ner.linking import EntityLinker, LinkerConfig

        _LINKER.clear()
        # the KB index is memory-mapped (shared by this host's workers), not loaded
        _LINKER[key] = EntityLinker(
            open_local(spec["index_uri"]), LinkerConfig.from_dict(spec["config"]["linker"])
        )
    return _LINKER[key]


def _read_captions(parquet_uri: str) -> pd.DataFrame:
    import pyarrow.parquet as pq

    from training.core import storage

    with storage.open_read(parquet_uri) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        missing = [c for c in ("key", "caption") if c not in names]
        if missing:
            raise ValueError(
                f"{parquet_uri} has no column(s) {missing}; raw Parquet needs key and caption"
            )
        return pf.read(columns=["key", "caption"]).to_pandas()


def _shard_rows(spec: dict, shard: str, parquet_uri: str, t0: float) -> tuple[list[dict], float]:
    """One row per caption of a shard: its status (ok, a drop reason, or a counted
    truncation) and, when linked, its mentions; and the seconds its linking took."""
    from pipeline_tasks.stages.ner.linking import clean_caption

    def row(key, status, mentions=None) -> dict:
        return {
            "shard": shard,
            "key": key,
            "status": status,
            "t_start": t0,
            "t_link": None,
            "mentions": mentions,
        }

    linker = _linker(spec)
    df = _read_captions(parquet_uri)
    keys, texts, rows = [], [], []
    for key, cap in zip(df["key"], df["caption"], strict=True):
        text, reason, truncated = clean_caption(cap, linker.config.max_caption_chars)
        if key is None or str(key) == "":
            rows.append(row(None, "key_missing"))
            continue
        if reason:
            rows.append(row(str(key), reason))
            continue
        if truncated:
            rows.append(row(None, "caption_truncated"))
        keys.append(str(key))
        texts.append(text)
    t_link = time.time()
    linked_all = linker.link_texts(texts)
    t_link = time.time() - t_link  # the linking alone: per-core throughput without Spark
    for key, mentions in zip(keys, linked_all, strict=True):
        linked = any(m["entity_id"] for m in mentions)
        rows.append(row(key, "ok" if linked else "no_linked_mention", mentions if linked else None))
    return rows, t_link


def ner_partition(spec: dict, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    from pipeline_tasks.runtime import markers
    from pipeline_tasks.runtime.layout import NER, RunLayout

    store = RunLayout(spec["run_uri"]).store(NER)
    for pdf in batches:
        for shard, parquet_uri in zip(pdf["shard"], pdf["parquet"], strict=True):
            t0 = time.time()
            store.mark_running(shard)
            sentinel = {
                "shard": shard,
                "key": None,
                "status": SENTINEL,
                "t_start": t0,
                "t_link": None,
                "mentions": None,
            }
            try:
                rows, t_link = _shard_rows(spec, shard, parquet_uri, t0)
                yield pd.DataFrame([{**sentinel, "t_link": t_link}] + rows)
            except Exception as exc:  # the shard fails alone; the others go on
                st = markers.ShardStats(
                    started_at=t0, finished_at=time.time(), duration_s=time.time() - t0
                )
                store.mark_failed(shard, f"{type(exc).__name__}: {exc}", st)
                yield pd.DataFrame([{**sentinel, "status": FAILED}])


def write_shard(spec: dict, pdf: pd.DataFrame) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline_tasks.runtime import markers
    from pipeline_tasks.runtime.layout import NER, RunLayout
    from pipeline_tasks.stages.ner.linking import MENTION_TYPE
    from training.core import storage
    from training.core.process import whoami

    shard = str(pdf["shard"].iloc[0])
    if (pdf["status"] == FAILED).any():
        return pd.DataFrame(
            [
                {
                    "shard": shard,
                    "state": "failed",
                    "n_in": 0,
                    "n_out": 0,
                    "drops": "{}",
                    "error": "see marker",
                }
            ]
        )
    store = RunLayout(spec["run_uri"]).store(NER)
    store.keys = spec.get("keys") or {}  # the reuse keys the done markers record
    st = markers.ShardStats(host=whoami()["host"])
    st.started_at = float(pdf["t_start"].min())
    rows = pdf[pdf["status"] != SENTINEL]
    for status, n in rows["status"].value_counts().items():
        if status == "ok":
            continue
        if status == "caption_truncated":
            st.extra["captions_truncated"] = int(n)
            continue
        st.drop(str(status), int(n))
    ok = rows[rows["status"] == "ok"].sort_values("key")
    st.n_in = int((rows["status"] != "caption_truncated").sum())
    st.n_out = len(ok)
    mentions = [
        sorted(
            [
                {k: m[k] for k in ("text", "label", "start", "end", "entity_id", "link_score")}
                for m in ms
            ],
            key=lambda m: (m["start"], m["end"]),
        )
        for ms in ok["mentions"]
    ]
    table = pa.table(
        {
            "key": pa.array(ok["key"].tolist(), pa.string()),
            "mentions": pa.array(mentions, pa.list_(MENTION_TYPE)),
        }
    )
    uri = RunLayout(spec["run_uri"]).output(NER, shard)
    with storage.open_write(uri) as f:
        pq.write_table(table, f, compression="zstd")
    markers.record_outputs(st, store.root, [uri])
    st.extra["mentions"] = int(sum(len(m) for m in mentions))
    t_link = pdf["t_link"].max(skipna=True)
    st.extra["link_seconds"] = round(float(t_link), 3) if pd.notna(t_link) else 0.0
    st.extra["linked_mentions"] = int(sum(1 for ms in mentions for m in ms if m["entity_id"]))
    st.finished_at = time.time()
    st.duration_s = round(st.finished_at - st.started_at, 3)
    store.mark_done(shard, st)
    return pd.DataFrame(
        [
            {
                "shard": shard,
                "state": "done",
                "n_in": st.n_in,
                "n_out": st.n_out,
                "drops": json.dumps(st.drops),
                "error": "",
            }
        ]
    )


def main(spec_path: str) -> int:
    from functools import partial

    from pyspark.sql import SparkSession

    with open(spec_path) as f:
        spec = json.load(f)
    spark = SparkSession.builder.appName("mofi-ner").getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    shards = spec["shards"]
    n_parts = spec.get("partitions") or min(len(shards), 2 * spark.sparkContext.defaultParallelism)
    df = spark.createDataFrame(shards, "shard string, parquet string").repartition(max(1, n_parts))
    rows = df.mapInPandas(partial(ner_partition, spec), schema=ROW_SCHEMA)
    stats = rows.groupBy("shard").applyInPandas(partial(write_shard, spec), schema=STATS_SCHEMA)
    for r in stats.collect():
        print("MOFI_SHARD", json.dumps(r.asDict()), flush=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
