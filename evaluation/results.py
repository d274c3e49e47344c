"""Where evaluation results go: a SQL results store, a Prometheus Pushgateway, a PNG chart.

Store: any SQLAlchemy URL (a SQLite file by default, Postgres in production). One row per
evaluation in ``mofi_eval_results`` (run id, model, images, I2E version, config and metrics as
JSON) and one row per metric in ``mofi_eval_metrics`` (for dashboards that chart a metric
over runs without parsing JSON). Both tables are created when missing.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import urllib.error
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Metric, push_to_gateway
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)
DEFAULT_DB_ENV = "MOFI_RESULTS_URL"

_meta = sa.MetaData()
RESULTS = sa.Table(
    "mofi_eval_results",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("run_id", sa.String(255), nullable=False, index=True),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("images", sa.Text, nullable=False),
    sa.Column("i2e_version", sa.String(64), nullable=False, default=""),
    sa.Column("config", sa.Text, nullable=False, default="{}"),
    sa.Column("metrics", sa.Text, nullable=False),
)
METRICS = sa.Table(
    "mofi_eval_metrics",
    _meta,
    sa.Column(
        "result_id", sa.Integer, sa.ForeignKey("mofi_eval_results.id"), nullable=False, index=True
    ),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("value", sa.Float, nullable=False),
)


def default_url() -> str:
    return os.environ.get(DEFAULT_DB_ENV) or "sqlite:///" + os.path.abspath("runs/results.sqlite")


def _engine(url: str) -> sa.Engine:
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        return sa.create_engine(url)
    except (sa.exc.ArgumentError, ImportError) as exc:
        from training.core.config import ConfigError

        raise ConfigError(f"results store {url!r}: {exc}") from exc


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def append_result(url: str, record: dict[str, Any]) -> int:
    """Append one evaluation; returns its id."""
    eng = _engine(url)
    _meta.create_all(eng)
    metrics = record["metrics"]
    with eng.begin() as conn:
        rid = conn.execute(
            RESULTS.insert().values(
                created_at=record.get("created_at")
                or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                run_id=record["run_id"],
                model=record["model"],
                images=record["images"],
                i2e_version=record.get("i2e_version") or "",
                config=json.dumps(record.get("config") or {}, sort_keys=True),
                metrics=json.dumps(metrics, sort_keys=True),
            )
        ).inserted_primary_key[0]
        rows = [
            {"result_id": rid, "name": k, "value": v} for k, v in numeric_metrics(metrics).items()
        ]
        if rows:
            conn.execute(METRICS.insert(), rows)
    eng.dispose()
    return int(rid)


def read_results(url: str) -> list[dict[str, Any]]:
    eng = _engine(url)
    _meta.create_all(eng)
    with eng.connect() as conn:
        rows = conn.execute(sa.select(RESULTS).order_by(RESULTS.c.id)).mappings().all()
    eng.dispose()
    out = []
    for r in rows:
        d = dict(r)
        d["metrics"] = json.loads(d["metrics"])
        d["config"] = json.loads(d["config"])
        out.append(d)
    return out


# ------------------------------------------------------------------ Pushgateway


def _label(v: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", v) or "_"


def _metric_name(key: str) -> str:
    return "mofi_eval_" + re.sub(r"[^a-zA-Z0-9_]", "_", key.replace("@", "_at_"))


def eval_registry(metrics: dict[str, Any], labels: dict[str, str]) -> CollectorRegistry:
    """One evaluation's numeric metrics as gauges: ``map`` and ``map@k`` with one series per
    domain (``mofi_eval_map{domain="sop",model="..."} 0.71``, the overall one without
    ``domain``), every other metric under its flattened name (``zero_shot/top1`` ->
    ``mofi_eval_zero_shot_top1``); ``labels`` on every series."""
    base = {k: str(v) for k, v in sorted(labels.items())}
    families: dict[str, Metric] = {}
    for key, value in sorted(numeric_metrics(metrics).items()):
        head, _, sub = key.partition("/")
        domain = sub if head == "map" or head.startswith("map@") else ""
        name = _metric_name(head if domain else key)
        if name not in families:
            families[name] = Metric(name, f"MOFI evaluation: {head if domain else key}", "gauge")
        families[name].add_sample(name, {**base, **({"domain": domain} if domain else {})}, value)

    class _Evaluation(Collector):
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Evaluation())
    return registry


def push_metrics(
    url: str, job: str, instance: str, metrics: dict[str, Any], labels: dict[str, str]
) -> None:
    """PUT to a Pushgateway: {url}/metrics/job/{job}/instance/{instance} (prometheus_client's
    push_to_gateway; a PUT replaces the group's previous metrics)."""
    target = f"{url.rstrip('/')}/metrics/job/{_label(job)}/instance/{_label(instance)}"
    try:
        push_to_gateway(
            url,
            job=_label(job),
            grouping_key={"instance": _label(instance)},
            registry=eval_registry(metrics, labels),
            timeout=10,
        )
    except urllib.error.URLError as exc:
        raise RuntimeError(f"pushgateway {target} unreachable: {exc}") from exc
    except OSError as exc:  # prometheus_client raises OSError for an HTTP error status
        raise RuntimeError(f"pushgateway {target}: {exc}") from exc


# ------------------------------------------------------------------ table and chart


def format_table(rows: list[dict[str, Any]], metric: str = "map") -> str:
    if not rows:
        return "no results yet"
    domains = sorted(
        {k.split("/", 1)[1] for r in rows for k in r["metrics"] if k.startswith(metric + "/")}
    )
    cols = [
        "id",
        "created_at",
        "run_id",
        "model",
        metric,
        *domains,
        "zero_shot/top1",
        "linear_probe/top1",
    ]
    table = []
    for r in rows:
        m = r["metrics"]
        vals = [str(r["id"]), r["created_at"], r["run_id"], r["model"]]
        for c in cols[4:]:
            key = c if c in (metric, "zero_shot/top1", "linear_probe/top1") else f"{metric}/{c}"
            v = m.get(key)
            vals.append(f"{v:.4f}" if isinstance(v, int | float) else "-")
        table.append(vals)
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*cols), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*t) for t in table]
    return "\n".join(lines)


def chart_series(
    rows: list[dict[str, Any]], metric: str = "map"
) -> tuple[list[str], dict[str, list[float]], str]:
    """(x-axis groups, {bar label: one value per group}, title) of :func:`write_chart`."""
    domains = sorted(
        {k.split("/", 1)[1] for r in rows for k in r["metrics"] if k.startswith(metric + "/")}
    )
    folders = list(dict.fromkeys(os.path.basename(str(r["images"]).rstrip("/")) for r in rows))
    if not domains and len(folders) > 1:
        # one group per image folder (in domain, out of domain ...), one bar per model
        runs = {str(r["run_id"]).split("/", 1)[0] for r in rows}
        label = {
            r["id"]: (f"{r['model']}  [{r['run_id']}]" if len(runs) > 1 else str(r["model"]))[:70]
            for r in rows
        }
        series_names = folders
        bars_by_label: dict[str, list[float]] = {}
        for r in rows:
            vals = bars_by_label.setdefault(label[r["id"]], [0.0] * len(folders))
            vals[folders.index(os.path.basename(str(r["images"]).rstrip("/")))] = r["metrics"].get(
                metric, 0.0
            )
        title = f"retrieval {metric} per image folder"
    else:
        series_names = ["all", *domains]
        bars_by_label = {
            f"#{r['id']} {r['run_id']} ({r['model']})"[:70]: [r["metrics"].get(metric, 0.0)]
            + [r["metrics"].get(f"{metric}/{d}", 0.0) for d in domains]
            for r in rows
        }
        title = f"retrieval {metric} by run"
    return series_names, bars_by_label, title


def write_chart(rows: list[dict[str, Any]], path: str, metric: str = "map") -> str:
    """Grouped bars: per-domain (or overall) mAP for each evaluation; evaluations of several
    image folders without domains are grouped by folder, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not rows:
        raise ValueError("no results to chart")
    series_names, bars_by_label, title = chart_series(rows, metric)
    x = np.arange(len(series_names))
    width = 0.8 / len(bars_by_label)
    fig, ax = plt.subplots(
        figsize=(max(6, 1.6 * len(series_names) + 2), 4 + 0.18 * len(bars_by_label))
    )
    for i, (lab, vals) in enumerate(bars_by_label.items()):
        bars = ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=lab)
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(x, series_names)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1.1)
    ax.set_title(title)
    # below the axes, so the legend never hides a bar
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
