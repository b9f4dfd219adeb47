"""Reads an ECU's fault memory (ReadDTCInformation): the DTCs by status mask, and per DTC its snapshots
and extended data, each of those a request of its own whose failure stays in that DTC's entry.

The requests come from udsoncan; the records of 0x04/0x06 are split by `wire.dtc`, not by udsoncan's
reader, which needs a codec for every snapshot DID and every extended record's size up front.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from udsoncan import Request, Response, services

from agent.config.model import EcuConfig
from agent.errors import TransportTimeoutError
from agent.uds.answers import error_fields, interpret
from agent.uds.transaction import InvalidResponseError, NegativeResponseError, UdsTimeoutError
from agent.wire import command as c
from agent.wire.dtc import fault_dict, split_snapshot_records, with_text

log = logging.getLogger(__name__)

_DTC = services.ReadDTCInformation.Subfunction
Ask = Callable[[Request, float], Response]  # one request, its positive answer by `deadline`


def read_faults(ask: Ask, ecu: EcuConfig, p: c.ReadFaults, deadline: float) -> dict[str, Any]:
    """`{"faults": [...]}`: the DTCs matching the status mask, with snapshots/extended data if asked."""
    request = services.ReadDTCInformation.make_request(_DTC.reportDTCByStatusMask, status_mask=p.status_mask)
    parsed = interpret(services.ReadDTCInformation.interpret_response, ask(request, deadline),
                       _DTC.reportDTCByStatusMask)
    faults = []
    for dtc in parsed.dtcs:
        entry = with_text(fault_dict(dtc.id, dtc.status.get_byte_as_int()), ecu.dtc_texts, dtc.id)
        if p.snapshots:
            read_snapshots(ask, ecu, entry, dtc.id, deadline)
        if p.extended:
            _fault_part(ask, ecu, entry, "extended_data", dtc.id, lambda d: d.hex(), deadline)
        faults.append(entry)
    return {"faults": faults}


def read_snapshots(ask: Ask, ecu: EcuConfig, entry: dict[str, Any], dtc: int, deadline: float) -> None:
    """One DTC's snapshot records into `entry["snapshots"]` (or `entry["snapshots_error"]`)."""
    _fault_part(ask, ecu, entry, "snapshots", dtc,
                lambda d: split_snapshot_records(d, {s.id: s for s in ecu.dids}), deadline)


def _fault_part(ask: Ask, ecu: EcuConfig, entry: dict[str, Any], key: str, dtc: int,
                read: Callable[[bytes], Any], deadline: float) -> None:
    """One DTC's snapshots or extended data into its entry; a failure stays in that entry."""
    sub = _DTC.reportDTCSnapshotRecordByDTCNumber if key == "snapshots" \
        else _DTC.reportDTCExtendedDataRecordByDTCNumber
    record = {"snapshot_record_number": 0xFF} if key == "snapshots" else {"extended_data_record_number": 0xFF}
    try:
        request = services.ReadDTCInformation.make_request(sub, dtc=dtc, **record)
        data = ask(request, deadline).get_payload()
        if len(data) < 6:
            raise InvalidResponseError(f"0x19 0x{sub:02X} answer too short: {data.hex()}")
        entry[key] = read(data[6:])  # after 59, sub-function, DTC (3), status
    except (NegativeResponseError, InvalidResponseError, UdsTimeoutError, TransportTimeoutError) as err:
        entry[f"{key}_error"] = error_fields(err)
        log.warning("%s of DTC 0x%06X on %s not read: %s", key, dtc, ecu.name, err,
                    extra={"component": ecu.name})
