"""`mofi score`: the driver of the scoring stage.

1. plan: the raw shards ner finished (from ner's plan) become the stage's plan;
2. text phase, once per call in the driver: the distinct candidate entities of the pending
   shards are embedded through the cache (each entity text once per scorer, ever);
3. image phase: one :class:`ScoreStage` worker per device (``runtime.executor``), each
   streaming its share of the shards.

``only`` restricts a call to some shards (an Airflow mapped task scores one batch of the
plan); ``prepare`` runs steps 1-2 only, so the mapped tasks that follow find every entity in
the cache. :func:`ensure_scorer` is the one rule for the packaged scorer: bootstrap it when
its checkpoint is missing (``mofi score --bootstrap-if-missing`` and ``mofi build-i2e``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from training.core import config as cfg
from training.core import storage, tempfiles

from ...runtime.executor import ShardTask, StageResult, pending_tasks, run_shards, stage_lease
from ...runtime.layout import NER, SCORE, RunLayout
from ..ner.stage import planned_raw_shards, read_candidates
from .backends import backend_fingerprint, build_backend, checkpoint_uri
from .config import ScoreConfig
from .embeddings import embed_entities, write_entity_matrix
from .prompts import kb_text_rows
from .worker import ScoreStage, resolve_devices

log = logging.getLogger(__name__)


def needs_bootstrap(c: ScoreConfig, run_uri: str) -> bool:
    """The packaged scorer without an explicit checkpoint, whose default one is missing."""
    return (
        c.backend == "packaged" and not c.model and not storage.exists(checkpoint_uri(c, run_uri))
    )


def ensure_scorer(
    c: ScoreConfig, boot, raw_uri: str, kb_uri: str, run_uri: str, progress: bool = True
) -> dict[str, Any] | None:
    """Bootstrap the packaged scorer when :func:`needs_bootstrap`; its report, or None."""
    if not needs_bootstrap(c, run_uri):
        return None
    from .bootstrap import bootstrap_scorer

    return bootstrap_scorer(
        boot, raw_uri, checkpoint_uri(c, run_uri), run_uri, kb_uri, progress=progress
    )


def run_score(
    c: ScoreConfig,
    raw_uri: str,
    run_uri: str,
    kb_uri: str,
    progress: bool = True,
    reference_every: int = 0,
    only: Iterable[str] | None = None,
    prepare: bool = False,
) -> StageResult:
    """Scores every pending shard (or those in ``only``). ``reference_every`` > 0: after every
    that many batches each worker also times one forward pass on a preloaded batch, and the
    result reports the bare forward rate and end to end / bare (what fraction of the model's
    speed the data path delivers), both measured in the same minutes on the same machine."""
    if reference_every < 0:
        raise cfg.ConfigError(f"reference_every = {reference_every}: must be >= 0")
    storage.check_writable(run_uri)
    layout = RunLayout(run_uri)
    with stage_lease(layout.store(SCORE), only):
        return _run_score(c, raw_uri, layout, kb_uri, progress, reference_every, only, prepare)


def _run_score(c, raw_uri, layout, kb_uri, progress, reference_every, only, prepare):
    run_uri = layout.root
    shards, problems = planned_raw_shards(layout, raw_uri)
    ner_store, store = layout.store(NER), layout.store(SCORE)
    out = layout.stage_dir(SCORE)
    ner_done = {s.shard: ner_store.is_done(s.shard) for s in shards}
    ready = [s for s in shards if ner_done[s.shard]]
    not_ready = {s.shard: "ner_not_done" for s in shards if not ner_done[s.shard]}
    if not ready:
        raise FileNotFoundError(
            f"no finished ner shards under {layout.stage_dir(NER)}: run `mofi ner` first"
        )
    wanted = set(only) if only is not None else None
    if wanted is not None:
        unknown = sorted(wanted - {s.shard for s in ready})
        if unknown:
            raise cfg.ConfigError(f"score: shards {unknown[:5]} are not in the plan of {out}")
    store.write_plan(
        [s.shard for s in ready],
        {"skipped": {**problems, **not_ready}, "backend": c.backend, "model": c.model},
    )
    c.save(out)
    result = StageResult(
        stage=SCORE, out=out, shards=len(ready), skipped_shards={**problems, **not_ready}
    )
    tasks = [
        ShardTask(s.shard, 1, {"tar": s.tar, "mentions": layout.output(NER, s.shard)})
        for s in ready
    ]
    todo = pending_tasks(store, [t for t in tasks if wanted is None or t.shard in wanted], result)
    if not todo:
        result.extra.update(entities=0, entities_embedded=0, images=0)
        return result
    # 1. every distinct candidate entity of the pending shards, embedded once
    t0 = time.time()
    devices = resolve_devices(c.devices)
    order, mat, n_new = _embed_candidates(c, layout, kb_uri, todo, devices[0])
    result.extra.update(
        entities=len(order), entities_embedded=n_new, text_seconds=round(time.time() - t0, 2)
    )
    if prepare:
        result.extra["images"] = 0
        return result
    # 2. images, one worker per device; the matrix reaches them as a local file of this call
    work = layout.local_work_dir()
    digest = hashlib.sha1("\n".join(order).encode()).hexdigest()[:12]
    matrix = os.path.join(work, f"score-entities-{digest}-{os.getpid()}.parquet")
    write_entity_matrix(matrix, order, mat)
    stage = ScoreStage(c, run_uri, matrix, devices, reference_every)
    tempfiles.clean_temp(out)
    t1 = time.time()
    try:
        run_shards(
            stage,
            store,
            tasks,
            workers=len(devices),
            only=[t.shard for t in todo],
            progress=progress,
            result=result,
        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(matrix)
    t_img = time.time() - t1
    result.processed = len(todo)
    _startup(result, t1)
    result.extra.update(
        image_seconds=round(t_img, 2),
        images_per_s=round(result.extra.get("images", 0) / t_img, 1) if t_img else None,
    )
    return result


def _embed_candidates(c: ScoreConfig, layout: RunLayout, kb_uri: str, todo, device: str):
    """(entity ids, their text embeddings, how many were embedded now): every distinct
    candidate of the pending shards, through the cache (each text once per scorer, ever)."""
    eids: set[str] = set()
    for t in todo:
        for v in read_candidates(t.data["mentions"]).values():
            eids.update(v)
    kb_rows = kb_text_rows(kb_uri)
    unknown = sorted(e for e in eids if e not in kb_rows)
    if unknown:
        raise cfg.ConfigError(
            f"{len(unknown)} candidate entities are not in the KB {kb_uri} (e.g. {unknown[:3]}): ner ran with another KB"
        )
    order = sorted(eids)

    def text_backend():
        from training.core.device import pick_device

        return build_backend(c, layout.root, pick_device(device))

    mat, n_new = embed_entities(
        text_backend,
        backend_fingerprint(c, layout.root),
        kb_rows,
        order,
        c,
        c.cache_uri or layout.embedding_cache,
    )
    return order, mat, n_new


def _startup(result: StageResult, t_launch: float) -> None:
    """The workers' start-up, from their absolute times: launch -> worker running (spawn,
    imports) -> model loaded -> first scored batch."""
    ts = {k: result.extra.pop(k, None) for k in ("t_setup", "t_ready", "t_first_scored")}
    if ts["t_setup"]:
        result.extra["startup_s"] = {
            "spawn_and_imports": round(ts["t_setup"] - t_launch, 2),
            "model_and_entities": round(ts["t_ready"] - ts["t_setup"], 2),
            "to_first_scored_batch": round(ts["t_first_scored"] - t_launch, 2)
            if ts["t_first_scored"]
            else None,
        }
