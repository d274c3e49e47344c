"""The linker on its own: real spaCy, a tiny KB with colliding aliases."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline_tasks.stages.ner.linking import EntityLinker, LinkerConfig, clean_caption

KB = [
    {
        "entity_id": "planet",
        "name": "Mercury (planet)",
        "aliases": [],
        "type": "place",
        "description": "smallest planet of the Solar System, closest to the Sun",
        "summary": "Mercury orbits the Sun; telescope observations of the planet",
    },
    {
        "entity_id": "element",
        "name": "Mercury (element)",
        "aliases": ["quicksilver"],
        "type": "science",
        "description": "chemical element, a liquid metal",
        "summary": "mercury metal is used in thermometers and barometers",
    },
    {
        "entity_id": "paris",
        "name": "Paris",
        "aliases": [],
        "type": "city",
        "description": "capital city of France",
        "summary": "",
    },
    {
        "entity_id": "paris_hilton",
        "name": "Paris Hilton",
        "aliases": [],
        "type": "person",
        "description": "American media personality",
        "summary": "",
    },
    {
        "entity_id": "penguin",
        "name": "Penguin",
        "aliases": [],
        "type": "organism",
        "description": "flightless seabird",
        "summary": "",
    },
    {
        "entity_id": "sailing_ship",
        "name": "Sailing ship",
        "aliases": [],
        "type": "technology",
        "description": "ship propelled by sails",
        "summary": "",
    },
]


@pytest.fixture(scope="module")
def linker():
    table = pa.Table.from_pylist([{**r} for r in KB])
    return EntityLinker(table, LinkerConfig())


def _ids(linker, text):
    (mentions,) = linker.link_texts([text])
    return [m["entity_id"] for m in mentions if m["entity_id"]]


def test_colliding_aliases_are_resolved_by_context(linker):
    assert "planet" in _ids(
        linker, "Mercury seen through a telescope, the planet closest to the Sun"
    )
    assert "element" in _ids(linker, "A thermometer filled with liquid Mercury metal")


def test_longest_match_and_plurals(linker):
    assert _ids(linker, "Paris Hilton at the premiere") == ["paris_hilton"]
    assert _ids(linker, "two Penguins on the ice") == ["penguin"]
    assert _ids(linker, "old Chinese sailing ship - high resolution") == ["sailing_ship"]


def test_offsets_point_into_the_caption(linker):
    text = "Stock photo: a penguin in Paris"
    (mentions,) = linker.link_texts([text])
    for m in mentions:
        assert text[m["start"] : m["end"]].strip(" #@.,;:!?\"'()[]") == m["text"]
        assert 0.0 <= m["link_score"] <= 1.0


def test_clean_caption_reasons():
    assert clean_caption(None, 100) == (None, "caption_missing", False)
    assert clean_caption("   ", 100) == (None, "caption_empty", False)
    assert clean_caption("caf\xe9".encode("latin-1"), 100) == (None, "caption_not_utf8", False)
    text, reason, truncated = clean_caption("x" * 500, 100)
    assert (len(text), reason, truncated) == (100, None, True)


def test_weights_must_sum_to_one():
    from training.core.config import ConfigError

    with pytest.raises(ConfigError, match="sum to 1"):
        LinkerConfig(w_prior=0.9)
