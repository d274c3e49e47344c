"""A raw corpus with planted duplicates and evaluation copies, and its truth (bench_hygiene).

Genuinely different pictures: real photographs (``pipeline_tasks.demo.photos``: one photo per
food of the Indian Food Composition Tables, byte-identical photos kept once, and photos whose
16x16 grey thumbnails correlate at >= 0.98 with a chosen one left out), many of the same
entity (22 brinjals, 15 eggs, 13 goat cuts ...). Each caption names its food, which the KB
made here holds as an entity, so every image is linked, scored and embedded.

Of ``n`` photos, ``eval_fraction`` go to an evaluation folder only (GPR1200 naming) and the
rest are the pool's originals; ``copy_fraction`` of the originals and every evaluation photo
get one planted copy in the pool, the kinds dealt in turn:

* ``exact``: the same bytes;
* ``reencode``: decoded and saved again at JPEG quality 30-90;
* ``resize``: scaled to 40-90 % of each side (and re-encoded);
* ``crop``: a window without up to 20 % of the area (an off-centre window of 80-100 % of
  the area, re-encoded);
* ``flip``: mirrored left to right (re-encoded).

Copies come after every original (larger shard numbers), so the stage, which keeps the
smallest (shard, key) of a group, must drop the copy and keep the original.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

KINDS = ("exact", "reencode", "resize", "crop", "flip")


SAME_PICTURE = 0.98  # correlation of 16x16 grey thumbnails at or above which two are one


def _thumb(data: bytes) -> np.ndarray:
    """A 16x16 grey thumbnail, zero-mean and unit-norm (dot product: correlation)."""
    g = np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((16, 16)), np.float32)
    g = g.ravel() - g.mean()
    return g / max(float(np.linalg.norm(g)), 1e-6)


def _encode(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def plant(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    """A copy of the JPEG ``data`` of the given kind."""
    if kind == "exact":
        return data
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    if kind == "reencode":
        return _encode(im, int(rng.integers(30, 91)))
    if kind == "resize":
        s = float(rng.uniform(0.4, 0.9))
        return _encode(im.resize((max(8, round(w * s)), max(8, round(h * s)))), 90)
    if kind == "crop":
        area = float(rng.uniform(0.8, 1.0))
        aspect = float(rng.uniform(0.9, 1.1))
        cw = min(w, round(w * (area * aspect) ** 0.5))
        ch = min(h, round(h * area / (cw / w)))
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        return _encode(im.crop((x0, y0, x0 + cw, y0 + ch)), 90)
    if kind == "flip":
        return _encode(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 90)
    raise ValueError(kind)


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def kb_table(records: list[dict], path: str) -> str:
    """A KB source table (JSON lines) with one entity per food name."""
    foods = sorted({r["food"] for r in records})
    groups = {r["food"]: r["group"] for r in records}
    with open(path, "w", encoding="utf-8") as f:
        for i, food in enumerate(foods):
            row = {
                "entity_id": f"F{i:04d}",
                "name": food,
                "aliases": [],
                "description": f"a food of the group {groups[food].lower()}",
                "type": "food",
            }
            f.write(json.dumps(row) + "\n")
    return path


def make_corpus(
    photos_dir: str,
    records: list[dict],
    out: str,
    n: int,
    seed: int = 0,
    eval_fraction: float = 0.1,
    copy_fraction: float = 0.5,
    shard_size: int = 100,
) -> dict:
    """Write ``out/raw`` (img2dataset tar + Parquet shards) and ``out/eval``; returns the
    truth: ``copies`` {id: (kind, source id or eval file)}, ``originals`` [id], ``evals``."""
    rng = np.random.default_rng(seed)
    chosen, thumbs = [], []
    for i in rng.permutation(len(records)):
        with open(os.path.join(photos_dir, records[i]["image"]), "rb") as f:
            t = _thumb(f.read())
        # the package repeats a few pictures under other bytes: kept once, by a pixel check
        # that owes nothing to the scorer (so "genuinely different" is not the model's word)
        if thumbs and float(np.max(np.stack(thumbs) @ t)) >= SAME_PICTURE:
            continue
        chosen.append(records[i])
        thumbs.append(t)
        if len(chosen) == n:
            break
    n_eval = round(n * eval_fraction)
    evals, originals = chosen[:n_eval], chosen[n_eval:]
    raw, eval_dir = os.path.join(out, "raw"), os.path.join(out, "eval")
    os.makedirs(raw, exist_ok=True)
    os.makedirs(eval_dir, exist_ok=True)

    def read(r):
        with open(os.path.join(photos_dir, r["image"]), "rb") as f:
            return f.read()

    samples = [(r["food"], read(r), None) for r in originals]  # (food, bytes, planted)
    planted = []
    n_copy = round(len(originals) * copy_fraction)
    for j, i in enumerate(rng.permutation(len(originals))[:n_copy]):
        kind = KINDS[j % len(KINDS)]
        planted.append((originals[i]["food"], plant(samples[i][1], kind, rng), (kind, int(i))))
    eval_files = []
    for j, r in enumerate(evals):
        name = os.path.join(eval_dir, f"{j % 7}_{r['code']}.jpg")
        data = read(r)
        with open(name, "wb") as f:
            f.write(data)
        eval_files.append(name)
        kind = KINDS[j % len(KINDS)]
        planted.append((r["food"], plant(data, kind, rng), (f"eval_{kind}", name)))
    samples += [planted[i] for i in rng.permutation(len(planted))]
    ids, truth_copies = [], {}
    for s0 in range(0, len(samples), shard_size):
        shard = f"{s0 // shard_size:05d}"
        keys, caps = [], []
        with tarfile.open(os.path.join(raw, f"{shard}.tar"), "w") as tf:
            for j, (food, data, how) in enumerate(samples[s0 : s0 + shard_size]):
                key = f"{shard}{j:04d}"
                cap = f"A photo of {food}."
                _member(tf, f"{key}.jpg", data)
                _member(tf, f"{key}.txt", cap.encode())
                keys.append(key)
                caps.append(cap)
                ids.append(f"{shard}/{key}")
                if how is not None:
                    kind, src = how
                    truth_copies[ids[-1]] = (kind, src)
        pq.write_table(
            pa.table({"key": keys, "caption": caps}), os.path.join(raw, f"{shard}.parquet")
        )
    n_orig = len(originals)
    copies = {
        i: (kind, ids[src] if isinstance(src, int) else src)
        for i, (kind, src) in truth_copies.items()
    }
    truth = {"copies": copies, "originals": ids[:n_orig], "evals": eval_files}
    with open(os.path.join(out, "truth.json"), "w") as f:
        json.dump(truth, f)
    return truth
