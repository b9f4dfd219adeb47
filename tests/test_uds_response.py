"""agent/uds/response.py against udsoncan's own `Response.from_payload`: the same Response for every
first byte, every negative-response service and code, and every short or truncated form. Pure."""

from __future__ import annotations

import pytest
from udsoncan import Response

from agent.uds.response import code_name, parse

FIELDS = ("valid", "invalid_reason", "positive", "code", "code_name", "data", "original_payload")


def same(payload: bytes) -> None:
    ours, theirs = parse(payload), Response.from_payload(payload)
    for field in FIELDS:
        assert getattr(ours, field) == getattr(theirs, field), (payload.hex(), field)
    assert ours.service is theirs.service, payload.hex()


def test_every_first_byte_with_and_without_data():
    same(b"")
    for first in range(256):
        for payload in (bytes([first]), bytes([first, 0x01]), bytes([first, 0xF1, 0x90, 0x41, 0x42])):
            same(payload)


@pytest.mark.parametrize("code", [0x10, 0x11, 0x12, 0x13, 0x21, 0x22, 0x31, 0x33, 0x35, 0x78, 0x7E, 0x7F, 0x00, 0xFF])
def test_negative_responses_for_every_service_byte(code):
    for service in range(256):
        same(bytes([0x7F, service, code]))
        same(bytes([0x7F, service, code, 0x00]))
    same(bytes([0x7F]))
    same(bytes([0x7F, 0x22]))


def test_code_names_as_udsoncan_names_them():
    for code in range(256):
        assert code_name(code) == Response.Code.get_name(code)
