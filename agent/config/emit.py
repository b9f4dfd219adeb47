"""Config as text: the one-line YAML mappings that generated `ecus:` entries are written with. Pure."""

from __future__ import annotations

import json
import re
from typing import Any

HEX_KEYS = frozenset({"request_id", "response_id", "functional_id", "target_address", "source_address", "padding",
                      "address_extension", "id"})
_BARE = re.compile(r"[a-z][a-z0-9_]*")


def scalar(key: str, value: Any) -> str:
    """One value: ids and addresses in hex, plain names bare, other strings JSON-quoted (valid YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and key in HEX_KEYS:
        return f"0x{value:X}" if value > 0xFF or key == "padding" else f"0x{value:02X}"
    if isinstance(value, dict):
        return flow(value)
    if isinstance(value, str):
        return value if _BARE.fullmatch(value) and value not in ("true", "false", "null", "yes", "no", "on", "off") \
            else _quoted(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _quoted(text: str) -> str:
    """A YAML double-quoted scalar in ASCII. JSON's escapes, except above U+FFFF: JSON writes a surrogate pair
    there, which YAML reads back as two lone surrogates; YAML's own `\\U` escape keeps the character."""
    if all(ord(ch) <= 0xFFFF for ch in text):
        return json.dumps(text)
    return '"' + "".join(json.dumps(ch)[1:-1] if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}" for ch in text) + '"'


def flow(mapping: dict[Any, Any]) -> str:
    """A one-line YAML flow mapping."""
    return "{" + ", ".join(f"{_key(k)}: {scalar(str(k), v)}" for k, v in mapping.items()) + "}"


def _key(key: Any) -> str:
    return str(key) if isinstance(key, int) or (isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_]+", key)) \
        else _quoted(str(key))


def comment(text: str) -> str:
    """A YAML comment line's text: printable ASCII only, so nothing read from an ECU or a file can break out."""
    return "".join(ch if 0x20 <= ord(ch) < 0x7F else "?" for ch in text)
