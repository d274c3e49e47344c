"""GPR1200-protocol mAP against a brute-force reference, ties included."""

import numpy as np
import pytest

from evaluation.retrieval import (
    GPR1200_DOMAINS,
    average_precisions,
    reference_average_precisions,
    retrieval_map,
)


def _tied_features(rng, n, d=8):
    # four +-1 entries per row: every row has norm 2, so all similarities are exact multiples
    # of 1/4 in any precision and ties are real ties
    f = np.zeros((n, d), np.float32)
    for i in range(n):
        idx = rng.choice(d, 4, replace=False)
        f[i, idx] = rng.choice([-1.0, 1.0], 4)
    return f


@pytest.mark.parametrize("k", [None, 1, 3, 10])
def test_matches_reference_with_ties(k):
    rng = np.random.default_rng(0)
    for _ in range(25):
        n = int(rng.integers(2, 60))
        f = _tied_features(rng, n)
        labels = rng.integers(0, 6, size=n)
        # chunk=7 and a tiny budget exercise the chunk boundaries
        got = average_precisions(f, labels, k=k, chunk=7, budget=5 * n)
        want = reference_average_precisions(f, labels, k=k)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_matches_reference_on_random_features():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((400, 32)).astype(np.float32)
    labels = np.repeat(np.arange(40), 10)
    got = retrieval_map(f, labels, chunk=64)
    want = reference_average_precisions(f, labels)
    assert abs(got.map - want.mean()) < 1e-6
    np.testing.assert_allclose(got.ap, want, atol=1e-6)


def test_known_values():
    # two classes of two; query 0 ranks 0 (itself), 2, 3, 1 -> AP = (1/1 + 2/4) / 2
    f = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.1, 1.0]], np.float32)
    ap = average_precisions(f, [0, 0, 1, 1])
    assert ap[0] == pytest.approx((1 + 2 / 4) / 2)
    # perfect features give mAP 1; a singleton class gives AP 1 (it finds itself first)
    assert retrieval_map(np.eye(3), [0, 1, 2]).map == 1.0


def test_map_at_k_divides_by_all_positives():
    f = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]], np.float32)
    labels = [0, 1, 1, 0]
    # query 0 ranks 0, 1, 3, 2; @1: only itself -> 1/2
    assert average_precisions(f, labels, k=1)[0] == pytest.approx(0.5)


def test_per_domain_and_names():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(0, 1200, 100), 3)
    f = rng.standard_normal((len(labels), 16)).astype(np.float32)
    res = retrieval_map(f, labels, domains=GPR1200_DOMAINS, k=5)
    assert set(res.per_domain) == {d for d, _, _ in GPR1200_DOMAINS}
    ap = res.ap
    assert res.per_domain["landmarks"] == pytest.approx(ap[labels < 200].mean())
    assert set(res.metrics()) == {"map@5"} | {f"map@5/{d}" for d, _, _ in GPR1200_DOMAINS}


def test_bad_shapes():
    with pytest.raises(ValueError, match="one label per row"):
        average_precisions(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="k must be"):
        average_precisions(np.zeros((2, 2)), [0, 1], k=0)
