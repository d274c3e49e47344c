"""The standalone dashboard's access token.

``mofi dashboard`` serves every watched run's paths, progress and results. On loopback that
reaches only this machine's users; on any other address it binds only with a token (from
``--token-file`` or ``$MOFI_DASHBOARD_TOKEN``), and then every route answers 401 without it.
A client passes it as ``Authorization: Bearer TOKEN`` (Prometheus: ``authorization:
credentials_file:``); a browser opens ``/?token=TOKEN`` once and keeps it in a same-site,
HTTP-only cookie that the page's own requests carry. Inside Airflow the plugin uses
Airflow's authentication instead.
"""

from __future__ import annotations

import ipaddress
import os
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

TOKEN_ENV = "MOFI_DASHBOARD_TOKEN"
COOKIE = "mofi_dashboard_token"


class TokenError(ValueError):
    """A dashboard token that cannot be used, or a public bind without one."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def load_token(token_file: str | None, environ: dict[str, str] | None = None) -> str:
    """The token from ``token_file`` (its first line) or ``$MOFI_DASHBOARD_TOKEN``; ''."""
    env = os.environ if environ is None else environ
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as exc:
            raise TokenError(f"--token-file {token_file}: {exc.strerror or exc}") from None
        if not token:
            raise TokenError(f"--token-file {token_file} is empty")
    else:
        token = env.get(TOKEN_ENV, "").strip()
    if token and len(token) < 16:
        raise TokenError("the dashboard token is shorter than 16 characters")
    return token


def check_bind(host: str, token: str) -> None:
    if not token and not is_loopback(host):
        raise TokenError(
            f"refusing to serve the dashboard on {host} without a token: anyone who can "
            f"reach it would see every run; pass --token-file FILE or set {TOKEN_ENV}, "
            "or bind 127.0.0.1"
        )


def guard(app: FastAPI, token: str) -> FastAPI:
    """Every route of ``app`` answers 401 unless the request carries ``token``."""

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        given = given or request.cookies.get(COOKIE, "")
        from_query = not given and "token" in request.query_params
        if from_query:
            given = request.query_params["token"]
        if not secrets.compare_digest(given.encode(), token.encode()):
            return JSONResponse(
                {"detail": "a token is required: Authorization: Bearer TOKEN, "
                           "or open /?token=TOKEN"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        response = await call_next(request)
        if from_query:  # a browser: later requests of the page carry the cookie
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    return app
