"""The I2E training loader: manifest checks, no duplicates across ranks and workers, exact resume."""

import json
import os
import tarfile

import pytest
import torch
from mofi_testdata import make_i2e

from training import data
from training.core.config import ConfigError


def _spec(manifest, rank, world, epoch=0, start=0, workers=2, batch=4):
    steps = data.steps_per_epoch(manifest.shards, world, workers, batch, seed=3, epoch=epoch)
    return data.LoaderSpec(
        shards=manifest.shards,
        world_size=world,
        rank=rank,
        batch_size=batch,
        image_size=32,
        seed=3,
        epoch=epoch,
        steps=steps,
        start_step=start,
        num_workers=workers,
        shuffle_buffer=16,
    )


def _batches(spec):
    return list(data.make_loader(spec, start_method="spawn"))


def test_manifest(tiny_i2e):
    m = data.load_manifest(tiny_i2e)
    assert m.num_classes == 6 and m.num_samples == 96 and len(m.shards) == 4
    assert m.entity_texts()[1] == "thing 1, a round colour 1"
    assert len(m.version()) == 12


def test_manifest_errors(tmp_path, tiny_i2e):
    with pytest.raises(ConfigError, match="no I2E URI"):
        data.load_manifest("")
    with pytest.raises(ConfigError, match="sizes.json is missing"):
        data.load_manifest(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "sizes.json").write_text("{}")
    (empty / "vocab.parquet").write_bytes(
        open(os.path.join(tiny_i2e, "vocab.parquet"), "rb").read()
    )
    with pytest.raises(ConfigError, match="lists no shards"):
        data.load_manifest(str(empty))
    info = json.load(open(os.path.join(tiny_i2e, "_info.json")))
    json.dump({**info, "num_classes": 9}, open(os.path.join(tiny_i2e, "_info.json"), "w"))
    with pytest.raises(ConfigError, match="vocabulary and shards disagree"):
        data.load_manifest(tiny_i2e)
    json.dump(info, open(os.path.join(tiny_i2e, "_info.json"), "w"))
    os.remove(os.path.join(tiny_i2e, "00002.tar"))
    with pytest.raises(ConfigError, match="00002.tar, which is not in"):
        data.load_manifest(tiny_i2e)


def test_more_ranks_than_shards_is_a_clear_error(tiny_i2e):
    m = data.load_manifest(tiny_i2e)
    with pytest.raises(ConfigError, match="fewer than the 5 ranks"):
        data.steps_per_epoch(m.shards, 5, 1, 4, 0, 0)


def test_shard_assignment_is_a_partition_and_balanced():
    shards = [(f"s{i}", n) for i, n in enumerate([10, 3, 7, 7, 2, 9, 4])]
    for epoch in range(3):
        per_rank = data.assign_shards(shards, 3, seed=1, epoch=epoch)
        flat = sorted(s for r in per_rank for s in r)
        assert flat == sorted(shards)
        loads = [sum(n for _, n in r) for r in per_rank]
        assert max(loads) - min(loads) <= 10
    assert data.assign_shards(shards, 3, 1, 0) != data.assign_shards(shards, 3, 1, 1)


@pytest.mark.slow
def test_no_duplicates_across_ranks_and_workers(tiny_i2e):
    m = data.load_manifest(tiny_i2e)
    world, batch = 2, 4
    keys_per_rank = []
    for rank in range(world):
        spec = _spec(m, rank, world, batch=batch)
        batches = _batches(spec)
        assert [b["step"] for b in batches] == list(range(spec.steps))
        assert all(
            b["image"].shape == (batch, 3, 32, 32) and b["image"].dtype == torch.uint8
            for b in batches
        )
        keys = [k for b in batches for k in b["key"]]
        assert len(keys) == len(set(keys)) == spec.steps * batch
        keys_per_rank.append(set(keys))
    assert not keys_per_rank[0] & keys_per_rank[1]
    # 96 samples: 48 per rank, 24 per worker, 6 batches of 4 per worker: 12 steps on every rank
    assert data.steps_per_epoch(m.shards, world, 2, batch, 3, 0) == 12


@pytest.mark.slow
def test_resume_inside_an_epoch_gives_the_same_batches(tiny_i2e):
    m = data.load_manifest(tiny_i2e)
    full = _batches(_spec(m, 1, 2, epoch=1))
    tail = _batches(_spec(m, 1, 2, epoch=1, start=3))
    assert [b["step"] for b in tail] == list(range(3, len(full)))
    for a, b in zip(full[3:], tail, strict=True):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    other_epoch = _batches(_spec(m, 1, 2, epoch=2))
    assert [b["key"] for b in other_epoch] != [b["key"] for b in full]


def test_corrupt_image_is_a_counted_skip_and_the_quota_is_kept(tmp_path):
    root = make_i2e(tmp_path / "i2e", n_shards=1, per_shard=12)
    tar = os.path.join(root, "00000.tar")
    members = []
    with tarfile.open(tar) as tf:
        for info in tf.getmembers():
            members.append((info, tf.extractfile(info).read()))
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i, (info, payload) in enumerate(members):
            if i == 0:  # the first image: truncated JPEG
                payload = payload[:40]
                info.size = len(payload)
            if i == 3:  # the second record: broken JSON
                payload = b"{not json"
                info.size = len(payload)
            import io

            tf.addfile(info, io.BytesIO(payload))
    m = data.load_manifest(root)
    spec = _spec(m, 0, 1, workers=0, batch=4)
    ds = data.I2EBatches(spec)
    batches = list(ds)
    # 12 samples, 2 unreadable: the worker wraps around its stream to fill its 3 batches
    assert len(batches) == spec.steps == 3
    assert sum(v for k, v in ds.drops.items() if k.startswith("bad_image")) >= 1
    assert ds.drops["bad_json"] >= 1
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 12 and len(set(keys)) == 10
