from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline_tasks import recipes
from pipeline_tasks.demo import recipes as demo_recipes
from pipeline_tasks.demo.corpus import CorpusConfig
from pipeline_tasks.stages.kb.stage import KBConfig
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
    assert len(
        {json.dumps(json.loads(b.to_json())["score"]) + b.kb.to_json() for b in bundles}
    ) == len(bundles)
    for b in bundles:
        json.loads(b.to_json())
    with pytest.raises(ConfigError, match="unknown config"):
        recipes.get("nope")
    corpora = [demo_recipes.get(n) for n in demo_recipes.RECIPES]
    assert len({c.pairs for c in corpora}) == len(corpora)
    with pytest.raises(ConfigError, match="unknown corpus config"):
        demo_recipes.get("nope")


def test_production_scores_with_open_clip_at_the_documented_filter():
    p = recipes.production()
    assert p.score.backend == "open_clip" and p.score.model.startswith("ViT-B-32")
    assert (p.vocab.threshold, p.vocab.top_k) == (0.25, 3)


def test_every_field_is_documented():
    for cls in (CorpusConfig, KBConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
