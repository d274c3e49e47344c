"""What the dashboard reads: its roots, the results store, how often the page refreshes.

``mofi dashboard`` builds it from flags; inside Airflow it comes from the environment of the
API server (:meth:`DashboardConfig.from_env`): ``MOFI_DASHBOARD_ROOTS`` (comma separated
URIs), ``MOFI_RESULTS_URL`` (the results store, as for ``mofi eval``) and
``MOFI_DASHBOARD_REFRESH_S``.
"""

from __future__ import annotations

import dataclasses
import os

from training.core.config import StageConfig, field

ROOTS_ENV = "MOFI_DASHBOARD_ROOTS"
RESULTS_ENV = "MOFI_RESULTS_URL"
REFRESH_ENV = "MOFI_DASHBOARD_REFRESH_S"


def _results_default() -> str:
    return os.environ.get(RESULTS_ENV) or "sqlite:///" + os.path.abspath("runs/results.sqlite")


def _root_key(uri: str) -> str:
    return uri.rstrip("/") if uri.startswith("s3://") else os.path.abspath(uri)


@dataclasses.dataclass
class DashboardConfig(StageConfig):
    """The shard-progress dashboard (``mofi dashboard``, the Airflow plugin)."""

    roots: tuple[str, ...] = field(
        (), "run roots to watch (local paths or s3:// URIs); every run below each is shown"
    )
    results_url: str = field(
        "",
        "SQLAlchemy URL of the evaluation results store; empty: $MOFI_RESULTS_URL or runs/results.sqlite",
    )
    refresh_s: float = field(3.0, "how often the page polls its JSON endpoint (seconds)")
    max_age_s: float = field(
        1.0,
        "a summary younger than this is served again instead of re-read (page polls and "
        "Prometheus scrapes arriving together cost one read)",
    )
    curve_points: int = field(400, "training curves are thinned to at most this many points")
    results_limit: int = field(20, "evaluation results shown (the newest first)")
    shards_listed: int = field(
        50, "failed, stale and invalid shards listed per stage (their counts are always exact)"
    )

    def validate(self) -> None:
        self._check(self.refresh_s > 0, "refresh_s", "must be > 0")
        self._check(self.max_age_s >= 0, "max_age_s", "must be >= 0")
        self._check(self.curve_points >= 2, "curve_points", "must be >= 2")
        self._check(self.results_limit >= 1, "results_limit", "must be >= 1")
        self._check(self.shards_listed >= 0, "shards_listed", "must be >= 0")
        self._check(
            all(isinstance(r, str) and r.strip() for r in self.roots), "roots", "empty root URI"
        )
        keys = [_root_key(r) for r in self.roots]
        self._check(len(set(keys)) == len(keys), "roots", "a root is listed twice")

    @property
    def results(self) -> str:
        return self.results_url or _results_default()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> DashboardConfig:
        env = os.environ if environ is None else environ
        roots = tuple(r.strip() for r in env.get(ROOTS_ENV, "").split(",") if r.strip())
        kw = {"roots": roots, "results_url": env.get(RESULTS_ENV, "")}
        if env.get(REFRESH_ENV):
            kw["refresh_s"] = float(env[REFRESH_ENV])
        return cls(**kw)
