"""The text each entity is scored and trained against, shared by the scorer bootstrap and scoring.

An entity's embedding is the mean of its prompts' embeddings: ``a photo of {name}.`` and
``{name}, {description}.`` by default. The bootstrap trains the packaged scorer's heads on
exactly the texts scoring later embeds.
"""

from __future__ import annotations

from typing import Any

DEFAULT_PROMPTS: tuple[str, ...] = ("a photo of {name}.", "{name}, {description}.")


def entity_texts(
    kb_rows: dict[str, dict[str, Any]], eids: list[str], prompts: tuple[str, ...]
) -> list[list[str]]:
    """The prompts of each entity, filled with its base name and its description."""
    from ..kb.names import base_name

    out = []
    for eid in eids:
        r = kb_rows[eid]
        name = base_name(r["name"])
        desc = (r.get("description") or "").strip().rstrip(".")
        out.append(
            [p.format(name=name, description=desc).replace(", .", ".").strip() for p in prompts]
        )
    return out


def kb_text_rows(kb_uri: str, eids=None) -> dict[str, dict[str, Any]]:
    """entity_id -> {entity_id, name, description} of the KB at ``kb_uri``; only the rows of
    ``eids`` when given (filtered in Arrow: a 2M-entity KB never becomes 2M Python dicts)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..kb.stage import load_kb

    kb = load_kb(kb_uri, columns=["entity_id", "name", "description"])
    if eids is not None:
        kb = kb.filter(
            pc.is_in(kb.column("entity_id"), value_set=pa.array(sorted(eids), pa.string()))
        )
    return {r["entity_id"]: r for r in kb.to_pylist()}
