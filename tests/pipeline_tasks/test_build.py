"""The whole I2E construction on a tiny corpus: real Spark (local[2]), real spaCy, real
open_clip / packaged towers, with hostile raw input mixed in."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline_tasks import build, ner, raw, recipes, scoring, vocab, write
from pipeline_tasks.runtime import markers
from pipeline_tasks.runtime.layout import RunLayout
from pipeline_tasks.scoring.images import ShardStream

pytestmark = pytest.mark.slow


def _jpeg(color=(200, 30, 30), size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _png_bomb() -> bytes:
    """A tiny PNG whose header claims 60000 x 60000 pixels."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # type + 13 bytes of IHDR data
    new = b"IHDR" + struct.pack(">II", 60000, 60000) + bytes(ihdr[12:17])
    data[12:29] = new
    data[29:33] = struct.pack(">I", zlib.crc32(new) & 0xFFFFFFFF)
    return bytes(data)


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _hostile_shards(raw_dir: str) -> None:
    """Shard 00010: every kind of bad sample next to two good ones; 00011 tar only; 00012 parquet only; 00013 empty."""
    good = _jpeg()
    samples = {
        "000100000": (good, b"A red apple in Paris"),
        "000100001": (b"", b"An apple, zero-byte image"),
        "000100002": (good[: len(good) // 3], b"A truncated apple"),
        "000100003": (_png_bomb(), b"An apple bomb"),
        "000100004": (good, b""),
        "000100005": (good, b"apple " * 20000),
        "000100006": (good, "Un caf\xe9 apple".encode("latin-1")),
        "000100007": (os.urandom(500), b"A corrupt apple"),
        "000100008": (good, b"A yellow banana"),
    }
    with tarfile.open(os.path.join(raw_dir, "00010.tar"), "w") as tar:
        for key, (img, cap) in samples.items():
            _add(tar, f"{key}.jpg", img)
            _add(tar, f"{key}.txt", cap)
        _add(tar, "/tmp/mofi_evil_absolute.jpg", good)
        _add(tar, "../mofi_evil_parent.jpg", good)
    keys = list(samples)
    caps = pa.array([c for _, c in samples.values()], pa.binary())
    pq.write_table(pa.table({"key": keys, "caption": caps}), os.path.join(raw_dir, "00010.parquet"))
    shutil.copy(os.path.join(raw_dir, "00000.tar"), os.path.join(raw_dir, "00011.tar"))
    shutil.copy(os.path.join(raw_dir, "00000.parquet"), os.path.join(raw_dir, "00012.parquet"))
    with tarfile.open(os.path.join(raw_dir, "00013.tar"), "w"):
        pass
    pq.write_table(
        pa.table({"key": pa.array([], pa.string()), "caption": pa.array([], pa.string())}),
        os.path.join(raw_dir, "00013.parquet"),
    )


@pytest.fixture(scope="module")
def built(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("i2e")
    raw_dir = str(root / "raw")
    shutil.copytree(tiny_corpus["raw"], raw_dir)
    _hostile_shards(raw_dir)
    p = recipes.cpu_test()
    run, i2e = str(root / "run"), str(root / "i2e")
    res = build.build_i2e(p, raw_dir, tiny_corpus["kb"], run, i2e, progress=False)
    return {
        "res": res,
        "raw": raw_dir,
        "run": run,
        "i2e": i2e,
        "kb": tiny_corpus["kb"],
        "config": p,
        "truth": tiny_corpus["truth"],
    }


def test_discovery_counts_incomplete_shards(built):
    shards, problems = raw.discover(built["raw"])
    assert [s.shard for s in shards] == ["00000", "00001", "00002", "00003", "00010", "00013"]
    assert problems == {"00011": "tar_without_parquet", "00012": "parquet_without_tar"}
    assert (
        markers.MarkerStore(os.path.join(built["run"], "ner"), "ner").read_plan()["skipped"]
        == problems
    )


def test_ner_links_mentions_and_counts_bad_captions(built):
    store = markers.MarkerStore(os.path.join(built["run"], "ner"), "ner")
    st = store.read_done("00010")
    assert (st.n_in, st.n_out) == (9, 7)  # empty and non-UTF-8 captions are counted skips
    assert st.drops["caption_empty"] == 1 and st.drops["caption_not_utf8"] == 1
    assert st.extra["captions_truncated"] == 1
    assert store.read_done("00013").n_in == 0  # the empty shard completes
    t = pq.read_table(os.path.join(built["run"], "ner", "00010.parquet")).to_pylist()
    by_key = {r["key"]: r for r in t}
    ents = {m["entity_id"] for m in by_key["000100000"]["mentions"]}
    assert {"Q89", "Q90"} <= ents  # apple (KB matcher) and Paris (NER GPE + KB)
    paris = next(m for m in by_key["000100000"]["mentions"] if m["entity_id"] == "Q90")
    assert paris["label"] in ("GPE", "KB") and 0 < paris["link_score"] <= 1
    assert by_key["000100008"]["mentions"][0]["entity_id"] == "Q503"


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


def test_nothing_written_outside_the_roots(built):
    assert not os.path.exists("/tmp/mofi_evil_absolute.jpg")
    parent = os.path.dirname(built["raw"])
    assert not any("mofi_evil" in f for f in os.listdir(parent))
    assert not any("mofi_evil" in f for _, _, fs in os.walk(parent) for f in fs)


def test_webdataset_reads_back_the_i2e_shards(built):
    import webdataset as wds

    i2e = built["i2e"]
    sizes = json.loads(open(os.path.join(i2e, "sizes.json")).read())
    vocab_t = pq.read_table(os.path.join(i2e, "vocab.parquet"))
    assert vocab_t.column("class_index").to_pylist() == list(range(vocab_t.num_rows))
    urls = [os.path.join(i2e, name) for name in sorted(sizes)]
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        meta = sample["json"]
        assert isinstance(sample["jpg"], Image.Image)
        assert set(meta) >= {
            "entity_ids",
            "class_indices",
            "names",
            "similarities",
            "caption",
            "key",
        }
        assert len(meta["entity_ids"]) == len(meta["class_indices"]) == len(meta["names"]) >= 1
        assert all(0 <= c < vocab_t.num_rows for c in meta["class_indices"])
        n += 1
    assert n == sum(sizes.values()) > 0
    info = json.loads(open(os.path.join(i2e, "_info.json")).read())
    assert info["num_samples"] == n and info["num_classes"] == vocab_t.num_rows


def test_rerun_is_a_no_op_and_byte_identical(built):
    def digests(root):
        return {
            os.path.relpath(os.path.join(d, f), root): hashlib.sha256(
                open(os.path.join(d, f), "rb").read()
            ).hexdigest()
            for d, _, fs in os.walk(root)
            for f in fs
            if "_markers" not in d
            and not f.endswith(".config.json")
            and "_embedding_cache" not in d
        }

    before = digests(built["i2e"]), digests(built["run"])
    res = build.build_i2e(
        built["config"], built["raw"], built["kb"], built["run"], built["i2e"], progress=False
    )
    assert (
        res["ner"]["processed"] == 0 and res["score"]["processed"] == 0 and res["vocab"]["skipped"]
    )
    assert res["write"]["processed"] == 0
    assert (digests(built["i2e"]), digests(built["run"])) == before


def test_killed_shard_is_redone_identically(built, tmp_path):
    """Delete one shard's outputs and markers in every stage (as if killed): the re-run restores the same bytes."""
    i2e = tmp_path / "i2e"
    shutil.copytree(built["i2e"], i2e)
    before = hashlib.sha256(open(i2e / "00001.tar", "rb").read()).hexdigest()
    os.remove(i2e / "00001.tar")
    os.remove(i2e / "_markers" / "write" / "00001.done.json")
    res = write.run_write(
        built["config"].write, built["raw"], built["run"], str(i2e), progress=False
    )
    assert res["processed"] == 1
    assert hashlib.sha256(open(i2e / "00001.tar", "rb").read()).hexdigest() == before


def test_resharding_is_deterministic(built, tmp_path):
    c = built["config"].write.replace(shard_size=7)
    a = write.run_write(c, built["raw"], built["run"], str(tmp_path / "a"), progress=False)
    b = write.run_write(
        c.replace(workers=2), built["raw"], built["run"], str(tmp_path / "b"), progress=False
    )
    assert a["num_samples"] == b["num_samples"] == built["res"]["write"]["num_samples"]
    sizes = json.loads(open(tmp_path / "a" / "sizes.json").read())
    assert all(v == 7 for v in list(sizes.values())[:-1])
    for name in sizes:
        assert open(tmp_path / "a" / name, "rb").read() == open(tmp_path / "b" / name, "rb").read()


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


def test_stage_errors_are_clear(built, tmp_path):
    import torch

    from training.core.config import ConfigError

    with pytest.raises(FileNotFoundError, match="raw input not found"):
        ner.run_ner(
            built["config"].ner, str(tmp_path / "nothing"), built["kb"], str(tmp_path / "r")
        )
    with pytest.raises(FileNotFoundError, match="run `mofi ner` first"):
        scoring.run_score(built["config"].score, built["raw"], str(tmp_path / "r2"), built["kb"])
    with pytest.raises(ConfigError, match="reference_every"):
        scoring.run_score(
            built["config"].score, built["raw"], built["run"], built["kb"], reference_every=-1
        )
    with pytest.raises(FileNotFoundError, match="run `mofi score` first"):
        vocab.run_vocab(built["config"].vocab, str(tmp_path / "r3"), built["kb"])
    with pytest.raises(ConfigError, match="another vocab config"):
        vocab.run_vocab(built["config"].vocab.replace(threshold=0.9), built["run"], built["kb"])
    with pytest.raises(ConfigError, match="open_clip has no architecture"):
        scoring.build_backend(
            built["config"].score.replace(backend="open_clip", model="NoSuchNet"),
            built["run"],
            torch.device("cpu"),
        )
    with pytest.raises(FileNotFoundError, match="scorer-bootstrap"):
        scoring.build_backend(built["config"].score, str(tmp_path / "norun"), torch.device("cpu"))


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

    c = scoring.ScoreConfig()
    assert scoring.decode_plan(c, torch.device("cpu"), 2, 1) == ("threads", 2)
    n = os.cpu_count() or 1
    assert scoring.decode_plan(c, torch.device("cuda", 0), 2, 1) == ("device", 2)
    assert scoring.decode_plan(c.replace(decode="processes"), torch.device("cuda", 0), 2, 1) == (
        "processes",
        max(1, n - 1),
    )
    assert scoring.decode_plan(c.replace(loader_workers=5), torch.device("cpu"), 2, 1) == (
        "threads",
        5,
    )
    assert scoring.decode_plan(c.replace(decode="processes"), torch.device("cpu"), n, 1) == (
        "processes",
        1,
    )
    from training.core.config import ConfigError

    with pytest.raises(ConfigError, match="decode"):
        scoring.ScoreConfig(decode="gpu")


def test_too_small_to_calibrate_is_refused_with_the_reason(built, tmp_path):
    """The calibrated filter on a corpus of 64 pairs: a clear failure, shown by status, and
    no vocabulary or labels published (never an empty or skewed I2E)."""
    from pipeline_tasks.filtering import FilterError
    from pipeline_tasks.runtime import status

    run = tmp_path / "run"
    shutil.copytree(os.path.join(built["run"], "ner"), run / "ner")
    shutil.copytree(os.path.join(built["run"], "score"), run / "score")
    c = built["config"].vocab.replace(threshold_mode="calibrated")
    with pytest.raises(FilterError, match="cannot calibrate the filter: only \\d+ null scores"):
        vocab.run_vocab(c, str(run), built["kb"], progress=False)
    assert not (run / "vocab" / "vocab.parquet").exists()
    (s,) = [s for s in status.summarize_run(str(run)) if s["stage"] == "vocab"]
    assert s["failed"] == 1 and "vocab.min_null_pairs" in s["failed_shards"]["00000"]
    with pytest.raises(FileNotFoundError, match="run `mofi vocab` first|labels are incomplete"):
        write.run_write(built["config"].write, built["raw"], str(run), str(tmp_path / "i2e"))


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
