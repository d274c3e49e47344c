from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipeline_tasks.runtime import markers
from pipeline_tasks.stages.kb import stage as kb
from training.core.config import ConfigError


def test_packaged_sources_build_a_valid_kb(tmp_path):
    out = str(tmp_path / "kb")
    stats = kb.build_kb(kb.KBConfig(sources=("vital", "countries")), out)
    table = kb.load_kb(out)
    assert table.num_rows == stats.n_out > 9000
    ids = table.column("entity_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert all(n.strip() for n in table.column("name").to_pylist())
    rows = {r["name"]: r for r in table.to_pylist()}
    assert rows["Lion"]["entity_id"] == "wiki:Lion" and rows["Lion"]["description"]
    assert rows["Lion"]["type"] == "organism"
    # qualifiers become aliases: "Mercury (planet)" is also "Mercury"
    assert any(r["aliases"] == ["Mercury"] for n, r in rows.items() if n.startswith("Mercury ("))
    # a country from the gazetteer folds into the article and brings its official name
    assert "French Republic" in rows["France"]["aliases"]
    assert stats.drops.get("merged_gazetteer_duplicate", 0) > 100
    assert markers.MarkerStore(out, "kb").is_done("00000")
    assert json.loads(open(f"{out}/kb.config.json").read())["sources"] == ["vital", "countries"]


def test_user_table_duplicates_and_empty_names_are_counted_skips(tmp_path):
    rows = [
        {
            "entity_id": "Q1",
            "name": "Owl",
            "aliases": ["owls", "Owl", ""],
            "description": "bird",
            "type": "organism",
        },
        {"entity_id": "Q2", "name": "  ", "aliases": [], "description": "no name", "type": "x"},
        {
            "entity_id": "Q3",
            "name": "owl",
            "aliases": [],
            "description": "same name, other case",
            "type": "x",
        },
        {"entity_id": "Q1", "name": "Other", "aliases": [], "description": "same id", "type": "x"},
        {"entity_id": "", "name": "No id", "aliases": [], "description": "", "type": "x"},
        {"entity_id": "Q4", "name": None, "aliases": None, "description": None, "type": None},
        {"entity_id": "Q5", "name": "Penguin", "aliases": None, "description": None, "type": None},
    ]
    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "kb")
    stats = kb.build_kb(kb.KBConfig(sources=(str(src),)), out)
    assert stats.drops == {
        "empty_name": 2,
        "duplicate_name": 1,
        "duplicate_entity_id": 1,
        "empty_entity_id": 1,
    }
    table = pq.read_table(f"{out}/entities.parquet").to_pylist()
    assert [r["entity_id"] for r in table] == ["Q1", "Q5"]
    assert table[0]["aliases"] == ["owls"]
    assert table[1]["type"] == "concept" and table[1]["description"] == ""


def test_csv_and_parquet_user_tables(tmp_path, tiny_kb):
    csv = tmp_path / "kb.csv"
    csv.write_text("entity_id,name,aliases,description,type\nQ1,Owl,owls;hooter,bird,organism\n")
    out = str(tmp_path / "kb2")
    kb.build_kb(kb.KBConfig(sources=(str(csv), f"{tiny_kb}/entities.parquet")), out)
    t = kb.load_kb(out).to_pylist()
    assert t[0]["aliases"] == ["owls", "hooter"]
    assert len(t) == 1 + 16  # the tiny KB's "Owl" is a duplicate name


def test_bad_sources_fail_with_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="neither a builtin"):
        kb.build_kb(kb.KBConfig(sources=("nosuchsource",)), str(tmp_path / "a"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"entity_id": "Q1", "name": "x"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        kb.build_kb(kb.KBConfig(sources=(str(bad),)), str(tmp_path / "b"))
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text('{"id": "Q1", "label": "x"}\n')
    with pytest.raises(ConfigError, match="required column"):
        kb.build_kb(kb.KBConfig(sources=(str(nocol),)), str(tmp_path / "c"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"entity_id": "Q1", "name": ""}\n')
    with pytest.raises(ConfigError, match="empty after cleaning"):
        kb.build_kb(kb.KBConfig(sources=(str(empty),)), str(tmp_path / "d"))
    # the failed build is visible as failed, not as done
    recs = markers.MarkerStore(str(tmp_path / "d"), "kb").read_all()
    assert recs["00000"]["state"] == "failed"
    with pytest.raises(FileNotFoundError, match="mofi kb"):
        kb.load_kb(str(tmp_path / "nothing"))


def test_kb_on_s3(s3_bucket, tiny_kb_table):
    out = s3_bucket + "/kb/v=1"
    kb.build_kb(kb.KBConfig(sources=(tiny_kb_table,)), out)
    assert kb.load_kb(out).num_rows == 17
