"""The dashboard's JSON endpoints on marker trees written with the real MarkerStore."""

from __future__ import annotations

import json
import os
import time

import pytest
from dashboard_trees import write_done, write_training
from fastapi.testclient import TestClient

from pipeline_tasks import cli
from pipeline_tasks.cli import operations
from pipeline_tasks.dashboard.app import create_app
from pipeline_tasks.dashboard.config import DashboardConfig
from pipeline_tasks.dashboard.results_reader import ResultsReader, masked
from pipeline_tasks.dashboard.training_log import TrainingLogReader
from pipeline_tasks.runtime import markers
from training.core.config import ConfigError


def _client(tree, **kw) -> TestClient:
    config = DashboardConfig(
        roots=(tree["demo"], tree["builds"], tree["missing"]),
        results_url=tree["results"],
        max_age_s=0,
        **kw,
    )
    return TestClient(create_app(config))


def test_runs_lists_every_run_under_the_roots(marker_tree):
    body = _client(marker_tree).get("/api/runs").json()
    assert [r["id"] for r in body["runs"]] == ["demo", "builds/v=2026-11-23", "builds/v=2026-11-24"]
    roots = {r["label"]: r for r in body["roots"]}
    assert roots["demo"]["error"] is None and roots["builds"]["runs"] == 2
    assert "not found" in roots["nothing-here"]["error"]  # reported, the others still shown
    by_id = {r["id"]: r for r in body["runs"]}
    assert by_id["builds/v=2026-11-23"]["state"] == "complete"
    assert by_id["builds/v=2026-11-24"]["state"] == "incomplete"
    (w,) = by_id["builds/v=2026-11-24"]["stages"]
    assert (w["stage"], w["where"], w["done"], w["pending"]) == ("write", "i2e", 1, 2)
    assert by_id["builds/v=2026-11-23"]["uri"].endswith("builds/v=2026-11-23")
    assert "curve" not in by_id["demo"]["training"][0]  # /api/runs leaves curves out


def test_stage_states_counts_and_reasons(marker_tree):
    run = _client(marker_tree).get("/api/runs/demo").json()
    assert run["state"] == "failed"
    ner, score = run["stages"]
    assert (ner["stage"], ner["where"], score["stage"]) == ("ner", "i2e_run/ner", "score")
    counts = {
        k: ner[k] for k in ("done", "failed", "running", "stale_running", "invalid", "pending")
    }
    assert counts == {
        "done": 2,
        "failed": 1,
        "running": 1,
        "stale_running": 1,
        "invalid": 1,
        "pending": 2,
    }
    assert ner["shards_total"] == 8 and ner["state"] == "failed"
    assert ner["failed_shards"] == [
        {"shard": "00003", "error": "ValueError: shard 00003 has no caption column"}
    ]
    (stale,) = ner["stale_shards"]
    assert stale["shard"] == "00005" and stale["why"].startswith("process gone")
    assert [x["shard"] for x in ner["running_shards"]] == ["00004"]  # the stale one is not running
    (inv,) = ner["invalid_shards"]
    assert inv["shard"] == "00002" and "missing" in inv["why"]
    assert (ner["samples_in"], ner["samples_out"]) == (200, 187)
    assert ner["drops"] == {"caption_empty": 9, "caption_not_utf8": 4}
    assert score["complete"] and score["state"] == "complete" and score["eta_s"] == 0.0
    assert score["drops"] == {"image_corrupt": 2}
    assert run["totals"]["done"] == 4 and run["totals"]["shards_total"] == 10


def test_shard_lists_are_capped_but_counts_stay_exact(tmp_path):
    store = markers.MarkerStore(str(tmp_path / "r" / "ner"), "ner")
    for i in range(30):
        store.mark_failed(markers.shard_id(i), f"OSError: {i}", markers.ShardStats())
    app = create_app(DashboardConfig(roots=(str(tmp_path / "r"),), shards_listed=5))
    (s,) = TestClient(app).get("/api/runs/r").json()["stages"]
    assert s["failed"] == 30 and len(s["failed_shards"]) == 5
    assert s["failed_shards"][0] == {"shard": "00000", "error": "OSError: 0"}


def test_training_curve_and_progress(marker_tree):
    c = _client(marker_tree, curve_points=8)
    (t,) = c.get("/api/runs/demo").json()["training"]
    assert (t["where"], t["step"], t["steps_logged"], t["state"]) == ("train", 30, 30, "running")
    assert t["loss"] == pytest.approx(5.7) and t["samples_per_s"] == 16.0
    assert t["config"]["name"] == "demo" and t["config"]["processes"] == 2
    curve = t["curve"]
    assert len(curve["step"]) <= 9 and curve["step"][0] == 1 and curve["step"][-1] == 30
    assert len(curve["loss"]) == len(curve["step"]) == len(curve["samples_per_s"])
    # more steps are read on the next poll; a finished run says so
    write_training(os.path.join(marker_tree["demo"], "train"), 10, start=31)
    open(os.path.join(marker_tree["demo"], "train", "model.pt"), "wb").close()
    (t,) = c.get("/api/runs/demo").json()["training"]
    assert (t["step"], t["state"]) == (40, "finished")


def test_training_log_reads_appends_and_a_resume_rewrite(tmp_path):
    folder = str(tmp_path / "train")
    write_training(folder, 20)
    reader = TrainingLogReader()
    assert reader.read(folder, "train", 100)["step"] == 20
    with open(os.path.join(folder, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 21, "loss": 1.0}) + "\n" + '{"step": 22, "lo')  # torn line
    t = reader.read(folder, "train", 100)
    assert (t["step"], t["steps_logged"]) == (21, 21)
    # a resume from step 10 trims the log, then logs steps 11.. again with other losses
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        kept = f.readlines()[:10]
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(kept)
        for i in range(11, 16):
            f.write(json.dumps({"step": i, "loss": 0.5}) + "\n")
    t = reader.read(folder, "train", 100)
    assert t["curve"]["step"] == list(range(1, 16)) and t["loss"] == 0.5
    # without the trim (lines of redone steps appended): the redone steps replace the old
    write_training(folder, 3, start=14)
    t = reader.read(folder, "train", 100)
    assert t["curve"]["step"] == list(range(1, 17)) and t["step"] == 16


def test_results_newest_first_with_domains(marker_tree):
    body = _client(marker_tree).get("/api/results").json()
    assert [r["run_id"] for r in body["rows"]] == ["train-1", "packaged"]
    assert body["domains"] == sorted(["landmarks", "inat", "sketch"])
    top = body["rows"][0]
    assert top["map"] == 0.7 and top["map_by_domain"]["sketch"] == pytest.approx(0.72)
    assert top["zero_shot_top1"] == 0.4 and top["linear_probe_top1"] == 0.8
    assert _client(marker_tree).get("/api/results?limit=1").json()["rows"][0]["id"] == top["id"]


def test_results_store_is_never_created(tmp_path):
    path = tmp_path / "later.sqlite"
    res = ResultsReader(f"sqlite:///{path}").read()
    assert res["rows"] == [] and "no results store yet" in res["note"]
    assert not path.exists()
    assert "s3cret" not in masked("postgresql://mofi:s3cret@db:5432/mofi")


def test_snapshot_is_reused_within_max_age(marker_tree):
    demo = marker_tree["demo"]
    app = create_app(DashboardConfig(roots=(demo,), max_age_s=60))
    builder = app.state.builder
    first = builder.snapshot()
    write_done(markers.MarkerStore(os.path.join(demo, "i2e_run", "ner"), "ner"), "00006", 1, 1)
    assert builder.snapshot() is first  # within max_age: served again
    fresh = builder.snapshot(max_age_s=0)
    assert fresh["runs"][0]["stages"][0]["done"] == first["runs"][0]["stages"][0]["done"] + 1


def test_read_only_and_page(marker_tree):
    c = _client(marker_tree)
    app = c.app
    methods = {m for r in app.routes for m in getattr(r, "methods", set())}
    assert methods <= {"GET", "HEAD"}
    assert c.post("/api/snapshot").status_code == 405
    assert c.get("/api/runs/no-such-run").status_code == 404
    page = c.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<meta name="mofi-base" content="/">' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing external
    snap = c.get("/api/snapshot").json()
    assert {"generated_at", "refresh_s", "roots", "runs", "results"} <= set(snap)
    assert snap["runs"][0]["training"][0]["curve"]["step"][-1] == 30


def test_config_from_env_and_validation(tmp_path):
    c = DashboardConfig.from_env(
        {
            "MOFI_DASHBOARD_ROOTS": f" {tmp_path}/a , s3://bucket/mofi ,",
            "MOFI_RESULTS_URL": "sqlite:///x.sqlite",
            "MOFI_DASHBOARD_REFRESH_S": "5",
        }
    )
    assert c.roots == (f"{tmp_path}/a", "s3://bucket/mofi") and c.refresh_s == 5.0
    assert c.results == "sqlite:///x.sqlite"
    with pytest.raises(ConfigError, match="twice"):
        DashboardConfig(roots=(str(tmp_path), str(tmp_path) + "/"))
    with pytest.raises(ConfigError, match="refresh_s"):
        DashboardConfig(refresh_s=0)
    args = cli.build_parser().parse_args(["dashboard", "--roots", "a", "s3://b/c", "--port", "9"])
    assert (args.roots, args.host, args.port, args.fn) == (
        ["a", "s3://b/c"],
        "127.0.0.1",
        9,
        operations.cmd_dashboard,
    )


def test_an_s3_root(s3_bucket):
    """The same run discovery through the cached, paginated S3 listing (moto server)."""
    root = s3_bucket + "/builds"
    store = markers.MarkerStore(root + "/v=2026-11-23/i2e", "write")
    store.write_plan(["00000", "00001"])
    st = markers.ShardStats(n_in=5, n_out=5, started_at=time.time() - 3, finished_at=time.time())
    store.mark_done("00000", st)
    store.mark_failed("00001", "OSError: disk", markers.ShardStats())
    body = TestClient(create_app(DashboardConfig(roots=(root,)))).get("/api/runs").json()
    (run,) = body["runs"]
    assert run["id"] == "builds/v=2026-11-23" and run["state"] == "failed"
    (s,) = run["stages"]
    assert (s["stage"], s["done"], s["failed"]) == ("write", 1, 1)
