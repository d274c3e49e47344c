"""Incremental rebuilds (``runtime.reuse``): a rebuild computes only the shards whose inputs
changed, copies the rest from the earlier build, and writes the same I2E as a full build.

Everything runs for real on the session's tiny build (``built``: Spark local, spaCy, the
bootstrapped packaged scorer); "computed" and "reused" are read from the done markers."""

from __future__ import annotations

import filecmp
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mofi_testdata import copy_raw_shard

from pipeline_tasks import build
from pipeline_tasks.runtime import reuse, status
from pipeline_tasks.runtime.executor import ShardTask, StageResult, pending_tasks
from pipeline_tasks.runtime.layout import NER, SCORE, RunLayout
from pipeline_tasks.runtime.markers import MarkerStore, ShardStats
from pipeline_tasks.stages.ner.stage import run_ner
from pipeline_tasks.stages.score.stage import ensure_scorer, run_score
from training.core.config import ConfigError

pytestmark = pytest.mark.slow


def _done(run: str, stage: str) -> dict[str, dict]:
    return {s: r for s, r in RunLayout(run).store(stage).read_all().items() if r["state"] == "done"}


def _split(run: str, stage: str) -> tuple[set[str], set[str]]:
    """(computed here, reused) shards of a stage, from its done markers."""
    done = _done(run, stage)
    reused = {s for s, r in done.items() if r.get("reused_from")}
    return set(done) - reused, reused


def _data_files(i2e: str) -> list[str]:
    """The I2E's data files: everything but markers, and ``_info.json`` (it names its run
    folder, which differs between two builds by construction)."""
    out = []
    for d, dirs, files in os.walk(i2e):
        dirs[:] = [x for x in dirs if x != "_markers"]
        out += [os.path.relpath(os.path.join(d, f), i2e) for f in files if f != "_info.json"]
    return sorted(out)


def _raw_copy(built, dst) -> str:
    raw = str(dst)
    shutil.copytree(built["raw"], raw, ignore=shutil.ignore_patterns("_markers"))
    return raw


def test_a_rebuild_computes_only_what_changed_and_writes_what_a_full_build_writes(built, tmp_path):
    # v2: 00001 re-crawled (same name, two samples fewer), 00003 deleted, 00020 new
    raw2 = _raw_copy(built, tmp_path / "raw2")
    copy_raw_shard(raw2, "00001", drop_last=2)
    os.remove(os.path.join(raw2, "00003.tar"))
    os.remove(os.path.join(raw2, "00003.parquet"))
    copy_raw_shard(built["raw"], "00002", raw2, new_shard="00020")
    v2 = tmp_path / "v=2"
    run2 = str(v2 / "i2e_run")
    build.build_i2e(
        built["config"], raw2, built["kb"], run2, str(v2 / "i2e"), False, str(built["run"])
    )
    planned = set(RunLayout(run2).store(NER).read_plan()["shards"])
    assert "00003" not in planned and {"00001", "00020"} <= planned
    for stage in (NER, SCORE):
        computed, reused = _split(run2, stage)
        assert computed == {"00001", "00020"}, stage
        assert reused == planned - {"00001", "00020"}, stage
        for shard in reused:  # where from, and under which key
            rec = _done(run2, stage)[shard]
            assert rec["reused_from"]["run"] == built["run"]
            assert rec["key"] == _done(built["run"], stage)[shard]["key"]
    # the scorer was kept, not bootstrapped again
    assert filecmp.cmp(
        RunLayout(run2).scorer_checkpoint, RunLayout(built["run"]).scorer_checkpoint, False
    )
    text = status.render(status.summarize_run(str(v2)), str(v2), shards=True)
    assert f"{len(planned) - 2} shards reused from {built['run']}, 2 computed here" in text
    assert f"00000: reused from {built['run']}" in text

    # v3: the original inputs again, rebuilt from v2: only what v2 changed is computed, and
    # the I2E equals the full build's of the same inputs with the same scorer, byte for byte
    raw3 = _raw_copy(built, tmp_path / "raw3")
    v3 = tmp_path / "v=3"
    run3, i2e3 = str(v3 / "i2e_run"), str(v3 / "i2e")
    build.build_i2e(built["config"], raw3, built["kb"], run3, i2e3, False, str(v2))
    assert _split(run3, NER)[0] == {"00001", "00003"}
    assert _split(run3, SCORE)[0] == {"00001", "00003"}
    files = _data_files(built["i2e"])
    assert files == _data_files(i2e3) and any(f.endswith(".tar") for f in files)
    _, mismatch, errors = filecmp.cmpfiles(built["i2e"], i2e3, files, shallow=False)
    assert not mismatch and not errors


@pytest.fixture(scope="module")
def ner_reused(built, tmp_path_factory):
    """A new version of the same inputs whose ner was entirely copied (no Spark job ran)."""
    run = str(tmp_path_factory.mktemp("ner_reused") / "i2e_run")
    res = run_ner(built["config"].ner, built["raw"], built["kb"], run, False, built["run"])
    assert res.processed == 0 and len(res.reused) == res.shards > 0
    return run


def _score_into(built, ner_run: str, dst, config, boot=None) -> StageResult:
    """A new run with ``ner_run``'s ner output, scored with reuse from the built run;
    ``boot``: retrain the scorer with this bootstrap config instead of keeping the built one."""
    run = str(dst)
    shutil.copytree(ner_run, run, ignore=shutil.ignore_patterns("_work", "score", "scorer"))
    p = built["config"]
    args = (built["raw"], built["kb"], run, False, built["run"], boot is not None)
    ensure_scorer(config, boot or p.bootstrap, *args)
    return run_score(config, built["raw"], run, built["kb"], False, reuse_from=built["run"])


def test_a_changed_score_config_rescores_every_shard_and_keeps_ner(built, ner_reused, tmp_path):
    c = built["config"].score
    same = _score_into(built, ner_reused, tmp_path / "same", c.replace(devices="cpu"))
    assert same.processed == 0 and len(same.reused) == same.shards  # devices: not an output
    other = c.replace(prompts=("a picture of {name}",))
    res = _score_into(built, ner_reused, tmp_path / "prompts", other)
    assert res.processed == res.shards > 0 and not res.reused
    rec = next(iter(_done(str(tmp_path / "prompts"), SCORE).values()))
    assert rec["key"]["parts"]["config"] == other.output_fingerprint() != c.output_fingerprint()


def test_a_retrained_scorer_rescores_every_shard(built, ner_reused, tmp_path):
    # another seed: a scorer with other weights (retraining alike would give the same bytes,
    # and then the same scores: nothing to redo)
    boot = built["config"].bootstrap.replace(seed=1)
    res = _score_into(built, ner_reused, tmp_path / "r", built["config"].score, boot)
    assert res.processed == res.shards > 0 and not res.reused
    assert not filecmp.cmp(
        RunLayout(str(tmp_path / "r")).scorer_checkpoint,
        RunLayout(built["run"]).scorer_checkpoint,
        False,
    )


def test_a_changed_kb_redoes_ner_and_score(built, tmp_path):
    kb = str(tmp_path / "kb")
    shutil.copytree(built["kb"], kb)
    path = os.path.join(kb, "entities.parquet")
    t = pq.read_table(path)
    desc = t.column("description").to_pylist()
    desc[0] = desc[0] + " (revised)"
    pq.write_table(
        t.set_column(t.schema.get_field_index("description"), "description", pa.array(desc)), path
    )
    run = str(tmp_path / "i2e_run")
    p = built["config"]
    ner = run_ner(p.ner, built["raw"], kb, run, False, built["run"])
    assert ner.processed == ner.shards > 0 and not ner.reused
    ensure_scorer(p.score, p.bootstrap, built["raw"], kb, run, False, built["run"])
    score = run_score(p.score, built["raw"], run, kb, False, reuse_from=built["run"])
    assert score.processed == score.shards and not score.reused
    parts = next(iter(_done(run, SCORE).values()))["key"]["parts"]
    assert parts["kb"] != next(iter(_done(built["run"], SCORE).values()))["key"]["parts"]["kb"]


def test_a_done_shard_whose_key_changed_is_redone_in_place(tmp_path):
    store = MarkerStore(str(tmp_path / "ner"), NER)
    old = reuse.make_key(NER, {"raw_parquet": "sha256:aa", "kb": "k"})
    store.keys = {"00000": old}
    store.mark_done("00000", ShardStats(n_in=3))
    res = StageResult(stage=NER, out=store.root)
    assert pending_tasks(store, [ShardTask("00000")], res) == []
    store.keys = {"00000": reuse.make_key(NER, {"raw_parquet": "sha256:bb", "kb": "k"})}
    todo = pending_tasks(store, [ShardTask("00000")], res)
    assert [t.shard for t in todo] == ["00000"]
    assert res.redone == {"00000": "its inputs changed (raw_parquet)"}
    assert not store.is_done("00000")


def test_reuse_sources_are_resolved_or_refused(built, tmp_path):
    assert reuse.resolve_source(None) is None and reuse.resolve_source("none") is None
    src = reuse.resolve_source(built["run"])
    assert src.run.root == built["run"]
    version = tmp_path / "v=7"
    RunLayout(str(version / "i2e_run")).store(NER).write_plan(["00000"])
    for uri in (version, version / "i2e", version / "i2e_run"):
        got = reuse.resolve_source(str(uri))
        assert got.run.root == str(version / "i2e_run") and got.label == "v=7"
    with pytest.raises(ConfigError, match="no earlier build there"):
        reuse.resolve_source(str(tmp_path / "nothing"))


def test_keys_leave_out_what_changes_how_not_what(built):
    c = built["config"]
    assert (
        c.ner.output_fingerprint()
        == c.ner.replace(
            spark=c.ner.spark.replace(master="local[1]", partitions=7)
        ).output_fingerprint()
    )
    linker = c.ner.linker
    assert (
        c.ner.output_fingerprint()
        != c.ner.replace(
            linker=linker.replace(min_link_score=linker.min_link_score + 0.1)
        ).output_fingerprint()
    )
    assert (
        c.score.output_fingerprint()
        == c.score.replace(
            devices="cpu", loader_workers=3, torch_threads=1, model="elsewhere.pt"
        ).output_fingerprint()
    )
    assert c.score.output_fingerprint() != c.score.replace(batch_size=7).output_fingerprint()
    a = reuse.make_key(NER, {"raw_parquet": "x", "kb": "y"})
    assert a == reuse.make_key(NER, {"kb": "y", "raw_parquet": "x"})
    assert a["key"] != reuse.make_key(SCORE, {"raw_parquet": "x", "kb": "y"})["key"]
    assert json.loads(json.dumps(a)) == a
