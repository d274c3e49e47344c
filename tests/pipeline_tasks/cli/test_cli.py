"""The `mofi` command end to end on tiny inputs (real subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys


def mofi(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "pipeline_tasks.cli", *args], capture_output=True, text=True, env=env
    )


def test_config_list_show_doc():
    out = mofi("config", "list")
    assert out.returncode == 0 and "cpu_test" in out.stdout and "production" in out.stdout
    assert '"pairs": 5000' in mofi("config", "show", "corpus:demo").stdout
    assert '"threshold": 0.25' in mofi("config", "show", "production").stdout
    doc = mofi("config", "doc", "corpus:cpu_test").stdout
    assert "[corpus]" in doc and "misspell_prob" in doc
    doc = mofi("config", "doc", "cpu_test").stdout
    assert "[score]" in doc and "[corpus]" not in doc
    bad = mofi("config", "show", "nope")
    assert bad.returncode == 2 and "unknown config" in bad.stderr


def test_kb_corpus_status_from_the_command_line(tmp_path, picture_folder, tiny_kb_table):
    run = tmp_path / "run"
    r = mofi("-q", "kb", "--out", str(run / "kb"), "--source", tiny_kb_table)
    assert r.returncode == 0, r.stderr
    assert "17 entities" in r.stdout
    r = mofi(
        "-q",
        "corpus",
        "--out",
        str(run / "raw"),
        "--kb",
        str(run / "kb"),
        "--pairs",
        "30",
        "--shard-size",
        "10",
        "--stamps",
        str(picture_folder),
        "--config",
        "cpu_test",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert "30 pairs in 3 shards" in r.stdout
    st = mofi("-q", "status", str(run))
    assert st.returncode == 0
    lines = [ln for ln in st.stdout.splitlines() if ln.startswith(("kb", "corpus", "pictures"))]
    assert len(lines) == 3 and all("complete" in ln for ln in lines)
    assert os.path.exists(run / "eval" / "classes.json")


def test_clear_errors_for_bad_input(tmp_path, picture_folder):
    base = ["-q", "corpus", "--out", str(tmp_path / "raw"), "--kb", str(tmp_path / "nokb")]
    r = mofi(*base, "--stamps", str(picture_folder), "--pairs", "5")
    assert r.returncode == 2 and "no knowledge base" in r.stderr and "Traceback" not in r.stderr
    r = mofi(*base, "--pairs", "0")
    assert r.returncode == 2 and "pairs" in r.stderr


def test_named_flags_and_set_reach_the_config():
    """A named flag stands for one config path; --set reaches any field, nested ones too, and
    its value is parsed as the field's type."""
    from pipeline_tasks.cli import build_parser
    from pipeline_tasks.cli.common import pipeline_config, with_overrides
    from pipeline_tasks.cli.stages import vocab_config
    from training import recipes as train_recipes

    args = build_parser().parse_args(
        ["score", "--raw", "r", "--kb", "k", "--run", "x", "--batch-size", "9"]
        + ["--set", "score.decode=threads", "--set", "vocab.spark.master=local[1]"]
        + ["--set", "score.jpeg_draft=false", "--set", "kb.sources=vital,countries"]
    )
    c = pipeline_config(args)
    assert (c.score.batch_size, c.score.decode, c.score.jpeg_draft) == (9, "threads", False)
    assert c.vocab.spark.master == "local[1]" and c.kb.sources == ("vital", "countries")
    args = build_parser().parse_args(["vocab", "--kb", "k", "--run", "x", "--threshold", "0.3"])
    v = vocab_config(args)
    assert (v.threshold, v.threshold_mode) == (0.3, "absolute")  # a threshold is absolute
    args = build_parser().parse_args(
        ["hygiene", "--run", "x", "--eval-folder", "a", "--eval-folder", "s3://b/c"]
        + ["--phash-distance", "-1", "--near-threshold", "0.93", "--local-max-images", "0"]
    )
    h = pipeline_config(args).hygiene
    assert (h.eval_folders, h.phash_distance, h.near_threshold) == (("a", "s3://b/c"), -1, 0.93)
    assert h.local_max_images == 0
    args = build_parser().parse_args(
        ["train", "--i2e", "i", "--out", "o", "--mode", "supervised", "--nnodes", "2"]
        + ["--rdzv-endpoint", "head:29400"]
        + ["--set", "optim.lr=0.5", "--set", "data.batch_size=3"]
    )
    t = with_overrides(train_recipes.get("cpu_test"), args)
    assert (t.loss.mode, t.dist.nnodes, t.optim.lr, t.data.batch_size) == (
        "supervised",
        2,
        0.5,
        3,
    )


def test_a_bad_set_is_one_line_and_exit_2(tmp_path):
    for assignment, says in (
        ("score.nope=1", "ScoreConfig has no field 'nope'"),
        ("score.batch_size=x", "invalid literal"),
        ("score.batch_size=0", "must be >= 1"),
        ("score=1", "a section, not a value"),
        ("score.batch_size", "use PATH=VALUE"),
    ):
        r = mofi("score", "--raw", str(tmp_path), "--kb", str(tmp_path), "--run", str(tmp_path),
                 "--set", assignment)  # fmt: skip
        assert r.returncode == 2, (assignment, r.stderr)
        assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
