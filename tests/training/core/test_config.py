from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline_tasks import recipes
from pipeline_tasks.corpus import CorpusConfig
from pipeline_tasks.kb import KBConfig
from training.core.config import ConfigError


def test_round_trip_through_saved_json(tmp_path):
    c = CorpusConfig(pairs=123, jpeg_quality=(60, 80))
    uri = c.save(str(tmp_path))
    assert uri.endswith("corpus.config.json")
    saved = json.loads(open(uri).read())
    assert saved["config_class"] == "CorpusConfig" and saved["pairs"] == 123
    assert CorpusConfig.load(uri) == c


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"pairs": 0}, "pairs"),
        ({"jpeg_quality": (90, 10)}, "jpeg_quality"),
        ({"min_side": 500, "max_side": 100}, "min_side"),
        ({"misspell_prob": 1.5}, "misspell_prob"),
        ({"holdout_fraction": 1.0}, "holdout_fraction"),
    ],
)
def test_impossible_values_fail_at_construction(changes, field):
    with pytest.raises(ConfigError, match=field):
        CorpusConfig(**changes)


def test_unknown_field_is_an_error():
    with pytest.raises(ConfigError, match="unknown field"):
        KBConfig.from_dict({"sources": ["vital"], "bogus": 1})


def test_named_configs_are_valid_and_distinct():
    names = list(recipes.RECIPES)
    assert {"cpu_test", "demo", "production"} <= set(names)
    bundles = [recipes.get(n) for n in names]
    assert len({b.corpus.pairs for b in bundles}) == len(bundles)
    for b in bundles:
        json.loads(b.to_json())
    with pytest.raises(ConfigError, match="unknown config"):
        recipes.get("nope")


def test_every_field_is_documented():
    for cls in (CorpusConfig, KBConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
