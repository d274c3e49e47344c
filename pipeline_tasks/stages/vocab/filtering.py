"""How the vocab stage decides which (image, entity) pairs to keep: the pieces that are not
Spark plumbing, so they are tested on their own and read in one place.

* **Visual coherence** of a pair (image i, entity e): the cosine similarity of i's visual
  features (the scorer's image tower, centred on the corpus mean) to the mean of the *other*
  images linking e. The subject of a picture is linked beside images that look like it; a
  distractor named beside it (a person, a place) or a generic concept is linked beside images
  that look like anything. Computed from per-entity sums, so no entity's images are ever
  gathered in one place (:func:`partial_sums`, :func:`leave_one_out`).
* **The score** of a pair is ``similarity + coherence_weight * coherence``.
* **Calibrated threshold**: a scorer's similarities have its own scale (a bootstrapped scorer
  on 600 pairs puts its 99th percentile at 0.34, on 5,000 pairs at 0.84), so a fixed number
  cannot serve every scorer. The threshold is read off the scores themselves: the quantile
  ``null_quantile`` of the *null* scores, those of each image's candidates other than its
  best one (almost all wrong: a picture shows one subject). A kept pair must score above
  what a wrong candidate scores in that share of cases. Too few null scores to estimate it
  is an error, not a guess.
* **min_count**, lowered for small corpora (:func:`effective_min_count`): entities on fewer
  images are dropped, but never so many that they hold more than ``min_count_max_drop`` of
  the kept labels (at 500 pairs most entities are seen once or twice; dropping them would
  throw away most of the dataset).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pandas as pd


class FilterError(RuntimeError):
    """The filter cannot produce a trustworthy output; the message names the setting."""


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def centred(emb: np.ndarray, mean: np.ndarray) -> np.ndarray:
    return unit(emb.astype(np.float64) - mean)


def embedding_sums(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """(n, sum of embeddings) of each batch: the corpus mean is their total / count."""
    for pdf in batches:
        if len(pdf):
            x = np.stack(pdf["embedding"].to_numpy()).astype(np.float64)
            yield pd.DataFrame({"n": [len(x)], "s": [x.sum(0).tolist()]})


def partial_sums(mean: np.ndarray, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Per entity of each batch: (entity_id, n, sum of its images' centred unit embeddings)."""
    for pdf in batches:
        if not len(pdf):
            continue
        x = centred(np.stack(pdf["embedding"].to_numpy()), mean)
        ents, inv = np.unique(pdf["entity_id"].to_numpy(), return_inverse=True)
        sums = np.zeros((len(ents), x.shape[1]))
        np.add.at(sums, inv, x)
        yield pd.DataFrame(
            {"entity_id": ents, "n": np.bincount(inv), "s": [s.tolist() for s in sums]}
        )


def add_partials(pdf: pd.DataFrame) -> pd.DataFrame:
    """One entity's partial sums added up."""
    return pd.DataFrame(
        {
            "entity_id": [pdf["entity_id"].iloc[0]],
            "n": [int(pdf["n"].sum())],
            "s": [np.stack(pdf["s"].to_numpy()).sum(0).tolist()],
        }
    )


def leave_one_out(
    mean: np.ndarray, weight: float, batches: Iterator[pd.DataFrame]
) -> Iterator[pd.DataFrame]:
    """Each pair's coherence (against its entity's other images) and score; an entity seen on
    one image only has no evidence either way: coherence 0."""
    cols = ["shard", "key", "entity_id", "similarity"]
    for pdf in batches:
        if not len(pdf):
            continue
        x = centred(np.stack(pdf["embedding"].to_numpy()), mean)
        others = np.stack(pdf["s"].to_numpy()) - x
        coh = (x * unit(others)).sum(1)
        coh = np.where(pdf["n"].to_numpy() > 1, coh, 0.0)
        out = pdf[cols].copy()
        out["coherence"] = coh.astype(np.float32)
        out["score"] = (pdf["similarity"].to_numpy() + weight * coh).astype(np.float32)
        yield out


def require_null_scores(n_null: int, min_pairs: int) -> None:
    """Too few null scores cannot place the threshold: a :class:`FilterError` that says so."""
    if n_null < min_pairs:
        raise FilterError(
            f"cannot calibrate the filter: only {n_null} null scores (candidates other than an "
            f"image's best), {min_pairs} are needed (vocab.min_null_pairs) to read the threshold "
            "off the scores; give the build more pairs, or set an absolute threshold for a "
            "scorer of known scale (mofi vocab --threshold-mode absolute --threshold T)"
        )


def effective_min_count(counts: Mapping[str, int], min_count: int, max_drop: float) -> int:
    """The largest m <= ``min_count`` whose dropped entities hold at most ``max_drop`` of the
    kept labels (1 when even m = 2 would drop more)."""
    total = sum(counts.values())
    m = min_count
    while m > 1 and total and sum(n for n in counts.values() if n < m) > max_drop * total:
        m -= 1
    return m


def check_output(
    images_in: int, images_labelled: int, entities: int, min_kept_fraction: float, how: str
) -> None:
    """An empty vocabulary, or labels far below the input for no reason the data gives, is a
    failure naming the cause and the setting, never a quiet empty dataset."""
    if images_in == 0:
        raise FilterError("vocab received no scored image: check the score stage (`mofi status`)")
    if entities == 0 or images_labelled == 0:
        raise FilterError(
            f"the filter kept no entity ({how}) out of {images_in} scored images: the scorer and "
            "the threshold disagree; use the calibrated threshold (vocab --threshold-mode "
            "calibrated), lower vocab.threshold or vocab.min_count, or check the scorer"
        )
    if images_labelled < min_kept_fraction * images_in:
        raise FilterError(
            f"the filter kept {images_labelled} of {images_in} scored images "
            f"({images_labelled / images_in:.1%}, under vocab.min_kept_fraction = "
            f"{min_kept_fraction:.0%}; {how}): far below what the data explains; lower the "
            "threshold (or vocab.null_quantile), or check the scorer"
        )
