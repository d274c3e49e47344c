"""`mofi build-i2e`: every I2E stage in order, without Airflow, resumable.

ner -> (scorer-bootstrap, for the packaged scorer when its checkpoint is missing) -> score ->
vocab -> write. Each stage skips the shards whose done marker exists, so a killed build
re-run with the same arguments picks up where it stopped and produces the same bytes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from training.core import storage

from . import bootstrap, ner, scoring, vocab, write
from .recipes import PipelineConfig

log = logging.getLogger(__name__)


def build_i2e(
    p: PipelineConfig, raw_uri: str, kb_uri: str, run_uri: str, i2e_uri: str, progress: bool = True
) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def step(name: str, fn, *args, **kw):
        t0 = time.time()
        if progress:
            print(f"== {name}", flush=True)
        res = fn(*args, **kw)
        res = res if isinstance(res, dict) else {}
        res["stage_seconds"] = round(time.time() - t0, 1)
        out[name] = res
        return res

    res = step("ner", ner.run_ner, p.ner, raw_uri, kb_uri, run_uri, progress=progress)
    if res["failed"]:
        raise RuntimeError(
            f"ner failed on {len(res['failed'])} shard(s): {dict(list(res['failed'].items())[:3])}"
        )
    sc = p.score
    if sc.backend == "packaged" and not sc.model:
        ckpt = scoring.default_packaged_checkpoint(run_uri)
        if not storage.exists(ckpt):
            step(
                "scorer-bootstrap",
                bootstrap.bootstrap_scorer,
                p.bootstrap,
                raw_uri,
                ckpt,
                run_uri,
                kb_uri,
                progress=progress,
            )
    res = step("score", scoring.run_score, sc, raw_uri, run_uri, kb_uri, progress=progress)
    if res.get("failed"):
        raise RuntimeError(
            f"score failed on {len(res['failed'])} shard(s): {dict(list(res['failed'].items())[:3])}"
        )
    step("vocab", vocab.run_vocab, p.vocab, run_uri, kb_uri, progress=progress)
    step("write", write.run_write, p.write, raw_uri, run_uri, i2e_uri, progress=progress)
    return out
