"""``/metrics``: the dashboard's snapshot in Prometheus exposition format.

A custom collector reads the snapshot at scrape time (nothing is kept between scrapes but
the readers' caches). Live progress is scraped; only finished evaluations are also pushed
to a Pushgateway (``mofi eval --push``), as Prometheus advises for batch jobs.

=============================================  =====================================================
metric                                         meaning
=============================================  =====================================================
``mofi_shards{run,path,stage,state}``          shards by state: done, failed, running, stale,
                                               invalid, pending
``mofi_stage_samples_in_total{run,path,stage}``  samples read by the stage's done shards
``mofi_stage_samples_out_total{...}``          samples they wrote
``mofi_stage_dropped_samples_total{...,reason}``  samples skipped, by reason
``mofi_stage_output_bytes_total{...}``         bytes the done shards published
``mofi_stage_samples_per_second{...}``         samples in / wall time from first start to last end
``mofi_stage_eta_seconds{...}``                time left at the current shard rate (when known)
``mofi_stage_complete{...}``                   1 when every planned shard is done
``mofi_stage_last_update_timestamp_seconds``   newest heartbeat or finished shard (Unix time)
``mofi_train_step{run,path}``                  last logged optimiser step
``mofi_train_loss{run,path,term}``             last loss: total, class, contrast
``mofi_train_samples_per_second{run,path}``    last step's throughput
``mofi_train_last_update_timestamp_seconds``   when the metrics log last changed
``mofi_eval_map{run_id,model,images,domain}``  the newest posted retrieval mAP per evaluated run
                                               (domain="all" for the overall mAP)
``mofi_eval_timestamp_seconds{run_id,...}``    when that evaluation was posted
``mofi_dashboard_root_up{root}``               1 when the root could be read
``mofi_dashboard_read_seconds``                time the snapshot took to read
=============================================  =====================================================
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

STATES = (
    ("done", "done"),
    ("failed", "failed"),
    ("running", "running"),
    ("stale", "stale_running"),
    ("invalid", "invalid"),
    ("pending", "pending"),
)
STAGE_LABELS = ["run", "path", "stage"]


def _timestamp(iso: str) -> float | None:
    try:
        t = datetime.datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return t.timestamp()


class SnapshotCollector(Collector):
    """Collects from ``snapshot()`` (a :meth:`SnapshotBuilder.snapshot`) at every scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # no scrape at registration time (it would read every root)

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from self._stages(snap["runs"])
        yield from self._training(snap["runs"])
        yield from self._eval(snap["results"])
        up = GaugeMetricFamily(
            "mofi_dashboard_root_up", "1 when the root could be read.", labels=["root"]
        )
        for r in snap["roots"]:
            up.add_metric([r["uri"]], 0.0 if r["error"] else 1.0)
        yield up
        yield GaugeMetricFamily(
            "mofi_dashboard_read_seconds",
            "Seconds the last snapshot took to read.",
            value=snap["read_s"],
        )

    def _stages(self, runs: list[dict[str, Any]]) -> Iterator[Metric]:
        shards = GaugeMetricFamily(
            "mofi_shards", "Shards of a stage by state.", labels=[*STAGE_LABELS, "state"]
        )
        s_in = CounterMetricFamily(
            "mofi_stage_samples_in",
            "Samples read by the stage's done shards.",
            labels=STAGE_LABELS,
        )
        s_out = CounterMetricFamily(
            "mofi_stage_samples_out",
            "Samples written by the stage's done shards.",
            labels=STAGE_LABELS,
        )
        drops = CounterMetricFamily(
            "mofi_stage_dropped_samples",
            "Samples skipped by the stage, by reason.",
            labels=[*STAGE_LABELS, "reason"],
        )
        out_bytes = CounterMetricFamily(
            "mofi_stage_output_bytes",
            "Bytes published by the stage's done shards.",
            labels=STAGE_LABELS,
        )
        rate = GaugeMetricFamily(
            "mofi_stage_samples_per_second",
            "Samples in per second of wall time, first shard start to last shard end.",
            labels=STAGE_LABELS,
        )
        eta = GaugeMetricFamily(
            "mofi_stage_eta_seconds",
            "Estimated seconds until every planned shard is done (absent when unknown).",
            labels=STAGE_LABELS,
        )
        complete = GaugeMetricFamily(
            "mofi_stage_complete",
            "1 when every planned shard of the stage is done.",
            labels=STAGE_LABELS,
        )
        updated = GaugeMetricFamily(
            "mofi_stage_last_update_timestamp_seconds",
            "Newest heartbeat or finished shard of the stage (Unix time).",
            labels=STAGE_LABELS,
        )
        reused = GaugeMetricFamily(
            "mofi_stage_reused_shards",
            "Done shards whose outputs an incremental rebuild copied from an earlier build.",
            labels=STAGE_LABELS,
        )
        for run in runs:
            for s in run["stages"]:
                lab = [run["id"], s["where"], s["stage"]]
                reused.add_metric(lab, s.get("reused", 0))
                for state, key in STATES:
                    shards.add_metric([*lab, state], s[key])
                s_in.add_metric(lab, s["samples_in"])
                s_out.add_metric(lab, s["samples_out"])
                for reason, n in s["drops"].items():
                    drops.add_metric([*lab, reason], n)
                out_bytes.add_metric(lab, s["bytes_out"])
                rate.add_metric(lab, s["samples_per_s"] or 0.0)
                if s["eta_s"] is not None:
                    eta.add_metric(lab, s["eta_s"])
                complete.add_metric(lab, 1.0 if s["complete"] else 0.0)
                if s["last_update"]:
                    updated.add_metric(lab, s["last_update"])
        yield from (shards, s_in, s_out, drops, out_bytes, rate, eta, complete, updated, reused)

    def _training(self, runs: list[dict[str, Any]]) -> Iterator[Metric]:
        step = GaugeMetricFamily(
            "mofi_train_step", "Last logged optimiser step.", labels=["run", "path"]
        )
        loss = GaugeMetricFamily(
            "mofi_train_loss", "Last logged training loss.", labels=["run", "path", "term"]
        )
        t_rate = GaugeMetricFamily(
            "mofi_train_samples_per_second",
            "Last step's training throughput.",
            labels=["run", "path"],
        )
        t_updated = GaugeMetricFamily(
            "mofi_train_last_update_timestamp_seconds",
            "When the training metrics log last changed (Unix time).",
            labels=["run", "path"],
        )
        for run in runs:
            for t in run["training"]:
                if t.get("step") is None:
                    continue
                lab = [run["id"], t["where"]]
                step.add_metric(lab, t["step"])
                for term, key in (
                    ("total", "loss"),
                    ("class", "loss_class"),
                    ("contrast", "loss_contrast"),
                ):
                    if t.get(key) is not None:
                        loss.add_metric([*lab, term], t[key])
                if t.get("samples_per_s") is not None:
                    t_rate.add_metric(lab, t["samples_per_s"])
                if t.get("last_update"):
                    t_updated.add_metric(lab, t["last_update"])
        yield from (step, loss, t_rate, t_updated)

    def _eval(self, results: dict[str, Any]) -> Iterator[Metric]:
        labels = ["run_id", "model", "images"]
        m = GaugeMetricFamily(
            "mofi_eval_map",
            "Newest posted retrieval mAP (GPR1200 protocol) of each evaluated run and model.",
            labels=[*labels, "domain"],
        )
        ts = GaugeMetricFamily(
            "mofi_eval_timestamp_seconds",
            "When that evaluation was posted (Unix time).",
            labels=labels,
        )
        seen = set()
        for r in results["rows"]:  # newest first: the first row of a key is its last posting
            key = (r["run_id"], r["model"], r["images"])
            if key in seen or r["map"] is None:
                continue
            seen.add(key)
            lab = list(key)
            m.add_metric([*lab, "all"], r["map"])
            for domain, v in sorted(r["map_by_domain"].items()):
                m.add_metric([*lab, domain], v)
            when = _timestamp(r["created_at"])
            if when is not None:
                ts.add_metric(lab, when)
        yield m
        yield ts
