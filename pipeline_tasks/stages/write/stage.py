"""`mofi write`: I2E shards as WebDataset tars with Parquet sidecars and a sizes.json manifest.

Every labelled image keeps its original bytes (no re-encoding) and gets ``KEY.json``: entity
ids, class indices, entity names, similarities and the caption. Images left with no entity
were already dropped (and counted) by the vocab stage's labels.

Resharding is deterministic: labelled samples are numbered in (input shard, tar order), and
output shard ``j`` holds numbers ``[j * shard_size, (j + 1) * shard_size)``, so each output
shard can be written, retried or re-run alone and always gets the same bytes.
``shard_size = 0`` keeps the input sharding. The I2E root also receives ``vocab.parquet``
and ``_info.json``, so training needs nothing but the I2E URI.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tarfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from training.core import config as cfg
from training.core import storage, tempfiles
from training.core.i2e import I2ELayout

from ...runtime import markers
from ...runtime import raw as raw_mod
from ...runtime.executor import ShardStage, ShardTask, StageResult, run_shards, stage_lease
from ...runtime.layout import HYGIENE, LABELS, WRITE, RunLayout
from ...runtime.markers import completed_shards
from ..ner.stage import planned_raw_shards
from ..vocab.filtering import FilterError
from ..vocab.stage import load_vocab

log = logging.getLogger(__name__)
STAGE = WRITE
SIDECAR_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("entity_ids", pa.list_(pa.string())),
        ("class_indices", pa.list_(pa.int64())),
        ("similarities", pa.list_(pa.float32())),
        ("caption", pa.string()),
        ("source_shard", pa.string()),
    ]
)


@dataclasses.dataclass
class WriteConfig(cfg.StageConfig):
    """How I2E shards are cut and written."""

    shard_size: int = cfg.field(0, "samples per output shard (0: one output shard per input shard)")
    workers: int = cfg.field(2, "worker processes writing output shards")
    include_caption: bool = cfg.field(True, "store the alt-text in KEY.json and the sidecar")

    def validate(self) -> None:
        self._check(self.shard_size >= 0, "shard_size", "must be >= 0")
        self._check(self.workers >= 1, "workers", "must be >= 1")


def _read_labels(uri: str) -> dict[str, dict[str, Any]]:
    with storage.open_read(uri) as f:
        t = pq.read_table(f)
    return {r["key"]: r for r in t.to_pylist()}


def plan_output(counts: list[tuple[str, int]], shard_size: int) -> list[dict[str, Any]]:
    """Output shards as lists of (input shard, first, last) ranges over labelled-sample ranks."""
    if shard_size == 0:
        return [{"out": sid, "parts": [(sid, 0, n)]} for sid, n in counts if n > 0]
    total = sum(n for _, n in counts)
    outs = []
    for j in range((total + shard_size - 1) // shard_size):
        lo, hi = j * shard_size, min(total, (j + 1) * shard_size)
        parts, start = [], 0
        for sid, n in counts:
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                parts.append((sid, a - start, b - start))
            start += n
        outs.append({"out": markers.shard_id(j), "parts": parts})
    return outs


@dataclasses.dataclass
class WriteStage(ShardStage):
    """Writes output shards: each one a tar of (image, labels) pairs and its sidecar."""

    run_uri: str
    i2e_uri: str
    raw_tars: dict[str, str]
    names: dict[str, str]
    include_caption: bool

    name = "write"
    unit = "img"

    def process(self, task: ShardTask, stats: markers.ShardStats) -> None:
        out_id = task.shard
        run, i2e = RunLayout(self.run_uri), I2ELayout(self.i2e_uri)
        tar_uri = i2e.tar(out_id)
        rows = []
        drop = markers.DropLogger(stats, log)
        with (
            storage.open_write(tar_uri) as f,
            tarfile.open(fileobj=f, mode="w|", format=tarfile.GNU_FORMAT) as tar,
        ):
            for sid, first, last in task.data["parts"]:
                labels = _read_labels(run.output(LABELS, sid))
                rank = 0
                found = set()
                for key, group in raw_mod.iter_tar_samples(self.raw_tars[sid], drop):
                    base = key.rsplit("/", 1)[-1]
                    lab = labels.get(base)
                    if lab is None or base in found:
                        continue
                    found.add(base)
                    r, rank = rank, rank + 1
                    if r < first:
                        continue
                    if r >= last:
                        break
                    stats.n_in += 1
                    img = raw_mod.image_bytes(group)
                    ext = next((e for e in raw_mod.IMAGE_EXTS if e in group), None)
                    if img is None or ext is None:
                        drop("image_missing", f"{sid}/{base}")
                        continue
                    caption = ""
                    if self.include_caption and "txt" in group:
                        caption = group["txt"].decode("utf-8", errors="replace").strip()
                    meta = {
                        "key": base,
                        "entity_ids": lab["entity_ids"],
                        "class_indices": lab["class_indices"],
                        "names": [self.names.get(e, e) for e in lab["entity_ids"]],
                        "similarities": [round(float(s), 5) for s in lab["similarities"]],
                        "source_shard": sid,
                    }
                    if self.include_caption:
                        meta["caption"] = caption
                    raw_mod.add_tar_member(tar, f"{base}.{ext if ext != 'jpeg' else 'jpg'}", img)
                    raw_mod.add_tar_member(
                        tar,
                        f"{base}.json",
                        json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
                    )
                    rows.append(meta)
                    stats.n_out += 1
                if rank < min(last, len(labels)) and first < len(labels):
                    stats.drop(
                        "labelled_key_missing_in_tar", min(last, len(labels)) - max(rank, first)
                    )
        side = pa.Table.from_pylist(
            [
                {
                    **{
                        k: m.get(k)
                        for k in (
                            "key",
                            "entity_ids",
                            "class_indices",
                            "similarities",
                            "source_shard",
                        )
                    },
                    "caption": m.get("caption", ""),
                }
                for m in rows
            ],
            schema=SIDECAR_SCHEMA,
        )
        pq_uri = i2e.sidecar(out_id)
        with storage.open_write(pq_uri) as f:
            pq.write_table(side, f, compression="zstd")
        markers.record_outputs(stats, self.i2e_uri, [tar_uri, pq_uri])


def run_write(
    c: WriteConfig,
    raw_uri: str,
    run_uri: str,
    i2e_uri: str,
    progress: bool = True,
    only: list[str] | None = None,
) -> StageResult:
    """Writes the pending output shards (or those in ``only``); once every shard is done,
    publishes the manifest (``sizes.json``), the vocabulary and ``_info.json``."""
    storage.check_writable(i2e_uri)
    layout = RunLayout(run_uri)
    with stage_lease(markers.MarkerStore(i2e_uri, STAGE), only):
        return _run_write(c, raw_uri, layout, i2e_uri, progress, only)


def _run_write(c, raw_uri, layout, i2e_uri, progress, only) -> StageResult:
    run_uri = layout.root
    i2e = I2ELayout(i2e_uri)
    shards, problems = planned_raw_shards(layout, raw_uri)
    labelled = completed_shards(layout.store(LABELS), "vocab")
    vocab = load_vocab(layout.vocab_file)
    n_classes = vocab.num_rows
    idx = vocab.column("class_index").to_pylist()
    if sorted(idx) != list(range(n_classes)):
        raise cfg.ConfigError(
            f"vocabulary at {layout.vocab_file} has class indices that are not 0..{n_classes - 1}"
        )
    names = dict(
        zip(vocab.column("entity_id").to_pylist(), vocab.column("name").to_pylist(), strict=True)
    )
    tars = {s.shard: s.tar for s in shards}
    counts = []
    for sid in sorted(labelled):
        if sid not in tars:
            problems[sid] = "labels_without_raw_tar"
            continue
        with storage.open_read(layout.output(LABELS, sid)) as f:
            t = pq.read_table(f, columns=["key", "class_indices"])
        bad = [
            ci
            for lst in t.column("class_indices").to_pylist()
            for ci in lst
            if not 0 <= ci < n_classes
        ]
        if bad:
            raise cfg.ConfigError(
                f"labels of shard {sid} use class index {bad[0]} outside the vocabulary (0..{n_classes - 1}): vocab and labels disagree; re-run `mofi vocab`"
            )
        counts.append((sid, t.num_rows))
    outs = plan_output(counts, c.shard_size)
    if not outs:
        raise FilterError(
            f"no labelled image to write under {layout.stage_dir(LABELS)}: the vocab stage kept "
            "nothing; see `mofi status` and the vocab settings (mofi config doc NAME)"
        )
    store = markers.MarkerStore(i2e_uri, STAGE)
    store.write_plan(
        [o["out"] for o in outs], {"skipped": problems, "shard_size": c.shard_size, "run": run_uri}
    )
    storage.makedirs(i2e_uri)
    c.save(i2e_uri)
    stage = WriteStage(run_uri, i2e_uri, tars, names, c.include_caption)
    tasks = [
        ShardTask(o["out"], sum(b - a for _, a, b in o["parts"]), {"parts": o["parts"]})
        for o in outs
    ]
    tempfiles.clean_temp(i2e_uri)
    result = StageResult(stage=STAGE, out=i2e_uri, shards=len(outs), skipped_shards=problems)
    run_shards(stage, store, tasks, c.workers, only=only, progress=progress, result=result)
    if result.failed or not all(store.is_done(o["out"]) for o in outs):
        return result  # the manifest waits for every shard
    # manifest and vocabulary, after every shard is done
    sizes = {storage.basename(i2e.tar(o["out"])): store.read_done(o["out"]).n_out for o in outs}
    storage.write_json(i2e.sizes, sizes)
    with storage.open_write(i2e.vocab) as f:
        pq.write_table(vocab, f)
    info = {
        "num_samples": sum(sizes.values()),
        "num_shards": len(sizes),
        "num_classes": n_classes,
        "run": run_uri,
        "raw": raw_uri,
        "skipped_input_shards": problems,
        # what the hygiene stage removed before vocab, and with which settings (each posted
        # evaluation result carries it through the checkpoint)
        "hygiene": hygiene_record(layout),
    }
    storage.write_json(i2e.info, info)
    result.extra.update(info)
    return result


def hygiene_record(layout: RunLayout) -> dict | None:
    """The run's hygiene settings and drops by reason (None: built without the stage)."""
    st = layout.store(HYGIENE).read_done(markers.WHOLE_STAGE)
    if st is None:
        return None
    extra = st.extra or {}
    return {"settings": extra.get("settings"), "drops": dict(st.drops), "images_in": st.n_in}
