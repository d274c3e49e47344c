"""The fixture the stage tests share: the whole I2E construction on a tiny corpus (real Spark
local[2], real spaCy, real open_clip / packaged towers) with hostile raw input mixed in,
built once per session."""

from __future__ import annotations

import io
import os
import shutil
import struct
import tarfile
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline_tasks import build, recipes


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


@pytest.fixture(scope="session")
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
