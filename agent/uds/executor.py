"""Runs one validated command on one ECU through udsoncan's services; every outcome is a value.

Requests are built with udsoncan's `services.*.make_request` and answers read with its
`interpret_response`; `transaction` has already matched each answer to its request by echo, and the
echoes udsoncan parses (session, reset type, security level, routine, DID, control parameter) are
compared once more here. Hand-built bytes remain only where udsoncan has no helper:
- `raw`: the caller's bytes, by definition;
- the records of ReadDTCInformation 0x04/0x06 (snapshots, extended data), split in `uds.faults`;
- the session/security bookkeeping that follows a raw 0x10/0x11/0x27, read from the raw bytes.
A command sent functionally (one request, every ECU's answer) is handed to `uds.functional`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import udsoncan
from udsoncan import Request, Response, services

from agent.config.model import EcuConfig
from agent.errors import BusDownError, TransportTimeoutError
from agent.uds import faults
from agent.uds.answers import did_groups, expect_echo, interpret
from agent.uds.functional import FunctionalRequests
from agent.uds.functional_exchange import FunctionalPort
from agent.uds.keys import load_algorithm
from agent.uds.response import parse as parse_response
from agent.uds.transaction import (
    InvalidResponseError,
    Link,
    NegativeResponseError,
    Timing,
    UdsTimeoutError,
    transact,
)
from agent.wire import codecs, obd
from agent.wire import command as c
from agent.wire.command import ErrorCode, Outcome, Status

log = logging.getLogger(__name__)

DEFAULT_SESSION = 1
LOCKED = 0
ACTIVE_SESSION = b"\x22\xF1\x86"  # read activeDiagnosticSessionDataIdentifier (ISO 14229-1)
KEEPALIVES_MISSED_LOST = 2  # unanswered keepalives in a row after which the ECU has left the session
# Answers to that read that mean the ECU will never report its session: keepalives are TesterPresent then.
_NO_SESSION_DID = frozenset({0x11, 0x12, 0x13, 0x31, 0x33, 0x7F})
_SEED, _KEY = services.SecurityAccess.Mode.RequestSeed, services.SecurityAccess.Mode.SendKey


class _Encoded(udsoncan.DidCodec):
    """A DID codec for bytes the command parser has already encoded (udsoncan only frames them)."""

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        return bytes(args[0])

    def decode(self, string_bin: bytes) -> bytes:
        return bytes(string_bin)

    def __len__(self) -> int:
        raise udsoncan.DidCodec.ReadAllRemainingData


class Executor:
    """Owns the UDS view of one ECU (session, security level, timing) and turns commands into outcomes.

    Used by exactly one worker thread. No exception escapes `execute`.
    """

    def __init__(self, ecu: EcuConfig, link: Link, functional: FunctionalPort | None = None) -> None:
        self.ecu = ecu
        self.link = link
        self.discarded = 0  # answers discarded as not for the request they came during (stale, another tester's)
        self._functional = FunctionalRequests(ecu, functional, self._discard)
        self.session = DEFAULT_SESSION
        self.security_level = LOCKED
        self._reports_session = True  # until the ECU refuses DID 0xF186
        self._keepalives_missed = 0  # in a row
        self._base = Timing(ecu.timing.p2_ms / 1000, ecu.timing.p2_star_ms / 1000, ecu.timing.busy_retries)
        self._budget = ecu.timing.request_ms / 1000  # the longest a keepalive or probe may hold the worker
        self.timing = Timing(self._base.p2, self._base.p2_star, self._base.busy_retries)
        self._algorithms = {s.level: (load_algorithm(s.algorithm), dict(s.params)) for s in ecu.security}
        self._handlers: dict[type, Callable[[Any, float], dict[str, Any]]] = {
            c.ReadData: self._read_data, c.WriteData: self._write_data, c.ReadFaults: self._read_faults,
            c.ReadFaultSnapshot: self._read_fault_snapshot,
            c.ClearFaults: self._clear_faults, c.SetSession: self._set_session, c.Reset: self._reset,
            c.SecurityAccess: self._security_access, c.Operation: self._operation,
            c.IoControl: self._io_control, c.TesterPresent: self._tester_present, c.Raw: self._raw,
            c.Obd: self._obd,
        }

    def execute(self, params: c.Params, deadline: float, addressing: str = c.PHYSICAL) -> Outcome:
        """Runs the command until done or `deadline` (monotonic seconds), physically or functionally."""
        try:
            if addressing == c.FUNCTIONAL:
                return Outcome.completed(self._functional.run(params, self.timing, deadline))
            return Outcome.completed(self._handlers[type(params)](params, deadline))
        except NegativeResponseError as nrc:
            return Outcome.failure(Status.FAILED, ErrorCode.NEGATIVE_RESPONSE, str(nrc),
                                   nrc=f"0x{nrc.code:02X}", nrc_name=nrc.name, service=f"0x{nrc.service:02X}")
        except (UdsTimeoutError, TransportTimeoutError) as err:
            return Outcome.failure(Status.TIMEOUT, ErrorCode.TIMEOUT, str(err))
        except BusDownError as err:
            return Outcome.failure(Status.FAILED, ErrorCode.BUS_ERROR, str(err))
        except (InvalidResponseError, obd.ObdResponseError) as err:  # the ECU's bad answer, not an agent bug
            return Outcome.failure(Status.FAILED, ErrorCode.INTERNAL, f"invalid response from ECU: {err}")
        except Exception as err:  # the executor's contract: a result, never an exception
            log.exception("executor failed on %s", self.ecu.name)
            return Outcome.failure(Status.FAILED, ErrorCode.INTERNAL, f"{type(err).__name__}: {err}")

    def probe(self) -> bool:
        """TesterPresent with a response: does the ECU answer right now?"""
        try:
            self._ask(services.TesterPresent.make_request(), time.monotonic() + min(self.timing.p2, self._budget))
        except (NegativeResponseError, InvalidResponseError):
            return True  # it answered, if not happily
        except (UdsTimeoutError, TransportTimeoutError, BusDownError):
            return False
        return True

    def keepalive(self) -> None:
        """Holds a non-default session (S3), and checks that the ECU is still in it.

        An ECU that reset on its own (power, watchdog) is back in its default session, and it answers
        TesterPresent there too: believing otherwise, the agent would keep it "alive" and hold its
        collection back for good. So the keepalive reads the session the ECU reports (DID 0xF186) and
        follows it; an ECU that does not answer two in a row has left the session as well. An ECU without that DID
        gets TesterPresent with suppressed positive response from then on.
        """
        fields = {"component": self.ecu.name, "session": self.session}
        if self._reports_session and self._keepalive_by_session_read(fields):
            return
        request = services.TesterPresent.make_request().get_payload(suppress_positive_response=True)
        try:
            self._transact(request, time.monotonic() + min(self.timing.p2, self._budget), wait_negative=False)
        except (BusDownError, TransportTimeoutError) as err:
            log.warning("keepalive to %s failed: %s", self.ecu.name, err, extra=fields)

    def _keepalive_by_session_read(self, fields: dict[str, object]) -> bool:
        """A keepalive that reads DID 0xF186 and follows the ECU back to its default session. False when
        TesterPresent must go out instead: the ECU answered it negatively, or too short to read."""
        # Silence ends the wait after P2; 0x78 extends it. Never past the component's command budget: P2 and P2*
        # are the ECU's to announce (up to 65 s and 655 s), and the worker's next command waits meanwhile.
        deadline = time.monotonic() + min(self.timing.p2_star, self._budget)
        try:
            data = self._transact(ACTIVE_SESSION, deadline)
        except NegativeResponseError as nrc:
            if nrc.code in _NO_SESSION_DID:
                self._reports_session = False
                log.info("ECU %s does not report its session (DID 0xF186: %s); keepalives are TesterPresent",
                         self.ecu.name, nrc, extra=fields)
        except (UdsTimeoutError, TransportTimeoutError) as err:
            self._keepalives_missed += 1
            if self._keepalives_missed < KEEPALIVES_MISSED_LOST:  # one lost frame does not end a session
                log.info("ECU %s did not answer a keepalive: %s", self.ecu.name, err, extra=fields)
                return True
            log.warning("ECU %s did not answer %d keepalives in a row (%s): taking it to be back in its "
                        "default session", self.ecu.name, self._keepalives_missed, err, extra=fields)
            self.session_lost()
            return True
        except (BusDownError, InvalidResponseError) as err:
            log.warning("keepalive to %s failed: %s", self.ecu.name, err, extra=fields)
            return True
        else:
            self._keepalives_missed = 0
            if data is not None and len(data) >= 4:
                # Only a fall back to the default session is followed: an OEM's odd 0xF186 format must
                # not put the agent into a session of its own invention (and hold collection for good).
                if data[3] == DEFAULT_SESSION:
                    log.warning("ECU %s reports session 0x%02X, not 0x%02X: it left the session on its own",
                                self.ecu.name, data[3], self.session, extra=fields)
                    self.session_lost()
                elif data[3] != self.session:
                    log.debug("ECU %s reports session 0x%02X for 0x%02X; kept", self.ecu.name, data[3],
                              self.session, extra=fields)
                return True
        return False

    # ---- session and security state: the same after a named command or a raw one -------------
    def _enter_session(self, session: int) -> None:
        if session != self.session or self.security_level != LOCKED:
            log.info("ECU %s in session 0x%02X", self.ecu.name, session,
                     extra={"component": self.ecu.name, "session": session})
        self.session = session
        self.security_level = LOCKED  # a session change relocks the ECU (ISO 14229-1)
        self._keepalives_missed = 0
        self.timing = Timing(self._base.p2, self._base.p2_star, self._base.busy_retries)

    def _apply_session_timing(self, response: Response) -> tuple[float, float]:
        """Reads the session response's timing record per the ECU's ISO 14229 edition (2006: none)."""
        data = interpret(services.DiagnosticSessionControl.interpret_response, response,
                         standard_version=self.ecu.uds_standard)
        if data.p2_server_max is None or data.p2_star_server_max is None:
            return self._base.p2, self._base.p2_star
        # The client waits at least what the config says, and at least what the server announces.
        self.timing = Timing(max(self._base.p2, data.p2_server_max + 0.05),
                             max(self._base.p2_star, data.p2_star_server_max + 0.05), self._base.busy_retries)
        return data.p2_server_max, data.p2_star_server_max

    def session_lost(self) -> None:
        """Back to the default session, locked (after a reset, or when the ECU stopped answering keepalives)."""
        self._enter_session(DEFAULT_SESSION)

    def _unlocked(self, level: int) -> None:
        self.security_level = level
        log.info("ECU %s unlocked at level %d", self.ecu.name, level,
                 extra={"component": self.ecu.name, "security_level": level})

    # ---- helpers -------------------------------------------------------------------------------
    def _discard(self, data: bytes) -> None:
        self.discarded += 1

    def _transact(self, request: bytes, deadline: float, wait_negative: bool = True,
                  accept: Callable[[bytes], object] | None = None) -> bytes | None:
        return transact(self.link, request, self.timing, deadline, wait_negative, accept=accept,
                        on_discard=self._discard)

    def _ask(self, request: Request, deadline: float) -> Response:
        data = self._transact(request.get_payload(), deadline)
        assert data is not None  # named commands never suppress the positive response
        response = parse_response(data)
        if not response.valid:
            raise InvalidResponseError(response.invalid_reason)
        return response

    # ---- one handler per command ---------------------------------------------------------------
    def _read_data(self, p: c.ReadData, deadline: float) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for group in did_groups(p.dids):
            config = {d.id: codecs.UdsoncanCodec(d) for d in group}
            ids = [d.id for d in group]
            taken: list[Any] = []  # what `read` made of each answer it accepted: the last is the one returned

            def read(data: bytes, ids: list[int] = ids, config: dict = config, taken: list[Any] = taken) -> None:
                response = parse_response(data)
                if not response.valid:
                    raise InvalidResponseError(response.invalid_reason)
                parsed = interpret(services.ReadDataByIdentifier.interpret_response, response, ids, config)
                if set(parsed.values) != set(ids):
                    got = ", ".join(f"0x{d:04X}" for d in parsed.values) or "none"
                    raise InvalidResponseError(f"response carries DIDs {got}, asked for "
                                               f"{', '.join(f'0x{d:04X}' for d in ids)}")
                taken.append(parsed)

            # An answer that echoes the first DID but not the rest may be a late one to a read of fewer DIDs:
            # `read` checks each answer as the exchange takes it, and its decoding is the result.
            self._transact(services.ReadDataByIdentifier.make_request(ids, config).get_payload(), deadline, accept=read)
            parsed = taken[-1]
            by_id = {d.id: d for d in group}
            for did, value in parsed.values.items():
                values[by_id[did].name] = value
        return {"values": {d.name: values[d.name] for d in p.dids if d.name in values}}

    def _write_data(self, p: c.WriteData, deadline: float) -> dict[str, Any]:
        request = services.WriteDataByIdentifier.make_request(p.did.id, p.payload, {p.did.id: _Encoded()})
        data = interpret(services.WriteDataByIdentifier.interpret_response, self._ask(request, deadline))
        expect_echo("DID", data.did_echo, p.did.id)
        return {}

    def _read_faults(self, p: c.ReadFaults, deadline: float) -> dict[str, Any]:
        return faults.read_faults(self._ask, self.ecu, p, deadline)

    def _read_fault_snapshot(self, p: c.ReadFaultSnapshot, deadline: float) -> dict[str, Any]:
        """`{"snapshots": ...}` or `{"snapshots_error": ...}` of one DTC: collection's one-request part."""
        entry: dict[str, Any] = {}
        faults.read_snapshots(self._ask, self.ecu, entry, p.dtc, deadline)
        return entry

    def _clear_faults(self, p: c.ClearFaults, deadline: float) -> dict[str, Any]:
        response = self._ask(services.ClearDiagnosticInformation.make_request(p.group), deadline)
        interpret(services.ClearDiagnosticInformation.interpret_response, response)
        return {}

    def _set_session(self, p: c.SetSession, deadline: float) -> dict[str, Any]:
        response = self._ask(services.DiagnosticSessionControl.make_request(p.session), deadline)
        self._enter_session(p.session)  # the ECU switched: the state follows before anything else is read
        try:
            p2, p2_star = self._apply_session_timing(response)
        except InvalidResponseError as err:
            standard = self.ecu.uds_standard
            raise InvalidResponseError(f"{err} (the ECU is in session 0x{p.session:02X}; an ISO 14229:2006 ECU "
                                       f"needs uds_standard: 2006, this one is configured {standard})") from err
        return {"session": p.name, "p2_ms": round(p2 * 1000), "p2_star_ms": round(p2_star * 1000)}

    def _reset(self, p: c.Reset, deadline: float) -> dict[str, Any]:
        response = self._ask(services.ECUReset.make_request(p.reset_type), deadline)
        interpret(services.ECUReset.interpret_response, response)
        self.session_lost()
        return {}

    def _security_access(self, p: c.SecurityAccess, deadline: float) -> dict[str, Any]:
        request = services.SecurityAccess.make_request(p.level, _SEED)
        seed = interpret(services.SecurityAccess.interpret_response, self._ask(request, deadline), _SEED).seed
        if seed and not any(seed):  # an all-zero seed means: already unlocked
            self._unlocked(p.level)
            return {"level": p.level, "unlocked": True}
        algorithm, params = self._algorithms[p.level]
        try:
            key = bytes(algorithm(p.level, seed, params))
        except Exception as err:  # the ECU's seed is input like any answer: a seed the algorithm cannot take
            log.warning("key algorithm for level %d of %s failed on the %d-byte seed %s", p.level, self.ecu.name,
                        len(seed), seed.hex(), exc_info=True, extra={"component": self.ecu.name})
            raise InvalidResponseError(f"the key algorithm for level {p.level} cannot take the ECU's {len(seed)}-byte "
                                       f"seed {seed.hex()}: {type(err).__name__}: {err}") from err
        response = self._ask(services.SecurityAccess.make_request(p.level, _KEY, key), deadline)
        interpret(services.SecurityAccess.interpret_response, response, _KEY)
        self._unlocked(p.level)
        return {"level": p.level, "unlocked": True}

    def _operation(self, p: c.Operation, deadline: float) -> dict[str, Any]:
        request = services.RoutineControl.make_request(p.routine_id, p.action, p.data or None)
        data = interpret(services.RoutineControl.interpret_response, self._ask(request, deadline))
        expect_echo("routine control type", data.control_type_echo, p.action)
        if data.routine_id_echo != p.routine_id:
            raise InvalidResponseError(f"response echoes routine 0x{data.routine_id_echo:04X}, "
                                       f"asked for 0x{p.routine_id:04X}")
        return {"status_record": data.routine_status_record.hex()}

    def _io_control(self, p: c.IoControl, deadline: float) -> dict[str, Any]:
        request = services.InputOutputControlByIdentifier.make_request(
            p.did.id, p.control, values=[p.payload] if p.payload else None, ioconfig={p.did.id: _Encoded()})
        data = interpret(services.InputOutputControlByIdentifier.interpret_response, self._ask(request, deadline),
                         p.control, ioconfig={p.did.id: codecs.UdsoncanCodec(p.did)})
        expect_echo("control parameter", data.control_param_echo, p.control)
        return {"values": {p.did.name: data.decoded_data}}

    def _tester_present(self, p: c.TesterPresent, deadline: float) -> dict[str, Any]:
        data = interpret(services.TesterPresent.interpret_response,
                         self._ask(services.TesterPresent.make_request(), deadline))
        expect_echo("sub-function", data.subfunction_echo, 0)
        return {}

    def _raw(self, p: c.Raw, deadline: float) -> dict[str, Any]:
        response = self._transact(p.request, deadline)
        self._follow_raw(p.request, response)
        if response is None:
            return {"response": "", "suppressed": True}
        return {"response": response.hex()}

    def _follow_raw(self, request: bytes, response: bytes | None) -> None:
        """Session and security state after a raw 0x10/0x11/0x27 the ECU accepted (None: suppressed answer)."""
        sid, sub = request[0], (request[1] & 0x7F if len(request) > 1 else None)
        if sub is None or sid not in (0x10, 0x11, 0x27):
            return
        if sid == 0x11:
            self.session_lost()
        elif sid == 0x10:
            self._enter_session(sub)
            if response is not None:
                try:
                    self._apply_session_timing(parse_response(response))
                except InvalidResponseError as err:
                    log.warning("session response of %s without usable timing (uds_standard %d): %s",
                                self.ecu.name, self.ecu.uds_standard, err, extra={"component": self.ecu.name})
        elif sub % 2 == 0:  # sendKey accepted
            self._unlocked(sub - 1)
        elif response is not None and len(response) > 2 and not any(response[2:]):  # zero seed: unlocked
            self._unlocked(sub)

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
        response = self._transact(request, deadline)
        assert response is not None  # OBD-II requests have no suppressPosRspMsgIndicationBit
        return response
