"""spark-submit entry point of `mofi hygiene` (see ``stage``). Usage: job.py SPEC.json

Every scored image (its visual embedding, content hash and NSFW score from the score stage)
and every registered evaluation image (embedded by the same scorer) go through, in order:

1. ``nsfw``: the NSFW score at or above the threshold;
2. ``eval_copy``: the same bytes as an evaluation image, or an embedding within
   ``eval_threshold`` of one (found through the LSH buckets below);
3. ``exact_duplicate``: the same content hash as an image with a smaller (shard, key);
4. ``near_duplicate``: connected to a smaller (shard, key) by pairs of cosine at or above
   ``near_threshold`` (components by label propagation; the smallest keeps).

Candidate pairs come from random-hyperplane LSH (``lsh``): each image falls in one bucket
per table, pairs are compared exactly only inside a bucket (a bucket larger than
``max_bucket`` compares its members to its first ``max_bucket`` ones only). The job writes
``RUN/hygiene/dropped.parquet`` (shard, key, reason, matched, score) and the stage's marker
with the drops by reason.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

IMAGE_SCHEMA = "shard string, key string, embedding array<float>, sha256 string, nsfw float"
EDGE_SCHEMA = "a string, b string, cos float"
DROP_SCHEMA = "id string, reason string, matched string, score float"
EVAL_PREFIX = "\x00eval/"  # sorts before every pool id; never a shard name


def read_images(batches):
    """Each (shard, uri) row's embeddings file: key, embedding, sha256 and nsfw (null when
    the score stage did not compute them), as Arrow batches (``mapInArrow``: the embeddings
    are never Python lists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.core import storage

    for rb in batches:
        for shard, uri in zip(rb.column("shard").to_pylist(), rb.column("uri").to_pylist(),
                              strict=True):  # fmt: skip
            with storage.open_read(uri) as f:
                t = pq.read_table(f)
            n = t.num_rows
            if not n:
                continue
            cols = {
                "shard": pa.array([shard] * n, pa.string()),
                "key": t.column("key").combine_chunks(),
                "embedding": t.column("embedding").cast(pa.list_(pa.float32())).combine_chunks(),
            }
            for name, typ in (("sha256", pa.string()), ("nsfw", pa.float32())):
                cols[name] = (  # null, never NaN, when missing: Spark orders NaN highest
                    t.column(name).cast(typ).combine_chunks()
                    if name in t.column_names
                    else pa.nulls(n, typ)
                )
            yield from pa.Table.from_pydict(cols).to_batches()


def _matrix(col) -> np.ndarray:
    """(n, dim) float32 of an Arrow list<float> column of equal-length rows."""
    n = len(col)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(n, -1) if n else flat.reshape(0, 1)


def bucket_rows(hyperplanes: np.ndarray, tables: int, batches):
    """One row per (image, table): the image's bucket key in that table (ids only: the
    embeddings join back for the buckets that hold two or more images). Arrow batches in
    and out (``mapInArrow``)."""
    import pyarrow as pa

    from pipeline_tasks.stages.hygiene import lsh

    for rb in batches:
        n = rb.num_rows
        if not n:
            continue
        emb = lsh.normalize(_matrix(rb.column("embedding")))
        k = lsh.keys(emb, hyperplanes, tables)  # (n, tables)
        ids = np.asarray(rb.column("id").to_pylist(), dtype=object)
        yield pa.RecordBatch.from_pydict(
            {
                "tbl": pa.array(np.tile(np.arange(tables, dtype=np.int32), n)),
                "bkey": pa.array(k.reshape(-1)),
                "id": pa.array(np.repeat(ids, tables), pa.string()),
            }
        )


def bucket_pairs(min_cos: float, max_bucket: int, pdf: pd.DataFrame) -> pd.DataFrame:
    """The pairs at cosine >= ``min_cos`` inside each bucket (tbl, bkey) of ``pdf`` (an
    ``applyInPandas`` group holding many buckets), each as (smaller id, larger id); a bucket
    over ``max_bucket`` compares everything with its first ``max_bucket`` members only."""
    from pipeline_tasks.stages.hygiene import lsh

    out_a, out_b, out_c = [], [], []
    for _, g in pdf.groupby(["tbl", "bkey"], sort=False):
        if len(g) < 2:
            continue
        g = g.sort_values("id")
        ids = g["id"].to_numpy()
        x = lsh.normalize(np.stack(g["embedding"].to_numpy()))
        sims = x[:max_bucket] @ x.T  # (leaders, all)
        i, j = np.nonzero(sims >= min_cos)
        keep = i < j  # each pair once, leaders against later members
        i, j = i[keep], j[keep]
        out_a.append(ids[i])
        out_b.append(ids[j])
        out_c.append(sims[i, j].astype(np.float32))
    if not out_a:
        none = np.array([], dtype=object)
        return pd.DataFrame({"a": none, "b": none, "cos": np.array([], np.float32)})
    return pd.DataFrame(
        {"a": np.concatenate(out_a), "b": np.concatenate(out_b), "cos": np.concatenate(out_c)}
    )


def candidate_pairs(members, hyperplanes: np.ndarray, c: dict, thr: float, n_groups: int):
    """(a, b, cos) of every pair that shares an LSH bucket and reaches ``thr``. Only bucket
    keys travel through the first shuffle; the embeddings join back for the buckets that
    hold two or more images, which are compared in ``n_groups`` groups of many buckets (one
    Python call per group, not per bucket)."""
    from pyspark.sql import functions as F

    tables = int(c["lsh_tables"])
    keyed = members.select("id", "embedding").mapInArrow(
        partial(bucket_rows, hyperplanes, tables), "tbl int, bkey long, id string"
    )
    shared = keyed.groupBy("tbl", "bkey").count().filter(F.col("count") > 1).drop("count")
    rows = (
        keyed.join(shared, ["tbl", "bkey"])
        .join(members.select("id", "embedding"), "id")
        .withColumn("part", F.pmod(F.xxhash64("tbl", "bkey"), F.lit(n_groups)))
    )
    return (
        rows.groupBy("part")
        .applyInPandas(_pairs_at(thr, int(c["max_bucket"])), EDGE_SCHEMA)
        .groupBy("a", "b")
        .agg(F.max("cos").alias("cos"))
    )


def _pairs_at(min_cos: float, max_bucket: int):
    def pairs(pdf: pd.DataFrame) -> pd.DataFrame:  # a function, as applyInPandas expects
        return bucket_pairs(min_cos, max_bucket, pdf)

    return pairs


def components(spark, edges, max_rounds: int = 50):
    """(id, label): every id on an edge with the smallest id of its connected component
    (label propagation; each round is one join)."""
    from pyspark.sql import functions as F

    both = edges.select("a", "b").union(edges.select(F.col("b").alias("a"), F.col("a").alias("b")))
    both = both.localCheckpoint()
    labels = both.groupBy("a").agg(F.least(F.min("b"), F.first("a")).alias("label"))
    labels = labels.withColumnRenamed("a", "id").localCheckpoint()
    for _ in range(max_rounds):
        nxt = (
            both.join(labels.withColumnRenamed("id", "b"), "b")
            .groupBy("a")
            .agg(F.min("label").alias("n"))
            .withColumnRenamed("a", "id")
            .join(labels, "id")
            .select("id", F.least("n", "label").alias("label"))
            .localCheckpoint()
        )
        changed = nxt.join(labels.withColumnRenamed("label", "old"), "id").filter(
            F.col("label") != F.col("old")
        )
        if changed.limit(1).count() == 0:
            return nxt
        labels = nxt
    raise RuntimeError(f"near-duplicate components did not settle in {max_rounds} rounds")


def _cosine_to(rows: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    for pdf in rows:
        if not len(pdf):
            continue
        a = np.stack(pdf["embedding"].to_numpy())
        b = np.stack(pdf["m_embedding"].to_numpy())
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        yield pd.DataFrame(
            {
                "id": pdf["id"],
                "reason": "near_duplicate",
                "matched": pdf["matched"],
                "score": (a * b).sum(axis=1).astype(np.float32),
            }
        )


def _eval_file(col):
    """The evaluation file of an eval id (the id without ``EVAL_PREFIX``)."""
    from pyspark.sql import functions as F

    return F.substring(col, len(EVAL_PREFIX) + 1, 1 << 30)


def find_drops(spark, c: dict[str, Any], images, evals, hyperplanes: np.ndarray, n_images: int):
    """(drops: id, reason, matched, score; pairs compared in buckets)."""
    from pyspark.sql import functions as F

    drops = []
    live = images
    if c["nsfw"]:
        bad = live.filter(F.col("nsfw") >= F.lit(float(c["nsfw_threshold"])))
        drops.append(
            bad.select(
                "id", F.lit("nsfw").alias("reason"), F.lit(None).cast("string").alias("matched"),
                F.col("nsfw").alias("score"),
            )
        )  # fmt: skip
        live = live.join(bad.select("id"), "id", "left_anti")
    near_on, eval_on = bool(c["near_duplicates"]), bool(c["decontaminate"]) and evals is not None
    if eval_on:  # the same bytes as an evaluation image
        same = live.filter(F.col("sha256").isNotNull()).join(
            evals.select(F.col("sha256"), _eval_file(F.col("id")).alias("matched")), "sha256"
        )
        same = same.groupBy("id").agg(F.min("matched").alias("matched"))
        drops.append(same.select("id", F.lit("eval_copy").alias("reason"), "matched",
                                 F.lit(1.0).cast("float").alias("score")))  # fmt: skip
        live = live.join(same.select("id"), "id", "left_anti")
    n_pairs = 0
    edges = None
    if near_on or eval_on:
        members = live.select("id", "embedding")
        if eval_on:
            members = members.unionByName(evals.select("id", "embedding"))
        thr = min(
            float(c["near_threshold"]) if near_on else 1.0,
            float(c["eval_threshold"]) if eval_on else 1.0,
        )
        # groups of at most ~100,000 (image, table) rows, at least two per core
        n_rows = n_images * int(c["lsh_tables"])
        n_groups = max(2 * spark.sparkContext.defaultParallelism, n_rows // 100_000 + 1)
        edges = candidate_pairs(members, hyperplanes, c, thr, n_groups).localCheckpoint()
        n_pairs = edges.count()
    if eval_on:  # near copies of evaluation images (eval ids sort first: always in "a")
        hits = edges.filter(
            F.col("a").startswith(EVAL_PREFIX) & ~F.col("b").startswith(EVAL_PREFIX)
            & (F.col("cos") >= F.lit(float(c["eval_threshold"])))
        )  # fmt: skip
        best = hits.groupBy(F.col("b").alias("id")).agg(
            F.max(F.struct("cos", F.col("a"))).alias("m")
        )
        copies = best.select(
            "id", F.lit("eval_copy").alias("reason"),
            _eval_file(F.col("m.a")).alias("matched"),
            F.col("m.cos").alias("score"),
        )  # fmt: skip
        drops.append(copies)
        live = live.join(copies.select("id"), "id", "left_anti")
    if c["exact_duplicates"]:
        w = (
            live.filter(F.col("sha256").isNotNull())
            .groupBy("sha256")
            .agg(F.min("id").alias("matched"))
        )
        dup = live.join(w, "sha256").filter(F.col("id") != F.col("matched"))
        drops.append(dup.select("id", F.lit("exact_duplicate").alias("reason"), "matched",
                                F.lit(1.0).cast("float").alias("score")))  # fmt: skip
        live = live.join(dup.select("id"), "id", "left_anti")
    if near_on:
        ids = live.select("id")
        pool = (
            edges.filter(F.col("cos") >= F.lit(float(c["near_threshold"])))
            .join(ids.withColumnRenamed("id", "a"), "a")
            .join(ids.withColumnRenamed("id", "b"), "b")
        )
        labels = components(spark, pool)
        dup = labels.filter(F.col("id") != F.col("label")).withColumnRenamed("label", "matched")
        emb = live.select("id", "embedding")
        withm = dup.join(emb, "id").join(
            emb.withColumnRenamed("id", "matched").withColumnRenamed("embedding", "m_embedding"),
            "matched",
        )
        drops.append(withm.mapInPandas(_cosine_to, DROP_SCHEMA))
    out = drops[0]
    for d in drops[1:]:
        out = out.unionByName(d)
    return out, n_pairs


def main(spec_path: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    from pipeline_tasks.runtime import markers
    from pipeline_tasks.runtime.layout import RunLayout
    from pipeline_tasks.stages.hygiene import lsh
    from pipeline_tasks.stages.hygiene.stage import DROPPED_SCHEMA, STAGE
    from training.core import storage

    with open(spec_path) as f:
        spec = json.load(f)
    c = spec["config"]
    t0 = time.time()
    spark = SparkSession.builder.appName("mofi-hygiene").getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    layout = RunLayout(spec["run_uri"])
    store = layout.store(STAGE)
    store.mark_running(markers.WHOLE_STAGE)
    n_parts = max(1, min(len(spec["embedding_files"]), 2 * spark.sparkContext.defaultParallelism))
    # one whole-stage task: the runtime's default would be a single shuffle partition
    spark.conf.set("spark.sql.shuffle.partitions", str(2 * spark.sparkContext.defaultParallelism))
    images = (
        spark.createDataFrame(spec["embedding_files"], "shard string, uri string")
        .repartition(n_parts)
        .mapInArrow(read_images, IMAGE_SCHEMA)
        .withColumn("id", F.concat_ws("/", "shard", "key"))
        .localCheckpoint()
    )
    n_in = images.count()
    evals = None
    if spec.get("eval_file"):
        with storage.open_read(spec["eval_file"]) as f:
            et = pq.read_table(f).to_pandas()
        if len(et):
            et["id"] = EVAL_PREFIX + et["file"]
            evals = spark.createDataFrame(
                et[["id", "embedding", "sha256"]],
                "id string, embedding array<float>, sha256 string",
            )
    dim = len(images.select("embedding").first()["embedding"]) if n_in else 1
    planes = lsh.planes(dim, int(c["lsh_bits"]), int(c["lsh_tables"]), int(c["seed"]))
    drops, n_pairs = find_drops(spark, c, images, evals, planes, int(n_in))
    dropped = (
        drops.join(images.select("id", "shard", "key"), "id")
        .select("shard", "key", "reason", "matched", "score")
        .orderBy("shard", "key")
        .toPandas()
    )
    table = pa.Table.from_pandas(dropped, schema=DROPPED_SCHEMA, preserve_index=False)
    uri = layout.hygiene_dropped
    with storage.open_write(uri) as f:
        pq.write_table(table, f)
    st = markers.ShardStats(n_in=int(n_in), n_out=int(n_in - len(dropped)), started_at=t0)
    for reason, n in dropped["reason"].value_counts().sort_index().items():
        st.drop(str(reason), int(n))
    st.finished_at = time.time()
    st.duration_s = round(st.finished_at - t0, 3)
    st.extra = {
        "images_in": int(n_in),
        "images_kept": int(n_in - len(dropped)),
        "eval_images": int(evals.count()) if evals is not None else 0,
        "pairs_compared": int(n_pairs),
        "settings": spec["settings"],
    }
    markers.record_outputs(st, store.root, [uri])
    store.mark_done(markers.WHOLE_STAGE, st)
    print("MOFI_HYGIENE", json.dumps(st.extra), flush=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
