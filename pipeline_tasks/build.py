"""`mofi build-i2e`: every I2E stage in order, without Airflow, resumable.

ner -> (scorer-bootstrap, when ``scoring.needs_bootstrap``) -> score -> vocab -> write. Each
stage skips the shards whose done marker exists, so a killed build re-run with the same
arguments picks up where it stopped and produces the same bytes. A stage that leaves failed
shards stops the build (``StageFailed``); its markers say which and why.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from training.core import storage

from . import ner, scoring, vocab, write
from .recipes import PipelineConfig

log = logging.getLogger(__name__)


def build_i2e(
    p: PipelineConfig, raw_uri: str, kb_uri: str, run_uri: str, i2e_uri: str, progress: bool = True
) -> dict[str, Any]:
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

    step("ner", ner.run_ner, p.ner, raw_uri, kb_uri, run_uri, progress=progress)
    if scoring.needs_bootstrap(p.score, run_uri):
        step(
            "scorer-bootstrap",
            scoring.ensure_scorer,
            p.score,
            p.bootstrap,
            raw_uri,
            kb_uri,
            run_uri,
            progress=progress,
        )
    step("score", scoring.run_score, p.score, raw_uri, run_uri, kb_uri, progress=progress)
    step("vocab", vocab.run_vocab, p.vocab, run_uri, kb_uri, progress=progress)
    step("write", write.run_write, p.write, raw_uri, run_uri, i2e_uri, progress=progress)
    return out
