"""The demo corpus on generated pictures and a tiny KB: layout, truth, determinism, resume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline_tasks.demo import corpus
from pipeline_tasks.demo import recipes as demo_recipes
from pipeline_tasks.demo.corpus import render as corpus_render
from pipeline_tasks.demo.corpus import stage as corpus_stage
from pipeline_tasks.runtime import markers


def _config(picture_folder, **kw):
    base = demo_recipes.cpu_test().replace(
        stamps_dir=str(picture_folder), pairs=40, shard_size=16, holdout_min_pictures=5
    )
    return base.replace(**kw)


def _digests(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if "_markers" in p:
                continue
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_layout_truth_and_eval(tmp_path, picture_folder, tiny_kb):
    c = _config(picture_folder)
    out = str(tmp_path / "run" / "raw")
    res = corpus.build_corpus(c, out, tiny_kb, progress=False)
    assert res["samples"] == 40 and res["shards"] == 3
    names = sorted(os.listdir(out))
    assert names == [
        "00000.parquet",
        "00000.tar",
        "00001.parquet",
        "00001.tar",
        "00002.parquet",
        "00002.tar",
        "_markers",
        "corpus.config.json",
    ]
    # img2dataset layout: key.jpg, key.txt, key.json, keys in order; parquet agrees with tar
    with tarfile.open(os.path.join(out, "00002.tar")) as tar:
        members = tar.getnames()
        assert members[:3] == ["000020000.jpg", "000020000.txt", "000020000.json"]
        assert len(members) == 3 * 8  # last shard holds the remainder
        meta = json.loads(tar.extractfile("000020000.json").read())
        im = Image.open(io.BytesIO(tar.extractfile("000020000.jpg").read()))
        assert im.format == "JPEG" and im.size == (meta["width"], meta["height"])
        assert c.min_side <= max(im.size) <= c.max_side
        assert tar.extractfile("000020000.txt").read().decode() == meta["caption"]
    raw = pq.read_table(os.path.join(out, "00002.parquet"))
    assert raw.column_names[:6] == ["key", "caption", "url", "width", "height", "original_width"]
    assert raw.column("key").to_pylist()[0] == "000020000" and set(
        raw.column("status").to_pylist()
    ) == {"success"}
    # ground truth sits outside the raw root; true entities come from the KB
    truth = pq.read_table(str(tmp_path / "run" / "truth" / "00000.parquet")).to_pylist()
    kb_ids = set(pq.read_table(f"{tiny_kb}/entities.parquet").column("entity_id").to_pylist())
    assert all(
        set(t["true_entity_ids"]) <= kb_ids and set(t["distractor_entity_ids"]) <= kb_ids
        for t in truth
    )
    assert sum(1 for t in truth if t["true_entity_ids"]) >= 0.8 * len(truth)
    assert not any(set(t["true_entity_ids"]) & set(t["distractor_entity_ids"]) for t in truth)
    links = {
        r["stamp_id"]: r
        for r in pq.read_table(str(tmp_path / "run" / "truth" / "stamps.parquet")).to_pylist()
    }
    assert links["animals/birds/owl"]["entity_id"] == "Q9186"
    assert links["vehicles/truck"]["entity_id"] == "Q43193"  # "A fire truck." -> head noun
    # eval pictures: GPR1200 naming, never used for training pairs
    eval_dir = tmp_path / "run" / "eval"
    files = sorted(f for f in os.listdir(eval_dir) if f.endswith(".jpg"))
    assert len(files) == res["eval_images"] >= 4
    held = {r["stamp_id"] for r in links.values() if r["split"] == "eval"}
    for f in files:
        class_id, _, rest = f.partition("_")
        assert class_id.isdigit() and rest
    used = {
        t["stamp_id"]
        for s in range(3)
        for t in pq.read_table(str(tmp_path / "run" / "truth" / f"{s:05d}.parquet")).to_pylist()
    }
    assert held and not (held & used)
    classes = json.loads((eval_dir / "classes.json").read_text())
    assert {v["category"] for v in classes.values()} <= {"fruit", "vehicles", "animals/birds"}


def test_alt_text_is_noisy_but_mentions_the_subject(tmp_path, picture_folder, tiny_kb):
    c = _config(
        picture_folder,
        pairs=200,
        shard_size=100,
        no_mention_prob=0.0,
        misspell_prob=0.0,
        casing_prob=0.0,
    )
    out = str(tmp_path / "raw")
    corpus.build_corpus(c, out, tiny_kb, progress=False)
    caps = pq.read_table(os.path.join(out, "00000.parquet")).column("caption").to_pylist()
    truth = pq.read_table(str(tmp_path / "truth" / "00000.parquet")).to_pylist()
    for cap, t in zip(caps, truth, strict=True):
        assert t["mention"] and t["mention"].lower() in cap.lower()
    assert len(set(caps)) > 0.8 * len(caps)  # distinct alt-texts
    assert sum(1 for t in truth if t["distractor_entity_ids"]) > 20
    assert any("©" in x or "Photo by" in x or "#" in x for x in caps)


def test_deterministic_across_runs_and_worker_counts(tmp_path, picture_folder, tiny_kb):
    a, b = str(tmp_path / "a" / "raw"), str(tmp_path / "b" / "raw")
    corpus.build_corpus(_config(picture_folder, workers=1), a, tiny_kb, progress=False)
    corpus.build_corpus(_config(picture_folder, workers=2), b, tiny_kb, progress=False)
    da, db = _digests(str(tmp_path / "a")), _digests(str(tmp_path / "b"))
    da.pop("raw/corpus.config.json"), db.pop("raw/corpus.config.json")  # records the worker count
    assert da == db and len(da) > 10
    other = str(tmp_path / "c" / "raw")
    corpus.build_corpus(_config(picture_folder, seed=1), other, tiny_kb, progress=False)
    assert _digests(str(tmp_path / "c"))["raw/00000.tar"] != da["raw/00000.tar"]


def test_resume_rewrites_only_missing_shards(tmp_path, picture_folder, tiny_kb):
    out = str(tmp_path / "raw")
    c = _config(picture_folder)
    corpus.build_corpus(c, out, tiny_kb, progress=False)
    before = _digests(out)
    done0 = os.path.getmtime(os.path.join(out, "_markers", "corpus", "00000.done.json"))
    os.remove(os.path.join(out, "_markers", "corpus", "00001.done.json"))
    os.remove(os.path.join(out, "00001.tar"))
    corpus.build_corpus(c, out, tiny_kb, progress=False)
    assert _digests(out) == before
    assert os.path.getmtime(os.path.join(out, "_markers", "corpus", "00000.done.json")) == done0


def test_a_failing_shard_never_looks_complete(tmp_path, picture_folder, tiny_kb, monkeypatch):
    out = str(tmp_path / "raw")
    real = corpus_stage.render
    failing = {"shard": None}

    def flaky(picture, rng, c):
        if failing["shard"] == "00001":
            raise OSError("disk full")
        return real(picture, rng, c)

    real_process = corpus_stage.CorpusStage.process

    def process(self, task, stats):
        failing["shard"] = task.shard
        return real_process(self, task, stats)

    monkeypatch.setattr(corpus_stage, "render", flaky)
    monkeypatch.setattr(corpus_stage.CorpusStage, "process", process)
    c = _config(picture_folder, workers=1)
    res = corpus.build_corpus(c, out, tiny_kb, progress=False)
    assert list(res.failed) == ["00001"] and "disk full" in res.failed["00001"]
    with pytest.raises(RuntimeError, match="1 shard\\(s\\)"):
        res.raise_if_failed()
    assert not os.path.exists(os.path.join(out, "00001.tar"))
    assert not any(".tmp-" in f for f in os.listdir(out))
    recs = markers.MarkerStore(out, "corpus").read_all()
    assert recs["00001"]["state"] == "failed" and "disk full" in recs["00001"]["error"]
    assert recs["00000"]["state"] == recs["00002"]["state"] == "done"


def test_corpus_to_s3(s3_bucket, tmp_path, picture_folder, tiny_kb):
    from training.core import storage

    out = s3_bucket + "/demo/raw"
    corpus.build_corpus(_config(picture_folder, pairs=20), out, tiny_kb, progress=False)
    names = [storage.basename(u) for u in storage.list_files(out)]
    assert names == [
        "00000.parquet",
        "00000.tar",
        "00001.parquet",
        "00001.tar",
        "corpus.config.json",
    ]
    assert storage.exists(s3_bucket + "/demo/truth/00001.parquet")
    assert storage.list_files(s3_bucket + "/demo/eval", suffix=".jpg")


def test_render_varies_the_picture(picture_folder):
    pic = corpus_render.load_picture(str(picture_folder / "fruit" / "apple.png"), 128)
    c = demo_recipes.cpu_test()
    outs = {corpus_render.render(pic, np.random.default_rng([0, 0, i]), c) for i in range(20)}
    assert len(outs) == 20
