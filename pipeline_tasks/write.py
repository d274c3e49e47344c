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
import multiprocessing as mp
import tarfile
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from training.core import config as cfg
from training.core import markers, storage

from . import raw as raw_mod
from .vocab import load_vocab

log = logging.getLogger(__name__)
STAGE = "write"
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


def _write_one(job: dict[str, Any]) -> dict[str, Any]:
    spec = job["spec"]
    out_id = job["out"]
    store = markers.MarkerStore(spec["i2e_uri"], STAGE)
    names = spec["names"]
    include_caption = spec["include_caption"]
    tar_uri = storage.join(spec["i2e_uri"], f"{out_id}.tar")
    rows = []
    try:
        with markers.ShardRun(store, out_id) as run:
            with (
                storage.open_write(tar_uri) as f,
                tarfile.open(fileobj=f, mode="w|", format=tarfile.GNU_FORMAT) as tar,
            ):
                for sid, first, last in job["parts"]:
                    labels = _read_labels(storage.join(spec["labels_uri"], f"{sid}.parquet"))
                    drop = markers.DropLogger(run.stats, log)
                    rank = 0
                    found = set()
                    for key, group in raw_mod.iter_tar_samples(spec["raw_tars"][sid], drop):
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
                        run.stats.n_in += 1
                        img = raw_mod.image_bytes(group)
                        ext = next((e for e in raw_mod.IMAGE_EXTS if e in group), None)
                        if img is None or ext is None:
                            drop("image_missing", f"{sid}/{base}")
                            continue
                        caption = ""
                        if include_caption and "txt" in group:
                            caption = group["txt"].decode("utf-8", errors="replace").strip()
                        meta = {
                            "key": base,
                            "entity_ids": lab["entity_ids"],
                            "class_indices": lab["class_indices"],
                            "names": [names.get(e, e) for e in lab["entity_ids"]],
                            "similarities": [round(float(s), 5) for s in lab["similarities"]],
                            "source_shard": sid,
                        }
                        if include_caption:
                            meta["caption"] = caption
                        raw_mod.add_tar_member(
                            tar, f"{base}.{ext if ext != 'jpeg' else 'jpg'}", img
                        )
                        raw_mod.add_tar_member(
                            tar,
                            f"{base}.json",
                            json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
                        )
                        rows.append(meta)
                        run.stats.n_out += 1
                    if rank < min(last, len(labels)) and first < len(labels):
                        run.stats.drop(
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
            pq_uri = storage.join(spec["i2e_uri"], f"{out_id}.parquet")
            with storage.open_write(pq_uri) as f:
                pq.write_table(side, f, compression="zstd")
            run.stats.bytes_out = storage.size(tar_uri) + storage.size(pq_uri)
        return {"out": out_id, "n": len(rows)}
    except Exception as exc:  # recorded in the failed marker; the other shards go on
        log.error("write shard %s failed: %s", out_id, exc)
        return {"out": out_id, "n": 0, "error": str(exc)}


def run_write(
    c: WriteConfig, raw_uri: str, run_uri: str, i2e_uri: str, progress: bool = True
) -> dict[str, Any]:
    from tqdm import tqdm

    shards, problems = raw_mod.discover(raw_uri)
    labels_dir = storage.join(run_uri, "labels")
    lstore = markers.MarkerStore(labels_dir, "labels")
    lplan = lstore.read_plan()
    if not lplan:
        raise FileNotFoundError(f"no labels under {labels_dir}: run `mofi vocab` first")
    not_done = [s for s in lplan["shards"] if not lstore.is_done(s)]
    if not_done:
        raise FileNotFoundError(
            f"labels are incomplete ({len(not_done)} shards pending): finish `mofi vocab` first"
        )
    vocab = load_vocab(storage.join(run_uri, "vocab"))
    n_classes = vocab.num_rows
    idx = vocab.column("class_index").to_pylist()
    if sorted(idx) != list(range(n_classes)):
        raise cfg.ConfigError(
            f"vocabulary at {run_uri}/vocab has class indices that are not 0..{n_classes - 1}"
        )
    names = dict(
        zip(vocab.column("entity_id").to_pylist(), vocab.column("name").to_pylist(), strict=True)
    )
    tars = {s.shard: s.tar for s in shards}
    counts = []
    for sid in sorted(lplan["shards"]):
        if sid not in tars:
            problems[sid] = "labels_without_raw_tar"
            continue
        with storage.open_read(storage.join(labels_dir, f"{sid}.parquet")) as f:
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
    store = markers.MarkerStore(i2e_uri, STAGE)
    store.write_plan(
        [o["out"] for o in outs], {"skipped": problems, "shard_size": c.shard_size, "run": run_uri}
    )
    storage.makedirs(i2e_uri)
    c.save(i2e_uri)
    spec = {
        "i2e_uri": i2e_uri,
        "labels_uri": labels_dir,
        "raw_tars": tars,
        "names": names,
        "include_caption": c.include_caption,
    }
    todo = [{"spec": spec, **o} for o in outs if not store.is_done(o["out"])]
    storage.clean_temp(i2e_uri)
    t0 = time.time()
    bar = tqdm(
        total=sum(sum(b - a for _, a, b in o["parts"]) for o in todo),
        unit="img",
        desc="write",
        disable=not progress,
        dynamic_ncols=True,
    )
    results = []
    if c.workers <= 1 or len(todo) <= 1:
        for job in todo:
            results.append(_write_one(job))
            bar.update(results[-1]["n"])
    else:
        with mp.get_context("spawn").Pool(min(c.workers, len(todo))) as pool:
            for res in pool.imap_unordered(_write_one, todo):
                results.append(res)
                bar.update(res["n"])
    bar.close()
    failed = {r["out"]: r["error"] for r in results if "error" in r}
    if failed:
        raise RuntimeError(
            f"write: {len(failed)} shard(s) failed: {dict(list(failed.items())[:3])}; see `mofi status {i2e_uri}`"
        )
    # manifest and vocabulary, after every shard is done
    sizes = {f"{o['out']}.tar": store.read_done(o["out"]).n_out for o in outs}
    storage.write_json(storage.join(i2e_uri, "sizes.json"), sizes)
    with storage.open_write(storage.join(i2e_uri, "vocab.parquet")) as f:
        pq.write_table(vocab, f)
    info = {
        "num_samples": sum(sizes.values()),
        "num_shards": len(sizes),
        "num_classes": n_classes,
        "run": run_uri,
        "raw": raw_uri,
        "skipped_input_shards": problems,
    }
    storage.write_json(storage.join(i2e_uri, "_info.json"), info)
    return {**info, "processed": len(todo), "seconds": round(time.time() - t0, 2), "out": i2e_uri}
