"""The hygiene job on one machine (``local``) against a brute force over every pair of a
small synthetic pool with planted cases of each reason (the Spark job is compared with it
on a real run in ``test_hygiene``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline_tasks.stages.hygiene import local, lsh
from pipeline_tasks.stages.hygiene.job import EVAL_PREFIX
from pipeline_tasks.stages.hygiene.stage import HygieneConfig
from pipeline_tasks.stages.score.phash import hamming


def _pool(rng):
    n, dim = 300, 48
    emb = rng.standard_normal((n, dim)).astype(np.float32)  # unrelated: cosines near 0
    sha = np.array([f"s{i}" for i in range(n)], object)
    ph = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64)
    nsfw = rng.uniform(0, 0.5, n)
    nsfw[[5, 77, 7]] = [0.95, 0.81, np.nan]  # NaN: a score that went wrong (Spark: unsafe)
    no_score = np.zeros(n, bool)
    no_score[[9, 11]] = True  # no score at all (null): kept, whatever the array holds
    nsfw[9] = 0.99
    for i in range(100, 110):  # near copies: the features barely moved, another hash
        emb[i] = emb[i - 100] + 0.1 * rng.standard_normal(dim)
    emb[110:113] = emb[113]  # a chain of copies of 113 (110 keeps, as the smallest key)
    sha[120:123] = sha[20]  # byte copies of 20 (same bytes, same features and hash)
    emb[120:123], ph[120:123] = emb[20], ph[20]
    for i in range(130, 134):  # resized: the features moved (cos ~0.7), the hash 2 bits
        emb[i] = emb[i - 100] + 1.0 * rng.standard_normal(dim)
        ph[i] = ph[i - 100] ^ np.int64(0b101)
    has = np.ones(n, bool)
    has[[31, 131, 200]] = False  # no hash: 131 is then no copy of 31
    emb[5] = emb[6]  # unsafe and a copy: dropped as unsafe, 6 stays
    t = pa.table(
        {
            "shard": ["00000" if i % 2 else "00001" for i in range(n)],
            "key": [f"{i:05d}" for i in range(n)],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim),
            "sha256": pa.array(sha, pa.string()),
            "nsfw": pa.array(nsfw, pa.float32(), mask=no_score),
            "phash": pa.array(ph, pa.int64(), mask=~has),
        }
    )
    evals = pd.DataFrame(  # the bytes of 40; a copy of 50's picture; an unrelated picture
        {
            "file": ["e/a.jpg", "e/b.jpg", "e/c.jpg"],
            "embedding": [emb[40], emb[50] + 0.05 * rng.standard_normal(dim).astype(np.float32),
                          rng.standard_normal(dim).astype(np.float32)],
            "sha256": [sha[40], "x", "y"],
            "phash": pd.array([ph[40], ~ph[50], ph[60] ^ 1], dtype="Int64"),
        }
    )  # fmt: skip
    evals["id"] = EVAL_PREFIX + evals["file"]
    return t, evals, emb, sha, ph, has, np.where(no_score, -1.0, nsfw)  # -1: never unsafe


def _brute_force(c, t, evals, emb, sha, ph, has, nsfw):
    """id -> (reason, matched) over every pair."""
    ids = [f"{s}/{k}" for s, k in zip(t["shard"].to_pylist(), t["key"].to_pylist(), strict=True)]
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    ex = (
        np.stack(evals["embedding"]) / np.linalg.norm(np.stack(evals["embedding"]), axis=1)[:, None]
    )

    def copy(cos, bits, thr):
        return cos >= thr or (bits <= c["phash_distance"] and cos >= c["phash_min_cosine"])

    out, live = {}, set(range(len(ids)))
    for i in sorted(live):
        if nsfw[i] >= c["nsfw_threshold"] or np.isnan(nsfw[i]):  # (null scores are not NaN here)
            out[ids[i]], live = ("nsfw", None), live - {i}
    for i in sorted(live):
        files = sorted(
            f for f, s in zip(evals["file"], evals["sha256"], strict=True) if s == sha[i]
        )
        if files:
            out[ids[i]], live = ("eval_copy", files[0]), live - {i}
    found = {}
    for i in sorted(live):
        for e in range(len(evals)):
            bits = 99 if pd.isna(evals["phash"][e]) or not has[i] else int(
                hamming(ph[i], int(evals["phash"][e])))  # fmt: skip
            if copy(float(x[i] @ ex[e]), bits, c["eval_threshold"]):
                found[i] = evals["file"][e]
    for i, f in found.items():
        out[ids[i]], live = ("eval_copy", f), live - {i}
    for i in sorted(live, key=lambda i: ids[i]):
        first = min((j for j in live if sha[j] == sha[i]), key=lambda j: ids[j])
        if first != i:
            out[ids[i]] = ("exact_duplicate", ids[first])
    live -= {i for i in live if ids[i] in out}
    label = {i: i for i in live}  # components by repeated min-label sweeps over all pairs

    def root(i):
        while label[i] != i:
            i = label[i]
        return i

    for i in live:
        for j in live:
            bits = int(hamming(ph[i], ph[j])) if has[i] and has[j] else 99
            if i < j and copy(float(x[i] @ x[j]), bits, c["near_threshold"]):
                a, b = root(i), root(j)
                if a != b:
                    lo, hi = sorted((a, b), key=lambda k: ids[k])
                    label[hi] = lo
    for i in live:
        if root(i) != i:
            out[ids[i]] = ("near_duplicate", ids[root(i)])
    return out


def test_one_machine_finds_what_every_pair_says():
    rng = np.random.default_rng(0)
    t, evals, emb, sha, ph, has, nsfw = _pool(rng)
    conf = HygieneConfig(nsfw=True)
    c = {**conf.to_dict(), "lsh_tables": conf.lsh_tables()}
    planes = lsh.planes(emb.shape[1], c["lsh_bits"], c["lsh_tables"], c["seed"])
    drops, n_pairs = local.find_drops(c, local._Pool(t), evals, planes, {})
    pool = local._Pool(t)
    got = {pool.ids[r]: (reason, m) for r, reason, m in
           zip(drops["row"], drops["reason"], drops["matched"], strict=True)}  # fmt: skip
    want = _brute_force(c, t, evals, emb, sha, ph, has, nsfw)
    assert got == want
    reasons = pd.Series([r for r, _ in got.values()]).value_counts().to_dict()
    assert reasons == {"near_duplicate": 14, "exact_duplicate": 3, "eval_copy": 2, "nsfw": 3}
    assert n_pairs >= 14
    # recorded as the Spark job records them: the cosine and bits to the kept image
    near = drops[drops["reason"] == "near_duplicate"]
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    index = {i: k for k, i in enumerate(pool.ids)}
    for r, m, s in zip(near["row"], near["matched"], near["score"], strict=True):
        assert abs(s - float(x[r] @ x[index[m]])) < 1e-5
    bits = near["phash_distance"]
    assert bits.isna().sum() == 0 and (bits.dropna() >= 0).all()
