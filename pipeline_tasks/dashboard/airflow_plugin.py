"""The dashboard inside Airflow 3: a FastAPI app on the API server plus a navigation entry.

Registered through the ``airflow.plugins`` entry point in pyproject.toml (no plugins folder).
The app is mounted at ``/mofi`` and configured from the API server's environment
(``MOFI_DASHBOARD_ROOTS``, ``MOFI_RESULTS_URL``; see :mod:`.config`).

Plugin apps are not behind Airflow's authentication unless they ask for it: every route of
this one depends on ``requires_authenticated()``, which accepts a JWT as
``Authorization: Bearer`` (from ``POST /auth/token``) or the UI's ``_token`` cookie. The
navigation entry renders ``/mofi/`` in an iframe of the Airflow UI on the same origin, so
the browser sends the signed-in user's cookie with the page and its polls.
"""

from __future__ import annotations

from airflow.api_fastapi.core_api.security import requires_authenticated
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends

from .app import create_app
from .config import DashboardConfig

URL_PREFIX = "/mofi"


class MofiDashboardPlugin(AirflowPlugin):
    """Shard progress, training curves, evaluation results and /metrics for MOFI runs."""

    name = "mofi_dashboard"
    fastapi_apps = [
        {
            "app": create_app(
                DashboardConfig.from_env(), dependencies=[Depends(requires_authenticated())]
            ),
            "url_prefix": URL_PREFIX,
            "name": "MOFI shard progress",
        }
    ]
    external_views = [
        {
            "name": "MOFI progress",
            "href": f"{URL_PREFIX}/",
            "url_route": "mofi",
            "destination": "nav",
            "category": "browse",
        }
    ]
