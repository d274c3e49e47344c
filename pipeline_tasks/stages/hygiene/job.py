"""spark-submit entry point of `mofi hygiene` (see ``stage``). Usage: job.py SPEC.json

Every scored image (its visual embedding, content hash, perceptual hash and NSFW score from
the score stage) and every registered evaluation image (embedded and hashed by the same
scorer) go through, in order:

1. ``nsfw``: the NSFW score at or above the threshold;
2. ``eval_copy``: the same bytes as an evaluation image, or a copy of one (below, at
   ``eval_threshold``; found through the LSH buckets);
3. ``exact_duplicate``: the same content hash as an image with a smaller (shard, key);
4. ``near_duplicate``: connected to a smaller (shard, key) by copy pairs at
   ``near_threshold`` (connected components, on the driver when the pairs are few enough,
   else by large-star / small-star rounds in Spark; the smallest keeps).

A pair is a copy at threshold ``t`` when its cosine reaches ``t``, or when its perceptual
hashes differ in at most ``phash_distance`` bits and its cosine reaches
``phash_min_cosine`` (a resize blurs the features more than it moves the hash). Candidate
pairs come from two kinds of bucket (``lsh``): random-hyperplane tables over the embeddings
(each image in one bucket per table) and ``phash_distance + 1`` runs of the hash's bits
(every pair within the distance shares one). Pairs are compared exactly only inside a
bucket (``pairs``; a bucket larger than ``max_bucket`` compares its members to its first
``max_bucket`` ones only). The job writes
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

from pipeline_tasks.stages.hygiene.pairs import (
    NO_HASH,
    bucket_pairs,
    bucket_rows,
    component_labels,
    copy_rule,
)

IMAGE_SCHEMA = (
    "shard string, key string, embedding array<float>, sha256 string, nsfw float, phash long"
)
EDGE_SCHEMA = "a string, b string, cos float, ham int"
DROP_SCHEMA = "id string, reason string, matched string, score float, phash_distance int"
EVAL_PREFIX = "\x00eval/"  # sorts before every pool id; never a shard name


def read_images(batches):
    """Each (shard, uri) row's embeddings file: key, embedding, sha256, nsfw and phash (null
    when the score stage did not compute them), as Arrow batches (``mapInArrow``: the embeddings
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
            for name, typ in (("sha256", pa.string()), ("nsfw", pa.float32()),
                              ("phash", pa.int64())):  # fmt: skip
                cols[name] = (  # null, never NaN, when missing: Spark orders NaN highest
                    t.column(name).cast(typ).combine_chunks()
                    if name in t.column_names
                    else pa.nulls(n, typ)
                )
            yield from pa.Table.from_pydict(cols).to_batches()


def candidate_pairs(members, hyperplanes: np.ndarray, c: dict, thr: float, n_groups: int):
    """(a, b, cos, ham) of every copy pair (``pairs.bucket_pairs``) that shares a bucket. Only
    ids travel through the bucketing: the buckets that hold two or more images fall into
    ``n_groups`` groups, and each group receives its memberships and, once per member
    however many of the group's buckets it is in, the member's features (one Python call per
    group; the features once per bucket membership were most of the job's time)."""
    from pyspark.sql import functions as F

    tables = int(c["lsh_tables"])
    rule = copy_rule(c)
    keyed = (
        members.select("id", "embedding", "phash")
        .mapInArrow(
            partial(bucket_rows, hyperplanes, tables, rule[0] + 1 if rule[0] >= 0 else 0),
            "tbl int, bkey long, id string",
        )
        .localCheckpoint()
    )  # read three times below: the projections are computed once
    shared = keyed.groupBy("tbl", "bkey").count().filter(F.col("count") > 1).drop("count")
    memb = keyed.join(shared, ["tbl", "bkey"]).withColumn(
        "part", F.pmod(F.xxhash64("tbl", "bkey"), F.lit(n_groups))
    )
    # columns of other origins than memb's (both sides of the cogroup would name the same ones)
    need = memb.select(F.col("part").alias("vpart"), "id").distinct()
    vecs = _with_hash(members).join(need, "id")
    return (
        memb.groupBy("part")
        .cogroup(vecs.groupBy("vpart"))
        .applyInPandas(_pairs_at(thr, int(c["max_bucket"]), rule), EDGE_SCHEMA)
        .groupBy("a", "b")
        .agg(F.max("cos").alias("cos"), F.min("ham").alias("ham"))
    )


def _with_hash(df):
    """id, embedding, ph (the hash, 0 when null: int64 in pandas, never float) and has_ph."""
    from pyspark.sql import functions as F

    return df.select(
        "id",
        "embedding",
        F.coalesce("phash", F.lit(0).cast("long")).alias("ph"),
        F.col("phash").isNotNull().alias("has_ph"),
    )


def _pairs_at(min_cos: float, max_bucket: int, rule: tuple[int, float]):
    def pairs(memb: pd.DataFrame, vecs: pd.DataFrame) -> pd.DataFrame:  # as cogroup expects
        return bucket_pairs(min_cos, max_bucket, rule, memb, vecs)

    return pairs


def is_copy(c: dict, threshold: float):
    """The Spark condition on an edge (cos, ham): a copy at ``threshold``."""
    from pyspark.sql import functions as F

    cond = F.col("cos") >= F.lit(float(threshold))
    max_bits, floor = copy_rule(c)
    if max_bits >= 0:
        cond = cond | ((F.col("ham") <= F.lit(max_bits)) & (F.col("cos") >= F.lit(floor)))
    return cond


def _undirected(df):
    """(hi, lo): each edge (a, b) once, the larger id first; no self loops."""
    from pyspark.sql import functions as F

    return (
        df.select(F.greatest("a", "b").alias("hi"), F.least("a", "b").alias("lo"))
        .filter(F.col("hi") != F.col("lo"))
        .distinct()
    )


def components(spark, edges, on_driver: bool, max_rounds: int = 50):
    """(id, label): every id on an edge with the smallest id of its connected component.
    ``on_driver``: the edges collected and grouped on the driver (``component_labels``: a few
    seconds of Spark jobs fewer at small sizes). Else in Spark, by alternating large-star
    and small-star rounds (Kiveris et al. 2014, "Connected Components in MapReduce and
    Beyond"): each component becomes a star around its smallest id in O(log^2 n) rounds,
    where label propagation needs as many rounds as the component's longest path (a chain
    of 200 near duplicates took more than 50)."""
    from pyspark.sql import functions as F

    if on_driver:
        t = edges.select("a", "b").toArrow()
        ids, labels = component_labels(
            t.column("a").to_numpy(zero_copy_only=False),
            t.column("b").to_numpy(zero_copy_only=False),
        )
        return spark.createDataFrame(
            pd.DataFrame({"id": ids, "label": labels}), "id string, label string"
        )
    e = _undirected(edges.select("a", "b")).localCheckpoint()
    n = e.count()
    for _ in range(max_rounds):
        # large star: each neighbour above u is linked to the smallest of u and its neighbours
        adj = e.select(F.col("hi").alias("u"), F.col("lo").alias("v")).union(
            e.select(F.col("lo").alias("u"), F.col("hi").alias("v"))
        )
        m = adj.groupBy("u").agg(F.min("v").alias("mv")).select("u", F.least("mv", "u").alias("m"))
        large = _undirected(
            adj.filter(F.col("v") > F.col("u")).join(m, "u").select(F.col("v").alias("a"),
                                                                     F.col("m").alias("b"))
        ).localCheckpoint()  # fmt: skip
        # small star: u and each neighbour below it are linked to the smallest of them
        m = large.groupBy("hi").agg(F.min("lo").alias("m"))
        small = _undirected(
            large.join(m, "hi").select(F.col("lo").alias("a"), F.col("m").alias("b"))
            .union(m.select(F.col("hi").alias("a"), F.col("m").alias("b")))
        ).localCheckpoint()  # fmt: skip
        n_small = small.count()
        settled = n_small == n and small.exceptAll(e).limit(1).count() == 0
        e, n = small, n_small
        if settled:  # stars: each id's one edge goes to its component's smallest id
            return (
                e.select(F.col("hi").alias("id"), F.col("lo").alias("label"))
                .union(e.select(F.col("lo").alias("id"), F.col("lo").alias("label")))
                .groupBy("id")
                .agg(F.min("label").alias("label"))
            )
    raise RuntimeError(f"near-duplicate components did not settle in {max_rounds} rounds")


def _cosine_to(rows: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """A near duplicate's drop row: its cosine and hash bits to the image that keeps."""
    from pipeline_tasks.stages.score.phash import hamming

    for pdf in rows:
        if not len(pdf):
            continue
        a = np.stack(pdf["embedding"].to_numpy())
        b = np.stack(pdf["m_embedding"].to_numpy())
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        has = pdf["has_ph"].to_numpy(bool) & pdf["m_has_ph"].to_numpy(bool)
        ham = hamming(pdf["ph"].to_numpy(np.int64), pdf["m_ph"].to_numpy(np.int64))
        yield pd.DataFrame(
            {
                "id": pdf["id"],
                "reason": "near_duplicate",
                "matched": pdf["matched"],
                "score": (a * b).sum(axis=1).astype(np.float32),
                "phash_distance": pd.Series(ham, index=pdf.index, dtype="Int32").mask(~has),
            }
        )


def read_evals(uri: str | None) -> pd.DataFrame | None:
    """The evaluation images (``stage``'s eval file: file, embedding, sha256, phash) with
    their ids (``EVAL_PREFIX`` + file); None when there are none. A missing hash stays
    null (Int64): a 64-bit hash through float64 would lose its low bits."""
    if not uri:
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.core import storage

    with storage.open_read(uri) as f:
        et = pq.read_table(f).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    if not len(et):
        return None
    et["id"] = EVAL_PREFIX + et["file"]
    return et


def _eval_file(col):
    """The evaluation file of an eval id (the id without ``EVAL_PREFIX``)."""
    from pyspark.sql import functions as F

    return F.substring(col, len(EVAL_PREFIX) + 1, 1 << 30)


def find_drops(
    spark, c: dict[str, Any], images, evals, hyperplanes: np.ndarray, n_images: int, secs: dict
):
    """(drops: id, reason, matched, score, phash_distance; copy pairs found in buckets);
    ``secs["pairs"]``: the seconds the pairs took."""
    from pyspark.sql import functions as F

    drops = []
    live = images
    if c["nsfw"]:
        bad = live.filter(F.col("nsfw") >= F.lit(float(c["nsfw_threshold"])))
        drops.append(
            bad.select(
                "id", F.lit("nsfw").alias("reason"), F.lit(None).cast("string").alias("matched"),
                F.col("nsfw").alias("score"), F.lit(None).cast("int").alias("phash_distance"),
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
                                 F.lit(1.0).cast("float").alias("score"),
                                 F.lit(0).alias("phash_distance")))  # fmt: skip
        live = live.join(same.select("id"), "id", "left_anti")
    n_pairs = 0
    edges = None
    if near_on or eval_on:
        members = live.select("id", "embedding", "phash")
        if eval_on:
            members = members.unionByName(evals.select("id", "embedding", "phash"))
        thr = min(
            float(c["near_threshold"]) if near_on else 1.0,
            float(c["eval_threshold"]) if eval_on else 1.0,
        )
        # groups of at most ~100,000 (image, table) rows, at least two per core
        n_rows = n_images * int(c["lsh_tables"])
        n_groups = max(2 * spark.sparkContext.defaultParallelism, n_rows // 100_000 + 1)
        t0 = time.time()
        edges = candidate_pairs(members, hyperplanes, c, thr, n_groups).localCheckpoint()
        n_pairs = edges.count()
        secs["pairs"] = time.time() - t0
    if eval_on:  # near copies of evaluation images (eval ids sort first: always in "a")
        hits = edges.filter(
            F.col("a").startswith(EVAL_PREFIX) & ~F.col("b").startswith(EVAL_PREFIX)
            & is_copy(c, c["eval_threshold"])
        )  # fmt: skip
        best = hits.groupBy(F.col("b").alias("id")).agg(
            F.max(F.struct("cos", F.col("a"), F.col("ham"))).alias("m")
        )
        copies = best.select(
            "id", F.lit("eval_copy").alias("reason"),
            _eval_file(F.col("m.a")).alias("matched"),
            F.col("m.cos").alias("score"),
            F.when(F.col("m.ham") < NO_HASH, F.col("m.ham")).alias("phash_distance"),
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
                                F.lit(1.0).cast("float").alias("score"),
                                F.when(F.col("phash").isNotNull(), F.lit(0))
                                .alias("phash_distance")))  # fmt: skip
        live = live.join(dup.select("id"), "id", "left_anti")
    if near_on:
        ids = live.select("id")
        pool = (
            edges.filter(is_copy(c, c["near_threshold"]))
            .join(ids.withColumnRenamed("id", "a"), "a")
            .join(ids.withColumnRenamed("id", "b"), "b")
        )
        # the pairs in the pool are some of the pairs found: their count bounds the collect
        labels = components(spark, pool, n_pairs <= int(c["driver_groups_max_pairs"]))
        dup = labels.filter(F.col("id") != F.col("label")).withColumnRenamed("label", "matched")
        emb = _with_hash(live)
        m_emb = emb.select([F.col(x).alias("m_" + x) for x in emb.columns])
        withm = dup.join(emb, "id").join(m_emb.withColumnRenamed("m_id", "matched"), "matched")
        drops.append(withm.mapInPandas(_cosine_to, DROP_SCHEMA))
    out = drops[0]
    for d in drops[1:]:
        out = out.unionByName(d)
    return out, n_pairs


def main(spec_path: str) -> int:
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    from pipeline_tasks.runtime import markers
    from pipeline_tasks.runtime.layout import RunLayout
    from pipeline_tasks.stages.hygiene import lsh
    from pipeline_tasks.stages.hygiene.local import record
    from pipeline_tasks.stages.hygiene.stage import STAGE

    with open(spec_path) as f:
        spec = json.load(f)
    c = spec["config"]
    t0 = time.time()
    spark = SparkSession.builder.appName("mofi-hygiene").getOrCreate()
    t_start = time.time()
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
    secs = {"start": t_start - t0, "read": time.time() - t_start}
    et = read_evals(spec.get("eval_file"))
    evals = None
    if et is not None:
        evals = spark.createDataFrame(
            et[["id", "embedding", "sha256", "phash"]],
            "id string, embedding array<float>, sha256 string, phash long",
        )
    dim = len(images.select("embedding").first()["embedding"]) if n_in else 1
    planes = lsh.planes(dim, int(c["lsh_bits"]), int(c["lsh_tables"]), int(c["seed"]))
    t1 = time.time()
    drops, n_pairs = find_drops(spark, c, images, evals, planes, int(n_in), secs)
    secs["groups"] = time.time() - t1 - secs.get("pairs", 0.0)  # components, the rest
    t1 = time.time()
    dropped = (
        drops.join(images.select("id", "shard", "key"), "id")
        .select("shard", "key", "reason", "matched", "score", "phash_distance")
        .orderBy("shard", "key")
        .toPandas()
    )
    secs["collect"] = time.time() - t1
    n_eval = evals.count() if evals is not None else 0
    extra = record(spec, dropped, int(n_in), n_eval, n_pairs, secs, t0, "spark")
    print("MOFI_HYGIENE", json.dumps(extra), flush=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
