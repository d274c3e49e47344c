"""Shared fixtures: tiny pictures and KBs made on the fly, a real moto S3 server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from pipeline_tasks.demo.layout import DAG_BUNDLE as DEMO_DAG_BUNDLE
from pipeline_tasks.demo.layout import DAG_FOLDER as DEMO_DAG_FOLDER
from pipeline_tasks.orchestration.local_airflow import dag_bundles

# Airflow reads its configuration when first imported: give the test session its own
# home (SQLite metadata DB) and no example DAGs before any test can import it.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="mofi-airflow-home-")
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__PARALLELISM"] = "2"
# the Spark stages' master comes from this connection, as in a deployment
os.environ.setdefault("AIRFLOW_CONN_SPARK_DEFAULT", '{"conn_type": "spark", "host": "local[2]"}')
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dags"
)
# the demo's DAG is a bundle of its own beside dags/, as the demo's local Airflow loads it
os.environ["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"] = json.dumps(
    dag_bundles({DEMO_DAG_BUNDLE: DEMO_DAG_FOLDER})
)

from training.core.compat import ensure_torchvision  # noqa: E402

# Before any test module can import open_clip/timm/transformers.
ensure_torchvision()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_heartbeats_after_the_test():
    """A test that leaves a claim behind (a worker it plays dead) must not keep beating for it
    in the next tests: the beat's S3 requests would land in their counts and client resets."""
    yield
    from pipeline_tasks.runtime.markers import HEARTBEATS

    HEARTBEATS.drop_all()


@pytest.fixture(scope="session")
def moto_server():
    """A moto S3 server in its own process, spoken to over real HTTP."""
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("moto_server exited early") from None
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(moto_server, monkeypatch):
    """A fresh bucket on the moto server; returns its s3:// root."""
    from training.core import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage.reset_clients()
    name = f"b{time.time_ns()}"
    storage.s3_client().create_bucket(Bucket=name)
    yield f"s3://{name}"
    storage.reset_clients()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage_root(request, tmp_path):
    """The same test on local disk and on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/run/v=2026-11-23"


# ------------------------------------------------------------------ tiny data

PICTURES = {
    # category: [(stem, caption, shape, colour)]
    "fruit": [
        ("apple", "A red apple.", "circle", (220, 30, 30)),
        ("banana", "A yellow banana.", "ellipse", (240, 220, 40)),
        ("apple_green", "A green apple.", "circle", (40, 200, 60)),
        ("lemon", "A lemon.", "ellipse", (250, 250, 80)),
        ("cherry", "Some cherries.", "circle", (150, 0, 30)),
    ],
    "vehicles": [
        ("car", "A blue car.", "rect", (30, 60, 220)),
        ("truck", "A fire truck.", "rect", (230, 20, 20)),
        ("bus", "A school bus.", "rect", (250, 200, 0)),
        ("boat", "A toy boat.", "triangle", (90, 90, 200)),
        ("train", "A train.", "rect", (60, 60, 60)),
    ],
    "animals/birds": [
        ("owl", "An owl.", "triangle", (120, 80, 40)),
        ("penguin", "A penguin.", "ellipse", (20, 20, 20)),
        ("crow", "A crow.", "triangle", (10, 10, 10)),
    ],
}


def draw_picture(path: str, shape: str, colour: tuple[int, int, int], size: int = 96) -> None:
    from PIL import Image, ImageDraw

    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    box = (8, 8, size - 8, size - 8)
    if shape == "circle":
        d.ellipse(box, fill=colour + (255,))
    elif shape == "ellipse":
        d.ellipse((8, size // 4, size - 8, 3 * size // 4), fill=colour + (255,))
    elif shape == "triangle":
        d.polygon([(size // 2, 8), (size - 8, size - 8), (8, size - 8)], fill=colour + (255,))
    else:
        d.rectangle(box, fill=colour + (255,))
    im.save(path)


def make_picture_folder(root) -> None:
    """13 good picture + caption pairs in 3 categories (one with a style sub-folder)."""
    for cat, items in PICTURES.items():
        for stem, caption, shape, colour in items:
            sub = root / cat / ("cartoon" if stem == "apple_green" else "")
            sub.mkdir(parents=True, exist_ok=True)
            draw_picture(str(sub / f"{stem}.png"), shape, colour)
            (sub / f"{stem}.txt").write_text(caption + "\nfr.utf8=traduction\n", encoding="utf-8")


@pytest.fixture
def picture_folder(tmp_path):
    root = tmp_path / "pictures"
    make_picture_folder(root)
    return root


TINY_KB = [
    {
        "entity_id": "Q89",
        "name": "Apple",
        "aliases": ["apples"],
        "description": "fruit of the apple tree",
        "type": "organism",
    },
    {
        "entity_id": "Q503",
        "name": "Banana",
        "aliases": [],
        "description": "elongated edible fruit",
        "type": "organism",
    },
    {
        "entity_id": "Q1093742",
        "name": "Lemon",
        "aliases": [],
        "description": "citrus fruit",
        "type": "organism",
    },
    {
        "entity_id": "Q196",
        "name": "Cherry",
        "aliases": [],
        "description": "fruit of the genus Prunus",
        "type": "organism",
    },
    {
        "entity_id": "Q1420",
        "name": "Car",
        "aliases": ["automobile"],
        "description": "motor vehicle with wheels",
        "type": "technology",
    },
    {
        "entity_id": "Q43193",
        "name": "Truck",
        "aliases": ["lorry"],
        "description": "motor vehicle for cargo",
        "type": "technology",
    },
    {
        "entity_id": "Q5638",
        "name": "Bus",
        "aliases": [],
        "description": "large road vehicle for passengers",
        "type": "technology",
    },
    {
        "entity_id": "Q35872",
        "name": "Boat",
        "aliases": [],
        "description": "watercraft",
        "type": "technology",
    },
    {
        "entity_id": "Q870",
        "name": "Train",
        "aliases": [],
        "description": "rail vehicle",
        "type": "technology",
    },
    {
        "entity_id": "Q5208",
        "name": "Bird",
        "aliases": ["birds"],
        "description": "class of animals",
        "type": "organism",
    },
    {
        "entity_id": "Q9186",
        "name": "Owl",
        "aliases": [],
        "description": "bird of prey",
        "type": "organism",
    },
    {
        "entity_id": "Q9147",
        "name": "Penguin",
        "aliases": [],
        "description": "flightless seabird",
        "type": "organism",
    },
    {
        "entity_id": "Q90",
        "name": "Paris",
        "aliases": [],
        "description": "capital of France",
        "type": "city",
    },
    {
        "entity_id": "Q60",
        "name": "New York City",
        "aliases": ["New York"],
        "description": "city in the USA",
        "type": "city",
    },
    {
        "entity_id": "Q142",
        "name": "France",
        "aliases": [],
        "description": "country in Europe",
        "type": "country",
    },
    {
        "entity_id": "Q937",
        "name": "Albert Einstein",
        "aliases": ["Einstein"],
        "description": "physicist",
        "type": "person",
    },
    {
        "entity_id": "Q762",
        "name": "Leonardo da Vinci",
        "aliases": [],
        "description": "Italian polymath",
        "type": "person",
    },
]


@pytest.fixture
def tiny_kb_table(tmp_path):
    path = tmp_path / "tiny_kb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TINY_KB), encoding="utf-8")
    return str(path)


@pytest.fixture
def tiny_kb(tmp_path, tiny_kb_table):
    from pipeline_tasks.stages.kb.stage import KBConfig, build_kb

    out = str(tmp_path / "kb")
    build_kb(KBConfig(sources=(tiny_kb_table,)), out)
    return out


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A 64-pair corpus (4 shards) over the tiny KB, built once per test session; treat as read-only."""
    from pipeline_tasks.demo import corpus
    from pipeline_tasks.demo import recipes as demo_recipes
    from pipeline_tasks.stages.kb.stage import KBConfig, build_kb

    root = tmp_path_factory.mktemp("tiny_corpus")
    pictures = root / "pictures"
    make_picture_folder(pictures)
    kb_table = root / "tiny_kb.jsonl"
    kb_table.write_text("".join(json.dumps(r) + "\n" for r in TINY_KB), encoding="utf-8")
    kb = str(root / "kb")
    build_kb(KBConfig(sources=(str(kb_table),)), kb)
    c = demo_recipes.cpu_test().replace(
        stamps_dir=str(pictures), pairs=64, shard_size=16, holdout_min_pictures=5
    )
    corpus.build_corpus(c, str(root / "raw"), kb, progress=False)
    return {
        "root": root,
        "raw": str(root / "raw"),
        "kb": kb,
        "truth": str(root / "truth"),
        "eval": str(root / "eval"),
    }


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is present (never in CI)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
