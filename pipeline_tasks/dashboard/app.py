"""The dashboard's FastAPI app: one page, its JSON endpoints and ``/metrics``. Read-only.

Routes (all GET; paths relative to where the app is mounted: ``/`` standalone, ``/mofi/``
inside Airflow):

* ``/``: the page. It polls ``api/snapshot`` every ``refresh_s`` seconds and redraws
  itself without reloading.
* ``/api/snapshot``: everything the page shows in one document (see :func:`snapshot`).
* ``/api/runs``: the runs with their stage summaries, without training curves.
* ``/api/runs/{run_id}``: one run, with its training curves (404 for an unknown id).
* ``/api/results``: the newest evaluation results of the results store.
* ``/metrics``: Prometheus exposition format (:mod:`.metrics`).

:func:`create_app` takes extra FastAPI dependencies for every route: the Airflow plugin
passes Airflow's authentication there; ``mofi dashboard`` passes its token check
(:mod:`.auth`) when it has a token, and without one binds loopback only.
"""

from __future__ import annotations

import html
import importlib.resources
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.params import Depends
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .config import DashboardConfig
from .metrics import SnapshotCollector
from .snapshot import SnapshotBuilder


def _page_template() -> str:
    return importlib.resources.files(__package__).joinpath("page.html").read_text("utf-8")


def _without_curves(run: dict[str, Any]) -> dict[str, Any]:
    return {
        **run,
        "training": [{k: v for k, v in t.items() if k != "curve"} for t in run["training"]],
    }


def create_app(
    config: DashboardConfig,
    dependencies: list[Depends] | None = None,
    builder: SnapshotBuilder | None = None,
) -> FastAPI:
    """The dashboard app over ``config``'s roots; ``dependencies`` guard every route."""
    builder = builder or SnapshotBuilder(config)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(builder.snapshot))
    template = _page_template()
    app = FastAPI(
        title="MOFI shard progress",
        description="Shard progress of MOFI runs, training curves and evaluation results (read-only).",
        dependencies=dependencies or [],
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.builder = builder

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request) -> HTMLResponse:
        """The page (self-contained: inline CSS, JS and SVG charts, no external requests)."""
        base = request.scope.get("root_path", "").rstrip("/") + "/"
        body = template.replace("__MOFI_BASE__", html.escape(base, quote=True)).replace(
            "__MOFI_REFRESH_MS__", str(int(config.refresh_s * 1000))
        )
        return HTMLResponse(body, headers={"Cache-Control": "no-store"})

    @app.get("/api/snapshot")
    def snapshot() -> dict[str, Any]:
        """Everything the page shows: ``generated_at`` (Unix time), ``read_s``, ``refresh_s``,
        ``roots`` [{uri, label, runs, error}], ``runs`` [{id, uri, root, state, last_update,
        totals, stages, training}] and ``results`` {url, rows, domains, note}.

        A stage is ``status.summarize_stage``'s summary (shards_total, done, failed, running,
        stale_running, invalid, pending, samples_in, samples_out, drops, bytes_out, wall_s,
        busy_s, samples_per_s, eta_s, last_update, complete) with ``where`` (its folder inside
        the run), ``state`` and the lists failed_shards [{shard, error}], stale_shards
        [{shard, why}], invalid_shards [{shard, why}] and running_shards [{shard, host, pid,
        started_at, heartbeat_at}] (at most ``shards_listed`` of each). A training entry has
        where, uri, state (running, silent, finished), step, loss, loss_class, loss_contrast,
        lr, samples_per_s, elapsed_s, last_update, config and ``curve`` {step, loss,
        loss_class, loss_contrast, samples_per_s}. A result row has id, created_at, run_id,
        model, images, i2e_version, map, map_by_domain, zero_shot_top1, linear_probe_top1 and
        every numeric metric."""
        return builder.snapshot()

    @app.get("/api/runs")
    def runs() -> dict[str, Any]:
        """``generated_at``, ``roots`` and ``runs`` as in the snapshot, without training curves."""
        snap = builder.snapshot()
        return {
            "generated_at": snap["generated_at"],
            "roots": snap["roots"],
            "runs": [_without_curves(r) for r in snap["runs"]],
        }

    @app.get("/api/runs/{run_id:path}")
    def run(run_id: str) -> dict[str, Any]:
        """One run as in the snapshot (with its training curves); 404 when no run has that id."""
        found = builder.run(run_id)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no run {run_id!r} under the roots")
        return found

    @app.get("/api/results")
    def results(limit: int = Query(20, ge=1, le=1000)) -> dict[str, Any]:
        """The results store: ``url`` (password hidden), ``rows`` (newest first, at most
        ``limit`` and at most the configured ``results_limit``), ``domains``, ``note``."""
        res = builder.snapshot()["results"]
        return {**res, "rows": res["rows"][:limit]}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus exposition format, read at scrape time."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(
    config: DashboardConfig, host: str = "127.0.0.1", port: int = 8765, token: str = ""
) -> None:
    """Serve the app with uvicorn until interrupted (``mofi dashboard``). Any address but
    loopback needs a ``token`` (:func:`.auth.check_bind`)."""
    import uvicorn

    from .auth import check_bind, guard

    check_bind(host, token)
    app = create_app(config)
    if token:
        guard(app, token)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
