"""Scoring: CLIP-style similarity between each image and its candidate entities.

One job per module:

* ``config``: :class:`ScoreConfig`;
* ``backends``: the scorers behind one interface (open_clip, packaged, mofi);
* ``embeddings``: entity text embeddings, once per entity and scorer, cached on storage;
* ``images``: the image stream (raw tars -> uint8 batches with candidates);
* ``worker``: the per-device worker (a ``runtime`` shard stage);
* ``stage``: the driver (`mofi score`) and the one scorer-bootstrap rule.
"""

from .backends import (
    ScorerBackend,
    bare_forward_rate,
    build_backend,
    checkpoint_uri,
    reference_batch,
)
from .config import BACKENDS, ScoreConfig
from .stage import ensure_scorer, needs_bootstrap, run_score
from .worker import SCORE_SCHEMA, decode_plan, resolve_devices

__all__ = [
    "BACKENDS",
    "SCORE_SCHEMA",
    "ScoreConfig",
    "ScorerBackend",
    "bare_forward_rate",
    "build_backend",
    "checkpoint_uri",
    "decode_plan",
    "ensure_scorer",
    "needs_bootstrap",
    "reference_batch",
    "resolve_devices",
    "run_score",
]
