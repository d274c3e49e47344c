"""`mofi build-i2e`: every I2E stage in order, without Airflow, resumable.

The stages are ``runtime.layout.BUILD_STAGES``, in that order (the build DAG chains its
tasks by the same list): ner -> score (the packaged scorer bootstrapped first, when
``score.stage.needs_bootstrap``) -> hygiene -> vocab -> write. Each stage skips the shards whose done
marker matches their files, so a killed build re-run with the same arguments picks up where
it stopped and produces the same bytes. A stage that leaves failed shards stops the build
(``StageFailed``); its markers say which and why. With ``reuse_from`` (an earlier build) the
per-shard stages copy what did not change instead of computing it (``runtime.reuse``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from training.core import storage

from .recipes import PipelineConfig
from .runtime.layout import BUILD_STAGES, HYGIENE, NER, SCORE, VOCAB, WRITE
from .stages.hygiene.stage import run_hygiene
from .stages.ner.stage import run_ner
from .stages.score.stage import ensure_scorer, needs_bootstrap, run_score
from .stages.vocab.stage import run_vocab
from .stages.write.stage import run_write

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BuildInputs:
    config: PipelineConfig
    raw: str
    kb: str
    run: str
    i2e: str
    progress: bool
    reuse_from: str | None = None  # an earlier build (runtime.reuse)
    retrain_scorer: bool = False


def _ner(b: BuildInputs, step) -> None:
    step(NER, run_ner, b.config.ner, b.raw, b.kb, b.run, b.progress, b.reuse_from)


def _score(b: BuildInputs, step) -> None:
    c = b.config
    if needs_bootstrap(c.score, b.run) or b.retrain_scorer:
        boot = (c.score, c.bootstrap, b.raw, b.kb, b.run, b.progress)
        step("scorer-bootstrap", ensure_scorer, *boot, b.reuse_from, b.retrain_scorer)
    step(SCORE, run_score, c.score, b.raw, b.run, b.kb, b.progress, reuse_from=b.reuse_from)


def _hygiene(b: BuildInputs, step) -> None:
    step(HYGIENE, run_hygiene, b.config.hygiene, b.config.score, b.run, progress=b.progress)


def _vocab(b: BuildInputs, step) -> None:
    step(VOCAB, run_vocab, b.config.vocab, b.run, b.kb, progress=b.progress)


def _write(b: BuildInputs, step) -> None:
    step(WRITE, run_write, b.config.write, b.raw, b.run, b.i2e, progress=b.progress)


RUNNERS: dict[str, Callable[[BuildInputs, Callable], None]] = {
    NER: _ner,
    SCORE: _score,
    HYGIENE: _hygiene,
    VOCAB: _vocab,
    WRITE: _write,
}


def build_i2e(
    p: PipelineConfig,
    raw_uri: str,
    kb_uri: str,
    run_uri: str,
    i2e_uri: str,
    progress: bool = True,
    reuse_from: str | None = None,
    retrain_scorer: bool = False,
) -> dict[str, Any]:
    """Every stage in order. ``reuse_from``: an earlier build (a version root, its i2e or
    i2e_run, or a run root) whose per-shard outputs are copied where nothing they depend on
    changed, and whose scorer is kept unless ``retrain_scorer`` (``runtime.reuse``)."""
    out: dict[str, Any] = {}
    for root in (run_uri, i2e_uri):  # before any compute: a bad output is found at once
        storage.check_writable(root)

    def step(name: str, fn, *args, **kw):
        t0 = time.time()
        if progress:
            print(f"== {name}", flush=True)
        res = fn(*args, **kw)
        if res is None:
            return None
        if hasattr(res, "raise_if_failed"):
            res.raise_if_failed()
            res = res.to_dict()
        res["stage_seconds"] = round(time.time() - t0, 1)
        out[name] = res
        return res

    inputs = BuildInputs(p, raw_uri, kb_uri, run_uri, i2e_uri, progress, reuse_from, retrain_scorer)
    for name in BUILD_STAGES:
        RUNNERS[name](inputs, step)
    return out
