"""NER and linking over the shared build (``built``): mentions linked, bad captions counted."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from pipeline_tasks.runtime import markers

pytestmark = pytest.mark.slow


def test_ner_links_mentions_and_counts_bad_captions(built):
    store = markers.MarkerStore(os.path.join(built["run"], "ner"), "ner")
    st = store.read_done("00010")
    assert (st.n_in, st.n_out) == (9, 7)  # empty and non-UTF-8 captions are counted skips
    assert st.drops["caption_empty"] == 1 and st.drops["caption_not_utf8"] == 1
    assert st.extra["captions_truncated"] == 1
    assert store.read_done("00013").n_in == 0  # the empty shard completes
    t = pq.read_table(os.path.join(built["run"], "ner", "00010.parquet")).to_pylist()
    by_key = {r["key"]: r for r in t}
    ents = {m["entity_id"] for m in by_key["000100000"]["mentions"]}
    assert {"Q89", "Q90"} <= ents  # apple (KB matcher) and Paris (NER GPE + KB)
    paris = next(m for m in by_key["000100000"]["mentions"] if m["entity_id"] == "Q90")
    assert paris["label"] in ("GPE", "KB") and 0 < paris["link_score"] <= 1
    assert by_key["000100008"]["mentions"][0]["entity_id"] == "Q503"
