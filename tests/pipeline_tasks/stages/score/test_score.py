"""Scoring over the shared build (``built``): bad images counted, entities embedded once,
every decode path scoring alike, the open_clip backend from a local checkpoint."""

from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq
import pytest

from pipeline_tasks.runtime import markers
from pipeline_tasks.runtime.layout import RunLayout
from pipeline_tasks.stages.score import stage as scoring
from pipeline_tasks.stages.score.config import ScoreConfig
from pipeline_tasks.stages.score.images import ShardStream
from pipeline_tasks.stages.score.worker import decode_plan

pytestmark = pytest.mark.slow


def test_score_counts_bad_images_and_embeds_each_entity_once(built):
    res = built["res"]["score"]
    ner_ents = set()
    for f in os.listdir(os.path.join(built["run"], "ner")):
        if f.endswith(".parquet"):
            for r in pq.read_table(os.path.join(built["run"], "ner", f)).to_pylist():
                ner_ents |= {m["entity_id"] for m in r["mentions"] if m["entity_id"]}
    assert res["entities"] == len(ner_ents) == res["entities_embedded"]
    st = markers.MarkerStore(os.path.join(built["run"], "score"), "score").read_done("00010")
    assert st.drops.get("image_empty") == 1
    assert st.drops.get("image_too_large") == 1
    assert st.drops.get("image_truncated", 0) + st.drops.get("image_corrupt", 0) == 2
    assert st.drops.get("unsafe_member_name") == 2
    scores = pq.read_table(os.path.join(built["run"], "score", "00000.parquet"))
    assert scores.column_names == ["key", "entity_id", "similarity"]
    sims = scores.column("similarity").to_pylist()
    assert all(-1.0001 <= s <= 1.0001 for s in sims)


def test_open_clip_backend_with_a_local_checkpoint(built, tmp_path):
    import torch

    from training.core.compat import import_open_clip
    from training.openclip import register_project_model_configs

    register_project_model_configs()
    open_clip = import_open_clip()
    torch.manual_seed(0)
    model = open_clip.create_model("mofi-tiny-vit")
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    run = tmp_path / "run"
    shutil.copytree(os.path.join(built["run"], "ner"), run / "ner")
    c = built["config"].score.replace(backend="open_clip", model=f"mofi-tiny-vit:{ckpt}")
    res = scoring.run_score(c, built["raw"], str(run), built["kb"], progress=False)
    assert res["entities_embedded"] == res["entities"] > 0 and res["images"] > 0
    # a second run on new shards reuses the cache: no entity is embedded twice
    shutil.rmtree(run / "score" / "_markers")
    res2 = scoring.run_score(
        c.replace(cache_uri=str(run / "score" / "_embedding_cache")),
        built["raw"],
        str(run),
        built["kb"],
        progress=False,
    )
    assert res2["entities_embedded"] == 0 and res2["images"] == res["images"]


def _stream_items(built, shard_ids, threads, batch_size=3, phase_batches=1):
    shards = [
        (
            s,
            os.path.join(built["raw"], f"{s}.tar"),
            os.path.join(built["run"], "ner", f"{s}.parquet"),
        )
        for s in shard_ids
    ]
    stream = ShardStream(
        shards, 32, batch_size, 40_000_000, decode_threads=threads, phase_batches=phase_batches
    )
    return list(stream)


def test_decode_threads_give_the_same_batches_as_one_decoder(built):
    """Bad images in the middle of a shard: batches stay full (but a shard's last) and in tar
    order, with one decoder, and with three threads decoding two batches per phase."""
    one = _stream_items(built, ["00010", "00000"], threads=1)
    three = _stream_items(built, ["00010", "00000"], threads=3, phase_batches=2)
    assert [i[:3] for i in one] == [i[:3] for i in three]
    assert len(one) == len(three)
    for a, b in zip(one, three, strict=True):
        if a[0] == "batch":
            assert a[3].shape[1:] == (3, 32, 32) and a[3].dtype == b[3].dtype
            assert a[3].equal(b[3])
    batches = [i for i in one if i[0] == "batch" and i[1] == "00010"]
    keys = [k for b in batches for k in b[2]]
    assert keys == sorted(keys) and all(len(b[2]) == 3 for b in batches[:-1])
    ends = {i[1]: i[2] for i in one if i[0] == "end"}
    assert ends["00010"]["drops"]["image_empty"] == 1
    assert "000100001" not in keys and "000100000" in keys


def test_decode_modes_score_identically(built, tmp_path):
    """Threads in the worker and loader processes: the same scores, byte for byte; the
    interleaved reference forwards (threads run) change nothing but the report."""
    outs = {}
    for mode, workers, ref in (("threads", 3, 1), ("processes", 2, 0)):
        run = tmp_path / mode
        shutil.copytree(os.path.join(built["run"], "ner"), run / "ner")
        c = built["config"].score.replace(
            decode=mode,
            loader_workers=workers,
            batch_size=4,
            model=RunLayout(built["run"]).scorer_checkpoint,
        )
        res = scoring.run_score(
            c, built["raw"], str(run), built["kb"], progress=False, reference_every=ref
        )
        assert res["decode"] == [f"{workers} {mode}"] and not res["failed"]
        if ref:
            assert res["bare_forward_images_per_s"] > 0 and 0 < res["end_to_end_over_bare"]
        else:
            assert "end_to_end_over_bare" not in res
        outs[mode] = {
            f: open(run / "score" / f, "rb").read()
            for f in os.listdir(run / "score")
            if f.endswith(".parquet") and not f.startswith("_")
        }
    assert outs["threads"] == outs["processes"] and len(outs["threads"]) >= 5


def test_decode_plan_follows_the_device():
    import torch

    c = ScoreConfig()
    assert decode_plan(c, torch.device("cpu"), 2, 1) == ("threads", 2)
    n = os.cpu_count() or 1
    assert decode_plan(c, torch.device("cuda", 0), 2, 1) == ("device", 2)
    assert decode_plan(c.replace(decode="processes"), torch.device("cuda", 0), 2, 1) == (
        "processes",
        max(1, n - 1),
    )
    assert decode_plan(c.replace(loader_workers=5), torch.device("cpu"), 2, 1) == (
        "threads",
        5,
    )
    assert decode_plan(c.replace(decode="processes"), torch.device("cpu"), n, 1) == (
        "processes",
        1,
    )
    from training.core.config import ConfigError

    with pytest.raises(ConfigError, match="decode"):
        ScoreConfig(decode="gpu")


def test_device_decode_path_labels_like_the_pil_path(built, tmp_path):
    """The GPU data path's logic on CPU (PIL decode where nvJPEG is unavailable, then the
    antialiased resize and crop on the device): similarities within a small distance of the
    PIL path's, the same best candidate for at least 99% of images, and the hostile shard's
    bad records counted exactly as on the PIL path."""
    outs, drops = {}, {}
    for mode in ("threads", "device"):
        run = tmp_path / mode
        shutil.copytree(os.path.join(built["run"], "ner"), run / "ner")
        c = built["config"].score.replace(
            decode=mode, batch_size=4, model=RunLayout(built["run"]).scorer_checkpoint
        )
        res = scoring.run_score(c, built["raw"], str(run), built["kb"], progress=False)
        assert not res["failed"] and res["decode"] == [f"2 {mode}"]
        rows = []
        for f in sorted(os.listdir(run / "score")):
            if f.endswith(".parquet") and not f.startswith("_"):
                rows += pq.read_table(run / "score" / f).to_pylist()
        outs[mode] = {(r["key"], r["entity_id"]): r["similarity"] for r in rows}
        drops[mode] = markers.MarkerStore(str(run / "score"), "score").read_done("00010").drops
    assert outs["threads"].keys() == outs["device"].keys()
    diff = max(abs(outs["threads"][k] - outs["device"][k]) for k in outs["threads"])
    assert diff < 0.05, diff

    def best(o):
        per = {}
        for (key, e), s in o.items():
            per.setdefault(key, []).append((s, e))
        return {k: max(v)[1] for k, v in per.items()}

    a, b = best(outs["threads"]), best(outs["device"])
    assert sum(a[k] == b[k] for k in a) / len(a) >= 0.99
    assert drops["threads"] == drops["device"]


def test_a_single_shard_uses_all_its_loaders(built, tmp_path):
    """Three loader processes on one shard: each reads its own share of the records (three
    parts merged into one done marker), and the scores equal the in-process decode's."""
    outs = {}
    for mode, workers in (("threads", 1), ("processes", 3)):
        run = tmp_path / mode
        shutil.copytree(os.path.join(built["run"], "ner"), run / "ner")
        c = built["config"].score.replace(
            decode=mode, loader_workers=workers, batch_size=4,
            model=RunLayout(built["run"]).scorer_checkpoint,
        )  # fmt: skip
        res = scoring.run_score(
            c, built["raw"], str(run), built["kb"], progress=False, only=["00000"]
        )
        assert res["processed"] == 1 and not res["failed"]
        assert res["decode"] == [f"{workers} {mode}"]
        outs[mode] = open(run / "score" / "00000.parquet", "rb").read()
        st = markers.MarkerStore(str(run / "score"), "score").read_done("00000")
        assert st.n_in == st.n_out + sum(st.drops.values())
    assert outs["threads"] == outs["processes"]
