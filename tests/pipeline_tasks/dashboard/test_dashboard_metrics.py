"""/metrics parses as Prometheus exposition format with the right names, labels and values;
the evaluation's Pushgateway push is prometheus_client's."""

from __future__ import annotations

import http.server
import threading

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from evaluation import results
from pipeline_tasks.dashboard.app import create_app
from pipeline_tasks.dashboard.config import DashboardConfig


def _samples(text: str) -> dict[str, dict[tuple, float]]:
    """metric sample name -> {sorted label items: value}."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _get(samples, name, **labels):
    return samples[name][tuple(sorted(labels.items()))]


@pytest.fixture
def scraped(marker_tree):
    config = DashboardConfig(
        roots=(marker_tree["demo"], marker_tree["builds"], marker_tree["missing"]),
        results_url=marker_tree["results"],
    )
    resp = TestClient(create_app(config)).get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return resp.text


def test_shards_by_run_stage_and_state(scraped):
    s = _samples(scraped)
    lab = {"run": "demo", "path": "i2e_run/ner", "stage": "ner"}
    states = {st: _get(s, "mofi_shards", **lab, state=st) for st in
              ("done", "failed", "running", "stale", "invalid", "pending")}  # fmt: skip
    assert states == {
        "done": 2,
        "failed": 1,
        "running": 1,
        "stale": 1,
        "invalid": 1,
        "pending": 2,
    }
    w = {"run": "builds/v=2026-11-24", "path": "i2e", "stage": "write"}
    assert _get(s, "mofi_shards", **w, state="done") == 1
    assert _get(s, "mofi_stage_complete", **w) == 0
    assert _get(s, "mofi_stage_complete", run="builds/v=2026-11-23", path="i2e", stage="write") == 1


def test_samples_drops_rates_and_types(scraped):
    s = _samples(scraped)
    lab = {"run": "demo", "path": "i2e_run/ner", "stage": "ner"}
    assert _get(s, "mofi_stage_samples_in_total", **lab) == 200
    assert _get(s, "mofi_stage_samples_out_total", **lab) == 187
    assert _get(s, "mofi_stage_dropped_samples_total", **lab, reason="caption_empty") == 9
    assert _get(s, "mofi_stage_dropped_samples_total", **lab, reason="caption_not_utf8") == 4
    assert _get(s, "mofi_stage_output_bytes_total", **lab) > 0
    assert _get(s, "mofi_stage_samples_per_second", **lab) > 0
    assert _get(s, "mofi_stage_last_update_timestamp_seconds", **lab) > 1.7e9
    types = {f.name: f.type for f in text_string_to_metric_families(scraped)}
    assert types["mofi_shards"] == "gauge"
    assert types["mofi_stage_samples_in"] == "counter"  # exposed as ..._total
    assert types["mofi_stage_dropped_samples"] == "counter"
    assert types["mofi_eval_map"] == "gauge"


def test_training_eval_and_roots(scraped):
    s = _samples(scraped)
    assert _get(s, "mofi_train_step", run="demo", path="train") == 30
    assert _get(s, "mofi_train_loss", run="demo", path="train", term="total") == pytest.approx(5.7)
    assert _get(s, "mofi_train_loss", run="demo", path="train", term="contrast") == 2.0
    assert _get(s, "mofi_train_samples_per_second", run="demo", path="train") == 16.0
    ev = {"run_id": "train-1", "model": "model.pt", "images": "runs/demo/eval"}
    assert _get(s, "mofi_eval_map", **ev, domain="all") == 0.7
    assert _get(s, "mofi_eval_map", **ev, domain="sketch") == pytest.approx(0.72)
    assert _get(s, "mofi_eval_map", run_id="packaged", model="packaged",
                images="runs/demo/eval", domain="all") == 0.6  # fmt: skip
    assert _get(s, "mofi_eval_timestamp_seconds", **ev) > 1.7e9
    ups = {dict(k)["root"]: v for k, v in s["mofi_dashboard_root_up"].items()}
    assert sorted(ups.values()) == [0.0, 1.0, 1.0]
    assert [r for r, v in ups.items() if not v][0].endswith("nothing-here")


def test_only_the_newest_evaluation_of_a_run_is_exported(marker_tree):
    results.append_result(
        marker_tree["results"],
        {"run_id": "train-1", "model": "model.pt", "images": "runs/demo/eval",
         "metrics": {"map": 0.75, "map/sketch": 0.8}},
    )  # fmt: skip
    config = DashboardConfig(roots=(marker_tree["demo"],), results_url=marker_tree["results"])
    s = _samples(TestClient(create_app(config)).get("/metrics").text)
    ev = {"run_id": "train-1", "model": "model.pt", "images": "runs/demo/eval"}
    assert _get(s, "mofi_eval_map", **ev, domain="all") == 0.75
    assert ("domain", "landmarks") not in {
        kv for k in s["mofi_eval_map"] for kv in k if dict(k)["run_id"] == "train-1"
    }


class _Gateway(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_PUT(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        _Gateway.received.append((self.path, body))
        self.send_response(200 if "fail" not in self.path else 500)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_pushgateway_push_through_prometheus_client():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        metrics = {"map": 0.7, "map/sop": 0.6, "map@10": 0.5, "zero_shot/top1": 0.4, "n": True}
        results.push_metrics(
            url, "mofi_eval", "run 7", metrics, {"model": "m.pt", "images": "eval"}
        )
        with pytest.raises(RuntimeError, match="pushgateway"):
            results.push_metrics(url, "mofi_eval", "fail", metrics, {})
    finally:
        server.shutdown()
    path, body = _Gateway.received[0]
    assert path == "/metrics/job/mofi_eval/instance/run_7"
    s = _samples(body)
    assert _get(s, "mofi_eval_map", model="m.pt", images="eval") == 0.7
    assert _get(s, "mofi_eval_map", model="m.pt", images="eval", domain="sop") == 0.6
    assert _get(s, "mofi_eval_map_at_10", model="m.pt", images="eval") == 0.5
    assert _get(s, "mofi_eval_zero_shot_top1", model="m.pt", images="eval") == 0.4
    assert "mofi_eval_n" not in s  # booleans are not metrics
    with pytest.raises(RuntimeError, match="unreachable"):
        results.push_metrics("http://127.0.0.1:9", "mofi_eval", "x", metrics, {})
