"""`mofi corpus`: the pictures indexed, linked and split, the evaluation and validation
folders, then every shard rendered (resumable, byte-identical for a seed)."""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from evaluation.layout import CLASSES_FILE, image_name
from training.core import config as cfg
from training.core import storage, tempfiles

from ...runtime import markers
from ...runtime.executor import ShardTask, StageResult, run_shards, stage_lease
from ...runtime.layout import sibling
from ...stages.kb.names import base_name
from ...stages.kb.stage import load_kb
from .. import stamps as stamps_mod
from .config import PICTURES_STAGE, STAGE, CorpusConfig
from .render import load_picture, render
from .stage import CorpusStage
from .truth import EntityIndex, link_stamp, split_pictures


def _pools(table: pa.Table) -> dict[str, list[tuple[str, str]]]:
    rows = table.select(["entity_id", "name", "type"]).to_pylist()
    places = [
        (r["entity_id"], base_name(r["name"]))
        for r in rows
        if r["type"] in ("city", "country", "place")
    ]
    people = [(r["entity_id"], base_name(r["name"])) for r in rows if r["type"] == "person"]
    return {"places": sorted(places), "people": sorted(people)}


def _write_eval(
    held: list[dict[str, Any]],
    stamps_dir: str,
    eval_dir: str,
    c: CorpusConfig,
    stream: int = 1_000_000,
    renders: int = 1,
) -> tuple[int, int]:
    """Held-out pictures as a GPR1200-named folder (``renders`` different renders of each)."""
    classes: dict[int, dict[str, Any]] = {}
    n = 0
    for k, rec in enumerate(held):
        pic = load_picture(os.path.join(stamps_dir, rec["image"]), c.cache_max_side)
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", rec["stamp_id"].rsplit("/", 1)[-1])
        for v in range(renders):
            rng = np.random.default_rng([c.seed, stream, k] + ([v] if renders > 1 else []))
            jpg = render(pic, rng, c)
            suffix = f"-{v}" if renders > 1 else ""
            storage.write_bytes(
                storage.join(eval_dir, image_name(rec["class_id"], f"{name}{suffix}")), jpg
            )
            classes.setdefault(rec["class_id"], {"category": rec["category"], "n": 0})["n"] += 1
            n += 1
    storage.write_json(
        storage.join(eval_dir, CLASSES_FILE), {str(k): v for k, v in sorted(classes.items())}
    )
    return n, len(classes)


def prepare(c: CorpusConfig, kb_uri: str) -> dict[str, Any]:
    """Pictures indexed, linked to KB entities and split; small enough to ship to workers."""
    stamps_dir = stamps_mod.ensure_stamps(c.stamps_dir or None)
    records, src_stats = stamps_mod.read_index(stamps_dir)
    table = load_kb(kb_uri)
    index = EntityIndex(table)
    categories = sorted({r["category"] for r in records})
    class_of = {cat: i for i, cat in enumerate(categories)}
    for r in records:
        eid, how = link_stamp(r, index)
        r["entity_id"], r["link"], r["class_id"] = eid, how, class_of[r["category"]]
        r["entity_surface"] = base_name(index.info[eid]["name"]) if eid else None
    train, held, val = split_pictures(records, c)
    if not train:
        raise cfg.ConfigError(f"no training pictures left in {stamps_dir} after the hold-out split")
    return {
        "stamps_dir": stamps_dir,
        "records": records,
        "train": train,
        "held": held,
        "val": val,
        "pools": _pools(table),
        "source_stats": src_stats,
        "categories": categories,
    }


def build_corpus(
    c: CorpusConfig,
    out_uri: str,
    kb_uri: str,
    eval_out: str | None = None,
    truth_out: str | None = None,
    progress: bool = True,
) -> StageResult:
    eval_dir = eval_out or sibling(out_uri, "eval")
    truth_dir = truth_out or sibling(out_uri, "truth")
    for root in (out_uri, eval_dir, truth_dir):
        storage.check_writable(root)
    prep = prepare(c, kb_uri)
    store = markers.MarkerStore(out_uri, STAGE)
    with stage_lease(store):
        return _build(c, out_uri, eval_dir, truth_dir, prep, store, progress)


def _build(c, out_uri, eval_dir, truth_dir, prep, store, progress) -> StageResult:
    storage.makedirs(out_uri)
    c.save(out_uri)
    # The pictures' own bookkeeping: how many pairs the source had and why some were skipped.
    src_store = markers.MarkerStore(out_uri, PICTURES_STAGE)
    src_store.write_plan([markers.WHOLE_STAGE])
    src_stats = prep["source_stats"]
    src_stats.extra = {
        "categories": len(prep["categories"]),
        "linked": sum(1 for r in prep["records"] if r["entity_id"]),
        "train_pictures": len(prep["train"]),
        "eval_pictures": len(prep["held"]),
        "val_pictures": len(prep["val"]),
    }
    src_store.mark_done(markers.WHOLE_STAGE, src_stats)
    link_rows = [
        {k: r.get(k) for k in ("stamp_id", "caption", "category", "class_id", "entity_id", "link")}
        | {"split": "eval" if r in prep["held"] else "val" if r in prep["val"] else "train"}
        for r in prep["records"]
    ]
    with storage.open_write(storage.join(truth_dir, "stamps.parquet")) as f:
        pq.write_table(pa.Table.from_pylist(link_rows), f)
    n_eval, n_classes = _write_eval(prep["held"], prep["stamps_dir"], eval_dir, c)
    val_dir = sibling(eval_dir, "val")
    n_val, _ = _write_eval(prep["val"], prep["stamps_dir"], val_dir, c, 2_000_000, c.val_renders)

    all_shards = list(range(c.num_shards))
    store.write_plan([markers.shard_id(s) for s in all_shards], {"pairs": c.pairs, "seed": c.seed})
    tempfiles.clean_temp(out_uri)
    stage = CorpusStage(c, out_uri, truth_dir, prep["train"], prep["pools"], prep["stamps_dir"])
    tasks = [
        ShardTask(markers.shard_id(s), min(c.shard_size, c.pairs - s * c.shard_size))
        for s in all_shards
    ]
    result = run_shards(stage, store, tasks, c.workers, progress=progress)
    result.extra.update(
        samples=c.pairs,
        eval_images=n_eval,
        eval_classes=n_classes,
        eval_dir=eval_dir,
        val_images=n_val,
        val_dir=val_dir,
        truth_dir=truth_dir,
        pictures=len(prep["records"]),
        linked_pictures=src_stats.extra["linked"],
    )
    return result
