"""spark-submit entry point of `mofi vocab` (see ``stage``). Usage: job.py SPEC.json

Four steps, one function each:

1. :func:`read`: score files (and, for coherence, the images' visual features) are read
   through the storage API inside ``mapInPandas`` (local or s3://);
2. :func:`score_pairs` and :func:`calibrate`: each pair's score (similarity plus visual
   coherence), its rank within its image, and the threshold read off the null scores (or the
   absolute one), as Spark SQL;
3. :func:`filter_vocab`: top-k, per-entity quantiles, image counts, min_count, and the
   refusal of an empty or collapsed output (``filtering``);
4. :func:`publish`: the vocabulary (small: one row per kept entity) is collected and
   published by the driver, each shard's labels by ``applyInPandas`` grouped by shard, then
   marked done; the vocabulary's own marker comes last.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import pandas as pd

SCORE_SCHEMA = "shard string, key string, entity_id string, similarity float"
EMBEDDING_SCHEMA = "shard string, key string, embedding array<float>"
SCORED_SCHEMA = (
    "shard string, key string, entity_id string, similarity float, coherence float, score float"
)
LABEL_STATS = "shard string, n long"


def read_columns(columns: list[str], batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """``columns`` of each (shard, uri) row's Parquet file, with the shard in front."""
    import pyarrow.parquet as pq

    from training.core import storage

    for pdf in batches:
        for shard, uri in zip(pdf["shard"], pdf["uri"], strict=True):
            with storage.open_read(uri) as f:
                t = pq.read_table(f, columns=columns).to_pandas()
            t.insert(0, "shard", shard)
            yield t


def read_keys(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """(shard, key) of each uri row's Parquet file (the hygiene stage's dropped images)."""
    import pyarrow.parquet as pq

    from training.core import storage

    for pdf in batches:
        for uri in pdf["uri"]:
            with storage.open_read(uri) as f:
                yield pq.read_table(f, columns=["shard", "key"]).to_pandas()


def _publish_labels(spec: dict, shard: str, table, st, compression: str | None = "zstd") -> None:
    """Write one shard's labels, then its done marker vouching for them."""
    import pyarrow.parquet as pq

    from pipeline_tasks.runtime import markers
    from pipeline_tasks.runtime.layout import LABELS, RunLayout
    from training.core import storage

    layout = RunLayout(spec["run_uri"])
    store, uri = layout.store(LABELS), layout.output(LABELS, shard)
    with storage.open_write(uri) as f:
        if compression:
            pq.write_table(table, f, compression=compression)
        else:
            pq.write_table(table, f)
    markers.record_outputs(st, store.root, [uri])
    store.mark_done(shard, st)


def write_labels(spec: dict, pdf: pd.DataFrame) -> pd.DataFrame:
    """One shard's kept labels (an ``applyInPandas`` group): every image's entities, best first."""
    import pyarrow as pa

    from pipeline_tasks.runtime import markers
    from pipeline_tasks.runtime.layout import LABELS, RunLayout
    from pipeline_tasks.stages.vocab.stage import LABELS_SCHEMA

    t0 = time.time()
    shard = str(pdf["shard"].iloc[0])
    RunLayout(spec["run_uri"]).store(LABELS).mark_running(shard)
    pdf = pdf.sort_values(["key", "similarity", "entity_id"], ascending=[True, False, True])
    keys, eids, cls, sims = [], [], [], []
    for key, g in pdf.groupby("key", sort=True):
        keys.append(key)
        eids.append(g["entity_id"].tolist())
        cls.append([int(x) for x in g["class_index"]])
        sims.append([float(x) for x in g["similarity"]])
    table = pa.table(
        {"key": keys, "entity_ids": eids, "class_indices": cls, "similarities": sims},
        schema=LABELS_SCHEMA,
    )
    st = markers.ShardStats(
        n_in=int(spec["images_in"].get(shard, len(keys))), n_out=len(keys), started_at=t0
    )
    dropped = st.n_in - st.n_out
    if dropped > 0:
        st.drop("no_entity_kept", dropped)
    st.extra = {"labels": int(len(pdf))}
    st.finished_at = time.time()
    st.duration_s = round(st.finished_at - t0, 3)
    _publish_labels(spec, shard, table, st)
    return pd.DataFrame([{"shard": shard, "n": len(keys)}])


def fail(vstore, message: str) -> int:
    """Record why the filter refused to publish (the driver reports it in one line)."""
    from pipeline_tasks.runtime import markers

    vstore.mark_failed(markers.WHOLE_STAGE, f"filter: {message}", markers.ShardStats())
    print(f"MOFI_FILTER_ERROR {message}", flush=True)
    return 3


def read(spark, spec: dict, n_parts: int):
    """(cached scores, pairs in, shard -> images in)."""
    from pyspark.sql import functions as F

    scores = (
        spark.createDataFrame(spec["score_files"], "shard string, uri string")
        .repartition(n_parts)
        .mapInPandas(partial(read_columns, ["key", "entity_id", "similarity"]), SCORE_SCHEMA)
    )
    if spec.get("dropped_file"):  # what the hygiene stage removed never becomes a label
        dropped = spark.createDataFrame([[spec["dropped_file"]]], "uri string").mapInPandas(
            read_keys, "shard string, key string"
        )
        scores = scores.join(dropped, ["shard", "key"], "left_anti")
    scores = scores.cache()
    pairs_in = scores.count()
    images_in = {
        r["shard"]: r["n"]
        for r in scores.groupBy("shard").agg(F.countDistinct("key").alias("n")).collect()
    }
    return scores, pairs_in, images_in


def score_pairs(spark, spec: dict, scores, n_parts: int, weight: float):
    """Each pair's coherence and score (similarity + weight x coherence; weight 0: the
    similarity alone), from per-entity sums of centred visual features."""
    import numpy as np
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from pipeline_tasks.stages.vocab import filtering

    if weight <= 0:
        return scores.withColumn("coherence", F.lit(0.0).cast("float")).withColumn(
            "score", F.col("similarity")
        )
    embs = (
        spark.createDataFrame(spec["embedding_files"], "shard string, uri string")
        .repartition(n_parts)
        .mapInPandas(partial(read_columns, ["key", "embedding"]), EMBEDDING_SCHEMA)
        # read twice (the mean, then the join), kept on local disk: in the JVM's heap these
        # features (one float per dimension per image) grew it with the pairs
        .persist(StorageLevel.DISK_ONLY)
    )
    parts = embs.mapInPandas(filtering.embedding_sums, "n long, s array<double>").collect()
    n_emb = sum(r["n"] for r in parts)
    mean = np.sum([np.asarray(r["s"]) for r in parts], axis=0) / max(1, n_emb)
    pairs = scores.join(embs, ["shard", "key"])
    sums = (
        pairs.mapInPandas(
            partial(filtering.partial_sums, mean), "entity_id string, n long, s array<double>"
        )
        .groupBy("entity_id")
        .applyInPandas(filtering.add_partials, "entity_id string, n long, s array<double>")
    )
    return pairs.join(sums, "entity_id").mapInPandas(
        partial(filtering.leave_one_out, mean, weight), SCORED_SCHEMA
    )


def calibrate(scored, c: dict[str, Any], weight: float):
    """(kept pairs with their rank in the image, calibration): above the null scores'
    quantile (calibrated) or the absolute threshold. Raises ``FilterError`` when the null
    is too small to place the threshold."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from pipeline_tasks.stages.vocab import filtering

    calibrated = c["threshold_mode"] == "calibrated"
    if not calibrated:  # an absolute threshold on the similarity, then the top-k survivors
        scored = scored.filter(F.col("similarity") >= F.lit(float(c["threshold"])))
    rank = Window.partitionBy("shard", "key").orderBy(F.desc("score"), F.asc("entity_id"))
    scored = scored.withColumn("_rank", F.row_number().over(rank)).cache()
    calibration = {"threshold_mode": c["threshold_mode"], "coherence_weight": weight}
    if not calibrated:
        calibration["threshold"] = float(c["threshold"])
        return scored, calibration
    null = scored.filter(F.col("_rank") > 1)
    n_null = null.count()
    filtering.require_null_scores(n_null, int(c["min_null_pairs"]))
    # Greenwald-Khanna with a 1e-4 rank error: exact enough, and it scales
    thr = null.approxQuantile("score", [float(c["null_quantile"])], 1e-4)[0]
    calibration.update(
        threshold=round(thr, 6), null_quantile=c["null_quantile"], null_pairs=int(n_null)
    )
    return scored.filter(F.col("score") >= F.lit(thr)), calibration


def filter_vocab(kept, c: dict[str, Any], calibration: dict[str, Any], images_in: dict):
    """(kept pairs, vocabulary as pandas, entities seen): top-k per image, the per-entity
    quantile, min_count (lowered on small corpora), and the refusal of an empty or collapsed
    output (``FilterError``)."""
    from pyspark.sql import functions as F

    from pipeline_tasks.stages.vocab import filtering

    if c["top_k"] > 0:
        kept = kept.filter(F.col("_rank") <= c["top_k"])
    kept = kept.drop("_rank")
    if c["entity_quantile"] > 0:
        q = kept.groupBy("entity_id").agg(
            F.percentile_approx("similarity", float(c["entity_quantile"]), 10000).alias("_q")
        )
        kept = kept.join(q, "entity_id").filter(F.col("similarity") >= F.col("_q")).drop("_q")
    kept = kept.cache()
    counts = kept.groupBy("entity_id").agg(F.countDistinct("shard", "key").alias("n_images"))
    counts_pd = counts.toPandas()
    min_count = filtering.effective_min_count(
        dict(zip(counts_pd["entity_id"], counts_pd["n_images"], strict=True)),
        int(c["min_count"]),
        float(c["min_count_max_drop"]),
    )
    calibration["min_count"] = min_count
    vocab = (
        counts_pd[counts_pd["n_images"] >= min_count]
        .sort_values("entity_id")
        .reset_index(drop=True)
    )
    how = ", ".join(f"{k}={v}" for k, v in calibration.items())
    filtering.check_output(
        int(sum(images_in.values())),
        int(vocab["n_images"].sum()) if len(vocab) else 0,
        len(vocab),
        float(c["min_kept_fraction"]),
        how,
    )
    return kept, vocab, len(counts_pd)


def publish(spark, spec: dict, kept, vocab: pd.DataFrame, images_in: dict) -> tuple[str, int]:
    """The vocabulary (class indices in entity-id order, names and descriptions from the KB)
    and every shard's labels, each shard marked done; (vocabulary URI, images labelled)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.sql import functions as F

    from pipeline_tasks.runtime import markers
    from pipeline_tasks.runtime.layout import RunLayout
    from pipeline_tasks.stages.kb.stage import load_kb
    from pipeline_tasks.stages.vocab.stage import LABELS_SCHEMA, VOCAB_SCHEMA
    from training.core import storage

    vocab["class_index"] = range(len(vocab))
    kb = load_kb(spec["kb_uri"]).select(["entity_id", "name", "description"]).to_pandas()
    vocab = vocab.merge(kb, on="entity_id", how="left")
    vocab["name"] = vocab["name"].fillna(vocab["entity_id"])
    vocab["description"] = vocab["description"].fillna("")
    table = pa.Table.from_pandas(
        vocab[["entity_id", "name", "description", "n_images", "class_index"]],
        schema=VOCAB_SCHEMA,
        preserve_index=False,
    )
    vocab_file = RunLayout(spec["run_uri"]).vocab_file
    with storage.open_write(vocab_file) as f:
        pq.write_table(table, f)
    # per-shard labels: only classes of the vocabulary
    idx = spark.createDataFrame(vocab[["entity_id", "class_index"]]) if len(vocab) else None
    n_labelled = 0
    written = set()
    if idx is not None:
        labelled = kept.select("shard", "key", "entity_id", "similarity").join(
            F.broadcast(idx), "entity_id"
        )
        spec["images_in"] = images_in
        res = (
            labelled.groupBy("shard")
            .applyInPandas(partial(write_labels, spec), schema=LABEL_STATS)
            .collect()
        )
        written = {r["shard"] for r in res}
        n_labelled = sum(r["n"] for r in res)
    for shard, _ in spec["score_files"]:  # shards where nothing survived: empty labels, a marker
        if shard in written:
            continue
        n = int(images_in.get(shard, 0))
        st = markers.ShardStats(n_in=n, n_out=0, drops={"no_entity_kept": n} if n else {})
        empty = pa.Table.from_pylist([], schema=LABELS_SCHEMA)
        _publish_labels(spec, shard, empty, st, compression=None)
    return vocab_file, n_labelled


def main(spec_path: str) -> int:
    from pyspark.sql import SparkSession

    from pipeline_tasks.runtime import markers
    from pipeline_tasks.runtime.layout import VOCAB, RunLayout
    from pipeline_tasks.stages.vocab.filtering import FilterError

    with open(spec_path) as f:
        spec = json.load(f)
    c = spec["config"]
    t0 = time.time()
    spark = SparkSession.builder.appName("mofi-vocab").getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    # Memory that does not grow with the pairs (each unless the config's spark.extra_conf sets
    # its own): Arrow batches and the cached columns' batches of 1,000 rows, not 10,000 (the
    # images' features travel through both: a task building a 10,000-row batch of them held
    # ~100 MB); no broadcast joins, so the plan is the same at every size (the features, small
    # enough at 1,000 pairs, were broadcast there and sort-merge joined above)
    submitted = spark.sparkContext.getConf()
    for key, value in (
        ("spark.sql.execution.arrow.maxRecordsPerBatch", "1000"),
        ("spark.sql.inMemoryColumnarStorage.batchSize", "1000"),
        ("spark.sql.autoBroadcastJoinThreshold", "-1"),
    ):
        if not submitted.contains(key):
            spark.conf.set(key, value)
    vstore = RunLayout(spec["run_uri"]).store(VOCAB)
    vstore.mark_running(markers.WHOLE_STAGE)
    # one partition per shard: a task's data, and the per-task sort and aggregation buffers
    # that hold it, stay one shard's as the shards grow (at 32,000 pairs, 32 shards, the JVM
    # peaked at 0.84-0.87 GiB with 4 partitions, 2 per core; 0.85 with 8; 0.75 with 32)
    n_parts = max(1, len(spec["score_files"]))
    scores, pairs_in, images_in = read(spark, spec, n_parts)
    weight = float(c["coherence_weight"]) if c["threshold_mode"] == "calibrated" else 0.0
    try:
        kept, calibration = calibrate(score_pairs(spark, spec, scores, n_parts, weight), c, weight)
        kept, vocab, candidates = filter_vocab(kept, c, calibration, images_in)
    except FilterError as exc:
        spark.stop()
        return fail(vstore, str(exc))
    vocab_file, n_labelled = publish(spark, spec, kept, vocab, images_in)
    kept_pairs = int(kept.count())
    st = markers.ShardStats(
        n_in=int(pairs_in), n_out=kept_pairs, started_at=t0, finished_at=time.time()
    )
    st.duration_s = round(st.finished_at - t0, 3)
    markers.record_outputs(st, vstore.root, [vocab_file])
    st.drop("pair_below_threshold_or_rank", int(pairs_in - kept_pairs))
    st.extra = {
        "pairs_in": int(pairs_in),
        "pairs_kept": kept_pairs,
        "entities_seen": int(candidates),
        "entities_kept": int(len(vocab)),
        "images_in": int(sum(images_in.values())),
        "images_labelled": int(n_labelled),
        "calibration": calibration,
    }
    vstore.mark_done(markers.WHOLE_STAGE, st)
    print("MOFI_VOCAB", json.dumps(st.extra), flush=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
