"""`mofi build-i2e` on a tiny corpus with hostile raw input (the shared ``built`` fixture):
discovery, nothing written outside the roots, a re-run is a byte-identical no-op, clear errors."""

from __future__ import annotations

import hashlib
import os

import pytest

from pipeline_tasks import build
from pipeline_tasks.runtime import markers, raw
from pipeline_tasks.stages.ner import stage as ner
from pipeline_tasks.stages.score import stage as scoring
from pipeline_tasks.stages.score.backends import build_backend
from pipeline_tasks.stages.vocab import stage as vocab

pytestmark = pytest.mark.slow


def test_discovery_counts_incomplete_shards(built):
    shards, problems = raw.discover(built["raw"])
    assert [s.shard for s in shards] == ["00000", "00001", "00002", "00003", "00010", "00013"]
    assert problems == {"00011": "tar_without_parquet", "00012": "parquet_without_tar"}
    assert (
        markers.MarkerStore(os.path.join(built["run"], "ner"), "ner").read_plan()["skipped"]
        == problems
    )


def test_nothing_written_outside_the_roots(built):
    assert not os.path.exists("/tmp/mofi_evil_absolute.jpg")
    parent = os.path.dirname(built["raw"])
    assert not any("mofi_evil" in f for f in os.listdir(parent))
    assert not any("mofi_evil" in f for _, _, fs in os.walk(parent) for f in fs)


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
        build_backend(
            built["config"].score.replace(backend="open_clip", model="NoSuchNet"),
            built["run"],
            torch.device("cpu"),
        )
    with pytest.raises(FileNotFoundError, match="scorer-bootstrap"):
        build_backend(built["config"].score, str(tmp_path / "norun"), torch.device("cpu"))
