"""Property-based fuzzing of the intake (hypothesis): whatever arrives on the command topic, every message
gets exactly one final answer (or, without a readable id, an invalid_message count and event), and a
valid command sent after it is answered.

Two levels: the pure decode/parse/policy path with many examples (milliseconds each), and the real
agent behind a real Mosquitto, one burst per example. Example counts come from the settings profile
(conftest.py): modest in CI, `SOVD_FUZZ=deep` for a long run.
"""

from __future__ import annotations

import itertools
import json
import re
import uuid
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.bus.owner import wait_until
from agent.config.model import ALL_COMMANDS
from agent.fleet.caller import Caller
from agent.policy.admission import allows
from agent.wire import decode
from agent.wire.command import ErrorCode, Status
from agent.wire.messages import encode, refusal_message
from agent.wire.parse import InvalidCommandError, UnknownComponentError, parse_body, parse_envelope

COMMAND_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
BIG_INT = "@@BIG_INT@@"  # placeholders for what json.dumps cannot write
DEEP = "@@DEEP@@"
E2E_EXAMPLES = settings.default.max_examples
PURE_EXAMPLES = settings.default.max_examples * 20

# ---- strategies --------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 1e-320, 0.5, 7, 255, 256, 65535, 0x7F, 2**63, -(2**63) - 1]),
    st.text(max_size=40),  # includes lone surrogates: json.dumps escapes them, the agent reads them back
    st.sampled_from(["vin", "engine_speed", "0xF190", "0x", "0xZZ", "P0301", "extended", "start", "freeze",
                     "self_test", "high", "\ud800", "\udfff", "a\x00b", BIG_INT, DEEP, "x" * 3000]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)
PARAM_KEYS = ["data", "value", "status_mask", "snapshots", "extended", "group", "session", "type", "level",
              "routine", "action", "control", "request", "timeout_ms"]


@st.composite
def commands(draw: Any, command_id: str) -> dict[str, Any]:
    """A command object that is right, nearly right, or wrong in any field."""
    body: dict[str, Any] = {
        "id": draw(st.one_of(st.just(command_id), st.just(command_id), st.just(command_id), values)),
        "component": draw(st.one_of(st.sampled_from(["engine", "body", "gateway", "camera"]), values)),
        "command": draw(st.one_of(st.sampled_from([c for c in ALL_COMMANDS if c != "raw"]), values)),
    }
    if draw(st.booleans()):
        body["params"] = draw(st.one_of(
            st.dictionaries(st.sampled_from(PARAM_KEYS), values, max_size=4), values))
    for key in ("timeout_ms", "expires_at", "reply_to", "progress", draw(st.text(max_size=8))):
        if draw(st.integers(0, 5)) == 0:
            body[key] = draw(values) if key != "timeout_ms" else draw(st.one_of(st.integers(1, 1500), values))
    if draw(st.integers(0, 4)) == 0:
        del body[draw(st.sampled_from(sorted(body)))]
    return body


def to_payload(body: Any, depth: int) -> bytes:
    text = json.dumps(body)  # NaN, Infinity and \\udXXX come out as JSON text the agent must refuse
    text = text.replace(json.dumps(BIG_INT), "1" * 4400).replace(json.dumps(DEEP), "[" * depth + "]" * depth)
    return text.encode()


@st.composite
def payloads(draw: Any, command_id: str) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        whole = to_payload(draw(commands(command_id)), 20)
        return whole[:draw(st.integers(0, len(whole)))]  # cut anywhere
    if kind == 2:
        return to_payload(draw(values), draw(st.integers(1, 40)))
    return to_payload(draw(commands(command_id)), draw(st.integers(1, 60)))


def readable_id(payload: bytes) -> str | None:
    """What a backend can know of a payload's id, read independently of the agent's decoder: the protocol
    answers whenever an id can be read, so bytes that are not UTF-8 elsewhere or a leading byte order mark
    do not hide it; an id given twice is no id."""
    def unique(pairs: list) -> dict:
        keys = [k for k, _ in pairs]
        return {k: (None if k == "id" and keys.count(k) > 1 else v) for k, v in pairs}

    try:
        body = json.loads(payload.decode("utf-8", "replace").removeprefix("\ufeff"), parse_int=lambda s: 0,
                          parse_float=lambda s: 0.0, parse_constant=lambda s: 0.0, object_pairs_hook=unique)
    except (ValueError, RecursionError):
        return None
    command_id = body.get("id") if isinstance(body, dict) else None
    return command_id if isinstance(command_id, str) and COMMAND_ID.fullmatch(command_id) else None


# ---- the pure path -----------------------------------------------------------------------------

@settings(max_examples=PURE_EXAMPLES)
@given(data=st.data())
def test_decode_parse_and_policy_raise_nothing_but_their_own_errors(vehicle, data):
    payload = data.draw(payloads("c-1"))
    body = decode.decode_command(payload)
    if isinstance(body, decode.Undecodable):
        assert body.command_id in (None, readable_id(payload))
        reply = refusal_message("c-1", {}, Status.REJECTED, ErrorCode.INVALID_COMMAND, body.reason, 0.0,
                                field=body.field)
        assert len(encode(reply)) < 4096
        return
    try:
        envelope = parse_envelope(body, vehicle)
        if allows(envelope.ecu, envelope.command):
            parse_body(envelope, 0.0)
    except (InvalidCommandError, UnknownComponentError) as err:
        reply = refusal_message("c-1", body, Status.REJECTED, ErrorCode.INVALID_COMMAND, str(err), 0.0)
        assert len(encode(reply)) < 4096
    encode(body)  # what passed decode can always be written to the ledger and echoed


# ---- the real agent ----------------------------------------------------------------------------

def answers(backend, command_id: str, final: bool = True) -> list[dict[str, Any]]:
    """The agent's replies for an id on any topic: a fuzzed `reply_to` may name any topic at all."""
    found = []
    for seen in list(backend.seen):
        if seen.topic.endswith("/commands"):
            continue
        try:
            body = json.loads(seen.payload)
        except ValueError:
            continue
        if isinstance(body, dict) and body.get("id") == command_id and "status" in body and \
                (not final or body.get("final") is True):
            found.append(body)
    return found


def test_every_message_gets_one_answer_and_the_agent_keeps_serving(service, backend, mqtt_vehicle):
    with Caller(mqtt_vehicle.mqtt, mqtt_vehicle.vehicle) as everything:
        everything.subscribe("#")  # one subscription: every message once, whatever topic it went to
        fuzz_bursts(service, backend, everything)


def fuzz_bursts(service, backend, everything) -> None:
    counter = itertools.count()
    expected_finals: set[str] = set()

    def no_id_count() -> int:
        return sum(n for reason, n in service.intake.stats.invalid.items() if reason != "invalid_command")

    @settings(max_examples=E2E_EXAMPLES)
    @given(data=st.data())
    def burst(data):
        run = uuid.uuid4().hex[:8]
        sent, ids = [], []
        for _ in range(data.draw(st.integers(1, 6))):
            payload = data.draw(payloads(f"fz-{run}-{next(counter):06d}"))  # fixed width: same draws, same bounds
            command_id = readable_id(payload)
            if command_id is not None and (command_id in expected_finals or command_id in ids):
                continue  # a repeated id is a duplicate, tested elsewhere: keep one answer per id here
            sent.append(payload)
            ids.append(command_id)
        sentinel = f"sentinel-{run}"
        before = no_id_count()
        backend.send_all([*sent, json.dumps({"id": sentinel, "component": "body", "command": "tester_present"})
                          .encode()])
        # answered, and run: intake took it (under CPU load the ECU may miss its 150 ms P2: `timeout` still ran)
        assert backend.final(sentinel, timeout=20)["status"] in ("completed", "timeout")
        for command_id in ids:
            if command_id is not None:
                assert wait_until(lambda c=command_id: answers(everything, c), 20), f"no final answer for {command_id}"
                expected_finals.add(command_id)
        no_ids = sum(1 for command_id in ids if command_id is None)
        assert wait_until(lambda: no_id_count() - before == no_ids, 10), (no_id_count() - before, no_ids)

    burst()
    assert service.intake.stats.errors == {}, service.intake.stats.errors
    assert service.link.stats.reconnects == 0  # nothing it published made the broker drop it
    assert wait_until(lambda: all(w.depth == 0 and w.in_flight is None for w in service.runtime.workers.values()),
                      20)
    for command_id in expected_finals:
        finals = answers(everything, command_id)
        assert len(finals) == 1, (command_id, finals)
        assert "duplicate" not in finals[0]
    # what hostile input costs the ledger: an id and its outcome, never its body (issue 10 item 9)
    assert service.store.ledger_bytes() < 2048 * (len(expected_finals) + 10)
