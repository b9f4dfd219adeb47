"""Takes a command payload off the wire: size, UTF-8, JSON and value checks before any field is read. Pure.

What leaves here is safe for everything after it: no number that is not finite or does not fit 64
bits, no string that cannot be encoded as UTF-8 (lone surrogates), no key twice in one object, no
nesting deeper than any command needs. What does not pass is refused with the path of the first offending field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from agent.config.reader import join
from agent.wire.command import COMMAND_ID

MAX_COMMAND_BYTES = 64 * 1024
# A signed command's envelope (protocol section Signed commands): the base64 of a Command of up to
# MAX_COMMAND_BYTES, a third larger, plus its key id, signature and JSON punctuation.
MAX_ENVELOPE_BYTES = 4 * -(-MAX_COMMAND_BYTES // 3) + 1024
SALVAGE_MAX_BYTES = 16 * MAX_COMMAND_BYTES  # an oversize payload up to this size is parsed for its id
MAX_DEPTH = 16  # levels of objects and lists inside the command object; commands need 3
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1  # no field of any command holds more than 64 bits
MAX_PROBLEMS = 3  # named in a refusal; the rest are counted


@dataclass(frozen=True)
class Undecodable:
    """A payload that is not a command object; `command_id` is set when an id could still be read."""

    reason: str
    field: str
    command_id: str | None


class _Refused:
    """Stands in the decoded tree for a JSON number that no field can hold (found by the walk)."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def _int(literal: str) -> int | _Refused:
    digits = len(literal.lstrip("-"))
    if digits > 19:  # never call int() on it: past 4300 digits that raises, and it is slow before
        return _Refused(f"an integer of {digits} digits does not fit 64 bits")
    value = int(literal)
    return value if INT_MIN <= value <= INT_MAX else _Refused(f"{value} does not fit 64 bits")


def _float(literal: str) -> float | _Refused:
    value = float(literal)
    return value if math.isfinite(value) else _Refused(f"{_clip(literal)} is not a finite number")


def _constant(name: str) -> _Refused:
    return _Refused(f"{name} is not a number JSON allows")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; a key that appears more than once is marked refused in place. Which of its values
    counts depends on the parser (json keeps the last, others the first), so a backend, a signing service
    and this agent could each read a different command from the same bytes: the command is refused."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                obj[key] = _Refused("the key appears more than once in its object")
            seen.add(key)
    return obj


def loads(text: str | bytes) -> Any:
    """json.loads with refused numbers and repeated keys marked in place; raises ValueError/RecursionError
    like json."""
    return json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant, object_pairs_hook=_object)


def decode_command(payload: bytes, max_bytes: int = MAX_COMMAND_BYTES) -> dict[str, Any] | Undecodable:
    """The JSON object of a command payload, or why it is not one (with the id, if readable). `max_bytes`:
    MAX_ENVELOPE_BYTES for a message that may be a signed envelope (its Command is decoded on its own)."""
    if len(payload) > max_bytes:
        return Undecodable(f"payload is {len(payload)} bytes, the limit is {max_bytes}", "",
                           _salvage_id(payload) if len(payload) <= SALVAGE_MAX_BYTES else None)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:  # an id of ASCII letters can still be read: the command is answered
        return Undecodable(f"payload is not UTF-8 (byte {err.start})", "",
                           _salvage_id(payload.decode("utf-8", "replace")))
    if text.startswith("\ufeff"):  # RFC 8259 section 8.1: JSON sent over a network has no byte order mark
        return Undecodable("payload starts with a byte order mark (U+FEFF), which JSON sent over a network "
                           "must not carry", "", _salvage_id(text[1:]))
    if text.count("[") + text.count("{") > MAX_DEPTH:  # else it cannot be too deep
        deep = too_deep(text)
        if deep is not None:
            path, command_id = deep
            return Undecodable(f"{path}: nested deeper than {MAX_DEPTH} levels", path, command_id)
    try:
        body = loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        return Undecodable(f"payload is not JSON: {_clip(str(getattr(err, 'msg', err)), 80)}", "", None)
    if not isinstance(body, dict):
        return Undecodable(f"payload is a JSON {type(body).__name__}, not an object", "", None)
    problems = find_problems(body)
    if problems:
        shown = "; ".join(f"{path}: {why}" for path, why in problems[:MAX_PROBLEMS])
        more = " (and more)" if len(problems) > MAX_PROBLEMS else ""
        return Undecodable(shown + more, problems[0][0], readable_id(body))
    return body


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},:]')


def too_deep(text: str) -> tuple[str, str | None] | None:
    """(path, top-level id) when the JSON text nests deeper than MAX_DEPTH, found from its tokens before
    json.loads sees it: how deep json can go depends on the caller's stack, this never does.

    A text whose brackets do not balance is left to json.loads to call not JSON (no id is read from it).
    """
    stack: list[list[Any]] = []  # per open container: [is_object, current key or index]
    command_id: str | None = None
    found: str | None = None
    expect_key = ended = False
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            if ended:
                return None  # a second top-level value
            if len(stack) >= MAX_DEPTH and found is None:
                found = _path_of(stack)
            stack.append([token == "{", None if token == "{" else 0])
            expect_key = token == "{"
        elif token in ("]", "}"):
            if not stack or stack.pop()[0] != (token == "}"):
                return None
            ended = not stack
            expect_key = False
        elif token == ",":
            if stack and not stack[-1][0]:
                stack[-1][1] += 1
            expect_key = bool(stack and stack[-1][0])
        elif token == ":":
            expect_key = False
        elif stack and stack[-1][0] and expect_key:
            stack[-1][1] = _string(token)
        elif len(stack) == 1 and stack[0][1] == "id":
            value = _string(token)
            command_id = value if COMMAND_ID.fullmatch(value) else None
    return (found, command_id) if found is not None and not stack else None


def _path_of(stack: list[list[Any]]) -> str:
    path = ""
    for _, key in stack:
        path = join(path, key if isinstance(key, int) else _clip(str(key), 64))
    return path


def _string(token: str) -> str:
    try:
        value = json.loads(token)
    except ValueError:
        return ""
    return value if isinstance(value, str) else ""


def find_problems(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, why) of values no command field can take: refused numbers, lone surrogates, depth.

    Stops after MAX_PROBLEMS + 1 of them. Iterative, so that its own depth never depends on the payload's.
    """
    problems: list[tuple[str, str]] = []
    stack: list[tuple[str, Any, int]] = [("", body, 1)]
    while stack and len(problems) <= MAX_PROBLEMS:
        path, value, depth = stack.pop()
        if isinstance(value, _Refused):
            problems.append((path or "(top level)", value.why))
        elif isinstance(value, str):
            if not _encodable(value):
                problems.append((path or "(top level)", "contains a lone surrogate (not valid Unicode)"))
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                problems.append((path, f"nested deeper than {MAX_DEPTH} levels"))
                continue
            pairs = value.items() if isinstance(value, dict) else enumerate(value)
            children = []
            for key, child in pairs:
                if isinstance(key, str) and not _encodable(key):
                    problems.append((join(path, _printable(key)), "the key contains a lone surrogate"))
                    continue
                children.append((join(path, _clip(key, 64) if isinstance(key, str) else key), child, depth + 1))
            stack.extend(reversed(children))
    problems.sort(key=lambda p: p[0] != "id")  # a problem in the id itself first: it decides the reply
    return problems


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    return _clip(text.encode("utf-8", "backslashreplace").decode("ascii", "replace"), 64)


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _salvage_id(payload: bytes | str) -> str | None:
    try:
        body = loads(payload)
    except (ValueError, RecursionError):
        return None
    return readable_id(body) if isinstance(body, dict) else None


def readable_id(body: dict[str, Any]) -> str | None:
    """The command's id when it is a valid one, else None."""
    command_id = body.get("id")
    return command_id if isinstance(command_id, str) and COMMAND_ID.fullmatch(command_id) else None
