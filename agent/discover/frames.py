"""ISO-TP single frames as a scan sends and reads them (ISO 15765-2, classic and FD escape). Pure."""

from __future__ import annotations

FD_LENGTHS = (8, 12, 16, 20, 24, 32, 48, 64)


def single_frame(payload: bytes, prefix: bytes = b"", padding: int | None = 0xCC) -> bytes:
    """A classic CAN single frame: [prefix] length payload [padding to 8 bytes]."""
    if not 1 <= len(payload) <= 7 - len(prefix):
        raise ValueError(f"{len(payload)} bytes do not fit a single frame")
    data = prefix + bytes([len(payload)]) + payload
    return data.ljust(8, bytes([padding])) if padding is not None else data


def read_single_frame(data: bytes, prefix_size: int = 0) -> bytes | None:
    """The payload of a single frame (classic, or CAN FD with the escape length byte); None otherwise."""
    body = data[prefix_size:]
    if not body or body[0] >> 4 != 0:
        return None
    if body[0]:
        length, start = body[0] & 0x0F, 1
    elif len(body) > 1:
        length, start = body[1], 2
    else:
        return None
    if length == 0 or start + length > len(body):
        return None
    return bytes(body[start:start + length])


def padding_of(data: bytes, prefix_size: int = 0) -> int | None:
    """The byte an ECU pads its single frames with, when it pads them (all unused bytes equal)."""
    payload = read_single_frame(data, prefix_size)
    if payload is None:
        return None
    used = prefix_size + (1 if data[prefix_size] else 2) + len(payload)
    rest = data[used:]
    return rest[0] if rest and len(set(rest)) == 1 else None


def is_tester_present_answer(payload: bytes | None) -> bool:
    """7E 00, or a negative response to 0x3E: either way an ECU is there."""
    return payload is not None and (payload[:2] == b"\x7e\x00" or payload[:2] == b"\x7f\x3e")
