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


def field(
    default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None, output: bool = True
) -> Any:
    """A documented config field. ``output=False`` marks a field that changes how a stage runs
    (devices, workers, memory) but never what it writes: :meth:`StageConfig.output_fingerprint`
    leaves it out, so changing it does not invalidate outputs an incremental rebuild reuses."""
    meta = {"doc": doc, "output": output}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


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

    def output_dict(self) -> dict[str, Any]:
        """The fields that can change what the stage writes (nested configs included)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.metadata.get("output", True):
                continue
            v = getattr(self, f.name)
            out[f.name] = v.output_dict() if isinstance(v, StageConfig) else v
        return out

    def output_fingerprint(self) -> str:
        """A short hash of :meth:`output_dict`: part of an incremental rebuild's reuse key."""
        import hashlib

        doc = json.dumps(
            {"config_class": type(self).__name__, **self.output_dict()}, sort_keys=True, default=str
        )
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

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
        from .inputs import InputError, check_json

        what = f"{cls.__name__} file"
        doc = check_json(uri, what)
        if not isinstance(doc, dict):
            raise InputError(f"{what} {uri} holds a JSON {type(doc).__name__}, not an object")
        try:
            return cls.from_dict(doc)
        except (ConfigError, TypeError) as exc:
            raise InputError(f"{what} {uri}: {' '.join(str(exc).split())}") from None

    def save(self, out_root: str, name: str | None = None) -> str:
        uri = storage.join(out_root, name or self.file_name())
        storage.write_text(uri, self.to_json() + "\n")
        return uri

    @classmethod
    def file_name(cls) -> str:
        """``STAGE.config.json``: what :meth:`save` writes beside the stage's outputs."""
        return f"{cls.stage_name()}.config.json"

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


def apply_overrides(obj: T, assignments: list[tuple[str, Any]]) -> T:
    """A copy of the config ``obj`` (a dataclass, nested ones included) with each
    ``(dotted.path, value)`` set, validated again. The fields of one section are replaced
    together (``dist.nnodes`` and ``dist.rdzv_endpoint`` are checked as a pair); a string
    value is parsed as the field's type (``"64"`` for an int, ``"a,b"`` or ``'["a","b"]'`` for
    a tuple, JSON for a dict); an unknown path is a ConfigError naming the known fields."""
    tree: dict[str, Any] = {}
    for path, value in assignments:
        node = tree
        *sections, name = path.split(".")
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {path}: {part} was set as a value, not a section")
        node[name] = (path, value)
    return _override(obj, tree) if tree else obj


def parse_assignment(text: str) -> tuple[str, str]:
    """``section.field=value`` -> (path, value)."""
    path, sep, value = text.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set {text!r}: use PATH=VALUE, e.g. score.batch_size=64")
    return path.strip(), value


def _override(obj: Any, changes: dict[str, Any]) -> Any:
    """``obj`` with ``changes`` (field -> (path, value), or field -> changes of a section)."""
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"{type(obj).__name__} has no fields to set")
    names = {f.name for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    new = {}
    for name, change in changes.items():
        if name not in names:
            where = change[0] if isinstance(change, tuple) else f"{name}..."
            raise ConfigError(
                f"--set {where}: {type(obj).__name__} has no field {name!r}; known: {sorted(names)}"
            )
        if isinstance(change, dict):
            new[name] = _override(getattr(obj, name), change)
        else:
            path, value = change
            new[name] = _parse(value, hints.get(name), path) if isinstance(value, str) else value
    return dataclasses.replace(obj, **new)


def _parse(text: str, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return low in ("true", "1", "yes")
        if hint in (int, float):
            return hint(text)
        if origin in (tuple, list):
            items = json.loads(text) if text.strip().startswith("[") else text.split(",")
            return tuple(i.strip() if isinstance(i, str) else i for i in items if i != "")
        if origin is dict or hint is dict:
            return json.loads(text)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--set {path}={text!r}: {exc}") from exc
    if dataclasses.is_dataclass(hint):
        raise ConfigError(f"--set {path}: a section, not a value; set one of its fields")
    return text
