"""Candidate pairs of the hygiene job (``job``): the LSH bucket keys of each image, and the
copy pairs inside the buckets that two or more images share.

The comparison runs on a group of many buckets at once (one ``cogroup`` call of the job):
the group's bucket memberships (ids only) and each member's features once, however many of
the group's buckets it is in. Buckets of one size are compared together, as one batched
matrix product (per bucket, pandas and numpy calls cost more than the arithmetic: the
demo's 3,786 images share 37,184 buckets); only buckets larger than ``_BATCHED`` members go
one by one. ``component_labels`` groups the copy pairs found when the driver can hold them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

NO_HASH = 99  # the distance of a pair when either image has no perceptual hash
_BATCHED = 64  # buckets up to this size are compared in batches of one size
_BATCH_FLOATS = 1 << 23  # features gathered per batch (32 MiB of float32)


def matrix(col) -> np.ndarray:
    """(n, dim) float32 of an Arrow list<float> column of equal-length rows."""
    n = len(col)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(n, -1) if n else flat.reshape(0, 1)


def bucket_rows(hyperplanes: np.ndarray, tables: int, bands: int, batches):
    """One row per (image, table): the image's bucket key in that table (ids only: the
    features join back for the buckets that hold two or more images). Tables
    ``0 .. tables-1`` are the embedding's hyperplane tables, ``tables .. tables+bands-1``
    the runs of its perceptual hash (none when ``bands`` is 0 or the image has no hash).
    Arrow batches in and out (``mapInArrow``); ids keep their type (``local``: int64 ranks)."""
    import pyarrow as pa

    from pipeline_tasks.stages.hygiene import lsh

    for rb in batches:
        n = rb.num_rows
        if not n:
            continue
        emb = lsh.normalize(matrix(rb.column("embedding")))
        k = lsh.keys(emb, hyperplanes, tables)  # (n, tables)
        ids = rb.column("id").to_numpy(zero_copy_only=False)  # strings, or int64 ranks
        tbl = [np.tile(np.arange(tables, dtype=np.int32), n)]
        bkey, rid = [k.reshape(-1)], [np.repeat(ids, tables)]
        ph = rb.column("phash")
        if bands and ph.null_count < n:
            has = ~np.asarray(ph.is_null().to_numpy(zero_copy_only=False), bool)
            hk = lsh.band_keys(ph.filter(pa.array(has)).to_numpy(), bands)  # (m, bands)
            tbl.append(np.tile(np.arange(tables, tables + bands, dtype=np.int32), len(hk)))
            bkey.append(hk.reshape(-1))
            rid.append(np.repeat(ids[has], bands))
        yield pa.RecordBatch.from_pydict(
            {
                "tbl": pa.array(np.concatenate(tbl)),
                "bkey": pa.array(np.concatenate(bkey)),
                "id": pa.array(np.concatenate(rid), rb.schema.field("id").type),
            }
        )


def copy_rule(c: dict) -> tuple[int, float]:
    """(phash_distance, phash_min_cosine); distance -1: by the cosine alone."""
    return int(c.get("phash_distance", -1)), float(c.get("phash_min_cosine", 1.0))


def _empty() -> pd.DataFrame:
    none = np.array([], dtype=object)
    return pd.DataFrame(
        {"a": none, "b": none, "cos": np.array([], np.float32), "ham": np.array([], np.int32)}
    )


def bucket_pairs(
    min_cos: float, max_bucket: int, rule: tuple[int, float], memb: pd.DataFrame, vecs: pd.DataFrame
) -> pd.DataFrame:
    """The copy pairs inside each bucket of ``memb`` (tbl, bkey, id: the memberships of a
    group of whole buckets; ``vecs``: id, embedding, ph, has_ph of each member, once):
    cosine >= ``min_cos``, or within ``rule`` (hash bits, cosine); each pair once, as
    (smaller id, larger id, cosine, hash bits). A bucket over ``max_bucket`` compares
    everything with its first ``max_bucket`` members (by id) only."""
    from pipeline_tasks.stages.hygiene import lsh
    from pipeline_tasks.stages.score.phash import hamming

    if len(memb) < 2 or not len(vecs):
        return _empty()
    # a member's row number orders it by id (an id is one image: a repeat adds nothing)
    vecs = vecs.drop_duplicates("id").sort_values("id")
    ids = vecs["id"].to_numpy(object)
    x = lsh.normalize(np.stack(vecs["embedding"].to_numpy()))
    ph, has = vecs["ph"].to_numpy(np.int64), vecs["has_ph"].to_numpy(bool)
    row = pd.Index(ids).get_indexer(memb["id"])
    if (row < 0).any():
        raise ValueError("a bucket member without its features")
    tbl, bkey = memb["tbl"].to_numpy(np.int64), memb["bkey"].to_numpy(np.int64)
    order = np.lexsort((row, bkey, tbl))
    row, tbl, bkey = row[order], tbl[order], bkey[order]
    new = np.ones(len(row), bool)
    new[1:] = (tbl[1:] != tbl[:-1]) | (bkey[1:] != bkey[:-1])
    starts = np.nonzero(new)[0]
    sizes = np.diff(np.append(starts, len(row)))
    max_bits, floor = rule
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def keep(i: np.ndarray, j: np.ndarray, sims: np.ndarray, among=True) -> None:
        """The copy pairs among member rows ``i`` x ``j`` (index arrays broadcast to the shape
        of their cosines ``sims``; ``among``: which of those pairs count)."""
        ham = np.where(has[i] & has[j], hamming(ph[i], ph[j]), NO_HASH)
        at = np.nonzero(((sims >= min_cos) | ((ham <= max_bits) & (sims >= floor))) & among)
        i, j = np.broadcast_to(i, sims.shape)[at], np.broadcast_to(j, sims.shape)[at]
        found.append((i, j, sims[at].astype(np.float32), ham[at].astype(np.int32)))

    for s in np.unique(sizes[sizes >= 2]).tolist():
        at = starts[sizes == s]
        if s <= min(_BATCHED, max_bucket):  # every pair of each bucket, buckets in batches
            iu, ju = np.triu_indices(s, 1)
            step = max(1, _BATCH_FLOATS // (s * x.shape[1]))
            for b in range(0, len(at), step):
                members = row[at[b : b + step, None] + np.arange(s)]  # (B, s), by id
                xb = x[members]
                sims = np.matmul(xb, xb.transpose(0, 2, 1))[:, iu, ju]  # (B, pairs)
                keep(members[:, iu].ravel(), members[:, ju].ravel(), sims.ravel())
            continue
        for a in at.tolist():  # a large bucket: its leaders against every member, as matrices
            members = row[a : a + s]  # (a flooded bucket's pairs are only indexed once found)
            lead = members[:max_bucket]
            later = np.arange(len(lead))[:, None] < np.arange(s)[None, :]
            keep(lead[:, None], members[None, :], x[lead] @ x[members].T, among=later)
    if not found:
        return _empty()
    i, j, cos, ham = (np.concatenate(p) for p in zip(*found, strict=True))
    # a pair that shares several buckets is the same pair: report it once
    _, first = np.unique(i.astype(np.int64) * len(ids) + j, return_index=True)
    return pd.DataFrame(
        {"a": ids[i[first]], "b": ids[j[first]], "cos": cos[first], "ham": ham[first]}
    )


def component_labels(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels): every id on an edge (a[k], b[k]) and the smallest id of its connected
    component, on one machine (what the job's star rounds compute in Spark): scipy's
    ``connected_components``, linear in the edges (min-label propagation in numpy took as
    many rounds as a quarter of a chain's length: 51,471 for a chain of 200,000)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ids, inv = np.unique(np.concatenate([a, b]), return_inverse=True)  # sorted: min index = min id
    n = len(ids)
    graph = coo_matrix((np.ones(len(a), np.int8), (inv[: len(a)], inv[len(a) :])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    first = np.full(comp.max() + 1 if n else 0, n)
    np.minimum.at(first, comp, np.arange(n))
    return ids, ids[first[comp]]
