"""udsoncan's `Response.from_payload` without its per-call introspection: the same Response, built
from lookup tables made once per process.

udsoncan walks every BaseService subclass (`from_response_id`) and runs `inspect.getmembers` over the
response codes (`Code.get_name`) for every answer it parses: under load that was a few percent of the
agent's CPU. The tables below are what those calls return, for every possible byte, computed on first
use; `parse` then follows `from_payload` step by step (tests/test_uds_response.py compares the two).
The agent defines no BaseService subclass of its own, so the tables never go stale.
"""

from __future__ import annotations

import inspect
import threading

from udsoncan import Response
from udsoncan.BaseService import BaseService

_tables: tuple[dict[int, type[BaseService] | None], dict[int, type[BaseService] | None], dict[int, str]] | None = None
_building = threading.Lock()


def _lookups() -> tuple[dict[int, type[BaseService] | None], dict[int, type[BaseService] | None], dict[int, str]]:
    global _tables
    if _tables is None:
        with _building:
            if _tables is None:
                by_response = {i: BaseService.from_response_id(i) for i in range(256)}
                by_request = {i: BaseService.from_request_id(i) for i in range(256)}
                names: dict[int, str] = {}
                for name, value in inspect.getmembers(Response.Code):  # get_name's order: the first match wins
                    if isinstance(value, int):
                        names.setdefault(value, name)
                _tables = (by_response, by_request, names)
    return _tables


def code_name(code: int) -> str:
    """`Response.Code.get_name(code)`: the response code's name, or the number as text."""
    return _lookups()[2].get(code, str(code))


def parse(payload: bytes) -> Response:
    """`Response.from_payload(payload)`, field for field."""
    by_response, by_request, names = _lookups()
    response = Response()
    response.original_payload = payload
    if len(payload) < 1:
        response.valid = False
        response.invalid_reason = "Payload is empty"
        return response
    if payload[0] != 0x7F:
        response.service = by_response[payload[0]]
        if response.service is None:
            response.valid = False
            response.invalid_reason = "Payload first byte is not a known service response ID."
            return response
        data_start = 1
        response.positive = True
        if len(payload) < 2 and response.service.has_response_data():
            response.valid = False
            response.positive = False
            response.invalid_reason = "Payload must be at least 2 bytes long (service and response)"
            return response
        response.code = Response.Code.PositiveResponse
        response.code_name = names.get(Response.Code.PositiveResponse, str(Response.Code.PositiveResponse))
    else:
        response.positive = False
        data_start = 3
        if len(payload) < 2:
            response.valid = False
            response.invalid_reason = "Incomplete invalid response service (7Fxx)"
            return response
        response.service = by_request[payload[1]]
        if response.service is None:
            response.valid = False
            response.invalid_reason = "Payload second byte is not a known service request ID."
            return response
        if len(payload) < 3:
            response.valid = False
            response.invalid_reason = "Response code missing"
            return response
        response.code = int(payload[2])
        response.code_name = names.get(response.code, str(response.code))
    response.valid = True
    response.invalid_reason = ""
    if len(payload) > data_start:
        response.data = payload[data_start:]
    return response
