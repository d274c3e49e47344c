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
