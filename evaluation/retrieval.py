"""Retrieval mAP exactly as the GPR1200 benchmark computes it, in bounded memory.

GPR1200 (Schall et al. 2021, github.com/Visual-Computing/GPR1200, ``evaluate.py``):

* every image is a query against all images, itself included;
* the ranking is the full sort by the dot product of L2-normalised features;
* AP of a query = mean, over all its positives (same class, the query itself included), of
  the precision at that positive's rank; mAP = mean AP over queries;
* AP@k (an extra, named ``map@k``) keeps GPR1200's definition: only positives ranked within
  the first ``k`` add their precision, and the sum is still divided by the number of *all*
  positives;
* the published per-domain figures are mean APs over the queries of six blocks of 200
  classes each (class ids 0-199 Landmarks, 200-399 iNat, 400-599 ImageNet-Sketch,
  600-799 INSTRE, 800-999 SOP, 1000-1199 IMDB faces).

Ties: GPR1200 sorts with numpy's unstable ``argsort``, so tied images come in an arbitrary
order there. Here ties are broken deterministically by image index (the earlier image ranks
first), in the chunked code and in the brute-force reference alike.

Queries are processed in chunks of rows: memory is O(rows x N), at most ``budget`` elements
(16 Mi by default), and 12,000 x 12,000 takes seconds on CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

GPR1200_DOMAINS: tuple[tuple[str, int, int], ...] = (
    ("landmarks", 0, 200),
    ("inat", 200, 400),
    ("sketch", 400, 600),
    ("instre", 600, 800),
    ("sop", 800, 1000),
    ("faces", 1000, 1200),
)


@dataclasses.dataclass
class RetrievalResult:
    map: float
    ap: np.ndarray  # per query, in input order
    per_domain: dict[str, float]
    k: int | None

    def metrics(self) -> dict[str, float]:
        name = "map" if self.k is None else f"map@{self.k}"
        out = {name: self.map}
        out.update({f"{name}/{d}": v for d, v in self.per_domain.items()})
        return out


def average_precisions(
    features: np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    k: int | None = None,
    chunk: int = 1024,
    device: str | torch.device = "cpu",
    budget: int = 1 << 24,
) -> np.ndarray:
    """Per-query AP (float64) of every image against all images, GPR1200 protocol."""
    feats = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    lab = torch.as_tensor(np.asarray(labels)).long()
    if feats.ndim != 2 or feats.shape[0] != lab.shape[0]:
        raise ValueError(
            f"features must be (N, D) with one label per row; got {tuple(feats.shape)} and {tuple(lab.shape)}"
        )
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = feats.shape[0]
    if n == 0:
        return np.zeros(0)
    device = torch.device(device)
    f = F.normalize(feats.to(device=device, dtype=torch.float32), dim=-1)
    # members of each query's class, padded with -1: (N, P), P = the largest class
    _, inverse, counts = torch.unique(lab, return_inverse=True, return_counts=True)
    p_max = int(counts.max())
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n) - starts[inverse[order]]
    members = torch.full((len(counts), p_max), -1, dtype=torch.long)
    members[inverse[order], slot] = order
    n_pos = counts[inverse].double()
    members = members.to(device)
    inverse = inverse.to(device)
    # Only the positives' ranks matter. A stable descending sort breaks ties by index (the
    # earlier image first); scattering positions through it gives every image's rank.
    rows = max(1, min(chunk, budget // n))
    positions = torch.arange(1, n + 1, device=device, dtype=torch.float64)
    seen = torch.arange(1, p_max + 1, device=device, dtype=torch.float64)
    out = torch.empty(n, dtype=torch.float64)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        sims = f[s:e] @ f.T  # (c, N)
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices
        del sims
        rank_of = torch.empty((e - s, n), device=device, dtype=torch.float64)
        rank_of.scatter_(1, order, positions.expand(e - s, n))
        del order
        pos = members[inverse[s:e]]  # (c, P), -1 = padding
        rank = torch.where(pos >= 0, rank_of.gather(1, pos.clamp(min=0)), torch.inf)
        rank = torch.sort(rank, dim=1).values
        keep = torch.isfinite(rank) if k is None else rank <= k
        ap = torch.where(keep, seen / rank, 0.0).sum(1) / n_pos[s:e].to(device)
        out[s:e] = ap.cpu()
        del rank_of
    return out.numpy()


def retrieval_map(
    features,
    labels,
    k: int | None = None,
    domains: Sequence[tuple[str, int, int]] | None = None,
    chunk: int = 1024,
    device: str | torch.device = "cpu",
    is_query: np.ndarray | None = None,
) -> RetrievalResult:
    """mAP (or GPR1200's mAP@k) and, for declared class-id blocks, the per-domain mAP.

    ``is_query`` (a boolean per image) averages only those images' APs; the others still
    stand in every ranking as gallery images.
    """
    ap = average_precisions(features, labels, k=k, chunk=chunk, device=device)
    lab = np.asarray(labels)
    q = np.ones(len(ap), dtype=bool) if is_query is None else np.asarray(is_query, dtype=bool)
    per_domain = {}
    for name, lo, hi in domains or ():
        m = q & (lab >= lo) & (lab < hi)
        if m.any():
            per_domain[name] = float(ap[m].mean())
    return RetrievalResult(float(ap[q].mean()) if q.any() else 0.0, ap, per_domain, k)


def reference_average_precisions(
    features: np.ndarray, labels: np.ndarray, k: int | None = None
) -> np.ndarray:
    """Brute force, one query at a time in float64, written after GPR1200's evaluate.py."""
    f = np.asarray(features, dtype=np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    labels = np.asarray(labels)
    out = []
    for q in range(len(f)):
        sims = f @ f[q]
        # descending, ties by index: sort by (-sim, index)
        order = np.lexsort((np.arange(len(f)), -sims))
        y = labels[order] == labels[q]
        n_positive = int(y.sum())
        y = y[: len(y) if k is None else k]
        score, seen = 0.0, 0
        for i in np.flatnonzero(y):
            seen += 1
            score += seen / (i + 1.0)
        out.append(score / n_positive)
    return np.asarray(out)
