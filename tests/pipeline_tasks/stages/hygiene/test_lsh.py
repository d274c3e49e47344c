"""Random-hyperplane LSH: the meeting probability it promises is the one it delivers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_tasks.stages.hygiene import lsh


def _pairs_at(cos: float, n: int, dim: int, rng) -> tuple[np.ndarray, np.ndarray]:
    a = lsh.normalize(rng.standard_normal((n, dim)))
    noise = rng.standard_normal((n, dim))
    noise -= (noise * a).sum(1, keepdims=True) * a  # orthogonal to a
    noise = lsh.normalize(noise)
    b = cos * a + np.sqrt(1 - cos**2) * noise
    return a, b


@pytest.mark.parametrize("cos", [0.95, 0.8, 0.2])
def test_pairs_meet_as_often_as_the_formula_says(cos):
    rng = np.random.default_rng(1)
    bits, tables, n = 12, 6, 3000
    a, b = _pairs_at(cos, n, 64, rng)
    planes = lsh.planes(64, bits, tables, seed=3)
    ka, kb = lsh.keys(a, planes, tables), lsh.keys(b, planes, tables)
    met = (ka == kb).any(axis=1).mean()
    want = lsh.meet_probability(cos, bits, tables)
    assert abs(met - want) < 4 * np.sqrt(want * (1 - want) / n) + 0.01, (met, want)


def test_choose_reaches_the_recall_and_no_more():
    t = lsh.choose(0.9, 0.99, 16)
    assert lsh.meet_probability(0.9, 16, t) >= 0.99 > lsh.meet_probability(0.9, 16, t - 1)
    # unrelated images rarely share a bucket
    assert lsh.meet_probability(0.0, 16, t) < 0.01
    with pytest.raises(ValueError, match="fewer bits"):
        lsh.choose(0.5, 0.999, 60, max_tables=4)


def test_keys_are_deterministic_and_fit_int64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 32))
    p1, p2 = lsh.planes(32, 63, 3, seed=7), lsh.planes(32, 63, 3, seed=7)
    k1, k2 = lsh.keys(x, p1, 3), lsh.keys(x, p2, 3)
    assert k1.dtype == np.int64 and (k1 == k2).all()
    assert len(np.unique(k1[:, 0])) > 40  # 63 bits: distinct keys for distinct vectors


def test_hash_buckets_and_pairs_skip_images_without_a_hash():
    """Embeddings files from before the hash (phash null) still bucket and pair by the
    features; a pair found by its hash needs both hashes and the cosine floor."""
    import pandas as pd
    import pyarrow as pa

    from pipeline_tasks.stages.hygiene import job

    rng = np.random.default_rng(0)
    e = lsh.normalize(rng.standard_normal((4, 16)))
    e[1] = lsh.normalize((e[0] + 1.2 * lsh.normalize(rng.standard_normal((1, 16)))[0])[None])[0]
    h = [5, 5 ^ 0b1011, None, 7]  # 0 and 1: 3 bits apart; 2 has no hash
    rb = pa.RecordBatch.from_pydict(
        {
            "id": ["a", "b", "c", "d"],
            "embedding": pa.array(e.tolist(), pa.list_(pa.float32())),
            "phash": pa.array(h, pa.int64()),
        }
    )
    planes = lsh.planes(16, 8, 2, seed=0)
    (out,) = job.bucket_rows(planes, 2, 5, [rb])
    rows = out.to_pydict()
    assert len(rows["id"]) == 4 * 2 + 3 * 5  # 2 tables each, 5 hash runs for the 3 hashed
    assert [i for i, t in zip(rows["id"], rows["tbl"], strict=True) if t >= 2].count("c") == 0
    cos01 = float(e[0] @ e[1])
    assert 0.5 < cos01 < 0.9, cos01
    pdf = pd.DataFrame(
        {
            "tbl": 9,
            "bkey": 1,
            "id": ["a", "b", "c", "d"],
            "embedding": list(e),
            "ph": [5, 5 ^ 0b1011, 5, 7],  # c's 0 stands in for its null
            "has_ph": [True, True, False, True],
        }
    )
    pairs = job.bucket_pairs(0.9, 100, (4, 0.5), pdf)
    assert list(zip(pairs["a"], pairs["b"], pairs["ham"], strict=True)) == [("a", "b", 3)]
    assert pairs["cos"].iloc[0] == pytest.approx(cos01, abs=1e-5)
    assert job.bucket_pairs(0.9, 100, (-1, 0.5), pdf).empty  # by the features alone
    assert job.bucket_pairs(0.9, 100, (4, cos01 + 0.01), pdf).empty  # below the floor
