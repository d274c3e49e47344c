"""The vocab stage's filter rules, against brute-force references on small inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.stages.vocab import filtering


def _pairs(rng, n_images=12, dim=5):
    rows = []
    emb = {f"k{i}": rng.normal(size=dim) for i in range(n_images)}
    for i in range(n_images):
        for e in rng.choice(["A", "B", "C", "D"], size=rng.integers(1, 4), replace=False):
            rows.append(
                {"shard": "00000", "key": f"k{i}", "entity_id": str(e),
                 "similarity": float(rng.uniform(-1, 1)), "embedding": emb[f"k{i}"]}
            )  # fmt: skip
    return pd.DataFrame(rows), emb


def test_leave_one_out_coherence_matches_brute_force():
    rng = np.random.default_rng(0)
    pdf, emb = _pairs(rng)
    mean = np.stack(list(emb.values())).mean(0)
    # sums over two "partitions", added up per entity, as Spark does
    parts = list(filtering.partial_sums(mean, iter([pdf.iloc[:10], pdf.iloc[10:]])))
    both = pd.concat(parts)
    sums = pd.concat(filtering.add_partials(g) for _, g in both.groupby("entity_id"))
    joined = pdf.merge(sums, on="entity_id")
    (out,) = filtering.leave_one_out(mean, 0.5, iter([joined]))
    unit = {k: (v - mean) / np.linalg.norm(v - mean) for k, v in emb.items()}
    for r in out.itertuples():
        others = [unit[k] for k in pdf[pdf.entity_id == r.entity_id].key if k != r.key]
        want = 0.0
        if others:
            m = np.mean(others, axis=0)
            want = float(unit[r.key] @ m / np.linalg.norm(m))
        assert r.coherence == pytest.approx(want, abs=1e-5)
        assert r.score == pytest.approx(r.similarity + 0.5 * want, abs=1e-5)


def test_min_count_is_lowered_only_when_it_would_drop_too_much():
    big = {"a": 50, "b": 40, "c": 2, "d": 1}  # rare entities hold 3 of 93 labels
    assert filtering.effective_min_count(big, 3, 0.05) == 3
    small = {"a": 3, "b": 2, "c": 1, "d": 1, "e": 2}  # most labels are on rare entities
    assert filtering.effective_min_count(small, 3, 0.05) == 1
    assert filtering.effective_min_count(small, 3, 1.0) == 3  # 1.0: always apply min_count
    assert filtering.effective_min_count({}, 3, 0.05) == 3


def test_an_empty_or_collapsed_output_is_an_error_that_names_the_setting():
    filtering.check_output(1000, 800, 40, 0.05, "threshold=0.6")
    with pytest.raises(filtering.FilterError, match="kept no entity .*threshold=0.6"):
        filtering.check_output(1000, 0, 0, 0.05, "threshold=0.6")
    with pytest.raises(filtering.FilterError, match="kept 3 of 1000 .*min_kept_fraction"):
        filtering.check_output(1000, 3, 1, 0.05, "threshold=0.9")
    with pytest.raises(filtering.FilterError, match="no scored image"):
        filtering.check_output(0, 0, 0, 0.05, "")
    filtering.require_null_scores(500, 200)
    with pytest.raises(filtering.FilterError, match="cannot calibrate .*only 37 null scores"):
        filtering.require_null_scores(37, 200)
