"""The hygiene stage over the shared build (``built``: real Spark local[2], the packaged
scorer): exact duplicates, copies of evaluation images and near duplicates found, counted
and audited, and left out of the vocabulary; the same drops in one process and in Spark."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from mofi_testdata import copy_raw_shard
from PIL import Image

from pipeline_tasks.runtime import status
from pipeline_tasks.runtime.layout import RunLayout
from pipeline_tasks.runtime.markers import WHOLE_STAGE
from pipeline_tasks.stages.hygiene import stage as hygiene
from pipeline_tasks.stages.ner.stage import run_ner
from pipeline_tasks.stages.score import stage as score
from pipeline_tasks.stages.score.nsfw import NsfwScorer
from pipeline_tasks.stages.score.phash import hamming, phash
from pipeline_tasks.stages.vocab import stage as vocab
from training.core.config import ConfigError

pytestmark = pytest.mark.slow


def _tar_images(raw: str, shard: str) -> dict[str, bytes]:
    with tarfile.open(os.path.join(raw, f"{shard}.tar")) as t:
        return {
            m.name.split(".", 1)[0]: t.extractfile(m).read()
            for m in t.getmembers()
            if m.isfile() and m.name.endswith(".jpg") and "/" not in m.name
        }


def _embedded(run: str) -> dict[str, dict]:
    """id -> the score stage's row (key, embedding, sha256) of every embedded image."""
    out = {}
    folder = os.path.join(run, "score", "embeddings")
    for f in sorted(os.listdir(folder)):
        shard = f.removesuffix(".parquet")
        for r in pq.read_table(os.path.join(folder, f)).to_pylist():
            out[f"{shard}/{r['key']}"] = r
    return out


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _worker_batch(c, run: str, raw: str, image_id: str):
    """A one-image batch as the score worker makes it (decode, resize, centre crop)."""
    import torch

    from pipeline_tasks.runtime import raw as raw_mod
    from pipeline_tasks.stages.score.backends import build_backend
    from training.transforms import resize_center_crop, stack_hwc, to_uint8_hwc

    size = build_backend(c, run, torch.device("cpu")).image_size
    shard, key = image_id.split("/")
    im, reason = raw_mod.decode_image(_tar_images(raw, shard)[key], c.max_pixels)
    assert reason is None, reason
    return stack_hwc([to_uint8_hwc(resize_center_crop(im, size))])


def test_drops_are_found_counted_audited_and_left_out_of_the_vocabulary(built, tmp_path):
    run = tmp_path / "run"
    for stage in ("ner", "scorer"):
        shutil.copytree(os.path.join(built["run"], stage), run / stage)
    # the planted faults: shard 00014 is a byte copy of 00000 under other keys (other URLs,
    # the same pictures), put through ner as a newly crawled shard; scored with Open NSFW
    new_raw = tmp_path / "raw"
    shutil.copytree(built["raw"], new_raw)
    copy_raw_shard(new_raw, "00000", new_shard="00014")
    c = built["config"]
    run_ner(c.ner, str(new_raw), built["kb"], str(run), False, None)
    sres = score.run_score(c.score.replace(nsfw=True), str(new_raw), str(run), built["kb"], False)
    sres.raise_if_failed()
    assert sres["nsfw_seconds"] > 0
    emb = _embedded(str(run))
    assert all(0.0 <= r["nsfw"] <= 1.0 for r in emb.values())
    # the worker's scores are the packaged model's on the same pictures
    i0 = sorted(emb)[0]
    batch = _worker_batch(c.score, str(run), str(new_raw), i0)
    assert emb[i0]["nsfw"] == pytest.approx(float(NsfwScorer()(batch)[0]), abs=1e-4)
    assert emb[i0]["phash"] == int(phash(batch)[0])  # and its hash the hash of that batch
    # the most unsafe-looking picture (the threshold set at its score) goes for that reason
    top = max(emb, key=lambda i: (emb[i]["nsfw"], i))
    # the score stage kept each image's content hash: equal bytes, equal hash
    tars = {s: _tar_images(built["raw"], s) for s in ("00000", "00001")}
    for i, r in emb.items():
        shard, key = i.split("/")
        if shard in tars:
            assert r["sha256"] == hashlib.sha256(tars[shard][key]).hexdigest()
    copies = {i for i in emb if i.startswith("00014/") and "00000/00000" + i[11:] in emb}
    assert len(copies) >= 8
    # three evaluation images: the bytes of a pool image, a re-encoded 90 % crop of another
    # and a 40 % resize of a third (all from shard 00001)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    k1, k2, k3 = sorted(k for k in tars["00001"] if f"00001/{k}" in emb and f"00001/{k}" != top)[:3]
    (eval_dir / "exact_0.jpg").write_bytes(tars["00001"][k1])
    im = Image.open(io.BytesIO(tars["00001"][k2])).convert("RGB")
    w, h = im.size
    buf = io.BytesIO()
    im.crop((w // 20, h // 20, w - w // 20, h - h // 20)).save(buf, "JPEG", quality=80)
    (eval_dir / "crop_0.jpg").write_bytes(buf.getvalue())
    im = Image.open(io.BytesIO(tars["00001"][k3])).convert("RGB")
    buf = io.BytesIO()
    im.resize((round(im.width * 0.4), round(im.height * 0.4)), Image.BILINEAR).save(
        buf, "JPEG", quality=75
    )
    (eval_dir / "resize_0.jpg").write_bytes(buf.getvalue())
    (eval_dir / "notes.txt").write_text("not an image")

    c = c.hygiene.replace(
        exact_duplicates=True,
        near_duplicates=True,
        decontaminate=True,
        eval_folders=(str(eval_dir),),
        near_threshold=0.97,
        eval_threshold=0.9,
        nsfw=True,
        nsfw_threshold=emb[top]["nsfw"],
    )
    # a run scored without NSFW has no score to filter by, whatever the caller's config says
    unscored = tmp_path / "unscored"
    shutil.copytree(os.path.join(built["run"], "score"), unscored / "score")
    with pytest.raises(ConfigError, match="score.nsfw"):
        hygiene.run_hygiene(c, built["config"].score.replace(nsfw=True), str(unscored), False)
    # the scorer that embedded the pool embeds the evaluation images (whatever the caller's)
    other = built["config"].score.replace(backend="open_clip", model="ViT-B-32:nowhere")
    res = hygiene.run_hygiene(c, other, str(run), False)
    res.raise_if_failed()
    # a small pool is done in this process; the Spark job finds the same drops, row for row
    assert res.extra["engine"] == "local"
    on_spark = tmp_path / "on_spark"
    for stage in ("scorer", "score"):
        shutil.copytree(run / stage, on_spark / stage)
    sres = hygiene.run_hygiene(c.replace(local_max_images=0), other, str(on_spark), False)
    sres.raise_if_failed()
    assert sres.extra["engine"] == "spark" and sres.extra["drops"] == res.extra["drops"]
    assert sres.extra["settings"] == res.extra["settings"]
    spark_rows = pq.read_table(on_spark / "hygiene" / "dropped.parquet")
    assert spark_rows.equals(pq.read_table(run / "hygiene" / "dropped.parquet"))
    dropped = {f"{r['shard']}/{r['key']}": r for r in pq.read_table(
        run / "hygiene" / "dropped.parquet").to_pylist()}  # fmt: skip

    unsafe = {i for i, r in dropped.items() if r["reason"] == "nsfw"}
    assert top in unsafe and unsafe == {i for i in emb if emb[i]["nsfw"] >= emb[top]["nsfw"]}
    # every byte copy goes, pointing at the smallest (shard, key) with its bytes
    for i in copies:
        assert i in dropped, i
        if dropped[i]["reason"] == "exact_duplicate":
            first = min(j for j in emb if emb[j]["sha256"] == emb[i]["sha256"] and j not in unsafe)
            assert dropped[i]["matched"] == first and first not in dropped
    assert sum(r["reason"] == "exact_duplicate" for r in dropped.values()) >= len(copies - unsafe)
    # the resize is too blurred for the features (below eval_threshold): its hash finds it
    ev = pq.read_table(next((run / "score" / "eval").glob("*.parquet"))).to_pylist()
    ev = {os.path.basename(r["file"]): r for r in ev}
    cos3 = _cos(ev["resize_0.jpg"]["embedding"], emb[f"00001/{k3}"]["embedding"])
    bits3 = int(hamming(ev["resize_0.jpg"]["phash"], emb[f"00001/{k3}"]["phash"]))
    assert cos3 < c.eval_threshold and bits3 <= c.phash_distance, (cos3, bits3)
    # all three evaluation copies go, with the eval file they copy
    for key, name in ((k1, "exact_0.jpg"), (k2, "crop_0.jpg"), (k3, "resize_0.jpg")):
        r = dropped[f"00001/{key}"]
        assert r["reason"] == "eval_copy" and r["matched"] == str(eval_dir / name), r
    assert dropped[f"00001/{k1}"]["score"] == 1.0 and dropped[f"00001/{k2}"]["score"] >= 0.9
    assert dropped[f"00001/{k3}"]["score"] == pytest.approx(cos3, abs=1e-4)
    assert dropped[f"00001/{k3}"]["phash_distance"] == bits3
    # near duplicates: each matched to a kept image at cosine >= the threshold, or within
    # the hash distance at cosine >= phash_min_cosine (both recorded)
    for i, r in dropped.items():
        if r["reason"] == "near_duplicate":
            cos = _cos(emb[i]["embedding"], emb[r["matched"]]["embedding"])
            bits = int(hamming(emb[i]["phash"], emb[r["matched"]]["phash"]))
            assert r["score"] == pytest.approx(cos, abs=1e-4) and r["phash_distance"] == bits
            assert cos >= c.near_threshold or (
                bits <= c.phash_distance and cos >= c.phash_min_cosine
            ), r
        if r["reason"] in ("near_duplicate", "exact_duplicate"):
            assert r["matched"] not in dropped and r["matched"] < i

    # counted in the marker, by reason, and shown by status
    reasons = {}
    for r in dropped.values():
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    (s,) = [s for s in status.summarize_run(str(run)) if s["stage"] == "hygiene"]
    assert s["complete"] and s["drops"] == reasons
    assert s["samples_in"] == len(emb) == s["samples_out"] + len(dropped)
    assert res.extra["eval_images"] == 3 and res.extra["settings"]["near_threshold"] == 0.97

    # the same settings again: nothing recomputed
    again = hygiene.run_hygiene(c, built["config"].score.replace(nsfw=True), str(run), False)
    assert again.extra["skipped"]
    # nor with only where it runs changed (Spark now): the same settings decide the drops
    moved = c.replace(local_max_images=0, driver_groups_max_pairs=0)
    again = hygiene.run_hygiene(moved, built["config"].score.replace(nsfw=True), str(run), False)
    assert again.extra["skipped"] and again.extra["engine"] == "local"

    # vocab leaves every dropped image out of the labels
    vres = vocab.run_vocab(built["config"].vocab, str(run), built["kb"], progress=False)
    vres.raise_if_failed()
    labelled = set()
    for f in os.listdir(run / "labels"):
        if f.endswith(".parquet"):
            shard = f.removesuffix(".parquet")
            labelled |= {
                f"{shard}/{k}" for k in pq.read_table(run / "labels" / f)["key"].to_pylist()
            }
    assert labelled and not (labelled & set(dropped))
    # the same drops: vocab has nothing to redo; other drops: vocab and labels are redone
    assert vocab.run_vocab(built["config"].vocab, str(run), built["kb"], False).extra["skipped"]
    c2 = c.replace(nsfw=False)
    hygiene.run_hygiene(c2, built["config"].score.replace(nsfw=True), str(run), False)
    again = {f"{r['shard']}/{r['key']}" for r in pq.read_table(
        run / "hygiene" / "dropped.parquet").to_pylist()}  # fmt: skip
    assert set(dropped) - unsafe <= again <= set(dropped)
    vres = vocab.run_vocab(built["config"].vocab, str(run), built["kb"], progress=False)
    assert not vres.extra["skipped"] and vres.processed
    assert labelled & {"00000/00000" + i[11:] for i in copies}  # the originals keep their labels
    # drops that no finished hygiene stage vouches for (it died while running again): refused
    hstore = RunLayout(str(run)).store("hygiene")
    hstore.unmark_done(WHOLE_STAGE)
    assert (run / "hygiene" / "dropped.parquet").exists() and not hstore.is_done(WHOLE_STAGE)
    with pytest.raises(ConfigError, match="not vouched for by a finished hygiene stage"):
        vocab.run_vocab(built["config"].vocab, str(run), built["kb"], progress=False)


def test_everything_off_drops_nothing_without_spark(built, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(os.path.join(built["run"], "score"), run / "score")
    c = built["config"].hygiene  # cpu_test: every part off
    assert not c.enabled
    res = hygiene.run_hygiene(c, built["config"].score, str(run), progress=False)
    n = len(_embedded(str(run)))
    assert res.extra["images_kept"] == n > 0 and res.extra["drops"] == {}
    assert hygiene.read_dropped(RunLayout(str(run))).num_rows == 0
