"""The hygiene job on one machine, for a pool of at most ``hygiene.local_max_images`` images:
what ``job`` computes with Spark, in this process with numpy, and the same drops.

Below a few tens of thousands of images Spark's fixed cost is most of the job (here: ~3 s
of spark-submit and JVM, 2 s of session, and a second or two per phase of Python workers
and shuffles: 16.5 s for 3,786 images, against the score stage's 35 s), while the work
itself takes a second or two. The steps and their order are ``job.find_drops``'s, and the
work is done by the same functions (``pairs``: the bucket keys, the comparisons inside
shared buckets, the connected components; ``job._cosine_to``: a near duplicate's row), on
one group holding every shared bucket. Ids travel as int64 ranks of the string ids (the
same order, so "the smallest id keeps" is unchanged): an image has up to 58 bucket
memberships, and a rank is 8 bytes where a string is an object.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline_tasks.stages.hygiene.job import EVAL_PREFIX, _cosine_to, read_evals, read_images
from pipeline_tasks.stages.hygiene.pairs import (
    NO_HASH,
    bucket_pairs,
    bucket_rows,
    component_labels,
    copy_rule,
    matrix,
)

_KEY_ROWS = 8192  # images per bucket-key batch (their projections: 8192 x 848 float32)


def copy_mask(c: dict, threshold: float, cos: np.ndarray, ham: np.ndarray) -> np.ndarray:
    """``job.is_copy`` on arrays: a copy at ``threshold`` (in float64, as Spark compares a
    float column with a double)."""
    cos = np.asarray(cos, np.float32).astype(np.float64)
    out = cos >= float(threshold)
    max_bits, floor = copy_rule(c)
    if max_bits >= 0:
        out |= (np.asarray(ham) <= max_bits) & (cos >= floor)
    return out


class _Pool:
    """The scored images, in the order read: ids, features, content and perceptual hashes,
    NSFW scores (``_members`` sorts the live ones with the evaluation images by id)."""

    def __init__(self, t: pa.Table):
        import pyarrow.compute as pc

        self.n = t.num_rows
        self.shard = t.column("shard").to_numpy(zero_copy_only=False)
        self.key = t.column("key").to_numpy(zero_copy_only=False)
        self.ids = pc.binary_join_element_wise(t["shard"], t["key"], "/").to_numpy(
            zero_copy_only=False
        )
        self.emb = matrix(t.column("embedding").combine_chunks()) if self.n else None
        self.sha = t.column("sha256").to_numpy(zero_copy_only=False)
        nsfw = t.column("nsfw")
        self.nsfw = nsfw.to_numpy(zero_copy_only=False).astype(np.float64)  # null: NaN
        self.nsfw_nan = nsfw.is_valid().to_numpy(zero_copy_only=False) & np.isnan(self.nsfw)
        self.has_ph = t.column("phash").is_valid().to_numpy(zero_copy_only=False)
        self.ph = t.column("phash").fill_null(0).to_numpy().astype(np.int64)


def _frame(rows, reason: str, matched, score, bits) -> pd.DataFrame:
    rows = np.asarray(rows, np.int64)
    return pd.DataFrame(
        {
            "row": rows,
            "reason": reason,
            "matched": pd.Series(matched, dtype=object) if len(rows) else [],
            "score": np.broadcast_to(np.asarray(score, np.float32), rows.shape),
            "phash_distance": pd.array(np.broadcast_to(bits, rows.shape), dtype="Int32"),
        }
    )


def _members(pool: _Pool, live: np.ndarray, evals: pd.DataFrame | None) -> dict:
    """The live images and the evaluation images, sorted by id: ids, features, hashes, and
    for each member its pool row (-1: an evaluation image)."""
    rows = np.nonzero(live)[0]
    ids, emb = [pool.ids[rows]], [pool.emb[rows]]
    ph, has, prow = [pool.ph[rows]], [pool.has_ph[rows]], [rows]
    if evals is not None:
        ids.append(evals["id"].to_numpy(object))
        emb.append(np.stack(evals["embedding"].to_numpy()).astype(np.float32))
        eph = evals["phash"]
        ph.append(eph.fillna(0).to_numpy(np.int64))
        has.append(eph.notna().to_numpy(bool))
        prow.append(np.full(len(evals), -1, np.int64))
    ids = np.concatenate(ids)
    order = np.argsort(ids, kind="stable")
    return {
        "ids": ids[order],
        "emb": np.concatenate(emb)[order],
        "ph": np.concatenate(ph)[order],
        "has_ph": np.concatenate(has)[order],
        "row": np.concatenate(prow)[order],
    }


def candidate_pairs(m: dict, planes: np.ndarray, c: dict, thr: float):
    """(a, b, cos, ham) of every copy pair that shares a bucket, a and b member ranks (a < b):
    ``job.candidate_pairs`` with every shared bucket in one group."""
    tables, rule = int(c["lsh_tables"]), copy_rule(c)
    bands = rule[0] + 1 if rule[0] >= 0 else 0
    n, dim = m["emb"].shape
    if n < 2:
        none = np.zeros(0, np.int64)
        return none, none, np.zeros(0, np.float32), none
    phash = pa.array(m["ph"], pa.int64(), mask=~m["has_ph"])
    emb = pa.FixedSizeListArray.from_arrays(pa.array(m["emb"].reshape(-1)), dim)
    batch = pa.RecordBatch.from_arrays([pa.array(np.arange(n)), emb, phash],
                                       ["id", "embedding", "phash"])  # fmt: skip
    keyed = list(bucket_rows(planes, tables, bands,
                             (batch.slice(i, _KEY_ROWS) for i in range(0, n, _KEY_ROWS))))  # fmt: skip
    tbl = np.concatenate([k.column("tbl").to_numpy() for k in keyed])
    bkey = np.concatenate([k.column("bkey").to_numpy() for k in keyed])
    rid = np.concatenate([k.column("id").to_numpy() for k in keyed])
    order = np.lexsort((bkey, tbl))
    tbl, bkey, rid = tbl[order], bkey[order], rid[order]
    new = np.ones(len(tbl), bool)
    new[1:] = (tbl[1:] != tbl[:-1]) | (bkey[1:] != bkey[:-1])
    sizes = np.diff(np.append(np.nonzero(new)[0], len(tbl)))
    shared = np.repeat(sizes > 1, sizes)
    memb = pd.DataFrame({"tbl": tbl[shared], "bkey": bkey[shared], "id": rid[shared]})
    need = np.unique(memb["id"].to_numpy())
    vecs = pd.DataFrame(
        {"id": need, "embedding": list(m["emb"][need]), "ph": m["ph"][need],
         "has_ph": m["has_ph"][need]}
    )  # fmt: skip
    e = bucket_pairs(thr, int(c["max_bucket"]), rule, memb, vecs)
    return (e["a"].to_numpy(np.int64), e["b"].to_numpy(np.int64),
            e["cos"].to_numpy(np.float32), e["ham"].to_numpy(np.int64))  # fmt: skip


def find_drops(c: dict[str, Any], pool: _Pool, evals, planes: np.ndarray, secs: dict):
    """``job.find_drops`` on one machine: (drops: row, reason, matched, score,
    phash_distance, the pool row of each dropped image; copy pairs found in buckets)."""
    drops: list[pd.DataFrame] = []
    live = np.ones(pool.n, bool)
    if c["nsfw"]:
        # a NaN score goes (Spark orders NaN above every number), a missing one stays
        unsafe = (pool.nsfw >= float(c["nsfw_threshold"])) | pool.nsfw_nan
        bad = np.nonzero(live & unsafe)[0]
        drops.append(_frame(bad, "nsfw", [None] * len(bad), pool.nsfw[bad], pd.NA))
        live[bad] = False
    near_on = bool(c["near_duplicates"])
    eval_on = bool(c["decontaminate"]) and evals is not None
    if eval_on:  # the same bytes as an evaluation image (the smallest such file)
        files = evals["id"].str.slice(len(EVAL_PREFIX))
        first = files.groupby(evals["sha256"]).min()
        hit = pd.Series(pool.sha).map(first).to_numpy(object)
        same = np.nonzero(live & pd.notna(pool.sha) & pd.notna(hit))[0]
        drops.append(_frame(same, "eval_copy", hit[same], 1.0, 0))
        live[same] = False
    n_pairs = 0
    if near_on or eval_on:
        m = _members(pool, live, evals if eval_on else None)
        thr = min(
            float(c["near_threshold"]) if near_on else 1.0,
            float(c["eval_threshold"]) if eval_on else 1.0,
        )
        t0 = time.time()
        a, b, cos, ham = candidate_pairs(m, planes, c, thr)
        n_pairs = len(a)
        secs["pairs"] = time.time() - t0
        is_eval = m["row"] < 0
    if eval_on:  # near copies of evaluation images: the best (cos, file, bits) per image
        at = np.nonzero(is_eval[a] & ~is_eval[b] & copy_mask(c, c["eval_threshold"], cos, ham))[0]
        at = at[np.lexsort((ham[at], a[at], cos[at], b[at]))]
        last = np.ones(len(at), bool)
        last[:-1] = b[at][1:] != b[at][:-1]
        at = at[last]
        rows = m["row"][b[at]]
        files = [f[len(EVAL_PREFIX) :] for f in m["ids"][a[at]]]
        bits = pd.arrays.IntegerArray(ham[at].astype(np.int32), mask=ham[at] >= NO_HASH)
        drops.append(_frame(rows, "eval_copy", files, cos[at], bits))
        live[rows] = False
    if c["exact_duplicates"]:  # the same bytes as an image with a smaller id
        rows = np.nonzero(live & pd.notna(pool.sha))[0]
        df = pd.DataFrame({"id": pool.ids[rows], "sha": pool.sha[rows], "row": rows})
        df["matched"] = df.groupby("sha")["id"].transform("min")
        dup = df[df["id"] != df["matched"]]
        r = dup["row"].to_numpy(np.int64)
        bits = pd.arrays.IntegerArray(np.zeros(len(r), np.int32), mask=~pool.has_ph[r])
        drops.append(_frame(r, "exact_duplicate", dup["matched"].to_numpy(object), 1.0,
                            bits))  # fmt: skip
        live[r] = False
    if near_on:
        pa_, pb = m["row"][a], m["row"][b]
        both = (pa_ >= 0) & (pb >= 0)
        keep = both & copy_mask(c, c["near_threshold"], cos, ham)
        keep[keep] = live[pa_[keep]] & live[pb[keep]]
        ranks, labels = component_labels(a[keep], b[keep])  # ranks: the smallest id keeps
        dup = ranks != labels
        r, mr = m["row"][ranks[dup]], m["row"][labels[dup]]
        rows = pd.DataFrame(
            {"id": pool.ids[r], "matched": pool.ids[mr], "embedding": list(pool.emb[r]),
             "m_embedding": list(pool.emb[mr]), "ph": pool.ph[r], "m_ph": pool.ph[mr],
             "has_ph": pool.has_ph[r], "m_has_ph": pool.has_ph[mr]}
        )  # fmt: skip
        near = next(_cosine_to(iter([rows])), None)
        if near is not None:
            near.insert(0, "row", r)
            drops.append(near.drop(columns="id").reset_index(drop=True))
    out = pd.concat(drops, ignore_index=True) if drops else _frame([], "", [], 0.0, 0)
    return out, n_pairs


def run(spec: dict) -> dict:
    """The job of ``spec`` (``stage``'s, as ``job.main`` gets it): the dropped images
    written and the stage's marker done; returns the marker's extra."""
    from pipeline_tasks.runtime import markers
    from pipeline_tasks.runtime.layout import RunLayout
    from pipeline_tasks.stages.hygiene import lsh
    from pipeline_tasks.stages.hygiene.stage import DROPPED_SCHEMA, STAGE

    t0 = time.time()
    c = spec["config"]
    store = RunLayout(spec["run_uri"]).store(STAGE)
    store.mark_running(markers.WHOLE_STAGE)
    files = spec["embedding_files"]
    src = pa.RecordBatch.from_pydict({"shard": [s for s, _ in files], "uri": [u for _, u in files]})
    batches = list(read_images([src]))
    pool = _Pool(pa.Table.from_batches(batches)) if batches else None
    del batches  # the pool holds what it needs
    secs = {"start": 0.0, "read": time.time() - t0}
    evals = read_evals(spec.get("eval_file"))
    t1 = time.time()
    cols = DROPPED_SCHEMA.names
    dropped, n_pairs = pd.DataFrame({k: [] for k in cols}), 0
    if pool is not None:
        dim = pool.emb.shape[1]
        planes = lsh.planes(dim, int(c["lsh_bits"]), int(c["lsh_tables"]), int(c["seed"]))
        drops, n_pairs = find_drops(c, pool, evals, planes, secs)
        rows = drops.pop("row").to_numpy(np.int64)
        dropped = drops.assign(shard=pool.shard[rows], key=pool.key[rows])[cols]
        dropped = dropped.sort_values(["shard", "key"], kind="stable").reset_index(drop=True)
    secs["groups"] = time.time() - t1 - secs.get("pairs", 0.0)
    secs["collect"] = 0.0  # nothing to collect: the drops are here
    n_in = pool.n if pool is not None else 0
    return record(spec, dropped, n_in, len(evals) if evals is not None else 0, n_pairs, secs, t0,
                  "local")  # fmt: skip


def record(spec, dropped: pd.DataFrame, n_in: int, n_eval: int, n_pairs: int, secs: dict,
           t0: float, engine: str) -> dict:  # fmt: skip
    """``RUN/hygiene/dropped.parquet`` (shard, key, reason, matched, score, phash_distance)
    and the stage's done marker, its drops by reason: the end of both engines."""
    import pyarrow.parquet as pq

    from pipeline_tasks.runtime import markers
    from pipeline_tasks.runtime.layout import RunLayout
    from pipeline_tasks.stages.hygiene.stage import DROPPED_SCHEMA, STAGE
    from training.core import storage

    layout = RunLayout(spec["run_uri"])
    store = layout.store(STAGE)
    table = pa.Table.from_pandas(
        dropped[DROPPED_SCHEMA.names], schema=DROPPED_SCHEMA, preserve_index=False
    )
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
        "eval_images": int(n_eval),
        "pairs_compared": int(n_pairs),
        "engine": engine,  # "local" (one process) or "spark"
        # where the job's time went (JVM and session start, reading, pairs, groups, collect)
        "phase_seconds": {k: round(v, 2) for k, v in secs.items()},
        "settings": spec["settings"],
    }
    markers.record_outputs(st, store.root, [uri])
    store.mark_done(markers.WHOLE_STAGE, st)
    return st.extra
