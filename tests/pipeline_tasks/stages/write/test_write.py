"""The write stage over the shared build (``built``): WebDataset reads the shards back, a
killed shard is redone identically, resharding is deterministic."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from unittest.mock import ANY

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline_tasks.stages.write import stage as write

pytestmark = pytest.mark.slow


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
    # the hygiene settings and drops that built it (cpu_test: every part off, nothing dropped)
    hygiene = built["config"].hygiene
    settings = json.loads(json.dumps(hygiene.settings()))
    assert info["hygiene"] == {"settings": settings, "drops": {}, "images_in": ANY}


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
