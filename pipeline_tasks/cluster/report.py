"""What ``mofi cluster`` reports: the checks a run must pass, each stage's time on the
local CLI against the cluster, and the plain-text table."""

from __future__ import annotations

from typing import Any

CHECKS = ("i2e_identical", "curve_identical", "model_identical", "results_rows",
          "status_all_complete", "dashboard_all_complete")  # fmt: skip


def stage_seconds(report: dict[str, Any]) -> dict[str, Any]:
    """Per stage: the local CLI's time against the cluster's (its Airflow tasks' run time)."""
    cluster: dict[str, float] = {}
    names = {"ner": "ner", "prepare_score": "score", "score": "score", "hygiene": "hygiene",
             "vocab": "vocab", "write": "write"}  # fmt: skip
    for t in report["build"]["tasks"]:
        stage = names.get(t["task"])
        if stage and t.get("seconds"):
            cluster[stage] = round(cluster.get(stage, 0.0) + float(t["seconds"]), 1)
    local = report["local"]["stage_seconds"]
    local = {**local, "score": round(local.get("score", 0) + local.get("scorer-bootstrap", 0), 1)}
    return {st: {"local_cli": local.get(st), "cluster": cluster.get(st)} for st in cluster}


def render(report: dict[str, Any]) -> str:
    from pipeline_tasks.runtime.layout import BUILD_STAGES

    times = report.get("stage_seconds", {})
    lines = ["stage      local CLI (s)  cluster (s)"]
    for st in [b for b in BUILD_STAGES if b in times]:
        v = times[st]
        lines.append(f"{st:<10} {v['local_cli'] or 0:>13.1f} {v['cluster'] or 0:>12.1f}")
    lines.append("host       address        peak memory")
    addresses = {h["name"]: h["address"] for h in report.get("hosts", [])}
    for h, b in report.get("peak_rss_bytes", {}).items():
        lines.append(f"{h:<10} {addresses.get(h, ''):<14} {b / 2**30:>7.2f} GiB")
    for f in report.get("faults", []):
        lines.append(f"fault: {f['fault']} ({f['host']}): {f.get('killed_pids')} processes killed")
    for k in CHECKS:
        lines.append(f"{k}: {report.get(k)}")
    return "\n".join(lines)
