"""DID codecs: bytes <-> values for ascii, integers with scale/offset, enums and raw bytes. Pure."""

from __future__ import annotations

import math
from typing import Any

import udsoncan

from agent.config.model import DidSpec

JsonValue = Any


def decode(spec: DidSpec, payload: bytes) -> JsonValue:
    """The JSON value of a DID's bytes; a length mismatch gives the raw bytes instead of guessing."""
    if spec.length is not None and len(payload) != spec.length:
        return {"raw": payload.hex(), "error": f"expected {spec.length} bytes, got {len(payload)}"}
    if spec.codec == "ascii":
        return payload.rstrip(b"\x00").decode("ascii", errors="replace")
    if spec.codec in ("unsigned", "signed"):
        raw = int.from_bytes(payload, "big", signed=spec.codec == "signed")
        return _scaled(raw, spec)
    if spec.codec == "enum":
        raw = int.from_bytes(payload, "big")
        return dict(spec.enum).get(raw, raw)
    return {"raw": payload.hex()}


def _scaled(raw: int, spec: DidSpec) -> int | float:
    if spec.scale == 1.0 and spec.offset == 0.0:
        return raw
    value = raw * spec.scale + spec.offset
    return round(value, 9)


def encode(spec: DidSpec, value: JsonValue) -> bytes:
    """The bytes for a value; ValueError says what is wrong with the value."""
    if spec.codec == "ascii":
        if not isinstance(value, str) or not value.isascii():
            raise ValueError("expected an ASCII string")
        assert spec.length is not None
        if len(value) > spec.length:
            raise ValueError(f"at most {spec.length} characters, got {len(value)}")
        return value.encode("ascii").ljust(spec.length, b" ")
    if spec.codec in ("unsigned", "signed"):
        return _encode_number(spec, value)
    if spec.codec == "enum":
        return _encode_enum(spec, value)
    return _encode_raw(spec, value)


def _encode_number(spec: DidSpec, value: JsonValue) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number")
    assert spec.length is not None
    signed = spec.codec == "signed"
    bits = spec.length * 8
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    low, high = lo * spec.scale + spec.offset, hi * spec.scale + spec.offset
    try:
        scaled = (value - spec.offset) / spec.scale
    except OverflowError:  # an int too large for a float
        scaled = math.inf
    if not math.isfinite(scaled):  # NaN, an infinity, or a finite value that overflows when scaled
        raise ValueError(f"{_number(value)} is outside {low:g}..{high:g}")
    raw = round(scaled)
    if not lo <= raw <= hi:
        raise ValueError(f"{_number(value)} is outside {low:g}..{high:g}")
    return raw.to_bytes(spec.length, "big", signed=signed)


def _number(value: int | float) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"


def _encode_enum(spec: DidSpec, value: JsonValue) -> bytes:
    assert spec.length is not None
    by_label = {label: key for key, label in spec.enum}
    if isinstance(value, str) and value in by_label:
        raw = by_label[value]
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << (8 * spec.length):
        raw = value
    else:
        raise ValueError(f"expected one of {', '.join(sorted(by_label))} or an integer")
    return raw.to_bytes(spec.length, "big")


def _encode_raw(spec: DidSpec, value: JsonValue) -> bytes:
    if not isinstance(value, str):
        raise ValueError("expected a hex string")
    try:
        data = bytes.fromhex(value.removeprefix("0x").replace(" ", ""))
    except ValueError:
        raise ValueError("expected a hex string of whole bytes") from None
    if spec.length is not None and len(data) != spec.length:
        raise ValueError(f"expected {spec.length} bytes, got {len(data)}")
    return data


def anonymous(did: int) -> DidSpec:
    """A DID that the config does not describe: raw bytes of whatever length the ECU sends."""
    return DidSpec(name=f"0x{did:04X}", id=did, codec="raw")


class UdsoncanCodec(udsoncan.DidCodec):
    """Lets udsoncan split multi-DID responses: it asks each codec for its length."""

    def __init__(self, spec: DidSpec) -> None:
        self.spec = spec

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        return encode(self.spec, args[0])

    def decode(self, string_bin: bytes) -> Any:
        return decode(self.spec, bytes(string_bin))

    def __len__(self) -> int:
        if self.spec.length is None:
            raise udsoncan.DidCodec.ReadAllRemainingData
        return self.spec.length
