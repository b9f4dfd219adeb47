"""Functional requests of one component: one request on its functional id, every answering ECU's
result keyed by responder (component name where its response id is configured, else CAN id).

Used by the component's Executor on its worker thread, for the commands that may go out functionally
(`read_data`, `tester_present`, `obd`, raw reads; the parser refuses the rest). One ECU's refusal or
bad answer becomes that ECU's `error` entry; only nobody answering at all fails the command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from udsoncan import services

from agent.config.model import EcuConfig
from agent.uds.answers import did_groups, error_fields, interpret
from agent.uds.functional_exchange import FunctionalPort, collect_answers
from agent.uds.response import parse as parse_response
from agent.uds.transaction import (
    NEGATIVE_RESPONSE,
    Discarded,
    InvalidResponseError,
    NegativeResponseError,
    Timing,
    UdsTimeoutError,
    suppresses_positive,
)
from agent.wire import codecs, obd
from agent.wire import command as c


class FunctionalRequests:
    """Turns one command into functional requests and the answers into `{"responses": {...}}`."""

    def __init__(self, ecu: EcuConfig, link: FunctionalPort | None, on_discard: Discarded | None = None) -> None:
        self.ecu = ecu
        self.link = link
        self._on_discard = on_discard

    def run(self, p: c.Params, timing: Timing, deadline: float) -> dict[str, Any]:
        """The command's result; raises what `transaction` raises (the executor turns it into an outcome)."""
        if self.link is None:
            raise InvalidResponseError(f"{self.ecu.name} has no functional_id: functional requests cannot go out")
        if isinstance(p, c.ReadData):
            return {"responses": self._read(p, timing, deadline)}
        if isinstance(p, c.Obd):
            return {"responses": self._obd(p, timing, deadline)}
        if isinstance(p, c.TesterPresent):
            request = services.TesterPresent.make_request().get_payload()
        elif isinstance(p, c.Raw):
            request = p.request
        else:
            raise InvalidResponseError(f"{type(p).__name__} cannot be sent functionally")
        entries: dict[str, dict[str, Any]] = {}
        for key, data in self._collect(request, timing, deadline, entries).items():
            if data[0] == NEGATIVE_RESPONSE:
                entries[key] = {"error": error_fields(NegativeResponseError(request[0], data[2]))}
            else:
                entries[key] = {"response": data.hex()} if isinstance(p, c.Raw) else {}
        return {"responses": entries}

    def _collect(self, request: bytes, timing: Timing, deadline: float, entries: dict[str, dict[str, Any]],
                 accept: Callable[[bytes], object] | None = None) -> dict[str, bytes]:
        """Every ECU's final answer; an ECU whose answer broke off under way gets a `timeout` error in
        `entries`, one whose refusal has no NRC byte an invalid-response error (unless an earlier request
        of the same command already gave it one)."""
        assert self.link is not None
        collected = collect_answers(self.link, request, timing, deadline, on_discard=self._on_discard, accept=accept)
        answers = collected.answers
        if not answers and not collected.lost and not suppresses_positive(request):
            raise UdsTimeoutError(f"no ECU answered functional request 0x{request[0]:02X} within P2 "
                                  f"({timing.p2 * 1000:.0f} ms)")
        for key, why in collected.lost.items():
            entries.setdefault(key, {}).setdefault("error", error_fields(
                UdsTimeoutError(f"answer to 0x{request[0]:02X} broke off under way: {why}")))
        for key, data in list(answers.items()):
            if data[0] == NEGATIVE_RESPONSE and len(data) < 3:  # no NRC byte: an invalid answer, as physically
                del answers[key]
                entries.setdefault(key, {}).setdefault("error", error_fields(
                    InvalidResponseError(f"truncated negative response {data.hex()}")))
        return answers

    def _read(self, p: c.ReadData, timing: Timing, deadline: float) -> dict[str, Any]:
        entries: dict[str, dict[str, Any]] = {}
        for group in did_groups(p.dids):
            config = {d.id: codecs.UdsoncanCodec(d) for d in group}
            ids = [d.id for d in group]
            request = services.ReadDataByIdentifier.make_request(ids, config).get_payload()

            accepted: dict[bytes, Any] = {}  # each accepted answer's decoding: an answer is decoded once

            def read(data: bytes, ids: list[int] = ids, config: dict = config,
                     accepted: dict[bytes, Any] = accepted) -> Any:
                parsed = interpret(services.ReadDataByIdentifier.interpret_response, parse_response(data), ids, config)
                if set(parsed.values) != set(ids):
                    raise InvalidResponseError("the answer does not carry every DID asked for")
                accepted[data] = parsed
                return parsed

            # An answer that echoes the first DID but not the rest may be a late one to a read of fewer DIDs.
            for key, data in self._collect(request, timing, deadline, entries, accept=read).items():
                entry = entries.setdefault(key, {})
                entry.setdefault("values", {})
                try:
                    if data[0] == NEGATIVE_RESPONSE:
                        raise NegativeResponseError(request[0], data[2])
                    parsed = accepted[data] if data in accepted else read(data)  # read raises on a set-aside one
                except (NegativeResponseError, InvalidResponseError) as err:
                    entry.setdefault("error", error_fields(err))
                    continue
                by_id = {d.id: d for d in group}
                entry["values"].update({by_id[did].name: value for did, value in parsed.values.items()})
        for entry in entries.values():
            got = entry.get("values", {})
            entry["values"] = {d.name: got[d.name] for d in p.dids if d.name in got}
            if "error" in entry and not entry["values"]:
                del entry["values"]
        return entries

    def _obd(self, p: c.Obd, timing: Timing, deadline: float) -> dict[str, Any]:
        """Each request of the `obd` command once, functionally; every answering ECU gets its own result."""
        entries: dict[str, dict[str, Any]] = {}
        for part, request in obd.plan(p.pids, p.info, p.dtcs):
            for key, data in self._collect(request, timing, deadline, entries).items():
                entry = entries.setdefault(key, {})
                if "error" in entry:
                    continue
                try:
                    if data[0] == NEGATIVE_RESPONSE:
                        raise NegativeResponseError(request[0], data[2])
                    obd.interpret(part, request, data, entry, self.ecu.dtc_texts)
                except NegativeResponseError as err:
                    entry["error"] = error_fields(err)
                except obd.ObdResponseError as err:
                    entry["error"] = error_fields(InvalidResponseError(str(err)))
        return {key: {k: entry[k] for k in ("values", "unsupported", "info", "dtcs", "error") if k in entry}
                for key, entry in entries.items()}
