"""Reads untyped YAML/JSON data into typed values while collecting every problem with its path."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_MISSING = object()


class InvalidValueError(Exception):
    """Raised by a converter: the value at hand is wrong for the reason given."""


class Problems:
    """Collects (path, message) pairs so that a file's errors are all reported at once."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append((path, message))

    def __bool__(self) -> bool:
        return bool(self.items)


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class Node:
    """A mapping at a known path. Fields are taken with `get`; `finish` flags the keys nobody took."""

    def __init__(self, data: Any, path: str, problems: Problems) -> None:
        self.path = path
        self.problems = problems
        self.ok = isinstance(data, Mapping)
        if not self.ok:
            problems.add(path or "(top level)", f"expected a mapping, got {describe(data)}")
        self.data: Mapping[str, Any] = data if self.ok else {}
        self._taken: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        self._taken.add(key)
        return self.data.get(key, default)

    def get(self, key: str, convert: Callable[[Any], T], default: Any = _MISSING) -> T:
        """Converts field `key`; a missing required field or a bad value is recorded, not raised.

        On a problem the default (or None for required fields) is returned, so parsing carries on
        and finds the next problem too.
        """
        self._taken.add(key)
        if key not in self.data or (self.data[key] is None and default is not _MISSING):
            if default is _MISSING:
                if self.ok:
                    self.problems.add(join(self.path, key), "required field is missing")
                return None  # type: ignore[return-value]
            return default
        return self.convert(key, self.data[key], convert, default)

    def convert(self, key: str | int, value: Any, convert: Callable[[Any], T], default: Any = None) -> T:
        """Converts a value found under `key` of this node."""
        return self.check(join(self.path, key), value, convert, default)

    def check(self, path: str, value: Any, convert: Callable[[Any], T], default: Any = None) -> T:
        """Converts a value whose full path is known (list items from `items_of`)."""
        try:
            return convert(value)
        except InvalidValueError as err:
            self.problems.add(path, str(err))
            return None if default is _MISSING else default

    def child(self, key: str) -> Node | None:
        """The mapping under `key`, or None when absent (the key counts as taken)."""
        self._taken.add(key)
        if key not in self.data or self.data[key] is None:
            return None
        return Node(self.data[key], join(self.path, key), self.problems)

    def items_of(self, key: str) -> Iterator[tuple[str, Any]]:
        """Each (path, item) of the list under `key`; a non-list is recorded as a problem."""
        self._taken.add(key)
        value = self.data.get(key)
        if value is None:
            return
        if not isinstance(value, list):
            self.problems.add(join(self.path, key), f"expected a list, got {describe(value)}")
            return
        for index, item in enumerate(value):
            yield join(join(self.path, key), index), item

    def finish(self) -> None:
        for key in self.data:
            if key not in self._taken:
                name = str(key)
                self.problems.add(join(self.path, name if len(name) <= 64 else f"{name[:64]}..."), "unknown key")


def describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"boolean {value}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"string {shown(value)}"
    return f"{type(value).__name__} {shown(value)}"


SHOWN_MAX = 40


def shown(value: Any) -> str:
    """repr(value) for an error message, cut short: a message never repeats a huge bad value."""
    if isinstance(value, str) and len(value) > SHOWN_MAX:
        return f"{value[:SHOWN_MAX]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= SHOWN_MAX else f"{text[:SHOWN_MAX]}... ({len(text)} characters)"


# ---- converters: each takes the raw value and returns the typed one or raises InvalidValueError ----------

def integer(lo: int | None = None, hi: int | None = None, what: str = "") -> Callable[[Any], int]:
    """An int, also written as a "0x.." string; bounds inclusive."""

    def convert(value: Any) -> int:
        if isinstance(value, bool):
            raise InvalidValueError(f"expected an integer, got {describe(value)}")
        if isinstance(value, str):
            try:
                number = int(value, 0)
            except ValueError:
                raise InvalidValueError(f"expected an integer, got {describe(value)}") from None
        elif isinstance(value, int):
            number = value
        else:
            raise InvalidValueError(f"expected an integer, got {describe(value)}")
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            shown = hex(number) if isinstance(value, str) and value.lower().startswith("0x") else str(number)
            raise InvalidValueError(f"{shown} is not {what}" if what else f"{shown} is out of range {lo}..{hi}")
        return number

    return convert


def number(lo: float | None = None, hi: float | None = None) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidValueError(f"expected a number, got {describe(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise InvalidValueError(f"{value} is out of range {lo}..{hi}")
        return float(value)

    return convert


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidValueError(f"expected true or false, got {describe(value)}")
    return value


def text(pattern: str | None = None, what: str = "", max_len: int = 256) -> Callable[[Any], str]:
    compiled = re.compile(pattern) if pattern else None

    def convert(value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidValueError(f"expected a string, got {describe(value)}")
        if not value or len(value) > max_len:
            raise InvalidValueError(f"expected 1 to {max_len} characters, got {len(value)}")
        if compiled and not compiled.fullmatch(value):
            raise InvalidValueError(f"{shown(value)} is not {what or 'valid'}")
        return value

    return convert


def choice(*options: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in options:
            raise InvalidValueError(f"expected one of {', '.join(options)}, got {describe(value)}")
        return value

    return convert


def hex_bytes(value: Any) -> bytes:
    """Bytes written as hex ("0a1b", "0A 1B", or "0x0a1b")."""
    if not isinstance(value, str):
        raise InvalidValueError(f"expected a hex string, got {describe(value)}")
    cleaned = value.strip().replace(" ", "")
    if cleaned[:2].lower() == "0x":
        cleaned = cleaned[2:]
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise InvalidValueError(f"{shown(value)} is not a hex string of whole bytes") from None
