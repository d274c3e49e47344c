"""Random-hyperplane LSH (Charikar's SimHash) for near duplicates by cosine similarity.

Each of ``tables`` hash tables draws ``bits`` random hyperplanes; an embedding's key in a
table is the sign pattern of its projections. Two embeddings at angle ``theta`` agree on one
bit with probability ``1 - theta / pi``, share a table's key with that to the power
``bits``, and meet in at least one table with

    P(cos) = 1 - (1 - (1 - acos(cos) / pi) ** bits) ** tables

(:func:`meet_probability`). Only pairs that meet are compared exactly, so the work grows with
the pairs that share a bucket, not with all pairs. :func:`choose` picks the fewest tables
that reach a recall at the similarity threshold with a bucket selective enough for
unrelated images (cosine ~0). The planes come from a seed: the same embeddings always get
the same keys (the stage is deterministic).
"""

from __future__ import annotations

import math

import numpy as np


def meet_probability(cos: float, bits: int, tables: int) -> float:
    """Probability that two embeddings at cosine ``cos`` share a key in some table."""
    p = 1.0 - math.acos(max(-1.0, min(1.0, cos))) / math.pi
    return 1.0 - (1.0 - p**bits) ** tables


def choose(threshold: float, recall: float, bits: int, max_tables: int = 64) -> int:
    """The fewest tables of ``bits`` bits with ``meet_probability(threshold) >= recall``."""
    for tables in range(1, max_tables + 1):
        if meet_probability(threshold, bits, tables) >= recall:
            return tables
    raise ValueError(
        f"{bits} bits per table need more than {max_tables} tables for recall {recall} at "
        f"cosine {threshold}: use fewer bits"
    )


def planes(dim: int, bits: int, tables: int, seed: int = 0) -> np.ndarray:
    """(tables * bits, dim) Gaussian hyperplanes, the same for the same arguments."""
    if bits > 63:
        raise ValueError("at most 63 bits per table (keys are int64)")
    rng = np.random.default_rng(seed)
    return rng.standard_normal((tables * bits, dim)).astype(np.float32)


def keys(emb: np.ndarray, hyperplanes: np.ndarray, tables: int) -> np.ndarray:
    """(n, tables) int64 bucket keys of ``emb`` (n, dim)."""
    n = len(emb)
    bits = len(hyperplanes) // tables
    signs = (np.asarray(emb, np.float32) @ hyperplanes.T) > 0  # (n, tables * bits)
    weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
    return signs.reshape(n, tables, bits).astype(np.int64) @ weights


def normalize(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)


def band_keys(hashes: np.ndarray, bands: int) -> np.ndarray:
    """(n, bands) int64: the 64-bit hashes cut into ``bands`` disjoint runs of bits.

    Multi-index hashing (Norouzi et al. 2012): two hashes that differ in fewer than
    ``bands`` bits agree exactly on at least one run (pigeonhole), so bucketing by each
    run finds every pair within ``bands - 1`` bits, with certainty."""
    if not 1 <= bands <= 32:
        raise ValueError("bands must be in [1, 32]")
    u = np.asarray(hashes, np.int64).view(np.uint64)
    edges = [b * 64 // bands for b in range(bands + 1)]
    out = np.empty((len(u), bands), np.int64)
    for b in range(bands):
        width = edges[b + 1] - edges[b]
        mask = np.uint64((1 << width) - 1)
        out[:, b] = ((u >> np.uint64(edges[b])) & mask).astype(np.int64)
    return out
