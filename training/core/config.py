"""Typed, validated stage configs that save as JSON beside their outputs.

Each stage has one dataclass deriving from :class:`StageConfig`. Every field is declared
with :func:`field` so it carries a one-line doc (printed by ``mofi config show``), values
are checked in ``validate`` (called from ``__post_init__``) so an impossible config fails
before any work starts, and ``save`` writes ``config.json`` next to the stage's outputs.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, TypeVar

from . import storage

T = TypeVar("T", bound="StageConfig")


class ConfigError(ValueError):
    """A config value is impossible; the message says which and what is allowed."""


def field(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None) -> Any:
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass
class StageConfig:
    """Base class: validation on construction, JSON round trip, docs."""

    def __post_init__(self) -> None:
        self._coerce_types()
        self.validate()

    def _coerce_types(self) -> None:
        # JSON has no tuples, ints may arrive for floats and nested configs arrive as dicts;
        # normalise so a loaded config equals the saved one.
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            hint = hints.get(f.name)
            if isinstance(hint, type) and issubclass(hint, StageConfig) and isinstance(v, dict):
                setattr(self, f.name, hint.from_dict(v))
            elif hint is float and isinstance(v, int) and not isinstance(v, bool):
                setattr(self, f.name, float(v))
            elif typing.get_origin(hint) is tuple and isinstance(v, list):
                setattr(self, f.name, tuple(v))

    def validate(self) -> None:
        """Raise ConfigError on impossible values. Subclasses extend this."""

    # helpers for subclasses
    def _check(self, ok: bool, name: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{type(self).__name__}.{name} = {getattr(self, name)!r}: {msg}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(
            {"config_class": type(self).__name__, **self.to_dict()}, indent=2, sort_keys=True
        )

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        d = {k: v for k, v in d.items() if k != "config_class"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def load(cls: type[T], uri: str) -> T:
        return cls.from_dict(storage.read_json(uri))

    def save(self, out_root: str, name: str | None = None) -> str:
        uri = storage.join(out_root, name or f"{self.stage_name()}.config.json")
        storage.write_text(uri, self.to_json() + "\n")
        return uri

    @classmethod
    def stage_name(cls) -> str:
        n = cls.__name__
        return n[: -len("Config")].lower() if n.endswith("Config") else n.lower()

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(name, default, doc) for every field."""
        out = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = repr(f.default_factory())  # type: ignore[misc]
            else:
                default = "(required)"
            out.append((f.name, default, f.metadata.get("doc", "")))
        return out
