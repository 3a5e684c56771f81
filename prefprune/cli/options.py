"""Command-line options generated from the config dataclasses (:mod:`prefprune.config`).

An :class:`OptionGroup` turns the fields of one :class:`~prefprune.config.Settings` class into
typer options: the flag is the field's name (``--batch-size``), the help, limits and choices are
the field's metadata, so a Python user and a CLI user meet the same names and the same checks.
Every generated option defaults to ``None`` ("not typed"); the group builds its config from the
typed values only, on top of a base (the defaults, or a ``--config`` file). That is also how
typed flags override a YAML file without a table that maps flags to fields.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import typer

from prefprune.config import Settings, limits_text
from prefprune.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
#: Flags whose name differs from their field: the column mapping is one repeatable ``--column``;
#: an experiment's trained model is ``--model``, as for ``score`` and ``evaluate``.
FLAG_NAMES = {"columns": "column", "trained_model": "model"}


@dataclass(frozen=True)
class OptionGroup:
    """The CLI options of one config class; the command receives the built config as ``name``.

    ``only``/``exclude`` pick fields; ``defaults`` is the instance whose values the help shows
    and the build starts from (the class defaults when not given). ``prefix`` names a second
    copy of a group (``--validation-format`` beside ``--format``).
    """

    name: str
    settings: type[Settings]
    panel: str
    only: frozenset[str] | None = None
    exclude: frozenset[str] = frozenset()
    defaults: Settings | None = None
    prefix: str = ""
    fields: tuple[dataclasses.Field, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        chosen = tuple(f for f in dataclasses.fields(self.settings)
                       if f.metadata.get("cli", True) and f.name not in self.exclude
                       and (self.only is None or f.name in self.only))
        object.__setattr__(self, "fields", chosen)

    @property
    def base(self) -> Settings:
        return self.defaults if self.defaults is not None else self.settings()

    def parameters(self) -> list[inspect.Parameter]:
        hints = typing.get_type_hints(self.settings)
        out = []
        for f in self.fields:
            out.append(_parameter(f, hints[f.name], getattr(self.base, f.name), self.panel,
                                  self.prefix))
            if f.metadata.get("negatable"):
                out.append(_off_parameter(f, self.panel, self.prefix))
        return out

    def typed(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The values the user typed, parsed into the field types (``--no-<name>``: None)."""
        hints = typing.get_type_hints(self.settings)
        typed = {f.name: _parse(values[_param(f, self.prefix)], hints[f.name], f, self.prefix)
                 for f in self.fields if values.get(_param(f, self.prefix)) is not None}
        for f in self.fields:
            if values.get(_off_name(f, self.prefix)):
                if f.name in typed:
                    raise typer.BadParameter(f"cannot be given with {flag_of(f.name, self.prefix)}",
                                             param_hint="--" + _off_name(f, self.prefix)
                                             .replace("_", "-"))
                typed[f.name] = None
        return typed

    def build(self, values: Mapping[str, Any], base: Settings | None = None) -> Settings:
        """The config: ``base`` (or the defaults) with the typed values on top."""
        return apply(base if base is not None else self.base, self.typed(values), self.prefix)


def apply(base: Settings, typed: Mapping[str, Any], prefix: str = "") -> Settings:
    """``base`` with ``typed`` values; an invalid value is a usage error naming its flag."""
    try:
        return base.replace(**typed)
    except ConfigError as exc:
        name = exc.field.split(".")[0].split("[")[0]
        raise typer.BadParameter(exc.problem, param_hint=flag_of(name, prefix)) from None


def flag_of(name: str, prefix: str = "") -> str:
    return "--" + _param_name(name, prefix).replace("_", "-")


def _param_name(name: str, prefix: str) -> str:
    name = FLAG_NAMES.get(name, name)
    return f"{prefix}_{name}" if prefix else name


def _param(f: dataclasses.Field, prefix: str = "") -> str:
    return _param_name(f.name, prefix)


def _inner(annotation: Any) -> tuple[Any, bool]:
    """(the type without ``None``, whether ``None`` is allowed)."""
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _parameter(f: dataclasses.Field, annotation: Any, default: Any, panel: str,
               prefix: str) -> inspect.Parameter:
    meta = f.metadata
    kind, _ = _inner(annotation)
    help_text = meta["help"]
    if meta.get("choices"):
        help_text += f" One of: {', '.join(map(str, meta['choices']))}."
    if limits_text(f):  # checked by the config, so the CLI, YAML and Python share one message
        help_text += f" [{limits_text(f)}]"
    info: dict[str, Any] = {"help": help_text, "rich_help_panel": panel,
                            "show_default": _shown(default)}
    if meta.get("metavar"):
        info["metavar"] = meta["metavar"]
    flag = flag_of(f.name, prefix)
    if kind is bool:
        decls: tuple[str, ...] = (f"{flag}/--no-{flag[2:]}",)
        cli_type: Any = bool | None
    elif typing.get_origin(kind) is tuple or kind is tuple:
        decls, cli_type = (flag,), str | None
    elif typing.get_origin(kind) is dict or kind is dict:
        decls, cli_type = (flag,), list[str] | None
    else:
        decls, cli_type = (flag,), kind | None
    option = typer.Option(*decls, **info)
    return inspect.Parameter(_param(f, prefix), inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[cli_type, option])


def _off_name(f: dataclasses.Field, prefix: str) -> str:
    return "no_" + _param(f, prefix)


def _off_parameter(f: dataclasses.Field, panel: str, prefix: str) -> inspect.Parameter:
    """The ``--no-<name>`` flag of a negatable field: it turns the setting off (None)."""
    option = typer.Option("--" + _off_name(f, prefix).replace("_", "-"), rich_help_panel=panel,
                          help=f"Turn {flag_of(f.name, prefix)} off.")
    return inspect.Parameter(_off_name(f, prefix), inspect.Parameter.KEYWORD_ONLY,
                             default=None, annotation=Annotated[bool | None, option])


def _shown(default: Any) -> str | bool:
    if default is None:
        return False
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, Mapping):
        return False
    return str(default)


def _parse(value: Any, annotation: Any, f: dataclasses.Field, prefix: str) -> Any:
    """A typed CLI value as the field's type: comma lists for tuples, ``KEY=VALUE`` pairs for
    mappings; scalars arrive already converted by click."""
    kind, _ = _inner(annotation)
    if typing.get_origin(kind) is tuple:
        return _parse_list(value, typing.get_args(kind), flag_of(f.name, prefix))
    if typing.get_origin(kind) is dict or kind is dict:
        return _parse_mapping(value, f, flag_of(f.name, prefix))
    return value


def _parse_list(value: str, args: tuple, flag: str) -> tuple:
    items = [item.strip() for item in value.split(",") if item.strip()]
    element = args[0]
    if not items:
        raise typer.BadParameter("expected a comma-separated list, got nothing",
                                 param_hint=flag)
    try:
        return tuple(element(item) if element in (int, float) else item for item in items)
    except ValueError:
        noun = "integers" if element is int else "numbers"
        raise typer.BadParameter(f"expected comma-separated {noun}, got '{value}'",
                                 param_hint=flag) from None


def _parse_mapping(values: Iterable[str], f: dataclasses.Field,
                   flag: str) -> dict[str, str]:
    """``["prompt=question", ...]`` -> ``{"prompt": "question"}``; bad syntax is a usage error."""
    mapping: dict[str, str] = {}
    for value in values:
        key, sep, target = (part.strip() for part in value.partition("="))
        if not sep or not key or not target:
            raise typer.BadParameter(f"expected {f.metadata.get('metavar') or 'KEY=VALUE'} "
                                     f"(e.g. prompt=question), got '{value}'",
                                     param_hint=flag)
        if key in mapping:
            raise typer.BadParameter(f"'{key}' is mapped twice", param_hint=flag)
        mapping[key] = target
    return mapping


def with_options(*groups: OptionGroup, into: str | None = None) -> Callable[[F], F]:
    """Add the groups' options to a command and hand it each group's typed values as a dict
    (``{field: value}``): under the group's name, or all of them in one dict
    ``{group name: values}`` under ``into``. The command builds its configs itself with
    :meth:`OptionGroup.build` (so it can choose the base, e.g. a ``--config`` file)."""

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        names = {into} if into else {g.name for g in groups}
        own = [p for p in signature.parameters.values() if p.name not in names]
        per_group = {g.name: g.parameters() for g in groups}

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values = {g.name: {p.name: kwargs.pop(p.name) for p in per_group[g.name]}
                      for g in groups}
            if into:
                kwargs[into] = values
            else:
                kwargs.update(values)
            return func(**kwargs)

        extra = [p for group in groups for p in per_group[group.name]]
        command.__signature__ = signature.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        return command  # type: ignore[return-value]

    return decorate
