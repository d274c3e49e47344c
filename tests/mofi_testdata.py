"""Small training and evaluation data made on the fly: coloured shapes, a few classes.

Imported by tests as ``mofi_testdata`` (tests/ is on sys.path through its conftest)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = [
    (220, 40, 40),
    (40, 200, 60),
    (40, 70, 220),
    (230, 200, 30),
    (160, 60, 200),
    (30, 200, 200),
]


def _image(cls: int, rng: np.random.Generator, size: int = 56) -> bytes:
    bg = tuple(int(v) for v in rng.integers(0, 80, 3))
    im = Image.new("RGB", (size + int(rng.integers(0, 16)), size), bg)
    d = ImageDraw.Draw(im)
    x0, y0 = int(rng.integers(2, 14)), int(rng.integers(2, 14))
    box = (x0, y0, x0 + 30 + cls * 2, y0 + 30)
    (d.ellipse if cls % 2 else d.rectangle)(box, fill=COLOURS[cls % len(COLOURS)])
    arr = np.asarray(im).astype(np.int16) + rng.integers(-12, 12, (im.size[1], im.size[0], 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


# what `mofi write` records of the hygiene stage in _info.json (settings and drops)
HYGIENE_RECORD = {"settings": {"exact_duplicates": True, "near_threshold": 0.9}, "drops": {}}


def make_i2e(
    root, n_shards: int = 4, per_shard: int = 24, n_classes: int = 6, seed: int = 0
) -> str:
    """Write an I2E root in the contract `mofi write` produces; returns its path."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes, counts = {}, np.zeros(n_classes, dtype=int)
    for s in range(n_shards):
        name = f"{s:05d}.tar"
        with tarfile.open(os.path.join(root, name), "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                cls = int(rng.integers(0, n_classes))
                labels = (
                    [cls] if rng.random() < 0.8 else sorted({cls, int(rng.integers(0, n_classes))})
                )
                counts[labels] += 1
                meta = {
                    "entity_ids": [f"e:{c}" for c in labels],
                    "class_indices": labels,
                    "names": [f"thing {c}" for c in labels],
                    "similarities": [0.5] * len(labels),
                    "caption": f"a picture of thing {cls}",
                }
                _member(tf, f"{key}.jpg", _image(cls, rng))
                _member(tf, f"{key}.json", json.dumps(meta).encode())
        sizes[name] = per_shard
    with open(os.path.join(root, "sizes.json"), "w") as f:
        json.dump(sizes, f)
    vocab = pa.table(
        {
            "entity_id": [f"e:{c}" for c in range(n_classes)],
            "name": [f"thing {c}" for c in range(n_classes)],
            "description": [
                f"a {'round' if c % 2 else 'square'} colour {c}" for c in range(n_classes)
            ],
            "n_images": counts.tolist(),
            "class_index": list(range(n_classes)),
        }
    )
    pq.write_table(vocab, os.path.join(root, "vocab.parquet"))
    with open(os.path.join(root, "_info.json"), "w") as f:
        json.dump(
            {
                "num_classes": n_classes,
                "num_samples": n_shards * per_shard,
                "num_shards": n_shards,
                "hygiene": HYGIENE_RECORD,
            },
            f,
        )
    return root


def make_eval_folder(root, per_class: int = 4, n_classes: int = 6, seed: int = 1) -> str:
    """GPR1200-named held-out images of the same classes: {class}_{n}.jpg."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        for i in range(per_class):
            with open(os.path.join(root, f"{c}_{i}.jpg"), "wb") as f:
                f.write(_image(c, rng))
    return root


def copy_raw_shard(
    raw_dir, shard: str, out_dir=None, new_shard: str | None = None, drop_last: int = 0
) -> None:
    """Raw shard ``shard`` (img2dataset's tar + Parquet) written again: as ``new_shard`` in
    ``out_dir`` (keys re-prefixed, so they stay unique: a newly crawled shard) and/or without
    its last ``drop_last`` samples (the same name with other bytes: a re-crawl)."""
    raw_dir, out_dir = str(raw_dir), str(out_dir or raw_dir)
    new_shard = new_shard or shard

    def rename(key: str) -> str:
        return new_shard + key[len(shard) :] if key.startswith(shard) else f"{new_shard}_{key}"

    table = pq.read_table(os.path.join(raw_dir, f"{shard}.parquet"))
    keys = table.column("key").to_pylist()
    kept = set(keys[: len(keys) - drop_last])
    table = table.filter(pa.array([k in kept for k in keys]))
    table = table.set_column(
        table.schema.get_field_index("key"),
        "key",
        pa.array([rename(k) for k in table.column("key").to_pylist()], pa.string()),
    )
    with tarfile.open(os.path.join(raw_dir, f"{shard}.tar")) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.isfile()]
    os.makedirs(out_dir, exist_ok=True)
    pq.write_table(table, os.path.join(out_dir, f"{new_shard}.parquet"))
    with tarfile.open(os.path.join(out_dir, f"{new_shard}.tar"), "w") as tf:
        for m, data in members:
            key, dot, ext = m.name.partition(".")
            if key in kept:
                _member(tf, rename(key) + dot + ext, data)
