"""Under ``config.py``'s declarations: ``key()``, the rules, one reader, the reference.

``config.py`` declares each key once, as a dataclass field whose metadata
(made by :func:`key` or :func:`required`) carries its doc, its rule and, when a
reload cannot take it, why. This module reads a YAML mapping into such a
dataclass by walking :func:`dataclasses.fields` (the field's type says what
YAML value it takes) and renders the same fields as the Markdown reference in
``docs/configuration.md``. Nothing here names a key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")
D = TypeVar("D")

_META = "sftpgate.key"


class Invalid(Exception):
    """A value breaks a rule. The reader puts ``file: key`` (and ``at``, e.g. ``[1]``) in front."""

    def __init__(self, message: str, at: str = "") -> None:
        super().__init__(message)
        self.message, self.at = message, at


@dataclass(frozen=True, slots=True)
class Rule:
    """A constraint: ``check`` returns the value to keep (maybe normalised) or raises Invalid.

    ``doc`` says it in the reference; ``accepts`` replaces the YAML types the
    field's own type would take (an octal mask is an integer or a string).
    """

    doc: str
    check: Callable[[Any], Any]
    accepts: tuple[type, ...] = ()


@dataclass(frozen=True, slots=True)
class Spec:
    """What a field's metadata says about its key."""

    doc: str
    rule: Rule | None = None
    restart: str | None = None  # why a reload cannot take it (read only at start)
    name: str | None = None  # the YAML key, where it differs from the attribute
    shown: str | None = None  # the default as the reference shows it
    unit: str = ""
    required: bool = False


def key(
    default: T,
    doc: str,
    rule: Rule | None = None,
    *,
    restart: str | None = None,
    name: str | None = None,
    shown: str | None = None,
    unit: str = "",
) -> T:
    """A key with a default, as a dataclass field: ``port: int = key(2222, "TCP port", PORT)``."""
    spec = Spec(doc, rule, restart, name, shown, unit)
    return field(default=default, metadata={_META: spec})


def required(doc: str, rule: Rule | None = None) -> Mapping[str, Spec]:
    """Metadata of a key without a default: ``login: str = field(metadata=required(...))``."""
    return {_META: Spec(doc, rule, required=True, shown="required")}


def spec_of(f: dataclasses.Field[Any]) -> Spec:
    spec = f.metadata.get(_META)
    if not isinstance(spec, Spec):
        raise TypeError(f"field {f.name} is not declared with key() or required()")
    return spec


def yaml_name(f: dataclasses.Field[Any]) -> str:
    return spec_of(f).name or f.name


# --- rules ----------------------------------------------------------------------------------


def _positive(value: Any) -> Any:
    if value <= 0:
        raise Invalid("must be greater than 0")
    return value


def _nonnegative(value: Any) -> Any:
    if value < 0:
        raise Invalid("must not be negative")
    return value


def _port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise Invalid("must be a port number (0-65535)")
    return value


def _even(value: int) -> int:
    if _positive(value) % 2:
        raise Invalid("must be an even number of pixels")
    return value


def _octal(value: int | str) -> int:
    """18 (YAML reads 0022 as octal), "022" or "0o022"."""
    if isinstance(value, str):
        try:
            value = int(value.removeprefix("0o"), 8)
        except ValueError:
            raise Invalid(f"must be an octal mask such as 022, got {value!r}") from None
    if not 0 <= value <= 0o777:
        raise Invalid("must be between 000 and 777 (octal)")
    return value


POSITIVE = Rule("> 0", _positive)
NONNEGATIVE = Rule("≥ 0", _nonnegative)
PORT = Rule("0-65535", _port)
EVEN = Rule("even, > 0", _even)
OCTAL = Rule('octal mask, `000`-`777` (`022`, `"0o027"`)', _octal, accepts=(int, str))


def one_of(*choices: str) -> Rule:
    """A string among ``choices``, any case.

    YAML reads a bare ``off`` or ``on`` as a boolean (so does an environment
    override): where ``off``/``on`` is a choice, false/true mean it.
    """
    switch = {False: "off", True: "on"}

    def check(value: str | bool) -> str:
        if isinstance(value, bool):
            value = switch[value]
        if value.lower() not in choices:
            raise Invalid(f"must be one of {', '.join(choices)}")
        return value.lower()

    doc = "one of " + ", ".join(f"`{c}`" for c in choices)
    if "off" in choices or "on" in choices:
        return Rule(doc, check, accepts=(str, bool))
    return Rule(doc, check)


def matching(pattern: str, message: str, doc: str) -> Rule:
    """A string that matches ``pattern`` (``re.match``); else ``message``."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.match(value):
            raise Invalid(message)
        return value

    return Rule(doc, check)


# --- the reader -----------------------------------------------------------------------------

_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "a mapping",
}


@dataclass(frozen=True, slots=True)
class Source:
    """The file being read (as the user named it) and the folder relative paths resolve against."""

    file: str
    base: Path

    def error(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.file}: {where}: {message}")


def _plain(hint: Any) -> Any:
    """``X | None`` → ``X``; other types unchanged."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _is_strings(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple and typing.get_args(hint) == (str, ...)


def _accepts(hint: Any) -> tuple[type, ...]:
    if _is_strings(hint):
        return (list,)
    if hint is Path:
        return (str,)
    if hint in (int, float, str, bool):
        return (hint,)
    raise TypeError(f"no reader for keys of type {hint!r}")


def _typed(value: Any, kinds: tuple[type, ...]) -> Any:
    """``value`` if it is one of ``kinds`` (an int where a float is wanted becomes one)."""
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return value
    names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
    raise Invalid(f"must be {names}, got {type(value).__name__}")


def _value(hint: Any, spec: Spec, value: Any, base: Path) -> Any:
    """The value a present key takes, or Invalid."""
    rule = spec.rule
    if rule and rule.accepts:  # the rule reads the value itself
        return rule.check(_typed(value, rule.accepts))
    value = _typed(value, _accepts(hint))
    if _is_strings(hint) and isinstance(value, list):
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise Invalid("must be a non-empty string", at=f"[{index}]")
        value = tuple(value)
    if spec.required and isinstance(value, str) and not value.strip():
        raise Invalid("is required")
    if hint is Path and isinstance(value, str):
        value = (base / os.path.expanduser(value)).resolve()
    return rule.check(value) if rule else value


def read(cls: type[D], data: Mapping[str, Any], source: Source, where: str) -> D:
    """Build ``cls`` from ``data``: each field's YAML key, typed, checked; unknown keys refused.

    Raises ConfigError naming ``source.file`` and ``where.key``.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    known: set[str] = set()
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        spec, name = spec_of(f), yaml_name(f)
        known.add(name)
        path = f"{where}.{name}" if where else name
        raw = data.get(name)
        if raw is None:
            if spec.required:
                raise source.error(path, "is required")
            continue  # the field's default
        try:
            values[f.name] = _value(_plain(hints[f.name]), spec, raw, source.base)
        except Invalid as exc:
            raise source.error(path + exc.at, exc.message) from None
    for name in data:
        if name not in known:
            raise source.error(f"{where}.{name}" if where else str(name), "unknown key")
    return cls(**values)


# --- the reference --------------------------------------------------------------------------

_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
_GIB = 1024**3


def _type_doc(hint: Any, spec: Spec) -> str:
    plain = _plain(hint)
    text = "list of strings" if _is_strings(plain) else _TYPE_NAMES.get(plain, str(plain))
    if spec.rule and spec.rule.accepts:
        text = ""
    if spec.unit:
        text = f"{text} ({spec.unit})" if text else spec.unit
    if spec.rule:
        text = f"{text}, {spec.rule.doc}" if text else spec.rule.doc
    return text


def _default_doc(value: Any, spec: Spec) -> str:
    if spec.shown is not None:
        return spec.shown
    if value is None or value == ():
        return "—"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return " ".join(f"`{item}`" for item in value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if spec.unit == "bytes" and value >= _GIB and value % _GIB == 0:
        return f"{value // _GIB} GiB"
    if spec.unit == "seconds" and value >= 3600 and value % 3600 == 0:
        return f"{value // 3600} h"
    if spec.rule is OCTAL and isinstance(value, int):
        return f"`{value:03o}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def documented(cls: type[Any]) -> Iterator[tuple[str, dataclasses.Field[Any], Spec, Any]]:
    """(YAML name, field, spec, type) of each key of ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield yaml_name(f), f, spec_of(f), hints[f.name]


def section_markdown(title: str, cls: type[Any]) -> list[str]:
    """One section's heading, its class docstring and a table of its keys."""
    lines = [f"### `{title}`", ""]
    doc = " ".join((cls.__doc__ or "").split())
    if doc:
        lines += [doc, ""]
    lines += ["| key | type | default | SIGHUP | meaning |", "|---|---|---|---|---|"]
    for name, f, spec, hint in documented(cls):
        default = None if f.default is dataclasses.MISSING else f.default
        cells = (
            f"`{title}.{name}`",
            _type_doc(hint, spec),
            _default_doc(default, spec),
            "restart" if spec.restart else "reload",
            spec.doc,
        )
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return [*lines, ""]


def restart_markdown(sections: Mapping[str, type[Any]]) -> list[str]:
    """The keys a reload cannot take, grouped by why, in declaration order."""
    reasons: dict[str, list[str]] = {}
    for title, cls in sections.items():
        for name, _, spec, _ in documented(cls):
            if spec.restart:
                reasons.setdefault(spec.restart, []).append(f"`{title}.{name}`")
    lines = ["| key | why a restart |", "|---|---|"]
    lines += [f"| {', '.join(keys)} | {_cell(why)} |" for why, keys in reasons.items()]
    return [*lines, ""]


MARKER = "<!-- Generated from sftpgate/config.py by `sftpgate check-config --docs`: edit there. -->"


def splice(document: str, generated: str) -> str:
    """``document`` up to and including its MARKER line, then ``generated``."""
    head, found, _ = document.partition(MARKER)
    if not found:
        raise ValueError(f"no line {MARKER!r} to put the reference after")
    return f"{head}{MARKER}\n\n{generated}"
