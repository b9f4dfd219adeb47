"""Reading an ECU's answer, for physical and functional requests alike: udsoncan's `interpret_response`
with its complaints as InvalidResponseError, echo checks, the DID groups a read goes out in, and the
`error` fields of a failure that stays inside a result (one DTC's snapshot, one ECU's answer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import udsoncan
from udsoncan import Response

from agent.config.model import DidSpec
from agent.errors import TransportTimeoutError
from agent.uds.transaction import InvalidResponseError, NegativeResponseError, UdsTimeoutError
from agent.wire.command import ErrorCode


def interpret(reader: Callable[..., Any], response: Response, *args: Any, **kwargs: Any) -> Any:
    """udsoncan's `interpret_response`, its complaints turned into InvalidResponseError."""
    try:
        return reader(response, *args, **kwargs).service_data
    except (udsoncan.exceptions.InvalidResponseException, udsoncan.exceptions.ConfigError, ValueError,
            IndexError) as err:  # IndexError: udsoncan's 0x2F reader on an answer without the control echo
        raise InvalidResponseError(str(err)) from err


def expect_echo(what: str, got: int, wanted: int) -> None:
    if got != wanted:
        raise InvalidResponseError(f"response echoes {what} 0x{got:02X}, asked for 0x{wanted:02X}")


def did_groups(dids: tuple[DidSpec, ...]) -> list[list[DidSpec]]:
    """The ReadDataByIdentifier requests a read goes out in: every fixed-length DID in one request,
    each DID of unknown length alone (its value runs to the end of the answer)."""
    fixed = [d for d in dids if d.length is not None]
    return ([fixed] if fixed else []) + [[d] for d in dids if d.length is None]


def error_fields(err: Exception) -> dict[str, Any]:
    """The `error` object of a per-item failure inside a result (e.g. one DTC's snapshot)."""
    if isinstance(err, NegativeResponseError):
        return {"code": str(ErrorCode.NEGATIVE_RESPONSE), "message": str(err), "nrc": f"0x{err.code:02X}",
                "nrc_name": err.name}
    if isinstance(err, UdsTimeoutError | TransportTimeoutError):
        return {"code": str(ErrorCode.TIMEOUT), "message": str(err)}
    return {"code": str(ErrorCode.INTERNAL), "message": f"invalid response from ECU: {err}"}
