"""One corpus shard: its tar and Parquet (img2dataset's layout) and its truth."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from training.core import storage

from ...runtime import markers
from ...runtime.executor import ShardStage, ShardTask
from ...runtime.raw import add_tar_member
from .alt_text import make_alt_text, mention_of
from .config import RAW_SCHEMA, TRUTH_SCHEMA, CorpusConfig
from .render import load_picture, render


def sample_key(shard: int, i: int) -> str:
    return f"{shard:05d}{i:04d}" if i < 10_000 else f"{shard:05d}{i:06d}"


@dataclasses.dataclass
class CorpusStage(ShardStage):
    """Renders corpus shards; each worker keeps the pictures it used in memory."""

    config: CorpusConfig
    out: str
    truth_dir: str
    train: list[dict[str, Any]]
    pools: dict[str, list[tuple[str, str]]]
    stamps_dir: str

    name = "corpus"
    unit = "pair"

    def setup(self, worker: int, workers: int) -> None:
        self.cache: dict[str, Any] = {}

    def _picture(self, rec: dict[str, Any]):
        pic = self.cache.get(rec["stamp_id"])
        if pic is None:
            pic = load_picture(
                os.path.join(self.stamps_dir, rec["image"]), self.config.cache_max_side
            )
            self.cache[rec["stamp_id"]] = pic
        return pic

    def process(self, task: ShardTask, stats: markers.ShardStats) -> None:
        from PIL import Image

        c, out, train = self.config, self.out, self.train
        shard = int(task.shard)
        sid = task.shard
        n = min(c.shard_size, c.pairs - shard * c.shard_size)
        rows, truth = [], []
        tar_uri = storage.join(out, f"{sid}.tar")
        with (
            storage.open_write(tar_uri) as f,
            tarfile.open(fileobj=f, mode="w|", format=tarfile.GNU_FORMAT) as tar,
        ):
            for i in range(n):
                rng = np.random.default_rng([c.seed, shard, i])
                stats.n_in += 1
                rec = train[int(rng.integers(0, len(train)))]
                key = sample_key(shard, i)
                jpg = render(self._picture(rec), rng, c)
                eid = rec.get("entity_id")
                mention, misspelled = mention_of(rec, rng, c)
                text, distractors, mentioned = make_alt_text(mention, rng, self.pools, c, eid)
                with Image.open(io.BytesIO(jpg)) as im:
                    w, h = im.size
                digest = hashlib.sha256(jpg).hexdigest()
                url = f"https://img.stock-demo.test/{digest[:2]}/{digest[:16]}.jpg"
                meta = {
                    "key": key,
                    "caption": text,
                    "url": url,
                    "width": w,
                    "height": h,
                    "original_width": w,
                    "original_height": h,
                    "status": "success",
                    "error_message": None,
                    "sha256": digest,
                }
                add_tar_member(tar, f"{key}.jpg", jpg)
                add_tar_member(tar, f"{key}.txt", text.encode("utf-8"))
                add_tar_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                rows.append(meta)
                truth.append(
                    {
                        "key": key,
                        "stamp_id": rec["stamp_id"],
                        "category": rec["category"],
                        "class_id": rec["class_id"],
                        "true_entity_ids": [eid] if eid else [],
                        "distractor_entity_ids": distractors,
                        "mention": mention if mentioned else "",
                        "mentioned": mentioned,
                        "misspelled": misspelled and mentioned,
                    }
                )
                stats.n_out += 1
        pq_uri = storage.join(out, f"{sid}.parquet")
        with storage.open_write(pq_uri) as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), f)
        truth_uri = storage.join(self.truth_dir, f"{sid}.parquet")
        with storage.open_write(truth_uri) as f:
            pq.write_table(pa.Table.from_pylist(truth, schema=TRUTH_SCHEMA), f)
        markers.record_outputs(stats, out, [tar_uri, pq_uri])
        markers.record_outputs(stats, out, [truth_uri])
        stats.bytes_out = (
            stats.outputs[f"{sid}.tar"]["size"] + stats.outputs[f"{sid}.parquet"]["size"]
        )
        stats.extra = {
            "with_entity": sum(1 for t in truth if t["true_entity_ids"]),
            "distractors": sum(len(t["distractor_entity_ids"]) for t in truth),
        }
