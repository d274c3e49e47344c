"""The newest evaluation results, read (never written) from the results store.

The store is the one ``mofi eval`` appends to (``evaluation.results``: any SQLAlchemy URL,
tables ``mofi_eval_results`` and ``mofi_eval_metrics``). The dashboard only reads: a SQLite
file that does not exist yet, or a database without the tables, is shown as "no results
yet" and is not created.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import sqlalchemy as sa

from evaluation import results as results_store

SQLITE = "sqlite:///"


def masked(url: str) -> str:
    """``url`` with its password hidden (what the page and the API show)."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def _row(r: dict[str, Any]) -> dict[str, Any]:
    try:
        m = json.loads(r["metrics"])
    except ValueError:
        m = {}
    num = results_store.numeric_metrics(m)
    return {
        "id": r["id"],
        "created_at": r["created_at"],
        "run_id": r["run_id"],
        "model": r["model"],
        "images": r["images"],
        "i2e_version": r["i2e_version"],
        "map": num.get("map"),
        "map_by_domain": {k.split("/", 1)[1]: v for k, v in num.items() if k.startswith("map/")},
        "zero_shot_top1": num.get("zero_shot/top1"),
        "linear_probe_top1": num.get("linear_probe/top1"),
        "metrics": num,
    }


class ResultsReader:
    """Newest ``limit`` evaluations of one store; a SQLite file is re-read only when it
    changed, another database at most every ``ttl_s`` seconds."""

    def __init__(self, url: str, limit: int = 20, ttl_s: float = 5.0):
        self.url = url
        self.limit = limit
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._engine: sa.Engine | None = None
        self._cache: tuple[Any, dict[str, Any]] | None = None

    def _sqlite_path(self) -> str | None:
        if self.url.startswith(SQLITE):
            path = self.url[len(SQLITE) :].split("?", 1)[0]
            return path if path and path != ":memory:" else None
        return None

    def read(self) -> dict[str, Any]:
        """{url, rows (newest first), domains, error}; never raises for an unreachable store."""
        with self._lock:
            path = self._sqlite_path()
            if path is not None:
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    return self._answer([], "no results store yet (mofi eval creates it)")
                version: Any = (st.st_mtime_ns, st.st_size)
            else:
                version = int(time.time() / self.ttl_s)
            if self._cache and self._cache[0] == version:
                return self._cache[1]
            try:
                rows = self._query()
                out = self._answer(rows, None if rows else "no results yet")
            except sa.exc.SQLAlchemyError as exc:
                out = self._answer(
                    [], f"results store unreadable: {exc.__class__.__name__}: {exc}".splitlines()[0]
                )
            self._cache = (version, out)
            return out

    def _query(self) -> list[dict[str, Any]]:
        if self._engine is None:
            self._engine = sa.create_engine(self.url)
        t = results_store.RESULTS
        with self._engine.connect() as conn:
            if not sa.inspect(conn).has_table(t.name):
                return []
            rows = conn.execute(sa.select(t).order_by(t.c.id.desc()).limit(self.limit))
            return [_row(dict(r)) for r in rows.mappings()]

    def _answer(self, rows: list[dict[str, Any]], note: str | None) -> dict[str, Any]:
        domains = sorted({d for r in rows for d in r["map_by_domain"]})
        return {"url": masked(self.url), "rows": rows, "domains": domains, "note": note}
