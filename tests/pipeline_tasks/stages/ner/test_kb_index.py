"""The linker's memory-mapped KB index against spaCy's own PhraseMatcher (what the linker used
before), saved and mapped, and published on S3 for the hosts of a cluster."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from pipeline_tasks.stages.kb.names import base_name, normalize_name
from pipeline_tasks.stages.ner import kb_index
from pipeline_tasks.stages.ner.linking import EntityLinker, LinkerConfig, load_spacy

TEMPLATES = [
    "a photo of {} at sunset",
    "{}'s garden, 2019",
    "#{} #travel #photo",
    "THE {} (detail)",
    "{}-style poster, {} and friends",
    "view of {}. taken by a friend",
    "{}",
]


@pytest.fixture(scope="module")
def nlp():
    return load_spacy(use_ner=True)


@pytest.fixture(scope="module")
def kb_table(tmp_path_factory):
    from pipeline_tasks.stages.kb.stage import KBConfig, build_kb, load_kb

    out = str(tmp_path_factory.mktemp("kb") / "kb")
    build_kb(KBConfig(), out)  # the packaged KB: 10k entities, real names and aliases
    return load_kb(out)


def _captions(table: pa.Table, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names = table.column("name").to_pylist()
    aliases = [a for al in table.column("aliases").to_pylist() for a in al or []]
    pool = names + aliases
    out = []
    for _ in range(n):
        t = rng.choice(TEMPLATES)
        picks = [rng.choice(pool) for _ in range(t.count("{}"))]
        picks = [p.upper() if rng.random() < 0.2 else p for p in picks]
        out.append(t.format(*picks))
    return out


def _phrase_matcher(nlp, table: pa.Table):
    """The reference: spaCy's PhraseMatcher over every usable surface form, as the linker
    built it before the index (name, name without qualifier, aliases, plurals)."""
    from spacy.lang.en.stop_words import STOP_WORDS
    from spacy.matcher import PhraseMatcher

    stop = set(STOP_WORDS)
    keys = set()
    for name, aliases in zip(
        table.column("name").to_pylist(), table.column("aliases").to_pylist(), strict=True
    ):
        for s in [name, base_name(name), *(aliases or [])]:
            for v in [s, *kb_index.plural_variants(s)]:
                k = normalize_name(v)
                if kb_index.usable_surface(k, stop):
                    keys.add(k)
    matcher = PhraseMatcher(nlp.vocab, attr="LOWER")
    matcher.add("KB", [nlp.tokenizer(k) for k in sorted(keys)])
    return matcher


def test_index_finds_exactly_the_phrase_matchers_spans(nlp, kb_table):
    from spacy.lang.en.stop_words import STOP_WORDS

    index = kb_index.KBIndex.build(kb_table, nlp.tokenizer, set(STOP_WORDS))
    matcher = _phrase_matcher(nlp, kb_table)
    captions = _captions(kb_table, 1500)
    n_spans = 0
    for doc in nlp.tokenizer.pipe(captions):
        want = sorted({(s, e) for _, s, e in matcher(doc)})
        lowers = np.array([t.lower for t in doc], np.uint64)
        got = sorted(index.match(lowers))
        assert got == want, doc.text
        n_spans += len(want)
    assert n_spans > 1500  # every caption names at least one entity; many name several


def test_a_batch_is_matched_as_its_documents_are_one_by_one(nlp, kb_table):
    """``match_many`` (what the linker runs per spaCy batch) finds each document's spans, and
    none across two documents: a two-word name split over a document's end and the next
    one's start is found in neither, and in the document that holds it whole."""
    from spacy.lang.en.stop_words import STOP_WORDS

    index = kb_index.KBIndex.build(kb_table, nlp.tokenizer, set(STOP_WORDS))
    two = next(
        n for n in kb_table.column("name").to_pylist()
        if len(n.split()) == 2 and n.isascii() and n.replace(" ", "").isalpha()
    )  # fmt: skip
    first, second = two.split()
    captions = _captions(kb_table, 400, seed=3)
    captions[10:12] = [f"zzz qqq {first}", f"{second} zzz qqq"]
    captions[20] = f"zzz {two} qqq"
    docs = list(nlp.tokenizer.pipe(captions))
    lowers = [np.array([t.lower for t in doc], np.uint64) for doc in docs]
    bounds = np.cumsum([0] + [len(x) for x in lowers])
    batched = index.match_many(np.concatenate(lowers), bounds)
    assert batched == [index.match(x) for x in lowers]
    assert (2, 4) not in batched[10] and (0, 2) not in batched[11]  # not across the boundary
    assert (1, 3) in batched[20]
    assert sum(map(len, batched)) > 400


def test_saved_index_is_mapped_and_links_the_same(nlp, kb_table, tmp_path):
    from spacy.lang.en.stop_words import STOP_WORDS

    built = kb_index.KBIndex.build(kb_table, nlp.tokenizer, set(STOP_WORDS))
    built.save(str(tmp_path / "index"))
    opened = kb_index.KBIndex.open(str(tmp_path / "index"))
    # plain ndarray views over the file maps (slicing a np.memmap is slow)
    assert all(isinstance(a.base, np.memmap) for a in opened.arrays.values())
    assert opened.meta == built.meta and opened.types == built.types
    captions = _captions(kb_table, 300, seed=1)
    in_memory = EntityLinker(kb_table, LinkerConfig(), nlp=nlp).link_texts(captions)
    mapped = EntityLinker(opened, LinkerConfig(), nlp=nlp).link_texts(captions)
    assert mapped == in_memory
    assert sum(1 for ms in mapped for m in ms if m["entity_id"]) > 300


def test_sorted_order_search_finds_what_searchsorted_finds():
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, 1 << 62, 5000, dtype=np.int64)).astype(np.uint64)
    for n in (0, 5, 63, 64, 3000):  # below and above the size where the queries are sorted
        hits = rng.choice(keys, n // 2)  # present keys, repeated ones among them
        misses = rng.integers(0, 1 << 63, n - n // 2, dtype=np.int64).astype(np.uint64)
        q = rng.permutation(np.concatenate([hits, misses, keys[:1], keys[-1:]]))
        assert np.array_equal(kb_index.search(keys, q), np.searchsorted(keys, q))


def test_context_overlap_counts_each_rows_words(nlp, kb_table):
    from spacy.lang.en.stop_words import STOP_WORDS

    index = kb_index.KBIndex.build(kb_table, nlp.tokenizer, set(STOP_WORDS))
    off, words_all = index.arrays["ctx_off"], index.arrays["ctx_word"]
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(off) - 1, 400).astype(np.int32)  # repeats included
    picked = rng.choice(words_all, 300, replace=False)
    words = np.unique(np.concatenate([picked, rng.integers(1, 2**63, 50, dtype=np.uint64)]))
    wanted = set(words.tolist())
    want = [sum(w in wanted for w in words_all[off[r] : off[r + 1]].tolist()) for r in rows]
    got = index.context_overlap(rows, words).tolist()
    assert got == want
    assert sum(want) > 50  # the check saw overlaps, not only zeros
    assert index.context_overlap(rows, words[:0]).tolist() == [0] * len(rows)


def test_overlaps_of_many_mentions_at_once_are_each_mentions_own(nlp, kb_table):
    """``context_overlap_many`` counts a row's words against its own mention's words only,
    and a word sharing the low bits of the prefilter's bitmap with a row's word is no hit."""
    from spacy.lang.en.stop_words import STOP_WORDS

    index = kb_index.KBIndex.build(kb_table, nlp.tokenizer, set(STOP_WORDS))
    off, words_all = index.arrays["ctx_off"], index.arrays["ctx_word"]
    rng = np.random.default_rng(1)
    mentions = []
    for _ in range(40):
        picked = rng.choice(words_all, 30, replace=False)
        decoys = picked[:10] ^ np.uint64(1 << 40)  # the same low 20 bits, another word
        mentions.append(np.unique(np.concatenate([picked[10:], decoys])))
    rows = rng.integers(0, len(off) - 1, 2000).astype(np.int32)
    req = rng.integers(0, len(mentions), len(rows))
    got = index.context_overlap_many(rows, req, mentions).tolist()
    want = [
        sum(w in set(mentions[m].tolist()) for w in words_all[off[r] : off[r + 1]].tolist())
        for r, m in zip(rows.tolist(), req.tolist(), strict=True)
    ]
    assert got == want and sum(want) > 100
    alone = [index.context_overlap(rows[req == m], mentions[m]) for m in range(len(mentions))]
    assert sum(int(a.sum()) for a in alone) == sum(want)


@pytest.mark.parametrize("few", [8, 0])
def test_linking_a_batch_links_each_caption_as_alone(nlp, kb_table, few, monkeypatch):
    """The linker scores all of a spaCy batch's mentions of many candidates at once (with
    ``_FEW`` 0, every mention of two or more): the same mentions, entities and scores as
    batches of one caption, and as one by one."""
    from pipeline_tasks.stages.ner import linking

    monkeypatch.setattr(linking, "_FEW", few)
    captions = _captions(kb_table, 300, seed=4)
    linker = EntityLinker(kb_table, LinkerConfig(), nlp=nlp)
    calls = []
    monkeypatch.setattr(linker, "_best_many", lambda reqs: calls.append(len(reqs)) or
                        EntityLinker._best_many(linker, reqs))  # fmt: skip
    batched = linker.link_texts(captions)
    assert not few or not calls  # the packaged KB has no name of more than 8 entities
    assert few or max(calls) > 1  # several mentions in one pass
    linker.config.batch_size = 1
    assert linker.link_texts(captions) == batched
    monkeypatch.setattr(linking, "_FEW", 10**6)
    assert linker.link_texts(captions) == batched
    assert sum(1 for ms in batched for m in ms if m["entity_id"]) > 300


@pytest.mark.parametrize("few", [8, 0])  # one candidate at a time; all at once in numpy
def test_ambiguous_mentions_pick_by_context_then_the_smallest_id(nlp, few, monkeypatch):
    """Context words decide between candidates; a tie goes to the smallest id."""
    from pipeline_tasks.stages.ner import linking

    monkeypatch.setattr(linking, "_FEW", few)
    from pipeline_tasks.stages.kb.stage import KB_SCHEMA

    rows = [
        ("Q30", "Mercury", [], "planet closest to the sun", "concept"),
        ("Q20", "Mercury", [], "chemical element, a liquid metal", "concept"),
        ("Q10", "Orion Pax", [], "a robot", "concept"),
        ("Q11", "Orion Pax", [], "a robot", "concept"),
    ]
    table = pa.Table.from_pylist(
        [
            dict(zip(("entity_id", "name", "aliases", "description", "type"), r, strict=True))
            | {"summary": "", "source": "test"}
            for r in rows
        ],
        schema=KB_SCHEMA,
    )
    cfg = LinkerConfig(use_ner=False, min_link_score=0.0)
    linker = EntityLinker(table, cfg, nlp=load_spacy(use_ner=False))
    planet, metal, tie = linker.link_texts(
        ["mercury seen from the sun side", "a drop of liquid mercury", "orion pax toy"]
    )
    assert [m["entity_id"] for m in planet] == ["Q30"]
    assert [m["entity_id"] for m in metal] == ["Q20"]
    assert [m["entity_id"] for m in tie] == ["Q10"]


def test_index_rejects_another_format(nlp, kb_table, tmp_path):
    import json

    from spacy.lang.en.stop_words import STOP_WORDS

    kb_index.KBIndex.build(kb_table.slice(0, 50), nlp.tokenizer, set(STOP_WORDS)).save(
        str(tmp_path / "ix")
    )
    meta = json.loads((tmp_path / "ix" / "meta.json").read_text())
    (tmp_path / "ix" / "meta.json").write_text(json.dumps({**meta, "format": 0}))
    with pytest.raises(ValueError, match="format 0"):
        kb_index.KBIndex.open(str(tmp_path / "ix"))


@pytest.mark.s3
def test_published_once_on_s3_and_mapped_through_the_host_cache(
    nlp, kb_table, s3_bucket, tmp_path, monkeypatch
):
    import pyarrow.parquet as pq

    from pipeline_tasks.stages.kb.stage import kb_version
    from training.core import storage

    kb_uri = f"{s3_bucket}/kb"
    with storage.open_write(f"{kb_uri}/entities.parquet") as f:
        pq.write_table(kb_table.slice(0, 2000), f)
    version = kb_version(kb_uri)
    uri, built = kb_index.ensure_published(kb_uri, version, nlp)
    assert built and uri.startswith(f"{kb_uri}/{kb_index.INDEX_DIR}/")
    assert storage.exists(f"{uri}/meta.json")
    again, built = kb_index.ensure_published(kb_uri, version, nlp)
    assert (again, built) == (uri, False)
    monkeypatch.setenv("MOFI_CACHE_DIR", str(tmp_path / "cache"))
    opened = kb_index.open_local(uri)
    local = tmp_path / "cache" / kb_index.INDEX_DIR / uri.rsplit("/", 1)[-1]
    assert (local / "meta.json").exists() and opened.meta["entities"] == 2000
    captions = _captions(kb_table.slice(0, 2000), 100, seed=2)
    want = EntityLinker(kb_table.slice(0, 2000), LinkerConfig(), nlp=nlp).link_texts(captions)
    assert EntityLinker(opened, LinkerConfig(), nlp=nlp).link_texts(captions) == want
