"""Every input a command reads, damaged every way, before any work: one line naming the
file and what is wrong, exit 2 (never a traceback from deep inside a reader)."""

from __future__ import annotations

import json
import os
import shutil
import traceback

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mofi_testdata import make_eval_folder, make_i2e

from pipeline_tasks import cli

DAMAGES = ("missing", "empty", "truncated", "not_format", "wrong_columns")


def _damage(path: str, how: str, wrong: bytes) -> None:
    """Damage the file at ``path`` in place; ``wrong``: a well-formed file of the wrong shape."""
    data = open(path, "rb").read() if os.path.exists(path) else b""
    if how == "missing":
        os.remove(path)
        return
    out = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "not_format": b"this is not the file you are looking for\n" * 20,
        "wrong_columns": wrong,
    }[how]
    with open(path, "wb") as f:
        f.write(out)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


WRONG_TABLE = _parquet_bytes(pa.table({"colour": ["red"], "size": [3]}))


def _run(argv: list[str], capsys) -> tuple[int | str, str]:
    capsys.readouterr()
    try:
        rc: int | str = cli.main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code if isinstance(exc.code, int) else 2
    except BaseException:
        rc = "crash: " + traceback.format_exc()[-1500:]
    return rc, capsys.readouterr().err


@pytest.fixture
def inputs(tiny_corpus, tmp_path):
    """A fresh copy of each valid input, ready to be damaged."""
    raw = str(tmp_path / "raw")
    shutil.copytree(tiny_corpus["raw"], raw)
    kb = str(tmp_path / "kb")
    shutil.copytree(tiny_corpus["kb"], kb)
    i2e = make_i2e(tmp_path / "i2e", n_shards=2, per_shard=8)
    evald = make_eval_folder(tmp_path / "eval", per_class=2, n_classes=3)
    ckpt = str(tmp_path / "model.pt")
    cfg = str(tmp_path / "train.config.json")
    return {"raw": raw, "kb": kb, "i2e": i2e, "eval": evald, "ckpt": ckpt, "cfg": cfg,
            "out": str(tmp_path / "out")}  # fmt: skip


def _case_kb(inp, how):
    path = os.path.join(inp["kb"], "entities.parquet")
    _damage(path, how, WRONG_TABLE)
    return path, ["build-i2e", "--raw", inp["raw"], "--kb", inp["kb"],
                  "--config", "cpu_test", "--out", inp["out"], "--no-progress"]  # fmt: skip


def _case_raw_parquet(inp, how):
    path = os.path.join(inp["raw"], "00001.parquet")
    _damage(path, how, WRONG_TABLE)
    if how == "missing":  # a shard without its Parquet is a counted skip; the root missing is not
        shutil.rmtree(inp["raw"])
        path = inp["raw"]
    return path, ["build-i2e", "--raw", inp["raw"], "--kb", inp["kb"],
                  "--config", "cpu_test", "--out", inp["out"], "--no-progress"]  # fmt: skip


def _case_raw_tar(inp, how):
    path = os.path.join(inp["raw"], "00002.tar")
    _damage(path, how, b"")
    if how == "missing":
        for f in os.listdir(inp["raw"]):  # a raw root with no shard in it
            if f.endswith((".tar", ".parquet")):
                os.remove(os.path.join(inp["raw"], f))
        path = inp["raw"]
    return path, ["build-i2e", "--raw", inp["raw"], "--kb", inp["kb"],
                  "--config", "cpu_test", "--out", inp["out"], "--no-progress"]  # fmt: skip


def _case_config(inp, how):
    from training import recipes

    path = inp["cfg"]
    with open(path, "w") as f:
        json.dump(recipes.get("cpu_test").to_dict(), f)
    _damage(path, how, json.dumps({"optimiser": {"lr": 1}, "colour": "red"}).encode())
    return path, ["train", "--i2e", inp["i2e"], "--out", inp["out"], "--config-file", path,
                  "--dry-run"]  # fmt: skip


def _case_checkpoint(inp, how):
    import torch

    path = inp["ckpt"]
    torch.save({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    buf = inp["ckpt"] + ".wrong"
    torch.save({"colour": "red"}, buf)
    _damage(path, how, open(buf, "rb").read())
    return path, ["eval", "--model", path, "--images", inp["eval"], "--no-results",
                  "--no-progress", "--device", "cpu"]  # fmt: skip


def _case_eval_folder(inp, how):
    d = inp["eval"]
    files = sorted(os.listdir(d))
    if how == "missing":
        shutil.rmtree(d)
    elif how == "empty":
        for f in files:
            os.remove(os.path.join(d, f))
    elif how in ("truncated", "not_format"):
        for f in files:
            _damage(os.path.join(d, f), how, b"")
    else:  # images, but not named {class}_{name}.jpg
        for i, f in enumerate(files):
            os.rename(os.path.join(d, f), os.path.join(d, f"picture{i}.jpg"))
    return d, ["eval", "--model", "packaged", "--images", d, "--no-results", "--no-progress",
               "--device", "cpu", "--out", os.path.join(inp["out"], "m.json")]  # fmt: skip


CASES = {
    "kb": _case_kb,
    "raw_parquet": _case_raw_parquet,
    "raw_tar": _case_raw_tar,
    "config": _case_config,
    "checkpoint": _case_checkpoint,
    "eval_folder": _case_eval_folder,
}


# a tar has no columns: bad members inside a whole tar are counted skips of their samples
# (the hostile shard of tests/pipeline_tasks/conftest.py)
TABLE = [(k, h) for k in CASES for h in DAMAGES if (k, h) != ("raw_tar", "wrong_columns")]


@pytest.mark.parametrize(("kind", "how"), TABLE)
def test_a_damaged_input_is_one_line_and_exit_2(kind, how, inputs, capsys):
    path, argv = CASES[kind](inputs, how)
    rc, err = _run(argv, capsys)
    assert rc == 2, f"{kind}/{how}: exit {rc}\n{err[-3000:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"{kind}/{how}: {len(lines)} lines:\n{err[-3000:]}"
    assert path in lines[0], lines[0]
    assert not os.path.exists(os.path.join(inputs["out"], "00000.tar"))  # no work was done
