"""Demo corpus: web-like noisy image/alt-text pairs in img2dataset's layout, with ground truth.

Real pictures with human captions (see :mod:`pipeline_tasks.stamps`) become many distinct
samples: each sample re-renders a picture (crop, scale, flip, colour, background, JPEG
quality) and writes web-like alt-text around the mention of what it shows: the caption
phrase or the name of the KB entity it is linked to, mixed with photographer and agency
names, cameras, places and events, stock-photo boilerplate, hashtags, unrelated named
entities (KB people and places: the distractors), misspellings and casing noise.

Outputs (all written atomically, shard markers last):

* ``OUT/{shard:05d}.tar`` (key.jpg, key.txt, key.json) and ``OUT/{shard:05d}.parquet``
  (key, caption, url, width, height, status, ...), as img2dataset writes them;
* ``TRUTH/{shard:05d}.parquet``: key -> true entity ids, distractor entity ids, picture id,
  category. No pipeline stage reads it; benchmarks do. ``TRUTH/stamps.parquet`` holds the
  picture -> entity linking and the train/eval split;
* ``EVAL/{class_id}_{picture}.jpg``: held-out pictures never used in the training pairs,
  named as GPR1200 names its images, and ``EVAL/classes.json``.

Sample ``i`` of shard ``s`` draws from ``numpy.random.default_rng([seed, s, i])``, so the
output is the same for a seed however the shards are spread over workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from training.core import config as cfg
from training.core import storage

from .. import kb as kb_mod
from ..raw import add_tar_member
from ..runtime import markers
from ..runtime.executor import ShardStage, ShardTask, StageResult, run_shards, stage_lease
from ..runtime.layout import sibling
from . import stamps as stamps_mod

log = logging.getLogger(__name__)

STAGE = "corpus"
RAW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("sha256", pa.string()),
    ]
)
TRUTH_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("stamp_id", pa.string()),
        ("category", pa.string()),
        ("class_id", pa.int32()),
        ("true_entity_ids", pa.list_(pa.string())),
        ("distractor_entity_ids", pa.list_(pa.string())),
        ("mention", pa.string()),
        ("mentioned", pa.bool_()),
        ("misspelled", pa.bool_()),
    ]
)


@dataclasses.dataclass
class CorpusConfig(cfg.StageConfig):
    """How many noisy pairs to make from the real pictures, and how noisy."""

    pairs: int = cfg.field(5000, "number of image/alt-text pairs")
    seed: int = cfg.field(
        0, "random seed; the corpus is a pure function of (seed, config, pictures)"
    )
    shard_size: int = cfg.field(1000, "pairs per shard (img2dataset's default is 10000)")
    workers: int = cfg.field(2, "worker processes rendering shards")
    stamps_dir: str = cfg.field(
        "", "picture + caption folder (empty: data/stamps, fetched on first use)"
    )
    min_side: int = cfg.field(160, "smallest image side in pixels")
    max_side: int = cfg.field(288, "largest image side in pixels")
    crop_min_area: float = cfg.field(0.6, "random crops keep at least this fraction of the picture")
    jpeg_quality: tuple[int, int] = cfg.field((70, 95), "JPEG quality range")
    white_background_prob: float = cfg.field(0.25, "share of 'isolated on white' stock pictures")
    holdout_fraction: float = cfg.field(
        0.2, "share of each category's pictures held out for evaluation"
    )
    holdout_min_pictures: int = cfg.field(5, "categories with fewer pictures are not held out")
    val_fraction: float = cfg.field(
        0.1,
        "share of each held-out category's remaining pictures kept out of training as a "
        "validation folder (model selection, e.g. WiSE-FT's mixing weight); at least one",
    )
    val_renders: int = cfg.field(2, "renders of each validation picture (a class needs two images)")
    misspell_prob: float = cfg.field(0.08, "probability that the mention is misspelled")
    casing_prob: float = cfg.field(
        0.15, "probability of all-upper / all-lower / title-case alt-text"
    )
    no_mention_prob: float = cfg.field(
        0.03, "probability that the alt-text does not mention the subject"
    )
    max_distractors: int = cfg.field(
        2, "at most this many unrelated KB entities named in one alt-text"
    )
    cache_max_side: int = cfg.field(320, "pictures are kept in worker memory at most this large")

    def validate(self) -> None:
        self._check(self.pairs >= 1, "pairs", "must be >= 1")
        self._check(self.shard_size >= 1, "shard_size", "must be >= 1")
        self._check(self.workers >= 1, "workers", "must be >= 1")
        self._check(
            16 <= self.min_side <= self.max_side <= 4096,
            "min_side",
            "need 16 <= min_side <= max_side <= 4096",
        )
        self._check(0.1 <= self.crop_min_area <= 1.0, "crop_min_area", "must be in [0.1, 1]")
        lo, hi = self.jpeg_quality
        self._check(1 <= lo <= hi <= 100, "jpeg_quality", "need 1 <= low <= high <= 100")
        for name in (
            "white_background_prob",
            "holdout_fraction",
            "misspell_prob",
            "casing_prob",
            "no_mention_prob",
        ):
            self._check(0.0 <= getattr(self, name) <= 1.0, name, "must be a probability in [0, 1]")
        self._check(
            self.holdout_fraction < 1.0, "holdout_fraction", "must leave pictures for training"
        )
        self._check(self.holdout_min_pictures >= 2, "holdout_min_pictures", "must be >= 2")
        self._check(0.0 <= self.val_fraction < 0.5, "val_fraction", "must be in [0, 0.5)")
        self._check(self.val_renders >= 1, "val_renders", "must be >= 1")
        self._check(
            0 <= self.max_distractors <= 2,
            "max_distractors",
            "must be 0, 1 or 2 (one place and one person slot)",
        )

    @property
    def num_shards(self) -> int:
        return math.ceil(self.pairs / self.shard_size)


# ----------------------------------------------------------------- entity linking

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
            self.names.setdefault(kb_mod.normalize_name(row["name"]), eid)
            for a in row["aliases"] or []:
                alias_hits.setdefault(kb_mod.normalize_name(a), set()).add(eid)
        for key, ids in alias_hits.items():
            if key not in self.names and len(ids) == 1:
                self.names[key] = next(iter(ids))

    def lookup(self, phrase: str) -> str | None:
        key = kb_mod.normalize_name(phrase)
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


# ------------------------------------------------------------------- alt-text noise

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


def _load_picture(path: str, max_side: int):
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGBA")
    bbox = im.getchannel("A").getbbox()
    if bbox:
        im = im.crop(bbox)
    if max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.LANCZOS)
    return im


def _background(w: int, h: int, rng: np.random.Generator, c: CorpusConfig):
    from PIL import Image

    kind = rng.random()
    if kind < c.white_background_prob:
        return Image.new("RGB", (w, h), (255, 255, 255))
    col = tuple(int(x) for x in rng.integers(0, 256, 3))
    if kind < c.white_background_prob + 0.25:
        return Image.new("RGB", (w, h), col)
    if kind < c.white_background_prob + 0.5:
        col2 = tuple(int(x) for x in rng.integers(0, 256, 3))
        mask = Image.linear_gradient("L").resize((w, h))
        if rng.random() < 0.5:
            mask = mask.rotate(90, expand=False)
        return Image.composite(Image.new("RGB", (w, h), col), Image.new("RGB", (w, h), col2), mask)
    g = int(rng.integers(2, 7))
    blot = rng.integers(0, 256, (g, g, 3), dtype=np.uint8)
    return Image.fromarray(blot, "RGB").resize((w, h), Image.BICUBIC)


def render(picture, rng: np.random.Generator, c: CorpusConfig) -> bytes:
    """One distinct JPEG of ``picture`` (RGBA): crop, scale, flip, background, colour, quality."""
    from PIL import Image, ImageEnhance, ImageOps

    pw, ph = picture.size
    fx = math.sqrt(rng.uniform(c.crop_min_area, 1.0))
    fy = math.sqrt(rng.uniform(c.crop_min_area, 1.0))
    cw, ch = max(4, int(pw * fx)), max(4, int(ph * fy))
    x0 = int(rng.integers(0, pw - cw + 1))
    y0 = int(rng.integers(0, ph - ch + 1))
    obj = picture.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        obj = ImageOps.mirror(obj)
    side = int(rng.integers(c.min_side, c.max_side + 1))
    aspect = rng.uniform(0.75, 1.333)
    w, h = (
        (side, max(16, int(side / aspect))) if aspect >= 1 else (max(16, int(side * aspect)), side)
    )
    fill = rng.uniform(0.55, 0.95)
    s = fill * min(w / cw, h / ch)
    ow, oh = max(2, int(cw * s)), max(2, int(ch * s))
    obj = obj.resize((ow, oh), Image.BILINEAR)
    canvas = _background(w, h, rng, c)
    px = int(rng.integers(0, w - ow + 1))
    py = int(rng.integers(0, h - oh + 1))
    canvas.paste(obj, (px, py), obj)
    for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        canvas = enh(canvas).enhance(float(rng.uniform(0.75, 1.25)))
    buf = io.BytesIO()
    q = int(rng.integers(c.jpeg_quality[0], c.jpeg_quality[1] + 1))
    canvas.save(buf, format="JPEG", quality=q, optimize=False)
    return buf.getvalue()


# ------------------------------------------------------------------ shard writing


def sample_key(shard: int, i: int) -> str:
    return f"{shard:05d}{i:04d}" if i < 10_000 else f"{shard:05d}{i:06d}"


@dataclasses.dataclass
class CorpusStage(ShardStage):
    """Renders corpus shards; each worker keeps the pictures it used in memory."""

    config: CorpusConfig
    out: str
    truth_dir: str
    train: list[dict[str, Any]]
    pools: dict[str, list[tuple[str, str]]]
    stamps_dir: str

    name = "corpus"
    unit = "pair"

    def setup(self, worker: int, workers: int) -> None:
        self.cache: dict[str, Any] = {}

    def _picture(self, rec: dict[str, Any]):
        pic = self.cache.get(rec["stamp_id"])
        if pic is None:
            pic = _load_picture(
                os.path.join(self.stamps_dir, rec["image"]), self.config.cache_max_side
            )
            self.cache[rec["stamp_id"]] = pic
        return pic

    def process(self, task: ShardTask, stats: markers.ShardStats) -> None:
        from PIL import Image

        c, out, train = self.config, self.out, self.train
        shard = int(task.shard)
        sid = task.shard
        n = min(c.shard_size, c.pairs - shard * c.shard_size)
        rows, truth = [], []
        tar_uri = storage.join(out, f"{sid}.tar")
        with (
            storage.open_write(tar_uri) as f,
            tarfile.open(fileobj=f, mode="w|", format=tarfile.GNU_FORMAT) as tar,
        ):
            for i in range(n):
                rng = np.random.default_rng([c.seed, shard, i])
                stats.n_in += 1
                rec = train[int(rng.integers(0, len(train)))]
                key = sample_key(shard, i)
                jpg = render(self._picture(rec), rng, c)
                eid = rec.get("entity_id")
                mention, misspelled = _mention(rec, rng, c)
                text, distractors, mentioned = make_alt_text(mention, rng, self.pools, c, eid)
                with Image.open(io.BytesIO(jpg)) as im:
                    w, h = im.size
                digest = hashlib.sha256(jpg).hexdigest()
                url = f"https://img.stock-demo.test/{digest[:2]}/{digest[:16]}.jpg"
                meta = {
                    "key": key,
                    "caption": text,
                    "url": url,
                    "width": w,
                    "height": h,
                    "original_width": w,
                    "original_height": h,
                    "status": "success",
                    "error_message": None,
                    "sha256": digest,
                }
                add_tar_member(tar, f"{key}.jpg", jpg)
                add_tar_member(tar, f"{key}.txt", text.encode("utf-8"))
                add_tar_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                rows.append(meta)
                truth.append(
                    {
                        "key": key,
                        "stamp_id": rec["stamp_id"],
                        "category": rec["category"],
                        "class_id": rec["class_id"],
                        "true_entity_ids": [eid] if eid else [],
                        "distractor_entity_ids": distractors,
                        "mention": mention if mentioned else "",
                        "mentioned": mentioned,
                        "misspelled": misspelled and mentioned,
                    }
                )
                stats.n_out += 1
        pq_uri = storage.join(out, f"{sid}.parquet")
        with storage.open_write(pq_uri) as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), f)
        truth_uri = storage.join(self.truth_dir, f"{sid}.parquet")
        with storage.open_write(truth_uri) as f:
            pq.write_table(pa.Table.from_pylist(truth, schema=TRUTH_SCHEMA), f)
        markers.record_outputs(stats, out, [tar_uri, pq_uri])
        markers.record_outputs(stats, out, [truth_uri])
        stats.bytes_out = (
            stats.outputs[f"{sid}.tar"]["size"] + stats.outputs[f"{sid}.parquet"]["size"]
        )
        stats.extra = {
            "with_entity": sum(1 for t in truth if t["true_entity_ids"]),
            "distractors": sum(len(t["distractor_entity_ids"]) for t in truth),
        }


def _mention(rec: dict[str, Any], rng: np.random.Generator, c: CorpusConfig) -> tuple[str, bool]:
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


# ------------------------------------------------------------------ entry point


def _pools(table: pa.Table) -> dict[str, list[tuple[str, str]]]:
    rows = table.select(["entity_id", "name", "type"]).to_pylist()
    places = [
        (r["entity_id"], kb_mod.base_name(r["name"]))
        for r in rows
        if r["type"] in ("city", "country", "place")
    ]
    people = [(r["entity_id"], kb_mod.base_name(r["name"])) for r in rows if r["type"] == "person"]
    return {"places": sorted(places), "people": sorted(people)}


def _write_eval(
    held: list[dict[str, Any]],
    stamps_dir: str,
    eval_dir: str,
    c: CorpusConfig,
    stream: int = 1_000_000,
    renders: int = 1,
) -> tuple[int, int]:
    """Held-out pictures as a GPR1200-named folder (``renders`` different renders of each)."""
    classes: dict[int, dict[str, Any]] = {}
    n = 0
    for k, rec in enumerate(held):
        pic = _load_picture(os.path.join(stamps_dir, rec["image"]), c.cache_max_side)
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", rec["stamp_id"].rsplit("/", 1)[-1])
        for v in range(renders):
            rng = np.random.default_rng([c.seed, stream, k] + ([v] if renders > 1 else []))
            jpg = render(pic, rng, c)
            suffix = f"-{v}" if renders > 1 else ""
            storage.write_bytes(
                storage.join(eval_dir, f"{rec['class_id']}_{name}{suffix}.jpg"), jpg
            )
            classes.setdefault(rec["class_id"], {"category": rec["category"], "n": 0})["n"] += 1
            n += 1
    storage.write_json(
        storage.join(eval_dir, "classes.json"), {str(k): v for k, v in sorted(classes.items())}
    )
    return n, len(classes)


def prepare(c: CorpusConfig, kb_uri: str) -> dict[str, Any]:
    """Pictures indexed, linked to KB entities and split; small enough to ship to workers."""
    stamps_dir = stamps_mod.ensure_stamps(c.stamps_dir or None)
    records, src_stats = stamps_mod.read_index(stamps_dir)
    table = kb_mod.load_kb(kb_uri)
    index = EntityIndex(table)
    categories = sorted({r["category"] for r in records})
    class_of = {cat: i for i, cat in enumerate(categories)}
    for r in records:
        eid, how = link_stamp(r, index)
        r["entity_id"], r["link"], r["class_id"] = eid, how, class_of[r["category"]]
        r["entity_surface"] = kb_mod.base_name(index.info[eid]["name"]) if eid else None
    train, held, val = split_pictures(records, c)
    if not train:
        raise cfg.ConfigError(f"no training pictures left in {stamps_dir} after the hold-out split")
    return {
        "stamps_dir": stamps_dir,
        "records": records,
        "train": train,
        "held": held,
        "val": val,
        "pools": _pools(table),
        "source_stats": src_stats,
        "categories": categories,
    }


def build_corpus(
    c: CorpusConfig,
    out_uri: str,
    kb_uri: str,
    eval_out: str | None = None,
    truth_out: str | None = None,
    progress: bool = True,
) -> StageResult:
    eval_dir = eval_out or sibling(out_uri, "eval")
    truth_dir = truth_out or sibling(out_uri, "truth")
    for root in (out_uri, eval_dir, truth_dir):
        storage.check_writable(root)
    prep = prepare(c, kb_uri)
    store = markers.MarkerStore(out_uri, STAGE)
    with stage_lease(store):
        return _build(c, out_uri, eval_dir, truth_dir, prep, store, progress)


def _build(c, out_uri, eval_dir, truth_dir, prep, store, progress) -> StageResult:
    storage.makedirs(out_uri)
    c.save(out_uri)
    # The pictures' own bookkeeping: how many pairs the source had and why some were skipped.
    src_store = markers.MarkerStore(out_uri, "pictures")
    src_store.write_plan(["00000"])
    src_stats = prep["source_stats"]
    src_stats.extra = {
        "categories": len(prep["categories"]),
        "linked": sum(1 for r in prep["records"] if r["entity_id"]),
        "train_pictures": len(prep["train"]),
        "eval_pictures": len(prep["held"]),
        "val_pictures": len(prep["val"]),
    }
    src_store.mark_done("00000", src_stats)
    link_rows = [
        {k: r.get(k) for k in ("stamp_id", "caption", "category", "class_id", "entity_id", "link")}
        | {"split": "eval" if r in prep["held"] else "val" if r in prep["val"] else "train"}
        for r in prep["records"]
    ]
    with storage.open_write(storage.join(truth_dir, "stamps.parquet")) as f:
        pq.write_table(pa.Table.from_pylist(link_rows), f)
    n_eval, n_classes = _write_eval(prep["held"], prep["stamps_dir"], eval_dir, c)
    val_dir = sibling(eval_dir, "val")
    n_val, _ = _write_eval(prep["val"], prep["stamps_dir"], val_dir, c, 2_000_000, c.val_renders)

    all_shards = list(range(c.num_shards))
    store.write_plan([markers.shard_id(s) for s in all_shards], {"pairs": c.pairs, "seed": c.seed})
    storage.clean_temp(out_uri)
    stage = CorpusStage(c, out_uri, truth_dir, prep["train"], prep["pools"], prep["stamps_dir"])
    tasks = [
        ShardTask(markers.shard_id(s), min(c.shard_size, c.pairs - s * c.shard_size))
        for s in all_shards
    ]
    result = run_shards(stage, store, tasks, c.workers, progress=progress)
    result.extra.update(
        samples=c.pairs,
        eval_images=n_eval,
        eval_classes=n_classes,
        eval_dir=eval_dir,
        val_images=n_val,
        val_dir=val_dir,
        truth_dir=truth_dir,
        pictures=len(prep["records"]),
        linked_pictures=src_stats.extra["linked"],
    )
    return result
