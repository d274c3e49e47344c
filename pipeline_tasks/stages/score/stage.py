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

from ...runtime import reuse
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
    c: ScoreConfig,
    boot,
    raw_uri: str,
    kb_uri: str,
    run_uri: str,
    progress: bool = True,
    reuse_from: str | None = None,
    retrain: bool = False,
) -> dict[str, Any] | None:
    """The packaged scorer of this run: when :func:`needs_bootstrap`, copied from the earlier
    build ``reuse_from`` (so a rebuild keeps the scorer, and labels of unchanged images stay
    put), else, or with ``retrain``, bootstrapped. Its report, or None when nothing was done.
    ``retrain`` also replaces a scorer this run copied earlier (``RUN/scorer/provenance.json``
    says where a copied one came from)."""
    ckpt = checkpoint_uri(c, run_uri)
    provenance = storage.join(RunLayout(run_uri).root, "scorer", "provenance.json")
    copied = ckpt and storage.exists(provenance) and storage.exists(ckpt)
    if not needs_bootstrap(c, run_uri) and not (retrain and copied and _is_default(c)):
        return None
    source = reuse.resolve_source(reuse_from)
    if source is not None and not retrain:
        src = checkpoint_uri(c, source.run.root)
        if storage.exists(src):
            how = storage.copy(src, ckpt)
            doc = {"reused_from": source.label, "checkpoint": src, "copy": how}
            doc["fingerprint"] = storage.fingerprint(ckpt)
            storage.write_json(provenance, doc)
            log.info("scorer reused from %s (%s)", source.label, how)
            return doc
        log.warning("no scorer at %s to reuse: bootstrapping one", src)
    from .bootstrap import bootstrap_scorer

    storage.delete(provenance)
    return bootstrap_scorer(boot, raw_uri, ckpt, run_uri, kb_uri, progress=progress)


def _is_default(c: ScoreConfig) -> bool:
    """The packaged scorer at its default place in the run (the one a rebuild may copy)."""
    return c.backend == "packaged" and not c.model


def run_score(
    c: ScoreConfig,
    raw_uri: str,
    run_uri: str,
    kb_uri: str,
    progress: bool = True,
    reference_every: int = 0,
    only: Iterable[str] | None = None,
    prepare: bool = False,
    reuse_from: str | None = None,
) -> StageResult:
    """Scores every pending shard (or those in ``only``). ``reference_every`` > 0: after every
    that many batches each worker also times one forward pass on a preloaded batch, and the
    result reports the bare forward rate and end to end / bare (what fraction of the model's
    speed the data path delivers), both measured in the same minutes on the same machine.
    ``reuse_from``: an earlier build whose scores of a shard are copied when the shard's
    reuse key (raw tar, ner output, KB, config, scorer, code) is the same (``runtime.reuse``)."""
    if reference_every < 0:
        raise cfg.ConfigError(f"reference_every = {reference_every}: must be >= 0")
    source = reuse.resolve_source(reuse_from)
    storage.check_writable(run_uri)
    layout = RunLayout(run_uri)
    with stage_lease(layout.store(SCORE), only):
        return _run_score(
            c, raw_uri, layout, kb_uri, progress, reference_every, only, prepare, source
        )


def _run_score(c, raw_uri, layout, kb_uri, progress, reference_every, only, prepare, source):
    run_uri = layout.root
    shards, problems = planned_raw_shards(layout, raw_uri)
    ner_store, store = layout.store(NER), layout.store(SCORE)
    out = layout.stage_dir(SCORE)
    ner_done = {s.shard: ner_store.read_done(s.shard) for s in shards}
    ready = [s for s in shards if ner_done[s.shard] is not None]
    not_ready = {s.shard: "ner_not_done" for s in shards if ner_done[s.shard] is None}
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
    fp = backend_fingerprint(c, layout.root)  # reads the whole checkpoint: once per call
    store.keys = _keys(c, layout, kb_uri, ready, {s.shard: ner_done[s.shard] for s in ready}, fp)
    todo = pending_tasks(store, [t for t in tasks if wanted is None or t.shard in wanted], result)
    if todo and source is not None:
        todo = reuse.adopt_tasks(store, todo, source, result)
        if todo:
            _copy_embedding_cache(c, layout, source, fp)
    if not todo:
        result.extra.update(entities=0, entities_embedded=0, images=0)
        return result
    # 1. every distinct candidate entity of the pending shards, embedded once
    t0 = time.time()
    devices = resolve_devices(c.devices)
    order, mat, n_new = _embed_candidates(c, layout, kb_uri, todo, devices[0], fp)
    result.extra.update(
        entities=len(order), entities_embedded=n_new, text_seconds=round(time.time() - t0, 2)
    )
    if prepare:
        result.extra["images"] = 0
        return result
    # 2. images, one worker per device; the matrix reaches them as a local file of this call
    work = layout.local_work_dir()
    digest = hashlib.sha1("\n".join(order).encode()).hexdigest()[:12]
    matrix = os.path.join(work, f"score-entities-{digest}-{os.getpid()}")
    matrix_files = write_entity_matrix(matrix, order, mat)
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
        for f in matrix_files:
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)
    t_img = time.time() - t1
    result.processed = len(todo)
    _startup(result, t1)
    result.extra.update(
        image_seconds=round(t_img, 2),
        images_per_s=round(result.extra.get("images", 0) / t_img, 1) if t_img else None,
    )
    return result


def _keys(c: ScoreConfig, layout: RunLayout, kb_uri: str, ready, ner_stats, fp) -> dict[str, dict]:
    """shard -> reuse key: what its scores depend on (``runtime.reuse``)."""
    from ..kb.stage import kb_version

    plan_inputs = layout.store(NER).read_plan().get("inputs", {})
    missing = [s.tar for s in ready if not plan_inputs.get(s.shard, {}).get("tar_id")]
    ids = reuse.content_ids(missing)  # a plan from before content ids were recorded
    parts = {
        "kb": kb_version(kb_uri),
        "config": c.output_fingerprint(),
        "scorer": fp,
    }
    keys = {}
    for s in ready:
        tar_id = plan_inputs.get(s.shard, {}).get("tar_id") or ids[s.tar]
        mentions = ner_stats[s.shard].outputs.get(f"{s.shard}.parquet", {}).get("sha256", "")
        keys[s.shard] = reuse.make_key(SCORE, {"raw_tar": tar_id, "mentions": mentions, **parts})
    return keys


def _copy_embedding_cache(c: ScoreConfig, layout: RunLayout, source, fp: str) -> None:
    """The source's entity text embeddings of this scorer, copied into this run's cache (its
    files are content-addressed: a rebuild embeds only entities no earlier build had)."""
    if c.cache_uri:  # a shared cache: nothing to copy
        return
    src = storage.join(RunLayout(source.run.root).embedding_cache, fp)
    dst = storage.join(layout.embedding_cache, fp)
    have = {storage.basename(u) for u in storage.list_files(dst, suffix=".parquet")}
    for uri in storage.list_files(src, suffix=".parquet"):
        if storage.basename(uri) not in have:
            storage.copy(uri, storage.join(dst, storage.basename(uri)))


def _embed_candidates(c: ScoreConfig, layout: RunLayout, kb_uri: str, todo, device: str, fp):
    """(entity ids, their text embeddings, how many were embedded now): every distinct
    candidate of the pending shards, through the cache (each text once per scorer, ever)."""
    eids: set[str] = set()
    for t in todo:
        for v in read_candidates(t.data["mentions"]).values():
            eids.update(v)
    kb_rows = kb_text_rows(kb_uri, eids)
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
        fp,
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
