"""Which KB entity each picture shows (from its caption, file name or category), and the
train / eval / validation split of the pictures."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pyarrow as pa

from pipeline_tasks.stages.kb.names import normalize_name

from .config import CorpusConfig

_STOP = set(
    """a an the of and or in on at to with for from by some one two three four five six seven eight nine ten
    happy sad little big large small tiny baby young old new blue red green yellow white black pink purple orange
    brown grey gray gold golden silver dark light left right front back side top bottom half full whole head view
    cartoon drawing picture image photo symbol shape letter number piece part kind type set go""".split()
)
# Category folders that name an occasion or a place in the house, not what the picture shows.
_NON_VISUAL_CATEGORIES = {
    "seasonal",
    "easter",
    "christmas",
    "halloween",
    "hanukkah",
    "newyears",
    "household",
    "town",
    "symbols",
    "hobbies",
    "people",
    "misc",
    "military",
    "medical",
    "naturalforces",
    "space",
}


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def caption_core(caption: str) -> str:
    """'A pink flamingo.' -> 'pink flamingo'."""
    s = re.sub(r"[\u2018\u2019]", "'", caption.strip())
    s = re.sub(r"[.!?\u2026]+$", "", s).strip()
    s = re.sub(r"^(a|an|the|some)\s+", "", s, flags=re.I)
    return s


class EntityIndex:
    """normalised surface form -> entity id (names win over aliases; ambiguous aliases dropped)."""

    def __init__(self, table: pa.Table):
        self.names: dict[str, str] = {}
        self.info: dict[str, dict[str, Any]] = {}
        alias_hits: dict[str, set[str]] = {}
        for row in table.select(
            ["entity_id", "name", "aliases", "type", "description"]
        ).to_pylist():
            eid = row["entity_id"]
            self.info[eid] = row
            self.names.setdefault(normalize_name(row["name"]), eid)
            for a in row["aliases"] or []:
                alias_hits.setdefault(normalize_name(a), set()).add(eid)
        for key, ids in alias_hits.items():
            if key not in self.names and len(ids) == 1:
                self.names[key] = next(iter(ids))

    def lookup(self, phrase: str) -> str | None:
        key = normalize_name(phrase)
        hit = self.names.get(key)
        if hit is None and " " not in key:
            hit = self.names.get(_singular(key))
        if hit is None and " " in key:
            head, _, last = key.rpartition(" ")
            hit = self.names.get(f"{head} {_singular(last)}")
        return hit

    def match_tokens(self, tokens: list[str], suffix_only: bool = False) -> str | None:
        """Longest n-gram that names an entity; among equals the rightmost (the head noun).

        With ``suffix_only`` the n-gram must end at the last token: in "a walnut sailboat"
        only "sailboat" (or "walnut sailboat") may name the picture, never "walnut".
        """
        for n in range(min(4, len(tokens)), 0, -1):
            starts = [len(tokens) - n] if suffix_only else range(len(tokens) - n, -1, -1)
            for start in starts:
                gram = tokens[start : start + n]
                if gram[0] in _STOP or gram[-1] in _STOP or (n == 1 and len(gram[0]) < 3):
                    continue
                hit = self.lookup(" ".join(gram))
                if hit and self.info[hit]["type"] not in ("person",):
                    return hit
        return None


def link_stamp(rec: dict[str, Any], index: EntityIndex) -> tuple[str | None, str]:
    """(entity_id or None, how): from the caption, else the file name, else the category."""
    # the first clause names the subject: "Yield" means you have to let ... -> "Yield"
    first = re.split(
        r"\s+(?:means|is|are|was|carries)\s+|[\u2014;:(]|\.\s", caption_core(rec["caption"])
    )[0]
    words = re.findall(r"[a-z][a-z'\-]*", first.lower())
    hit = index.match_tokens(words, suffix_only=True)
    if hit:
        return hit, "caption"
    stem = rec["stamp_id"].rsplit("/", 1)[-1]
    hit = index.match_tokens([w for w in re.split(r"[^a-z]+", stem.lower()) if w], suffix_only=True)
    if hit:
        return hit, "name"
    for part in reversed(rec["category"].split("/")):
        if part.lower() in _NON_VISUAL_CATEGORIES:
            continue
        hit = index.match_tokens([w for w in re.split(r"[^a-z]+", part.lower()) if w])
        if hit:
            return hit, "category"
    hit = index.match_tokens(words)
    if hit:
        return hit, "caption"
    return None, "none"


# --------------------------------------------------------------------- the plan


def split_pictures(
    records: list[dict[str, Any]], c: CorpusConfig
) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, eval, val): per category, a seeded hash orders the pictures; the first
    holdout_fraction go to eval, then val_fraction of the rest (at least one) to val."""
    by_cat: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_cat.setdefault(r["category"], []).append(r)
    train, held, val = [], [], []
    for cat in sorted(by_cat):
        recs = sorted(
            by_cat[cat],
            key=lambda r: hashlib.sha1(f"{c.seed}:{r['stamp_id']}".encode()).hexdigest(),
        )
        k = int(round(len(recs) * c.holdout_fraction)) if len(recs) >= c.holdout_min_pictures else 0
        k = max(2, k) if k else 0
        kv = max(1, int(round((len(recs) - k) * c.val_fraction))) if k and c.val_fraction else 0
        held.extend(recs[:k])
        val.extend(recs[k : k + kv])
        train.extend(recs[k + kv :])
    by_id = lambda r: r["stamp_id"]  # noqa: E731
    return sorted(train, key=by_id), sorted(held, key=by_id), sorted(val, key=by_id)
