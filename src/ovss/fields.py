"""Typed configuration fields: check a value against its annotation, parse it from text, describe the type.

Every configuration dataclass (pipeline settings, method options, GLA options) declares what a field accepts
in its annotation only — ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``X | None`` or
``tuple[int, ...]`` — and these functions read it from there: ``ovss.load`` keywords and ``--opt KEY=VALUE``
are checked and parsed by the same declaration, and ``ovss methods`` prints it. Torch-free.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from typing import Any, Literal, Union

from ovss.errors import OvssError

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null")


def switched_on(variable: str) -> bool:
    """An on/off environment switch (``OVSS_TEXT_CACHE``, ``OVSS_PREPARED_CACHE``, ``OVSS_FAST_EXIT``): on unless
    set to false/0/no/off (any case, surrounding spaces ignored)."""
    import os

    return os.environ.get(variable, "1").strip().lower() not in _FALSE


class _Mismatch(Exception):
    """A value does not fit one alternative of an annotation."""


_HINTS: dict[type, dict[str, Any]] = {}  # resolved annotations per dataclass type


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of a dataclass type (``Literal``, unions, ...)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def alternatives(hint: Any) -> tuple[Any, ...]:
    """The members of a union annotation (``int | None`` -> ``(int, NoneType)``), else ``(hint,)``."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def describe(hint: Any) -> str:
    """What an annotation accepts, in words: ``one of 'kk', 'naclip'``, ``a number or None``."""
    words = []
    for alt in alternatives(hint):
        if alt is type(None):
            words.append("None")
        elif typing.get_origin(alt) is Literal:
            words.append("one of " + ", ".join(repr(choice) for choice in typing.get_args(alt)))
        elif typing.get_origin(alt) is tuple:
            words.append(f"a comma-separated list of {describe(typing.get_args(alt)[0]).removeprefix('a ')}s")
        else:
            words.append({bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(alt, "any"))
    return " or ".join(words)


def type_name(hint: Any) -> str:
    """An annotation as Python spells it, Literal choices inlined: ``'kk' | 'naclip'``, ``int | None``."""
    names = []
    for alt in alternatives(hint):
        if alt is type(None):
            names.append("None")
        elif typing.get_origin(alt) is Literal:
            names.extend(repr(choice) for choice in typing.get_args(alt))
        elif typing.get_origin(alt) is tuple:
            names.append(f"tuple[{type_name(typing.get_args(alt)[0])}, ...]")
        else:
            names.append(getattr(alt, "__name__", str(alt)))
    return " | ".join(names)


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as a member of one alternative ``hint`` (int -> float, list -> tuple), or raise _Mismatch."""
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
    elif typing.get_origin(hint) is Literal:
        for choice in typing.get_args(hint):
            if type(value) is type(choice) and value == choice:
                return value
    elif typing.get_origin(hint) is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_convert(item, typing.get_args(hint)[0]) for item in value)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise _Mismatch


def check_value(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation ``hint`` (ints become floats where a float is declared).

    Raises:
        OvssError: one line naming the option, the value and what is allowed.
    """
    for alt in alternatives(hint):
        try:
            return _convert(value, alt)
        except _Mismatch:
            continue
    raise OvssError(f"{name}={value!r} is invalid: expected {describe(hint)}")


def _parse(text: str, hint: Any) -> Any:
    low = text.strip().lower()
    if hint is type(None):
        if low in _NONE:
            return None
    elif typing.get_origin(hint) is Literal:
        for choice in typing.get_args(hint):
            if text.strip() == str(choice):
                return choice
    elif typing.get_origin(hint) is tuple:
        items = text.strip().strip("()[]").split(",")  # "3,4" or "(3, 4)", as `ovss methods` prints a default
        return tuple(_parse(item, typing.get_args(hint)[0]) for item in items if item.strip())
    elif hint is bool:
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
    elif hint in (int, float):
        try:
            return hint(text.strip())
        except ValueError:
            raise _Mismatch from None
    elif hint in (str, Any):
        return text.strip()
    raise _Mismatch


def parse_text(name: str, text: str, hint: Any) -> Any:
    """Parse command-line text by the declared type: bool (true/false/1/0/yes/no), int, float, Literal
    choices, ``none`` for optional fields, comma-separated tuples.

    Raises:
        OvssError: one line naming the option, the text and what is allowed.
    """
    for alt in sorted(alternatives(hint), key=lambda a: a is str):  # text is the last resort
        try:
            return _parse(text, alt)
        except _Mismatch:
            continue
    raise OvssError(f"{name}={text!r} is invalid: expected {describe(hint)}")


class CheckedFields:
    """Mix-in for frozen dataclasses: every field is checked against its annotation when an instance is built.

    Messages name the owner after the class (``NACLIPOptions`` -> "naclip option attn='kq' is invalid ...").
    """

    def __post_init__(self) -> None:
        check_fields(self, prefix=type(self).__name__.removesuffix("Options").lower() + " option ")


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check (and normalise: int -> float, list -> tuple) every field of a dataclass instance in place.

    Args:
        obj: a dataclass instance (frozen or not).
        prefix: prepended to field names in messages (e.g. ``"gla_"``).
    """
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = check_value(prefix + f.name, value, hints[f.name])
        if checked is not value:
            object.__setattr__(obj, f.name, checked)
