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

    from pipeline_tasks.stages.hygiene import pairs as hp

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
    (out,) = hp.bucket_rows(planes, 2, 5, [rb])
    rows = out.to_pydict()
    assert len(rows["id"]) == 4 * 2 + 3 * 5  # 2 tables each, 5 hash runs for the 3 hashed
    assert [i for i, t in zip(rows["id"], rows["tbl"], strict=True) if t >= 2].count("c") == 0
    cos01 = float(e[0] @ e[1])
    assert 0.5 < cos01 < 0.9, cos01
    memb = pd.DataFrame({"tbl": 9, "bkey": 1, "id": ["d", "c", "b", "a"]})
    vecs = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d"],
            "embedding": list(e),
            "ph": [5, 5 ^ 0b1011, 5, 7],  # c's 0 stands in for its null
            "has_ph": [True, True, False, True],
        }
    )
    pairs = hp.bucket_pairs(0.9, 100, (4, 0.5), memb, vecs)
    assert list(zip(pairs["a"], pairs["b"], pairs["ham"], strict=True)) == [("a", "b", 3)]
    assert pairs["cos"].iloc[0] == pytest.approx(cos01, abs=1e-5)
    assert hp.bucket_pairs(0.9, 100, (-1, 0.5), memb, vecs).empty  # by the features alone
    assert hp.bucket_pairs(0.9, 100, (4, cos01 + 0.01), memb, vecs).empty  # below the floor


def _pairs_one_bucket_at_a_time(min_cos, max_bucket, rule, memb, vecs) -> dict:
    """What a bucket's pairs are, bucket by bucket (leaders: the first max_bucket by id)."""
    from pipeline_tasks.stages.score.phash import hamming

    by_id = vecs.set_index("id")
    out = {}
    for _, g in memb.groupby(["tbl", "bkey"]):
        ids = sorted(g["id"])
        x = lsh.normalize(np.stack(by_id.loc[ids, "embedding"].to_numpy()))
        ph, has = by_id.loc[ids, "ph"].to_numpy(), by_id.loc[ids, "has_ph"].to_numpy()
        for i in range(min(len(ids), max_bucket)):
            for j in range(i + 1, len(ids)):
                cos = float(x[i] @ x[j])
                ham = int(hamming(ph[i], ph[j])) if has[i] and has[j] else 99
                if cos >= min_cos or (ham <= rule[0] and cos >= rule[1]):
                    out[(ids[i], ids[j])] = (cos, ham)
    return out


def test_buckets_compared_in_batches_find_each_buckets_own_pairs(monkeypatch):
    """Buckets of one size compared together, large ones one by one: the same pairs, cosines
    and hash bits as each bucket alone; a pair in several buckets comes back once."""
    import pandas as pd

    from pipeline_tasks.stages.hygiene import pairs as hp

    rng = np.random.default_rng(4)
    n, dim = 400, 24
    base = lsh.normalize(rng.standard_normal((40, dim)))
    e = lsh.normalize(base[rng.integers(0, 40, n)] + 0.1 * rng.standard_normal((n, dim)))
    ph = rng.integers(0, 1 << 62, n)
    ph[1::3] = ph[0::3][: len(ph[1::3])] ^ 0b101  # hash near-twins, 2 bits apart
    ids = np.array([f"{i:04d}" for i in rng.permutation(n)])
    rows = []
    for tbl, size in enumerate([2, 3, 5, 17, 64, 65, 150] * 3):  # batched, and one by one
        for b in range(4):
            rows += [(tbl, b, i) for i in rng.choice(ids, size, replace=False)]
    memb = pd.DataFrame(rows, columns=["tbl", "bkey", "id"]).sample(frac=1, random_state=0)
    vecs = pd.DataFrame({"id": ids, "embedding": list(e), "ph": ph, "has_ph": ph % 7 != 0})
    cases = ((2000, (4, 0.3), 1 << 23), (100, (4, 0.3), 1 << 23), (2000, (-1, 1.0), 1 << 23))
    cases += ((2000, (4, 0.3), 24 * 8),)  # a batch of a few buckets: many batches per size
    for max_bucket, rule, batch_floats in cases:
        monkeypatch.setattr(hp, "_BATCH_FLOATS", batch_floats)
        got = hp.bucket_pairs(0.8, max_bucket, rule, memb, vecs)
        want = _pairs_one_bucket_at_a_time(0.8, max_bucket, rule, memb, vecs)
        assert len(want) > 50, len(want)
        keys = list(zip(got["a"], got["b"], strict=True))
        assert len(keys) == len(set(keys)) and set(keys) == set(want)
        for a, b, cos, ham in zip(got["a"], got["b"], got["cos"], got["ham"], strict=True):
            assert cos == pytest.approx(want[(a, b)][0], abs=1e-5) and ham == want[(a, b)][1]


def test_groups_on_one_machine_are_the_connected_components_labelled_by_their_smallest_id():
    from pipeline_tasks.stages.hygiene import pairs as hp

    rng = np.random.default_rng(2)
    names = np.array([f"s/{i:05d}" for i in rng.permutation(3000)], dtype=object)
    chain = rng.permutation(600)  # one long chain: many rounds of label propagation
    edges = [(chain[k], chain[k + 1]) for k in range(599)]
    star = 600 + rng.permutation(200)
    edges += [(star[0], x) for x in star[1:]]
    edges += [tuple(e) for e in rng.integers(800, 3000, (900, 2)) if e[0] != e[1]]
    a = names[[e[0] for e in edges]]
    b = names[[e[1] for e in edges]]
    ids, labels = hp.component_labels(a, b)
    # the reference: breadth-first search from each unseen id
    nbr: dict[str, set] = {}
    for x, y in zip(a, b, strict=True):
        nbr.setdefault(x, set()).add(y)
        nbr.setdefault(y, set()).add(x)
    want, seen = {}, set()
    for start in sorted(nbr):
        if start in seen:
            continue
        comp, todo = {start}, [start]
        while todo:
            for y in nbr[todo.pop()] - comp:
                comp.add(y)
                todo.append(y)
        seen |= comp
        want.update({x: min(comp) for x in comp})
    assert dict(zip(ids, labels, strict=True)) == want
    assert want[names[chain[-1]]] == min(names[chain]) and len(set(want.values())) > 100
    none = np.array([], dtype=object)
    assert [len(x) for x in hp.component_labels(none, none)] == [0, 0]
