"""What the I2E asset carries between the build DAG and the train DAG.

The build DAG's last task records the version's I2E URI in the asset event's ``extra``; the
train DAG, when an asset event triggered it, trains on the newest such URI, and otherwise
on the URI given in its params. Plain functions, so they are tested without Airflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from training.core.config import ConfigError

URI_KEY = "uri"


def asset_extra(i2e_uri: str) -> dict[str, str]:
    if not i2e_uri:
        raise ConfigError("the I2E asset event needs the version's URI")
    return {URI_KEY: i2e_uri}


def resolve_i2e_uri(explicit: str, events: Mapping[Any, Iterable[Any]] | None) -> str:
    """``explicit`` wins; else the URI of the newest triggering asset event."""
    if explicit:
        return explicit
    newest = None
    for evs in (events or {}).values():
        for ev in evs:
            extra = (
                getattr(ev, "extra", None)
                or (ev.get("extra") if isinstance(ev, dict) else None)
                or {}
            )
            ts = getattr(ev, "timestamp", None) or (
                ev.get("timestamp") if isinstance(ev, dict) else None
            )
            if extra.get(URI_KEY) and (newest is None or (ts is not None and ts >= newest[0])):
                newest = (ts, extra[URI_KEY])
    if newest is None:
        raise ConfigError(
            "no I2E URI: trigger with params.i2e, or let a mofi_build_i2e run publish the mofi_i2e asset"
        )
    return newest[1]
