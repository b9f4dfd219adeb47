"""Runs one validated command on one ECU through udsoncan's services; every outcome is a value."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import udsoncan
from udsoncan import Response, services

from agent.config.model import EcuConfig
from agent.errors import BusDownError, TransportTimeoutError
from agent.uds.keys import load_algorithm
from agent.uds.transaction import InvalidResponseError, Link, NegativeResponseError, Timing, UdsTimeoutError, transact
from agent.wire import codecs, obd
from agent.wire import command as c
from agent.wire.command import ErrorCode, Outcome, Status
from agent.wire.dtc import fault_dict, split_snapshot_records, with_text

log = logging.getLogger(__name__)

DEFAULT_SESSION = 1


class Executor:
    """Owns the UDS view of one ECU (session, timing) and turns commands into outcomes.

    Used by exactly one worker thread. No exception escapes `execute`.
    """

    def __init__(self, ecu: EcuConfig, link: Link) -> None:
        self.ecu = ecu
        self.link = link
        self.session = DEFAULT_SESSION
        self._base = Timing(ecu.timing.p2_ms / 1000, ecu.timing.p2_star_ms / 1000, ecu.timing.busy_retries)
        self.timing = Timing(self._base.p2, self._base.p2_star, self._base.busy_retries)
        self._algorithms = {s.level: (load_algorithm(s.algorithm), dict(s.params)) for s in ecu.security}
        self._handlers: dict[type, Callable[[Any, float], dict[str, Any]]] = {
            c.ReadData: self._read_data, c.WriteData: self._write_data, c.ReadFaults: self._read_faults,
            c.ClearFaults: self._clear_faults, c.SetSession: self._set_session, c.Reset: self._reset,
            c.SecurityAccess: self._security_access, c.Operation: self._operation,
            c.IoControl: self._io_control, c.TesterPresent: self._tester_present, c.Raw: self._raw,
            c.Obd: self._obd,
        }

    def execute(self, params: c.Params, deadline: float) -> Outcome:
        """Runs the command until done or `deadline` (monotonic seconds)."""
        try:
            return Outcome.completed(self._handlers[type(params)](params, deadline))
        except NegativeResponseError as nrc:
            return Outcome.failure(Status.FAILED, ErrorCode.NEGATIVE_RESPONSE, str(nrc),
                                   nrc=f"0x{nrc.code:02X}", nrc_name=nrc.name, service=f"0x{nrc.service:02X}")
        except (UdsTimeoutError, TransportTimeoutError) as err:
            return Outcome.failure(Status.TIMEOUT, ErrorCode.TIMEOUT, str(err))
        except BusDownError as err:
            return Outcome.failure(Status.FAILED, ErrorCode.BUS_ERROR, str(err))
        except (InvalidResponseError, udsoncan.exceptions.InvalidResponseException, ValueError) as err:
            return Outcome.failure(Status.FAILED, ErrorCode.INTERNAL, f"invalid response from ECU: {err}")
        except Exception as err:  # the executor's contract: a result, never an exception
            log.exception("executor failed on %s", self.ecu.name)
            return Outcome.failure(Status.FAILED, ErrorCode.INTERNAL, f"{type(err).__name__}: {err}")

    def probe(self) -> bool:
        """TesterPresent with a response: does the ECU answer right now?"""
        try:
            transact(self.link, bytes([0x3E, 0x00]), self.timing, time.monotonic() + self.timing.p2)
        except (NegativeResponseError, InvalidResponseError):
            return True  # it answered, if not happily
        except (UdsTimeoutError, TransportTimeoutError, BusDownError):
            return False
        return True

    def keepalive(self) -> None:
        """TesterPresent with suppressed positive response, to hold a non-default session (S3)."""
        deadline = time.monotonic() + self.timing.p2
        try:
            transact(self.link, bytes([0x3E, 0x80]), self.timing, deadline, expect_response=False)
        except (BusDownError, TransportTimeoutError) as err:
            log.warning("keepalive to %s failed: %s", self.ecu.name, err)

    # ---- helpers -------------------------------------------------------------------------------
    def _ask(self, request: udsoncan.Request | bytes, deadline: float) -> Response:
        payload = request if isinstance(request, bytes) else request.get_payload()
        data = transact(self.link, payload, self.timing, deadline)
        response = Response.from_payload(data)
        if not response.valid:
            raise InvalidResponseError(response.invalid_reason)
        return response

    # ---- one handler per command ---------------------------------------------------------------
    def _read_data(self, p: c.ReadData, deadline: float) -> dict[str, Any]:
        values: dict[str, Any] = {}
        fixed = [d for d in p.dids if d.length is not None]
        groups = ([fixed] if fixed else []) + [[d] for d in p.dids if d.length is None]
        for group in groups:
            config = {d.id: codecs.UdsoncanCodec(d) for d in group}
            ids = [d.id for d in group]
            response = self._ask(services.ReadDataByIdentifier.make_request(ids, config), deadline)
            parsed = services.ReadDataByIdentifier.interpret_response(response, ids, config)
            by_id = {d.id: d for d in group}
            for did, value in parsed.service_data.values.items():
                values[by_id[did].name] = value
        return {"values": {d.name: values[d.name] for d in p.dids if d.name in values}}

    def _write_data(self, p: c.WriteData, deadline: float) -> dict[str, Any]:
        self._ask(bytes([0x2E]) + p.did.id.to_bytes(2, "big") + p.payload, deadline)
        return {}

    def _read_faults(self, p: c.ReadFaults, deadline: float) -> dict[str, Any]:
        sub = services.ReadDTCInformation.Subfunction
        request = services.ReadDTCInformation.make_request(sub.reportDTCByStatusMask, status_mask=p.status_mask)
        response = self._ask(request, deadline)
        parsed = services.ReadDTCInformation.interpret_response(response, sub.reportDTCByStatusMask)
        faults = []
        for dtc in parsed.service_data.dtcs:
            entry = with_text(fault_dict(dtc.id, dtc.status.get_byte_as_int()), self.ecu.dtc_texts, dtc.id)
            dtc_bytes = dtc.id.to_bytes(3, "big")
            if p.snapshots:
                data = self._ask(bytes([0x19, 0x04]) + dtc_bytes + b"\xff", deadline).get_payload()
                entry["snapshots"] = split_snapshot_records(data[6:], {d.id: d for d in self.ecu.dids})
            if p.extended:
                data = self._ask(bytes([0x19, 0x06]) + dtc_bytes + b"\xff", deadline).get_payload()
                entry["extended_data"] = data[6:].hex()
            faults.append(entry)
        return {"faults": faults}

    def _clear_faults(self, p: c.ClearFaults, deadline: float) -> dict[str, Any]:
        self._ask(services.ClearDiagnosticInformation.make_request(p.group), deadline)
        return {}

    def _set_session(self, p: c.SetSession, deadline: float) -> dict[str, Any]:
        response = self._ask(services.DiagnosticSessionControl.make_request(p.session), deadline)
        data = services.DiagnosticSessionControl.interpret_response(response).service_data
        self.session = p.session
        p2 = data.p2_server_max if data.p2_server_max is not None else self._base.p2
        p2_star = data.p2_star_server_max if data.p2_star_server_max is not None else self._base.p2_star
        # The client waits at least what the config says, and at least what the server announces.
        self.timing = Timing(max(self._base.p2, p2 + 0.05), max(self._base.p2_star, p2_star + 0.05),
                             self._base.busy_retries)
        return {"session": p.name, "p2_ms": round(p2 * 1000), "p2_star_ms": round(p2_star * 1000)}

    def _reset(self, p: c.Reset, deadline: float) -> dict[str, Any]:
        self._ask(services.ECUReset.make_request(p.reset_type), deadline)
        self.session_lost()
        return {}

    def session_lost(self) -> None:
        """Back to the default session (after a reset, or when the ECU stopped answering keepalives)."""
        self.session = DEFAULT_SESSION
        self.timing = Timing(self._base.p2, self._base.p2_star, self._base.busy_retries)

    def _security_access(self, p: c.SecurityAccess, deadline: float) -> dict[str, Any]:
        seed_response = self._ask(bytes([0x27, p.level]), deadline).get_payload()
        seed = seed_response[2:]
        if seed and not any(seed):  # an all-zero seed means: already unlocked
            return {"level": p.level, "unlocked": True}
        algorithm, params = self._algorithms[p.level]
        key = bytes(algorithm(p.level, seed, params))
        self._ask(bytes([0x27, p.level + 1]) + key, deadline)
        return {"level": p.level, "unlocked": True}

    def _operation(self, p: c.Operation, deadline: float) -> dict[str, Any]:
        request = services.RoutineControl.make_request(p.routine_id, p.action, p.data or None)
        parsed = services.RoutineControl.interpret_response(self._ask(request, deadline))
        return {"status_record": parsed.service_data.routine_status_record.hex()}

    def _io_control(self, p: c.IoControl, deadline: float) -> dict[str, Any]:
        did = p.did.id.to_bytes(2, "big")
        data = self._ask(bytes([0x2F]) + did + bytes([p.control]) + p.payload, deadline).get_payload()
        if data[1:3] != did:
            raise InvalidResponseError(f"response echoes DID {data[1:3].hex()}, asked for {did.hex()}")
        record = data[4:] if len(data) > 3 and data[3] == p.control else data[3:]
        return {"values": {p.did.name: codecs.decode(p.did, record)}}

    def _tester_present(self, p: c.TesterPresent, deadline: float) -> dict[str, Any]:
        self._ask(services.TesterPresent.make_request(), deadline)
        return {}

    def _raw(self, p: c.Raw, deadline: float) -> dict[str, Any]:
        return {"response": transact(self.link, p.request, self.timing, deadline).hex()}

    # ---- OBD-II (SAE J1979), physical addressing -----------------------------------------------
    def _obd(self, p: c.Obd, deadline: float) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for part, request in obd.plan(p.pids, p.info, p.dtcs):
            obd.interpret(part, request, self._obd_ask(request, deadline), result, self.ecu.dtc_texts)
        if p.supported:
            result["supported"] = [obd.pid_name(x) for x in self._supported_pids(deadline) if x not in obd.BITMAP_PIDS]
        return {k: result[k] for k in ("values", "unsupported", "supported", "info", "dtcs") if k in result}

    def _supported_pids(self, deadline: float) -> list[int]:
        """Walks the bitmaps 0x00, 0x20, ... for as long as each says the next one is supported."""
        found: list[int] = []
        for base in obd.BITMAP_PIDS:
            data = obd.split_pid_response(self._obd_ask(obd.pid_request([base]), deadline), [base])
            if base not in data:
                break
            listed = obd.supported_from_bitmap(base, data[base])
            found += listed
            if base + 0x20 not in listed:
                break
        return found

    def _obd_ask(self, request: bytes, deadline: float) -> bytes:
        return transact(self.link, request, self.timing, deadline)
