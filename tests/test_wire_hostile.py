"""Hostile payloads against the pure wire layer: decode refuses what no field can hold, with the field
path; parsing never raises anything but its own errors; error messages never repeat a huge value."""

import json

import pytest

from agent.config.model import DidSpec
from agent.fleet.topics import is_publishable
from agent.policy.admission import Admission, allows
from agent.wire import codecs
from agent.wire.command import ErrorCode, Status
from agent.wire.decode import MAX_DEPTH, Undecodable, decode_command
from agent.wire.messages import MAX_ERROR_TEXT, encode, in_flight_duplicate, refusal_message
from agent.wire.parse import InvalidCommandError, UnknownComponentError, parse_body, parse_envelope


def raw(text: str) -> bytes:
    return text.encode()


DEEP = '{"id": "deep", "component": "engine", "command": "read_data", "params": {"data": ' + "[" * 990 + \
    "]" * 990 + "}}"


@pytest.mark.parametrize(("payload", "field", "why", "command_id"), [
    (raw('{"id": "a", "timeout_ms": ' + "1" * 4400 + "}"), "timeout_ms", "4400 digits", "a"),
    (raw('{"id": "a", "timeout_ms": 9223372036854775808}'), "timeout_ms", "does not fit 64 bits", "a"),
    (raw('{"id": "a", "timeout_ms": -9223372036854775809}'), "timeout_ms", "does not fit 64 bits", "a"),
    (raw('{"id": "a", "command": "\\ud800"}'), "command", "lone surrogate", "a"),
    (raw('{"id": "a", "component": "\\udfff"}'), "component", "lone surrogate", "a"),
    (raw('{"id": "a", "reply_to": "x/\\ud800"}'), "reply_to", "lone surrogate", "a"),
    (raw('{"id": "\\ud800"}'), "id", "lone surrogate", None),
    (raw('{"id": "a", "params": {"\\ud800": 1}}'), "params.\\ud800", "key contains a lone surrogate", "a"),
    (raw('{"id": "a", "params": {"value": Infinity}}'), "params.value", "Infinity", "a"),
    (raw('{"id": "a", "params": {"value": -Infinity}}'), "params.value", "-Infinity", "a"),
    (raw('{"id": "a", "params": {"value": NaN}}'), "params.value", "NaN", "a"),
    (raw('{"id": "a", "params": {"value": 1e999}}'), "params.value", "not a finite number", "a"),
    (raw('{"id": "a", "params": {"data": ["vin", -1e400]}}'), "params.data[1]", "not a finite number", "a"),
    (raw(DEEP), "params.data" + "[0]" * (MAX_DEPTH - 2), f"deeper than {MAX_DEPTH}", "deep"),
    # a key twice is ambiguous (json keeps the last, other parsers the first): refused, never guessed
    (raw('{"id": "a", "command": "read_data", "command": "reset"}'), "command", "more than once", "a"),
    (raw('{"id": "a", "params": {"data": "vin", "data": "oil_temp"}}'), "params.data", "more than once", "a"),
    (raw('{"id": "a", "id": "b"}'), "id", "more than once", None),
])
def test_decode_refuses_what_no_field_can_hold(payload, field, why, command_id):
    result = decode_command(payload)
    assert isinstance(result, Undecodable), result
    assert result.field == field and why in result.reason and result.command_id == command_id
    assert len(result.reason) < 400


def test_an_id_is_read_from_a_payload_that_is_not_utf8_or_starts_with_a_byte_order_mark():
    """The protocol answers `rejected`/`invalid_command` whenever an id can be read; these were events."""
    not_utf8 = decode_command(b'{"id": "u-1", "component": "engine", "note": "\xff"}')
    assert isinstance(not_utf8, Undecodable) and not_utf8.command_id == "u-1" and "not UTF-8" in not_utf8.reason
    bom = decode_command(b'\xef\xbb\xbf{"id": "b-1", "component": "engine"}')
    assert isinstance(bom, Undecodable) and bom.command_id == "b-1" and "byte order mark" in bom.reason
    assert decode_command(b'{"id": "\xff\xfe"}').command_id is None  # the id itself is what is broken
    assert decode_command(b'\xef\xbb\xbf[' * 3).command_id is None


def test_decode_keeps_what_is_fine():
    body = decode_command(raw('{"id": "ok", "params": {"value": 1.5e300, "n": -9223372036854775808, '
                              '"s": "\\ud83d\\ude00 ä"}}'))
    assert body == {"id": "ok", "params": {"value": 1.5e300, "n": -(1 << 63), "s": "😀 ä"}}


def test_decode_of_a_deep_but_legal_command_and_of_runaway_brackets():
    legal = {"id": "x", "params": {"data": [[[[1]]]]}}
    assert decode_command(json.dumps(legal).encode()) == legal
    assert "not JSON" in decode_command(b"[" * 60_000).reason  # unbalanced: no structure, no id read from it
    balanced = decode_command(b'{"id": "b", "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}")
    assert "deeper than" in balanced.reason and balanced.command_id == "b"
    truncated = decode_command(b'{"id": "t", "x": ' + b"[" * 30_000 + b"]" * 29_999 + b"}")
    assert "not JSON" in truncated.reason and truncated.command_id is None


def test_several_problems_are_named_briefly():
    payload = {"id": "many", **{f"k{i}": "\ud800" for i in range(50)}}
    result = decode_command(json.dumps(payload).encode())  # json.dumps escapes the surrogates
    assert isinstance(result, Undecodable) and result.command_id == "many"
    assert "(and more)" in result.reason and len(result.reason) < 400


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e308, -1e308, 10**400, 2**63])
def test_number_codec_refuses_what_overflows(value):
    spec = DidSpec("x", 1, "unsigned", 2, scale=0.25)
    with pytest.raises(ValueError, match="outside"):
        codecs.encode(spec, value)


def command(**fields):
    body = {"id": "c-1", "component": "engine", "command": "read_data", "params": {"data": "vin"}}
    body.update(fields)
    return body


def test_policy_is_asked_before_params_are_read(vehicle):
    """A write_data the component does not allow, with a value no codec could encode: the envelope
    parses, policy says no, and the params are never looked at."""
    envelope = parse_envelope(command(component="body", command="write_data",
                                      params={"data": "vin", "value": 1e308}), vehicle)
    assert not allows(envelope.ecu, envelope.command)
    assert Admission.NOT_PERMITTED.refusal("body", "write_data").error.code == ErrorCode.NOT_PERMITTED
    allowed = parse_envelope(command(command="write_data", params={"data": "engine_speed", "value": 1e308}),
                             vehicle)
    with pytest.raises(InvalidCommandError) as info:
        parse_body(allowed, 0.0)
    assert info.value.problems[0][0] == "params.value" and "outside" in str(info.value)


@pytest.mark.parametrize(("fields", "field"), [
    ({"command": "operation", "params": {"routine": "self_test", "action": []}}, "params.action"),
    ({"command": "operation", "params": {"routine": "self_test", "action": {"a": 1}}}, "params.action"),
    ({"command": "io_control", "params": {"data": "vin", "control": [1]}}, "params.control"),
    ({"command": "set_session", "params": {"session": ["extended"]}}, "params.session"),
    ({"params": {"data": "x" * 60_000}}, "params.data"),
    ({"command": "clear_faults", "params": {"group": "P" + "9" * 60_000}}, "params.group"),
    ({"params": "not an object"}, "params"),
])
def test_unhashable_or_huge_values_are_invalid_not_crashes(vehicle, fields, field):
    with pytest.raises(InvalidCommandError) as info:
        parse_body(parse_envelope(command(**fields), vehicle), 0.0)
    assert info.value.problems[0][0] == field
    assert len(str(info.value)) < 400  # the bad value is not repeated in full


def test_unknown_keys_by_the_thousand_make_a_short_message(vehicle):
    with pytest.raises(InvalidCommandError) as info:
        parse_envelope({**command(), **{f"key{i}" + "x" * 1000: 1 for i in range(1000)}}, vehicle)
    assert len(info.value.problems) == 1000 and "(and 995 more)" in str(info.value)
    assert len(str(info.value)) < 1000


def test_unknown_component_is_a_refusal_with_a_short_name(vehicle):
    with pytest.raises(UnknownComponentError) as info:
        parse_envelope(command(component="w" * 128), vehicle)
    assert len(str(info.value)) < 200
    outcome = Admission.UNKNOWN_COMPONENT.refusal("warp", "read_data")
    assert outcome.status == Status.REJECTED and outcome.error.code == ErrorCode.UNKNOWN_COMPONENT


def test_refusal_messages_are_clipped_and_encodable():
    message = refusal_message("c-1", {"component": "x" * 10_000}, Status.REJECTED, ErrorCode.INVALID_COMMAND,
                              "bad: " + "v" * 100_000, 0.0, field="f" * 10_000)
    assert len(message["error"]["message"]) < MAX_ERROR_TEXT + 64 and len(message["error"]["field"]) < 600
    assert "component" not in message  # a name no config could hold is not echoed
    assert len(encode(message)) < 2048


def test_in_flight_duplicate_is_the_accepted_message_again():
    message = in_flight_duplicate("c-1", {"component": "engine", "command": "read_data"}, 0.0)
    assert message == {"id": "c-1", "component": "engine", "command": "read_data", "status": "accepted",
                       "final": False, "seq": 1, "received_at": "1970-01-01T00:00:00.000Z", "duplicate": True}
    assert ErrorCode.BUSY.transient and ErrorCode.STORAGE_UNAVAILABLE.transient
    assert not ErrorCode.INVALID_COMMAND.transient and not ErrorCode.NOT_PERMITTED.transient


@pytest.mark.parametrize("reply_to", ["r/\x01", "r/\x7f", "r/\u0085", "r/\ufdd0", "r/\uffff", "r/\U0010fffe",
                                      "r/+", "r/#", "r/\x00", "x" * 65536, "$SYS/x", "$share/g/r"])
def test_a_reply_topic_a_broker_would_refuse_is_invalid(vehicle, reply_to):
    """Mosquitto drops the connection of a client publishing to such a topic: answering there would
    make the outbox resend the answer forever, reconnecting each time (found by the fuzz run)."""
    with pytest.raises(InvalidCommandError) as info:
        parse_envelope(command(reply_to=reply_to), vehicle)
    assert info.value.problems[0][0] == "reply_to"
    assert not is_publishable(reply_to)


def test_a_reply_topic_in_any_script_is_fine(vehicle):
    assert parse_envelope(command(reply_to="backend/Antwort/ä/東京/🚗"), vehicle).reply_to.endswith("🚗")
