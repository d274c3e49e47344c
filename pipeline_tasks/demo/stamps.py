"""Real pictures with human captions for the demo corpus.

Source: Debian's ``tuxpaint-stamps-default`` (about 950 picture + caption pairs in ~120
categories; line 1 of each ``.txt`` is the English caption). It is fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x`` (nothing is installed), and only the
PNG pictures and their captions are cached under ``data/stamps`` (about 25 MB).

Any folder of ``NAME.png|jpg`` pictures with a ``NAME.txt`` caption beside each works the
same way (tests build one with generated pictures). The category of a picture is its
folder path relative to the root, with style sub-folders such as ``cartoon`` folded into
their parent.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import tempfile
from typing import Any

from ..runtime import markers
from . import data_dir

log = logging.getLogger(__name__)

DEB_PACKAGE = "tuxpaint-stamps-default"
INDEX_FILE = "index.json"
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
STYLE_DIRS = {"cartoon", "photo", "photos", "outlined", "filled", "uppercase", "lowercase"}
MAX_CAPTION_BYTES = 2000


def default_dir() -> str:
    """``$MOFI_STAMPS_DIR``, else the demo's data folder (never the working directory)."""
    return os.environ.get("MOFI_STAMPS_DIR") or data_dir("stamps")


def category_of(rel_dir: str) -> str:
    parts = [p for p in rel_dir.replace(os.sep, "/").split("/") if p and p != "."]
    while len(parts) > 1 and parts[-1].lower() in STYLE_DIRS:
        parts.pop()
    return "/".join(parts) or "uncategorized"


def _read_caption(path: str) -> tuple[str | None, str | None]:
    """(caption, None) or (None, drop reason). Only line 1 (the English caption) is used."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CAPTION_BYTES)
    except OSError:
        return None, "caption_unreadable"
    first = raw.split(b"\n", 1)[0]
    if len(first) >= MAX_CAPTION_BYTES:
        return None, "caption_too_long"
    try:
        line = first.decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError:
        return None, "caption_not_utf8"
    if not line:
        return None, "caption_empty"
    return line, None


def _check_image(path: str) -> str | None:
    """Drop reason, or None if the picture decodes."""
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            return "image_zero_bytes"
        with Image.open(path) as im:
            im.load()
            if im.width < 8 or im.height < 8:
                return "image_too_small"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return "image_unreadable"
    return None


def index_folder(
    src_root: str, copy_to: str | None = None
) -> tuple[list[dict[str, Any]], markers.ShardStats]:
    """Scan ``src_root`` for picture + caption pairs; optionally copy the good ones to ``copy_to``.

    Returns the records (sorted by id) and the stats with per-reason skip counts.
    """
    stats = markers.ShardStats()
    drop = markers.DropLogger(stats, log)
    records: list[dict[str, Any]] = []
    for txt in sorted(glob.glob(os.path.join(src_root, "**", "*.txt"), recursive=True)):
        base = txt[: -len(".txt")]
        rel = os.path.relpath(base, src_root)
        stats.n_in += 1
        image = next((base + e for e in IMAGE_EXTS if os.path.exists(base + e)), None)
        if image is None:
            drop("svg_only" if os.path.exists(base + ".svg") else "no_picture", rel)
            continue
        caption, reason = _read_caption(txt)
        if reason:
            drop(reason, rel)
            continue
        reason = _check_image(image)
        if reason:
            drop(reason, rel)
            continue
        ext = os.path.splitext(image)[1].lower()
        rel_image = rel + ext
        if copy_to:
            dst = os.path.join(copy_to, "images", rel_image)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(image, dst)
            rel_image = os.path.join("images", rel_image)
        records.append(
            {
                "stamp_id": rel.replace(os.sep, "/"),
                "image": rel_image.replace(os.sep, "/"),
                "caption": caption,
                "category": category_of(os.path.dirname(rel)),
            }
        )
    stats.n_out = len(records)
    return records, stats


def _fetch_deb(workdir: str) -> str:
    """Download and unpack the stamps package; returns the stamps root inside ``workdir``."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FileNotFoundError(
            "the demo pictures come from Debian's tuxpaint-stamps-default, but apt-get/dpkg-deb are not "
            "available here; extract the package elsewhere and pass --stamps DIR"
        )

    def download() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["apt-get", "download", DEB_PACKAGE], cwd=workdir, capture_output=True, text=True
        )

    res = download()
    if res.returncode != 0:
        log.info(
            "apt-get download failed (%s); running apt-get update once", res.stderr.strip()[-200:]
        )
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True)
        res = download()
    if res.returncode != 0:
        raise FileNotFoundError(
            f"apt-get download {DEB_PACKAGE} failed: {res.stderr.strip()[-500:]}"
        )
    debs = glob.glob(os.path.join(workdir, f"{DEB_PACKAGE}_*.deb"))
    if not debs:
        raise FileNotFoundError(f"apt-get download produced no {DEB_PACKAGE} .deb")
    target = os.path.join(workdir, "x")
    subprocess.run(["dpkg-deb", "-x", debs[0], target], check=True)
    root = os.path.join(target, "usr", "share", "tuxpaint", "stamps")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{debs[0]} has no usr/share/tuxpaint/stamps")
    return root


def ensure_stamps(path: str | None = None) -> str:
    """A folder with ``index.json`` and pictures: the cache, fetched on first use, or a user folder."""
    path = path or default_dir()
    if os.path.exists(os.path.join(path, INDEX_FILE)):
        return path
    if os.path.isdir(path) and glob.glob(os.path.join(path, "**", "*.txt"), recursive=True):
        # A user-supplied folder of pairs: index it in place.
        records, stats = index_folder(path)
        _write_index(path, records, stats)
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_root = tempfile.mkdtemp(prefix="mofi-stamps-")
    staging = path.rstrip("/") + ".partial"
    try:
        log.info("fetching %s (161 MB) into %s", DEB_PACKAGE, tmp_root)
        src = _fetch_deb(tmp_root)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        records, stats = index_folder(src, copy_to=staging)
        _write_index(staging, records, stats)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)  # the cache appears whole or not at all
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _write_index(path: str, records: list[dict[str, Any]], stats: markers.ShardStats) -> None:
    if not records:
        raise FileNotFoundError(
            f"no usable picture + caption pairs under {path} (skipped: {stats.drops})"
        )
    tmp = os.path.join(path, INDEX_FILE + ".tmp-index")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"records": records, "stats": stats.to_dict()}, f, indent=1, ensure_ascii=False)
    os.replace(tmp, os.path.join(path, INDEX_FILE))
    log.info("indexed %d pairs under %s; skipped %s", len(records), path, stats.drops)


def list_stamps(path: str) -> list[dict[str, Any]]:
    return read_index(path)[0]


def read_index(path: str) -> tuple[list[dict[str, Any]], markers.ShardStats]:
    with open(os.path.join(path, INDEX_FILE), encoding="utf-8") as f:
        d = json.load(f)
    return d["records"], markers.ShardStats.from_dict(d.get("stats", {}))
