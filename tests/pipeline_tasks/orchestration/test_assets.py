"""The I2E URI handed from the build DAG to the train DAG through the asset event."""

import datetime

import pytest

from pipeline_tasks.orchestration.assets import asset_extra, resolve_i2e_uri
from training.core.config import ConfigError


class _Event:
    def __init__(self, uri, day):
        self.extra = {"uri": uri} if uri else {}
        self.timestamp = datetime.datetime(2026, 11, day)


def test_explicit_uri_wins():
    assert resolve_i2e_uri("s3://b/i2e", {"mofi_i2e": [_Event("x", 1)]}) == "s3://b/i2e"


def test_newest_event_uri():
    events = {
        "mofi_i2e": [_Event("v=2026-11-01/i2e", 1), _Event("v=2026-11-20/i2e", 20), _Event("", 22)]
    }
    assert resolve_i2e_uri("", events) == "v=2026-11-20/i2e"


def test_nothing_to_train_on():
    with pytest.raises(ConfigError, match="no I2E URI"):
        resolve_i2e_uri("", None)
    with pytest.raises(ConfigError):
        asset_extra("")
    assert asset_extra("r/i2e") == {"uri": "r/i2e"}
