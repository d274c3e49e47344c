"""How entity names are compared and shortened: the rules the KB's duplicate check, the
linker's surface forms, the scoring prompts and the demo's truth all share."""

from __future__ import annotations

import re
import unicodedata


def normalize_name(s: str) -> str:
    """Case-, accent- and space-insensitive key used for duplicate checks and matching."""
    s = unicodedata.normalize("NFKD", s)
    s = "".join(c for c in s if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", s).strip().casefold()


_QUALIFIER = re.compile(r"^(.*?)\s*\(([^()]*)\)\s*$")


def base_name(title: str) -> str:
    """'Mercury (planet)' -> 'Mercury'."""
    m = _QUALIFIER.match(title)
    return m.group(1).strip() if m else title.strip()


def slug(title: str) -> str:
    return re.sub(r"\s+", "_", title.strip())
