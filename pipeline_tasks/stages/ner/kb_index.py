"""The linker's view of a knowledge base as flat arrays: built once per KB version, memory-
mapped by every process of a host.

At 2M entities the linker's old Python structures (a dict of surface forms, a set of context
words per entity and a spaCy PhraseMatcher with millions of patterns) took gigabytes and
minutes in every Spark Python worker. Here they are numpy arrays and one Arrow column in a
folder; a process opens them with ``mmap`` (start-up: milliseconds), only the pages a lookup
touches become resident, and the processes of a host share them through the page cache.

Arrays (``meta.json`` names the format and the sizes):

* ``pat_hash`` (sorted uint64): the hash of every usable surface form as a token sequence,
  computed from spaCy's ``LOWER`` ids (what the PhraseMatcher with ``attr="LOWER"`` compared);
  ``first_hash``/``first_len``: the first tokens of those sequences and the longest sequence
  each begins, so a caption is probed only at tokens that can begin a match;
* ``key_hash`` (sorted uint64) with ``key_off`` (CSR offsets), ``cand_ent`` (int32) and
  ``cand_prior`` (float64): the normalised surface -> {entity: prior} table of ``candidates``;
* ``ent_type`` (uint8 codes into ``meta.types``), ``ctx_off``/``ctx_word`` (sorted uint64
  word hashes per entity): what ``EntityLinker._score`` needs of each entity;
* ``entity_ids.arrow``: the ids, an Arrow string column read zero-copy.

Hashes are spaCy's 64-bit string ids (MurmurHash); an n-gram's hash folds its tokens' ids
with the splitmix64 finaliser. The index key includes the spaCy version, so a different
tokenizer or hash never meets an old index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from array import array
from typing import Any

import numpy as np
import pyarrow as pa

from training.core import storage

from ..kb.names import base_name, normalize_name

INDEX_FORMAT = 1
INDEX_DIR = "_linker_index"
MAX_TOKENS = 255  # longer surface forms are left out
_NO_ROWS = np.zeros(0, np.int32)
_NO_PRIORS = np.zeros(0, np.float64)
_ARRAYS = (
    "pat_hash",
    "first_hash",
    "first_len",
    "key_hash",
    "key_off",
    "cand_ent",
    "cand_prior",
    "ent_type",
    "ctx_off",
    "ctx_word",
)
_WORD = re.compile(r"[a-z][a-z'\-]{2,}")
_PLAIN = re.compile(r"[a-z]+")
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_P = np.uint64(0x9E3779B97F4A7C15)
_FILTER_BITS = np.uint64((1 << 20) - 1)  # context_overlap_many's bitmap: 1 MiB, cache-sized


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (vectorised; uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def fold(prev: np.ndarray, token: np.ndarray) -> np.ndarray:
    """The hash of a token sequence extended by one token."""
    return _mix(prev * _P + token)


def search(sorted_arr: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``np.searchsorted(sorted_arr, queries)``, the queries looked up in sorted order: over
    the millions of keys of a 2M-entity index, in-order lookups walk the array's cache lines
    in order (4x faster for 50,000 queries into 4M keys)."""
    queries = np.asarray(queries)
    if len(queries) < 64:
        return np.searchsorted(sorted_arr, queries)
    order = np.argsort(queries)
    pos = np.empty(len(queries), np.intp)
    pos[order] = np.searchsorted(sorted_arr, queries[order])
    return pos


def content_words(text: str, stop: set[str]) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in stop}


def plural_variants(surface: str) -> list[str]:
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


def usable_surface(key: str, stop: set[str]) -> bool:
    if len(key) < 2 or key.isdigit():
        return False
    return not (" " not in key and (key in stop or len(key) < 3))


def index_key(kb_version: str) -> str:
    """Which index serves a KB version under this code and tokenizer."""
    import spacy

    raw = f"{kb_version}|{INDEX_FORMAT}|spacy={spacy.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


@dataclasses.dataclass
class KBIndex:
    arrays: dict[str, np.ndarray]
    entity_ids: pa.Array
    types: list[str]
    meta: dict[str, Any]

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, kb_table: pa.Table, tokenizer, stop: set[str]) -> KBIndex:
        """The index of a KB table (``stages.kb`` contract) under ``tokenizer``."""
        from spacy.strings import get_string_id

        n = kb_table.num_rows
        col = kb_table.column
        names = col("name").to_pylist()
        aliases = col("aliases").to_pylist()
        has = set(kb_table.column_names)
        types_col = col("type").to_pylist() if "type" in has else [None] * n
        descs = col("description").to_pylist() if "description" in has else [None] * n
        sums = col("summary").to_pylist() if "summary" in has else [None] * n
        types: dict[str, int] = {}
        ent_type = np.zeros(n, np.uint8)
        ctx_len = np.zeros(n + 1, np.int64)
        # flat typed buffers, not Python lists of ints (the 2M-entity build peaked at 2.9 GiB)
        ctx_words = array("Q")
        s_key, s_ent, s_prior = array("Q"), array("i"), array("d")
        p_tokens, p_len = array("Q"), array("H")  # every usable surface's token ids
        special = set(tokenizer.rules or {})
        for i in range(n):
            t = types_col[i] or "concept"
            ent_type[i] = types.setdefault(t, len(types))
            text = f"{descs[i] or ''} {sums[i] or ''}"
            words = sorted({get_string_id(w) for w in content_words(text, stop)})
            ctx_words.extend(words)
            ctx_len[i + 1] = len(words)
            name = names[i]
            forms = [(name, 1.0)]
            b = base_name(name)
            if b != name:
                forms.append((b, 0.8))
            forms += [(a, 0.6) for a in (aliases[i] or [])]
            for surface, prior in forms:
                for s, p in [(surface, prior)] + [
                    (v, prior * 0.95) for v in plural_variants(surface)
                ]:
                    key = normalize_name(s)
                    if not usable_surface(key, stop):
                        continue
                    toks = _token_ids(key, tokenizer, special, get_string_id)
                    if len(toks) > MAX_TOKENS:  # not a name; the first-token table caps here
                        continue
                    s_key.append(get_string_id(key))
                    s_ent.append(i)
                    s_prior.append(p)
                    p_tokens.extend(toks)
                    p_len.append(len(toks))
        if len(types) > 255:
            raise ValueError(f"the KB has {len(types)} entity types; the index holds 255")
        arrays = _surface_arrays(
            np.frombuffer(s_key, np.uint64),
            np.frombuffer(s_ent, np.int32),
            np.frombuffer(s_prior, np.float64),
        )
        arrays.update(
            _pattern_arrays(np.frombuffer(p_tokens, np.uint64), np.frombuffer(p_len, np.uint16))
        )
        arrays["ent_type"] = ent_type
        arrays["ctx_off"] = np.cumsum(ctx_len)
        arrays["ctx_word"] = np.frombuffer(ctx_words, np.uint64).copy()
        meta = {
            "format": INDEX_FORMAT,
            "entities": n,
            "surfaces": int(len(arrays["key_hash"])),
            "patterns": int(len(arrays["pat_hash"])),
            "max_tokens": int(arrays["first_len"].max()) if len(arrays["first_len"]) else 0,
        }
        ids = pa.array(col("entity_id").to_pylist(), pa.string())
        return cls(arrays, ids, sorted(types, key=types.get), meta)

    # ------------------------------------------------------------------ files
    def save(self, path: str) -> None:
        """Write the index folder atomically (a temp folder renamed into place)."""
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-index-", dir=parent)
        try:
            for name in _ARRAYS:
                np.save(os.path.join(tmp, f"{name}.npy"), self.arrays[name])
            with pa.OSFile(os.path.join(tmp, "entity_ids.arrow"), "wb") as f:
                batch = pa.record_batch([self.entity_ids], names=["entity_id"])
                with pa.ipc.new_file(f, batch.schema) as w:
                    w.write_batch(batch)
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({**self.meta, "types": self.types}, f)
            try:
                os.rename(tmp, path)
            except OSError:  # another process of this host published it first
                if not os.path.exists(os.path.join(path, "meta.json")):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def open(cls, path: str) -> KBIndex:
        """Memory-map a saved index (nothing is read until a lookup touches it)."""
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(
                f"{path}: linker index format {meta.get('format')}, need {INDEX_FORMAT}"
            )
        # plain ndarray views of the maps: slicing a np.memmap makes a memmap object each time
        # (a third of the linking time at 2M entities)
        arrays = {
            n: np.asarray(np.load(os.path.join(path, f"{n}.npy"), mmap_mode="r")) for n in _ARRAYS
        }
        table = pa.ipc.open_file(pa.memory_map(os.path.join(path, "entity_ids.arrow"))).read_all()
        ids = table.column("entity_id").combine_chunks()
        return cls(arrays, ids, meta.pop("types"), meta)

    # ------------------------------------------------------------------ lookups
    def match(self, token_ids: np.ndarray) -> list[tuple[int, int]]:
        """(start, end) token spans of a document whose lower-cased tokens form a surface
        form: every match, overlapping ones included (what the PhraseMatcher returned)."""
        return self.match_many(token_ids, np.array([0, len(token_ids)]))[0]

    def match_many(self, token_ids: np.ndarray, bounds: np.ndarray) -> list[list[tuple[int, int]]]:
        """:meth:`match` of many documents at once: ``token_ids`` holds their lower-cased
        token ids one after another, document ``d`` at ``bounds[d]:bounds[d + 1]``. One
        pass of numpy calls serves a whole batch (per document, their overhead was a third
        of the linking time at 2M entities); no match crosses a document's end."""
        a = self.arrays
        n = len(token_ids)
        bounds = np.asarray(bounds, np.int64)
        out: list[list[tuple[int, int]]] = [[] for _ in range(len(bounds) - 1)]
        if n == 0 or len(a["first_hash"]) == 0:
            return out
        doc_of = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
        fh = a["first_hash"]
        pos = np.minimum(search(fh, token_ids), len(fh) - 1)
        maxlen = np.where(fh[pos] == token_ids, a["first_len"][pos].astype(np.int64), 0)
        maxlen = np.minimum(maxlen, bounds[doc_of + 1] - np.arange(n))  # the tokens left
        starts = np.nonzero(maxlen)[0]
        if not len(starts):
            return out
        hashes, begins, lengths = [], [], []
        h = token_ids[starts]
        live = starts
        length = 1
        while True:
            hashes.append(h)
            begins.append(live)
            lengths.append(length)
            keep = maxlen[live] > length
            if not keep.any():
                break
            live, h = live[keep], h[keep]
            h = fold(h, token_ids[live + length])
            length += 1
        hs = np.concatenate(hashes)
        ph = a["pat_hash"]
        hit = ph[np.minimum(search(ph, hs), len(ph) - 1)] == hs
        at = 0
        for b, m in zip(begins, lengths, strict=True):  # shorter first, then by start
            s = b[hit[at : at + len(b)]]
            d = doc_of[s]
            for doc, local in zip(d.tolist(), (s - bounds[d]).tolist(), strict=True):
                out[doc].append((local, local + m))
            at += len(b)
        return out

    def candidates(self, key: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(entity rows, priors) of a normalised surface form, highest prior first (the
        ``limit`` best); empty arrays when no entity has it."""
        from spacy.strings import get_string_id

        kh = self.arrays["key_hash"]
        h = np.uint64(get_string_id(key))
        i = int(np.searchsorted(kh, h)) if len(kh) else 0
        if i >= len(kh) or kh[i] != h:
            return _NO_ROWS, _NO_PRIORS
        off = self.arrays["key_off"]
        lo, hi = int(off[i]), int(off[i + 1])
        if limit is not None:
            hi = min(hi, lo + limit)
        return self.arrays["cand_ent"][lo:hi], self.arrays["cand_prior"][lo:hi]

    def entity_id(self, row: int) -> str:
        return self.entity_ids[row].as_py()

    def entity_type(self, row: int) -> str:
        return self.types[int(self.arrays["ent_type"][row])]

    def context_overlap(self, rows: np.ndarray, words: np.ndarray) -> np.ndarray:
        """Per row: how many of its context words are in ``words`` (sorted unique ids)."""
        return self.context_overlap_many(rows, np.zeros(len(rows), np.int64), [words])

    def context_overlap_many(
        self, rows: np.ndarray, req: np.ndarray, words: list[np.ndarray]
    ) -> np.ndarray:
        """:meth:`context_overlap` of many mentions at once: row ``i`` is compared with
        ``words[req[i]]``. Each (mention, word) pair is one hash, ``fold(mention, word)``:
        within a mention that is a bijection of the word (exact, as one mention alone is);
        two mentions' pairs could meet only in a 64-bit collision, the same odds as two
        words' string ids, which the whole index already relies on."""
        off = self.arrays["ctx_off"]
        lo = off[rows].astype(np.int64)
        n = off[rows + 1].astype(np.int64) - lo
        total = int(n.sum())
        sizes = [len(w) for w in words]
        if not sum(sizes) or not total:
            return np.zeros(len(rows), np.int64)
        ends = np.cumsum(n)
        starts = ends - n
        # every row's slice of ctx_word, one after another
        vals = self.arrays["ctx_word"][np.repeat(lo - starts, n) + np.arange(total)]
        # most words are no mention's: a cache-sized bitmap of the mentions' words' low bits
        # rules them out before anything is hashed or searched
        allw = np.concatenate(words).astype(np.uint64, copy=False)
        seen = np.zeros(_FILTER_BITS + 1, bool)
        seen[(allw & _FILTER_BITS).astype(np.intp)] = True
        sel = np.nonzero(seen[(vals & _FILTER_BITS).astype(np.intp)])[0]
        hit = np.zeros(total, bool)
        if len(sel):
            rq = np.asarray(req, np.uint64)[np.searchsorted(ends, sel, side="right")]
            probe = fold(rq, vals[sel])
            keys = fold(np.repeat(np.arange(len(words), dtype=np.uint64), sizes), allw)
            keys.sort()
            hit[sel] = keys[np.minimum(search(keys, probe), len(keys) - 1)] == probe
        counts = np.zeros(total + 1, np.int64)
        np.cumsum(hit, out=counts[1:])
        return counts[ends] - counts[starts]

    def nbytes(self) -> int:
        return int(sum(x.nbytes for x in self.arrays.values()) + self.entity_ids.nbytes)


def _token_ids(key: str, tokenizer, special: set[str], get_string_id) -> list[int]:
    """The LOWER ids of ``key``'s tokens. Plain lower-case words need no tokenizer (spaCy
    splits them only by its special cases, which are checked); anything else is tokenized."""
    words = key.split(" ")
    if all(_PLAIN.fullmatch(w) and w not in special for w in words):
        return [get_string_id(w) for w in words]
    return [t.lower for t in tokenizer(key)]


def _pattern_arrays(tokens: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """pat_hash (sorted, unique) and the first-token table of the token sequences (given
    flat: every sequence's token ids one after another, and each sequence's length)."""
    lengths = lengths.astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    hashes, firsts, lens = [], [], []
    for m in np.unique(lengths[lengths > 0]).tolist():
        t = tokens[starts[lengths == m][:, None] + np.arange(m)]
        h = t[:, 0].copy()
        for j in range(1, m):
            h = fold(h, t[:, j])
        hashes.append(h)
        firsts.append(t[:, 0])
        lens.append(np.full(len(t), m, np.int64))
    if not hashes:
        empty = np.zeros(0, np.uint64)
        return {"pat_hash": empty, "first_hash": empty, "first_len": np.zeros(0, np.uint8)}
    first = np.concatenate(firsts)
    length = np.concatenate(lens)
    order = np.lexsort((-length, first))  # by first token, longest first
    first, length = first[order], length[order]
    uniq, idx = np.unique(first, return_index=True)
    return {
        "pat_hash": np.unique(np.concatenate(hashes)),
        "first_hash": uniq,
        "first_len": length[idx].astype(np.uint8),
    }


def _surface_arrays(
    keys: np.ndarray, ents: np.ndarray, priors: np.ndarray
) -> dict[str, np.ndarray]:
    """CSR table key -> (entity, best prior); within a key the highest prior first, then the
    KB's row order (``candidates(limit=)`` keeps the head of that list)."""
    order = np.lexsort((-priors, ents, keys))
    keys, ents, priors = keys[order], ents[order], priors[order]
    if len(keys):
        first = np.ones(len(keys), bool)  # the best prior of each (key, entity) pair
        first[1:] = (keys[1:] != keys[:-1]) | (ents[1:] != ents[:-1])
        keys, ents, priors = keys[first], ents[first], priors[first]
        order = np.lexsort((ents, -priors, keys))
        keys, ents, priors = keys[order], ents[order], priors[order]
    uniq, starts = np.unique(keys, return_index=True)
    return {
        "key_hash": uniq,
        "key_off": np.append(starts, len(keys)).astype(np.int64),
        "cand_ent": ents.astype(np.int32),
        "cand_prior": priors.astype(np.float64),
    }


# ---------------------------------------------------------------------- where indexes live
def cache_root() -> str:
    return os.environ.get("MOFI_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mofi"
    )


def published_uri(kb_uri: str, key: str) -> str:
    """Where the ner driver publishes the index of a KB version (beside its entities)."""
    from ..kb.stage import entities_uri

    return storage.join(entities_uri(kb_uri).rsplit("/", 1)[0], INDEX_DIR, key)


def ensure_published(kb_uri: str, kb_version: str, nlp) -> tuple[str, bool]:
    """(the index folder URI of this KB version, whether it was built now). Built at most
    once per KB version; a process of any host then opens it with :func:`open_local`.
    ``nlp``: a spaCy pipeline for its tokenizer, or a function that loads one (called only
    when the index must be built)."""
    from spacy.lang.en.stop_words import STOP_WORDS

    from ..kb.stage import load_kb

    key = index_key(kb_version)
    uri = published_uri(kb_uri, key)
    if storage.exists(storage.join(uri, "meta.json")):
        return uri, False
    if callable(nlp) and not hasattr(nlp, "tokenizer"):
        nlp = nlp()
    index = KBIndex.build(load_kb(kb_uri), nlp.tokenizer, set(STOP_WORDS))
    if storage.is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="mofi-index-") as tmp:
            local = os.path.join(tmp, key)
            index.save(local)
            for name in sorted(os.listdir(local), key=lambda x: x == "meta.json"):
                storage.publish_file(os.path.join(local, name), storage.join(uri, name))
    else:
        index.save(uri)
    return uri, True


def open_local(uri: str) -> KBIndex:
    """Open a published index: a local folder in place; an S3 one through this host's cache
    (downloaded once per host, renamed into place, then memory-mapped by every process)."""
    if not storage.is_s3(uri):
        return KBIndex.open(uri)
    local = os.path.join(cache_root(), INDEX_DIR, storage.basename(uri.rstrip("/")))
    if not os.path.exists(os.path.join(local, "meta.json")):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-index-", dir=os.path.dirname(local))
        try:
            for f in storage.list_files(uri):
                with storage.local_path(f) as src:
                    shutil.copyfile(src, os.path.join(tmp, storage.basename(f)))
            try:
                os.rename(tmp, local)
            except OSError:
                if not os.path.exists(os.path.join(local, "meta.json")):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return KBIndex.open(local)
