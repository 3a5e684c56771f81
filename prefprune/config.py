"""Typed settings that own their help text, limits and choices, and check themselves.

Every configuration object of prefprune (model, training, influence, experiment) is a frozen
dataclass built on :class:`Settings`, with each field declared through :func:`setting`. The
field's metadata carries what a user needs to know about it (help, minimum, maximum,
choices), so that

* constructing a config in Python validates it at once (``TrainConfig(batch_size=0)`` raises a
  :class:`~prefprune.errors.ConfigError` naming the field, instead of a ``ZeroDivisionError``
  deep in the training loop);
* a YAML file goes through the same checks, with the file and the dotted field in the message;
* the command line builds its options from the same metadata (:mod:`prefprune.cli.options`),
  so a flag is its field's name and has exactly the field's help and limits.

Type annotations drive the checks: ``int``, ``float``, ``bool``, ``str``, ``X | None``,
``tuple[X, ...]``, fixed-length tuples, nested :class:`Settings` and ``dict`` fields are
understood. Lists become tuples, integers are accepted where a float is expected, and numbers
written as strings (YAML 1.1 reads ``1e-3`` as a string) are accepted for float fields.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from prefprune.errors import ConfigError

S = TypeVar("S", bound="Settings")
_MISSING = dataclasses.MISSING


def setting(default: Any = _MISSING, *, help: str, min: float | None = None,
            max: float | None = None, above: float | None = None, below: float | None = None,
            choices: tuple[Any, ...] | None = None, default_factory: Any = _MISSING,
            cli: bool = True, persist: bool = True, identity: bool = True,
            metavar: str | None = None, negatable: bool = False) -> Any:
    """A dataclass field with what users and the CLI need to know about it.

    ``min``/``max`` are inclusive bounds, ``above``/``below`` exclusive ones (applied to each
    element of a tuple); ``choices`` the allowed values. ``cli=False`` keeps the field off the
    command line (it stays a Python and YAML setting). ``persist=False`` keeps it out of every
    saved file: a setting that must come from the user each time (``trust_remote_code``).
    ``identity=False`` marks a runtime setting (a cache budget) that does not change results,
    so it is left out of fingerprints. ``negatable`` gives an optional field a second flag,
    ``--no-<name>``, that sets it to None (off).
    """
    metadata = {"help": help, "min": min, "max": max, "above": above, "below": below,
                "choices": choices,
                "cli": cli, "persist": persist, "identity": identity, "metavar": metavar,
                "negatable": negatable}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of prefprune's configs: checks and normalises every field on construction.

    Subclasses add cross-field rules in :meth:`validate`.
    """

    #: Name of the section in a YAML file and in messages (e.g. ``train``).
    section: ClassVar[str] = ""
    #: The error raised for an invalid setting (a subclass says which stage complained).
    error: ClassVar[type[ConfigError]] = ConfigError

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        try:
            for f in dataclasses.fields(self):
                value = _coerce(getattr(self, f.name), hints[f.name], f.name)
                _check_limits(value, f)
                object.__setattr__(self, f.name, value)
            self.validate()
        except ConfigError as exc:
            raise self.error(exc.field, exc.problem) from None

    def validate(self) -> None:
        """Cross-field rules; raise :class:`ConfigError` naming the field at fault."""

    # --- conversion ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML values (tuples as lists, nested settings as dicts), without the
        fields that must never be saved."""
        return self._plain_fields(identity=False)

    def identity(self) -> dict[str, Any]:
        """The settings that change results: :meth:`to_dict` without runtime-only fields (a
        cache budget), at every level. Fingerprints and resume checks compare this."""
        return self._plain_fields(identity=True)

    def _plain_fields(self, *, identity: bool) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if not f.metadata.get("persist", True):
                continue
            if identity and not f.metadata.get("identity", True):
                continue
            out[f.name] = _plain(getattr(self, f.name), identity)
        return out

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any] | None, **fixed: Any) -> S:
        """Build from plain values (a YAML section); unknown keys are errors.

        ``fixed`` are values that do not come from the file (e.g. ``trust_remote_code`` from
        the user's own flag); a field that must not be saved may not be set by ``data``.
        """
        data = dict(data or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise cls.error("", f"unknown setting(s) {', '.join(unknown)}; known: "
                                f"{', '.join(known)}")
        for name in data:
            if not known[name].metadata.get("persist", True) and data[name] != known[name].default:
                raise cls.error(name, "cannot be set from a file; only its command-line "
                                      "flag or a Python argument can set it")
        return cls(**{**data, **fixed})

    def replace(self: S, **changes: Any) -> S:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def check_value(cls, name: str, value: Any, *, called: str | None = None) -> Any:
        """``value`` checked and normalised as field ``name`` would be (type and limits), so
        another setting can reuse the field's rules; errors name it ``called``."""
        field = cls.fields_help()[name]
        label = called or name
        try:
            value = _coerce(value, _hints(cls)[name], label)
            _check_limits(value, field, label)
        except ConfigError as exc:
            raise cls.error(exc.field, exc.problem) from None
        return value

    @classmethod
    def fields_help(cls) -> dict[str, dataclasses.Field]:
        """Every field with its metadata, in declaration order (for the CLI and the docs)."""
        return {f.name: f for f in dataclasses.fields(cls)}


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _plain(value: Any, identity: bool = False) -> Any:
    if isinstance(value, Settings):
        return value.identity() if identity else value.to_dict()
    if isinstance(value, tuple | list):
        return [_plain(v, identity) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v, identity) for k, v in value.items()}
    return value


# --- type checks ----------------------------------------------------------------------------------

_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " (or null)"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
        return f"a list of {len(args)} values"
    if isinstance(annotation, type) and issubclass(annotation, Settings):
        return "a mapping of settings"
    return _KIND_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` as ``annotation`` says, or a :class:`ConfigError` naming ``name``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], name)
    if origin is tuple:
        return _coerce_tuple(value, args, annotation, name)
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _wrong(name, value, "a mapping")
        return dict(value)
    if isinstance(annotation, type) and issubclass(annotation, Settings):
        if isinstance(value, annotation):
            return value
        if isinstance(value, Mapping):
            try:
                return annotation.from_dict(value)
            except ConfigError as exc:
                raise ConfigError(exc.within(name).field, exc.problem) from None
        raise _wrong(name, value, _describe(annotation))
    return _coerce_scalar(value, annotation, name)


def _coerce_tuple(value: Any, args: tuple, annotation: Any, name: str) -> tuple:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise _wrong(name, value, _describe(annotation))
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise _wrong(name, value, _describe(annotation))
    return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _coerce_scalar(value: Any, annotation: Any, name: str) -> Any:
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        number = _number(value)
        if number is not None and math.isnan(number):
            raise ConfigError(name, f"is not a number (got {value!r})")
        if number is not None and math.isinf(number):
            raise ConfigError(name, f"must be finite, got {value!r}")
        if number is not None:
            return number
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise _wrong(name, value, _describe(annotation))


def _number(value: Any) -> float | None:
    """A float from an int, a float or a numeric string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number


def _wrong(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(name, f"must be {expected}, got {value!r}")


#: The limit checks of a field: metadata key, how a value fails it, what the message says.
_LIMITS = (("min", lambda v, b: v < b, ">="), ("max", lambda v, b: v > b, "<="),
           ("above", lambda v, b: v <= b, ">"), ("below", lambda v, b: v >= b, "<"))


def _check_limits(value: Any, f: dataclasses.Field, name: str | None = None) -> None:
    meta = f.metadata
    name = name or f.name
    values = value if isinstance(value, tuple) else (value,)
    for item in values:
        if item is None or isinstance(item, Settings | Mapping | tuple):
            continue
        choices = meta.get("choices")
        if choices is not None and item not in choices:
            allowed = ", ".join(map(str, choices))
            raise ConfigError(name, f"must be one of {allowed}, got {item!r}")
        if isinstance(item, bool) or not isinstance(item, int | float):
            continue
        for key, fails, words in _LIMITS:
            if meta.get(key) is not None and fails(item, meta[key]):
                raise ConfigError(name, f"must be {words} {meta[key]}, got {item!r}")


def limits_text(f: dataclasses.Field) -> str:
    """A field's limits in words for help texts, e.g. ``> 0, < 1``; empty when it has none."""
    return ", ".join(f"{words} {f.metadata[key]:g}" for key, _, words in _LIMITS
                     if f.metadata.get(key) is not None)
