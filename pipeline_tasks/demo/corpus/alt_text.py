"""Web-like alt-text around a mention of what a picture shows: names, cameras, events,
boilerplate, hashtags, distractor entities, misspellings and casing noise."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .config import CorpusConfig
from .truth import caption_core

_FIRST = "James Maria Chen Olga Rahul Sofia Kenji Amara Lukas Ines Mateo Priya Tomasz Hana Diego Freya Omar Lena Yusuf Clara".split()
_LAST = "Okafor Lindqvist Moreau Tanaka Kowalski Haddad Fernandes Novak Brennan Castillo Ivanova Mbeki Schultz Rossi Nakamura Ortega Dubois Petrov".split()
_AGENCIES = [
    "Shutterstock",
    "Getty Images",
    "Alamy Stock Photo",
    "iStock",
    "Adobe Stock",
    "Dreamstime",
    "123RF",
    "Depositphotos",
    "Pond5",
    "Stocksy",
    "EyeEm",
    "Pixabay",
]
_CAMERAS = [
    "Canon EOS R5",
    "Nikon D850",
    "Sony A7 III",
    "Fujifilm X-T4",
    "iPhone 14 Pro",
    "Pixel 7",
    "Olympus OM-D E-M1",
    "Leica Q2",
    "Panasonic Lumix GH5",
    "Canon 5D Mark IV",
]
_EVENTS = [
    "Summer Festival",
    "Spring Fair",
    "Comic Con",
    "Christmas Market",
    "Trade Show",
    "Family Day",
    "Street Parade",
    "Art Week",
    "Harvest Fest",
    "Expo",
]
_BOILER = [
    "stock photo",
    "royalty free stock image",
    "isolated on white background",
    "high resolution",
    "vector illustration",
    "free download",
    "HD wallpaper",
    "clipart",
    "png transparent",
    "stock illustration",
    "editorial use only",
    "premium photo",
    "close-up",
    "4K",
    "image ID 2F4KX9",
]
_TAGS = [
    "photooftheday",
    "instagood",
    "nofilter",
    "picoftheday",
    "art",
    "design",
    "cute",
    "love",
    "travel",
    "kids",
    "stock",
    "illustration",
]
_DISTRACTOR_TYPES = ("person", "city", "country", "place", "work")


def _misspell(word: str, rng: np.random.Generator) -> str:
    letters = [i for i, ch in enumerate(word) if ch.isalpha()]
    if len(letters) < 4:
        return word
    i = letters[int(rng.integers(1, len(letters) - 1))]
    op = int(rng.integers(0, 3))
    if op == 0:  # swap with the next letter
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :] if i + 1 < len(word) else word
    if op == 1:  # drop
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]  # double


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(0, len(seq)))]


def make_alt_text(
    mention: str,
    rng: np.random.Generator,
    pools: dict[str, list[tuple[str, str]]],
    c: CorpusConfig,
    true_id: str | None,
) -> tuple[str, list[str], bool]:
    """(alt text, distractor entity ids, mention included)."""
    person = f"{_pick(rng, _FIRST)} {_pick(rng, _LAST)}"
    fields = {
        "P": person,
        "A": _pick(rng, _AGENCIES),
        "C": _pick(rng, _CAMERAS),
        "E": _pick(rng, _EVENTS),
        "B": _pick(rng, _BOILER),
        "Y": str(int(rng.integers(2009, 2026))),
        "N": str(int(rng.integers(100000, 9999999))),
    }
    slot_ids: dict[str, str] = {}
    n_dis = int(rng.integers(0, c.max_distractors + 1))
    slots = ["L", "X"] if rng.random() < 0.5 else ["X", "L"]
    for slot in slots[:n_dis]:
        pool = pools["places"] if slot == "L" else pools["people"]
        if not pool:
            continue
        eid, name = _pick(rng, pool)
        if eid == true_id:
            continue
        fields[slot] = name
        slot_ids[slot] = eid
    mentioned = rng.random() >= c.no_mention_prob
    fields["M"] = mention if mentioned else ""
    tags = " ".join("#" + _pick(rng, _TAGS) for _ in range(int(rng.integers(1, 4))))
    fields["H"] = tags
    generic = [
        "{M} - {B}",
        "{M} | Photo by {P} / {A}",
        "{B}: {M}. Shot on {C}",
        "{M} #{M_tag} {H}",
        "Close-up of {M} - {A} {N}",
        "{P} © {Y} {A}. {M}",
        "{M}",
        "{E} {Y}: {M} ({A})",
        "Download {M} {B} from {A}",
        "{M}, {B}, {H}",
    ]
    named: list[str] = []  # templates that name the distractors drawn above
    if "L" in fields:
        named += [
            "{M} in {L} | {A}",
            "{E} {L} {Y} - {M}",
            "{M} near {L}. Photo: {P}",
            "Souvenir from {L}: {M}",
        ]
    if "X" in fields:
        named += ["{X} with {M} at {E}", "{M} picture shared by {X}", "{X}'s favourite {M} {H}"]
    if "L" in fields and "X" in fields:
        named = ["{X} in {L}: {M} ({A})", "{M} - {X}, {L} {Y}", "{X} visiting {L} - {M}"]
    t = _pick(rng, named) if named and rng.random() < 0.7 else _pick(rng, generic)
    if not mentioned and "{M}" in t:
        t = t.replace("{M}", "{B}")
    # a distractor counts only if the chosen template names it
    used = [eid for slot, eid in sorted(slot_ids.items()) if "{" + slot + "}" in t]
    fields["M_tag"] = re.sub(r"[^A-Za-z0-9]", "", mention.title()) or "photo"
    text = t.format(**fields)
    text = re.sub(r"\s+", " ", text).strip(" -|,:")
    r = rng.random()
    if r < c.casing_prob / 3:
        text = text.upper()
    elif r < 2 * c.casing_prob / 3:
        text = text.lower()
    elif r < c.casing_prob:
        text = text.title()
    return text, used, mentioned


# ----------------------------------------------------------------------- images


def mention_of(rec: dict[str, Any], rng: np.random.Generator, c: CorpusConfig) -> tuple[str, bool]:
    core = caption_core(rec["caption"])
    name = rec.get("entity_surface")
    if name and rec.get("link") == "caption":
        mention = core if rng.random() < 0.6 else name
    elif name:
        mention = name if rng.random() < 0.6 else f"{core}, {name}"
    else:
        mention = core
    misspelled = False
    if rng.random() < c.misspell_prob:
        words = mention.split(" ")
        j = int(rng.integers(0, len(words)))
        new = _misspell(words[j], rng)
        misspelled = new != words[j]
        words[j] = new
        mention = " ".join(words)
    return mention, misspelled
