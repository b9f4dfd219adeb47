"""Signed commands and the audit log end to end: real Mosquitto, the agent in-process (so the simulator's
counters prove what ran), keys made at test time. Every message the agent publishes is validated against
docs/asyncapi.yaml by the `backend` fixture."""

import base64
import dataclasses
import json
import logging
import os
import time
import uuid

import pytest
from signing_support import expires_in, make_keys, security

from agent.bus.owner import wait_until
from agent.clock import Clock
from agent.store.audit import AUDIT_FILE, read_records
from agent.system.service import Service
from agent.wire.timefmt import parse_rfc3339

MUTATING = [
    ("set_session", {"session": "extended"}),
    ("security_access", {"level": 1}),
    ("write_data", {"data": "idle_mode", "value": "high"}),
    ("operation", {"routine": "self_test", "action": "start"}),
    ("operation", {"routine": "0x9999", "action": "start"}),  # the ECU refuses it: NRC 0x31
    ("io_control", {"data": "engine_speed", "control": "freeze"}),
    ("raw", {"request": "22F40D"}),
    ("clear_faults", {}),
    ("reset", {"type": "soft"}),
]
READ_ONLY = [("read_data", {"data": "vin"}), ("read_faults", {}), ("tester_present", {})]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"), "backend-1", "backend-2", "workshop", "stranger")


def signed_config(config, keys, *key_ids, **fields):
    limits = {"workshop": {"commands": ["read_data", "read_faults", "clear_faults"], "components": ["engine"]}}
    chosen = [keys[k].config(**limits.get(k, {})) for k in key_ids]
    return dataclasses.replace(config, security=security(*chosen, **fields))


@pytest.fixture
def signed_vehicle(mqtt_vehicle, keys):
    # the engine opts in to undeclared routine ids, so that routine 0x9999 reaches the ECU and is refused there
    ecus = tuple(dataclasses.replace(e, allow_undeclared_ids=True) if e.name == "engine" else e
                 for e in mqtt_vehicle.ecus)
    return signed_config(dataclasses.replace(mqtt_vehicle, ecus=ecus), keys, "backend-1", "backend-2", "workshop")


def start(config, backend, clock=None):
    """The agent, once its subscription is in place (it subscribes before it publishes `online`)."""
    svc = Service(config, clock=clock)
    svc.start()
    assert svc.link.wait_connected(10), svc.link.last_error
    backend.wait_for(lambda s: s.topic == backend.topics.status and s.json().get("state") == "online"
                     and s.at >= svc.started_at, 10)
    return svc


@pytest.fixture
def signed(signed_vehicle, sim, backend):
    svc = start(signed_vehicle, backend)
    yield svc
    svc.stop()


def command(name="clear_faults", params=None, component="engine", expires=60, **fields):
    body = {"id": f"s-{uuid.uuid4().hex[:10]}", "component": component, "command": name,
            "params": {} if params is None else params, **fields}
    if expires is not None:
        body["expires_at"] = expires_in(expires)
    return body


def failures(svc, reason):
    return svc.registry.get_sample_value("sovd_authentication_failures_total", {"reason": reason})


def barrier(backend, topic="replies/chosen"):
    """A read answered on `topic`: whatever the agent published before it has arrived by then."""
    body = command("read_data", {"data": "vin"}, expires=None)
    backend.send(body, response_topic=topic)
    backend.final(body["id"], topic=topic)


# ---- accepted ---------------------------------------------------------------------------------------------

def test_signed_mutating_command_runs(signed, backend, sim, keys):
    body = command()
    backend.send(keys["backend-1"].sign(body), response_topic="replies/signed")
    final = backend.final(body["id"], topic="replies/signed")  # a signed command's Response Topic is honoured
    assert final["status"] == "completed"
    assert sim.ecu("engine").server.executed[0x14] == 1
    assert signed.store.get(body["id"]).signer == "backend-1"


def test_unsigned_reads_still_run_under_mutating(signed, backend, sim):
    for name, params in READ_ONLY:
        body = command(name, params, expires=None)
        backend.send(body)
        assert backend.final(body["id"])["status"] == "completed", name


# ---- refused: one test per reason, each on the default topic, nothing run, nothing remembered ---------------

def refusal_cases(keys):
    """(reason, the inner command, the payload sent, key id named, rule named): one fresh id per case."""
    def tampered():
        body = command()
        envelope = json.loads(keys["backend-1"].sign(body))
        envelope["sig"] = json.loads(keys["backend-2"].sign(body))["sig"]  # backend-2's signature, named backend-1
        return body, json.dumps(envelope).encode()

    def by(key_id, body):
        return body, keys[key_id].sign(body)

    plain = command()
    cases = [
        ("missing", plain, json.dumps({**plain, "reply_to": "replies/chosen"}).encode(), None, None),
        ("unknown_key", *by("stranger", command()), "stranger", None),
        ("bad_signature", *tampered(), "backend-1", None),
        ("expired", *by("backend-1", command(expires=-5)), "backend-1", None),
        ("expired", *by("backend-1", command(expires=3 * 3600)), "backend-1", "security.max_expiry_ahead_s"),
        ("expired", *by("backend-1", command(expires=None)), "backend-1", None),
        ("not_allowed", *by("workshop", command("reset", {"type": "soft"})), "workshop",
         "security.keys.workshop.commands"),
        ("not_allowed", *by("workshop", command(component="body")), "workshop", "security.keys.workshop.components"),
    ]
    return cases


def test_each_refusal_reason(signed, backend, sim, keys, caplog):
    cases = refusal_cases(keys)
    with caplog.at_level(logging.WARNING, logger="agent.fleet.signed"):
        for reason, body, payload, key_id, rule in cases:
            before = failures(signed, reason)
            backend.send(payload, response_topic="replies/chosen", correlation=b"c")
            final = backend.final(body["id"])  # the default topic, whatever reply topic the message chose
            error = final["error"]
            assert (final["status"], error["code"], error["reason"]) == ("rejected", "unauthenticated", reason), final
            assert error.get("key_id") == key_id and error.get("rule") == rule
            assert failures(signed, reason) == before + 1
            assert signed.store.get(body["id"]) is None  # not remembered
    barrier(backend)
    ids = {body["id"] for _, body, *_ in cases}
    assert not [s for s in backend.seen if s.topic.startswith("replies/") and json.loads(s.payload)["id"] in ids]
    assert sim.ecu("engine").received[0x14] == sim.ecu("engine").received[0x11] == 0
    assert sim.ecu("body").received[0x14] == 0
    warned = {(r.reason, r.key_id) for r in caplog.records if r.name == "agent.fleet.signed"}
    assert warned == {("missing", ""), ("unknown_key", "stranger"), ("bad_signature", "backend-1"),
                      ("expired", "backend-1"), ("not_allowed", "workshop")}
    assert signed.registry.get_sample_value("sovd_rejected_messages_total", {"reason": "unauthenticated"}) == \
        len(cases)


def test_a_refused_message_does_not_claim_its_id(signed, backend, sim, keys):
    body = command()
    backend.send(body)  # unsigned: refused
    assert backend.final(body["id"])["error"]["reason"] == "missing"
    backend.send(keys["backend-1"].sign(body))  # the genuine command with the same id still runs
    backend.wait_for(lambda s: s.topic == backend.topics.responses(body["id"]) and b'"completed"' in s.payload, 10)
    assert sim.ecu("engine").server.executed[0x14] == 1


def test_roles_a_workshop_key_may_clear_faults_but_not_reset(signed, backend, sim, keys):
    clear = command()
    backend.send(keys["workshop"].sign(clear))
    assert backend.final(clear["id"])["status"] == "completed"
    reset = command("reset", {"type": "hard"})
    backend.send(keys["workshop"].sign(reset))
    refused = backend.final(reset["id"])["error"]
    assert refused["reason"] == "not_allowed" and "may not sign reset" in refused["message"]
    assert (sim.ecu("engine").server.executed[0x14], sim.ecu("engine").received[0x11]) == (1, 0)


# ---- replay ---------------------------------------------------------------------------------------------

def test_replay_of_a_captured_envelope(signed, backend, sim, keys):
    body = command(expires=2)
    expiry = time.time() + 2
    captured = keys["backend-1"].sign(body)
    backend.send(captured)
    assert backend.final(body["id"])["status"] == "completed"
    backend.send(captured)  # same id: the final again, marked duplicate, never a second run
    topic = backend.topics.responses(body["id"])
    backend.wait_for(lambda s: s.topic == topic and b'"duplicate"' in s.payload, 10)
    assert wait_until(lambda: time.time() > expiry + 0.05, 5)
    backend.send(captured)  # after its expiry: refused (counted; not answered, the id is held)
    assert wait_until(lambda: failures(signed, "expired") == 1, 10)
    barrier(backend)
    assert [r["status"] for r in backend.replies(body["id"])] == ["accepted", "completed", "completed"]
    assert sim.ecu("engine").server.executed[0x14] == 1


def test_a_flood_of_plain_messages_cannot_evict_a_signed_id_before_its_expiry(signed_vehicle, sim, backend, keys):
    """Review defect: unsigned messages (reads allowed plain under `mutating`, invalid ones remembered as
    rejected) pushed the ledger over store.ledger_max_bytes, its bound forgot the signed command's id inside
    its expires_at window, and the captured envelope ran again. The bound forgets the flood, not that id."""
    config = dataclasses.replace(signed_vehicle, store=dataclasses.replace(signed_vehicle.store,
                                                                           ledger_max_bytes=64 * 1024))
    svc = start(config, backend)
    try:
        body = command(expires=600)
        captured = keys["backend-1"].sign(body)
        backend.send(captured)
        assert backend.final(body["id"])["status"] == "completed"
        for _ in range(12):  # each remembers an 8 KiB result: together over the bound
            read = command("read_data", {"data": "big_block"}, expires=None)
            backend.send(read)
            assert backend.final(read["id"])["status"] == "completed"
        invalid = [json.dumps({"id": f"f-{i:04d}-{uuid.uuid4().hex[:8]}", "component": "engine",
                               "command": "read_data", "timeout_ms": "z" * 3000}).encode() for i in range(100)]
        backend.send_all(invalid)
        backend.final(json.loads(invalid[-1])["id"])
        svc.outbox.maintain()  # what the outbox thread does every minute
        assert svc.outbox.ledger_dropped >= 100 and svc.store.ledger_bytes() <= 64 * 1024
        assert svc.store.get(body["id"]) is not None
        backend.send(captured)  # the replay, well inside expires_at: the first final again, nothing run
        topic = backend.topics.responses(body["id"])
        backend.wait_for(lambda s: s.topic == topic and b'"duplicate"' in s.payload, 10)
        assert sim.ecu("engine").server.executed[0x14] == 1
        assert svc.registry.get_sample_value("sovd_ledger_over_bound") == 0
    finally:
        svc.stop()


def test_how_long_the_ledger_holds_an_id_that_ran(signed, backend, keys):
    """A signed command's id is held until its expires_at; a plain command's for at most
    security.max_expiry_ahead_s (else plain commands with far expiries could hold the ledger past its bound)."""
    signed_body, plain, forever = command(expires=600), command("read_data", {"data": "vin"}, expires=600), \
        command("read_data", {"data": "vin"}, expires=None, expires_at="9999-12-31T23:59:59Z")
    for payload, body in ((keys["backend-1"].sign(signed_body), signed_body), (plain, plain), (forever, forever)):
        backend.send(payload)
        assert backend.final(body["id"])["status"] == "completed"
    held = {b["id"]: signed.store.get(b["id"]) for b in (signed_body, plain, forever)}
    assert held[signed_body["id"]].keep_until == held[signed_body["id"]].expires_at
    assert held[plain["id"]].keep_until == held[plain["id"]].expires_at
    entry = held[forever["id"]]
    assert entry.keep_until == entry.received_at + signed.config.security.max_expiry_ahead_s


def test_a_signed_command_the_policy_refuses_is_held_until_its_signed_expiry(signed, backend, keys):
    """Review note: refused at intake, it was remembered without its signer or expiry, so the byte bound
    forgot it first; after a policy change the captured envelope, replayed inside expires_at, would have
    run though the backend was told it was refused. Held like any signed id now (store: bounds)."""
    body = command("write_data", {"data": "vin", "value": "X" * 17}, component="body", expires=600)
    backend.send(keys["backend-1"].sign(body))
    assert backend.final(body["id"])["error"]["code"] == "not_permitted"
    entry = signed.store.get(body["id"])
    assert entry.signer == "backend-1" and entry.keep_until == pytest.approx(parse_rfc3339(body["expires_at"]))


def test_an_expires_at_that_cannot_be_represented_is_an_invalid_command_signed_or_not(signed, backend, sim, keys):
    """Review defect: a validly signed command with expires_at "0001-01-01T00:00:00+23:59" (valid RFC 3339,
    before year 1 in UTC) raised in the signature check: an `internal` invalid_message event and no answer
    for its readable id. Signed and plain, it is answered invalid_command naming the field."""
    cases = []
    for instant in ("0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59"):
        cases.append((lambda b: keys["backend-1"].sign(b), command(expires=None, expires_at=instant)))
        cases.append((lambda b: b, command("read_data", {"data": "vin"}, expires=None, expires_at=instant)))
    for wrap, body in cases:
        backend.send(wrap(body))
        final = backend.final(body["id"])
        assert (final["status"], final["error"]["code"], final["error"]["field"]) == \
            ("rejected", "invalid_command", "expires_at"), final
    assert not signed.intake.stats.errors and sim.ecu("engine").received[0x14] == 0
    assert not [s for s in backend.seen if s.topic == backend.topics.events and b"invalid_message" in s.payload]


@pytest.mark.parametrize("mode", ["mutating", "all"])
def test_garbage_is_answered_as_without_signatures(signed_vehicle, sim, backend, keys, mode):
    """Review defect: with signatures required, undecodable input was an authentication failure `missing`:
    no invalid_message event for garbage without an id, and a plain read with NaN or a lone surrogate got
    unauthenticated instead of invalid_command. Now as with signatures off; a malformed envelope whose id can
    be read is still unauthenticated. An unverified message's id is not remembered: the genuine command with
    that id runs afterwards."""
    svc = start(dataclasses.replace(signed_vehicle, security=dataclasses.replace(signed_vehicle.security,
                                                                                 require_signature=mode)), backend)
    try:
        inner = json.dumps(command()).encode()
        garbage = [b"\xff not json", b"[1, 2]", json.dumps({"signed": "!!!", "key_id": "k", "sig": "AA=="}).encode(),
                   json.dumps({"signed": "e30=", "key_id": "k", "sig": "AA==", "pad": "x" * 70_000}).encode(),
                   b'{"signed": "' + base64.b64encode(inner) + b'", "key_id": "\\ud800", "sig": "AA=="}']
        backend.send_all(garbage)
        nan, surrogate = command("read_data", {"data": "vin"}, expires=None), command()
        backend.send(json.dumps(nan)[:-1].encode() + b', "x": NaN}')
        backend.send(json.dumps(surrogate)[:-1].encode() + b', "x": "\\ud800"}')
        malformed = command()
        backend.send(json.dumps({"signed": base64.b64encode(json.dumps(malformed).encode()).decode(),
                                 "key_id": "backend-1", "sig": "@@"}).encode())
        for body, field in ((nan, "x"), (surrogate, "x")):
            final = backend.final(body["id"])
            assert (final["status"], final["error"]["code"], final["error"]["field"]) == \
                ("rejected", "invalid_command", field), final
            assert svc.store.get(body["id"]) is None  # unverified: it claims no id
        final = backend.final(malformed["id"])
        assert (final["error"]["code"], final["error"]["reason"]) == ("unauthenticated", "bad_signature")
        events = backend.wait_for(lambda s: s.topic == backend.topics.events and b"invalid_message" in s.payload,
                                  10, count=len(garbage))
        assert {e.json()["reason"] for e in events} == {"undecodable"}
        assert svc.registry.get_sample_value("sovd_authentication_failures_total", {"reason": "missing"}) == 0
        backend.send(keys["backend-1"].sign(surrogate))  # the genuine command with the garbage's id runs
        topic = backend.topics.responses(surrogate["id"])
        backend.wait_for(lambda s: s.topic == topic and b'"completed"' in s.payload, 10)
        assert sim.ecu("engine").server.executed[0x14] == 1 and not svc.intake.stats.errors
    finally:
        svc.stop()


# ---- rotation -------------------------------------------------------------------------------------------

def test_rotation_old_and_new_key_then_old_removed(mqtt_vehicle, keys, sim, backend):
    def send(svc, key_id):
        body = command()
        backend.send(keys[key_id].sign(body))
        return backend.final(body["id"])

    both = start(signed_config(mqtt_vehicle, keys, "backend-1", "backend-2"), backend)
    try:
        assert send(both, "backend-1")["status"] == send(both, "backend-2")["status"] == "completed"
    finally:
        both.stop()
    new_only = start(signed_config(mqtt_vehicle, keys, "backend-2"), backend)
    try:
        old = send(new_only, "backend-1")
        assert old["status"] == "rejected" and old["error"]["reason"] == "unknown_key"
        assert send(new_only, "backend-2")["status"] == "completed"
    finally:
        new_only.stop()
    assert sim.ecu("engine").server.executed[0x14] == 3


# ---- the audit log --------------------------------------------------------------------------------------

def audit_events(backend):
    return [s.json() for s in backend.seen if s.topic == backend.topics.events and b'"audit"' in s.payload]


def test_every_mutating_command_is_audited_in_the_file_and_as_events(signed, signed_vehicle, backend, keys):
    sent = []
    for name, params in MUTATING + READ_ONLY:
        body = command(name, params)
        backend.send(keys["backend-1"].sign(body))
        final = backend.final(body["id"])
        sent.append((body, final))
    records = read_records(signed_vehicle.state_dir / AUDIT_FILE)
    mutating = [(body, final) for body, final in sent if body["command"] not in ("read_data", "read_faults",
                                                                                   "tester_present")]
    assert len(records) == 2 * len(mutating)
    for (body, final), started, finished in zip(mutating, records[::2], records[1::2], strict=True):
        assert started == {"at": started["at"], "phase": "started", "id": body["id"], "who": "backend-1",
                           "component": "engine", "command": body["command"], "params": body["params"]}
        assert (finished["phase"], finished["id"], finished["status"]) == ("finished", body["id"], final["status"])
    assert {r["status"] for r in records[1::2]} == {"completed", "failed"}
    assert next(r for r in records if r.get("status") == "failed")["error"]["code"] == "negative_response"
    expected = [(r["phase"], r["id"]) for r in records]
    assert wait_until(lambda: [(e["phase"], e["id"]) for e in audit_events(backend)] == expected, 10)


def test_unsigned_commands_are_audited_as_unsigned(service, mqtt_vehicle, backend):
    body = command(expires=None)
    backend.send(body)
    assert backend.final(body["id"])["status"] == "completed"
    started, finished = read_records(mqtt_vehicle.state_dir / AUDIT_FILE)
    assert started["who"] == finished["who"] == "unsigned"


def test_no_audit_record_no_run(mqtt_vehicle, sim, backend):
    """A full disk (a real /dev/full under the audit file): mutating commands are refused
    `storage_unavailable` (transient: the same id may be sent again once there is room) and never run;
    reads go on."""
    mqtt_vehicle.state_dir.mkdir(parents=True)
    os.symlink("/dev/full", mqtt_vehicle.state_dir / AUDIT_FILE)
    svc = start(mqtt_vehicle, backend)
    try:
        clear, read = command(expires=None), command("read_data", {"data": "vin"}, expires=None)
        backend.send(clear)
        final = backend.final(clear["id"])
        assert (final["status"], final["error"]["code"]) == ("rejected", "storage_unavailable")
        assert "audit log" in final["error"]["message"]
        backend.send(read)
        assert backend.final(read["id"])["status"] == "completed"
        assert sim.ecu("engine").received[0x14] == 0
        assert svc.registry.get_sample_value("sovd_audit_log_write_errors_total") == 1
        # an operator sees it where store trouble shows (systemd STATUS=), until a record is written again
        assert any("audit log unavailable" in p and "storage_unavailable" in p for p in svc.health())
        assert "audit log unavailable" in svc.status_line()
        (mqtt_vehicle.state_dir / AUDIT_FILE).unlink()  # room again: the next mutating command is recorded
        again = command(expires=None)
        backend.send(again)
        assert backend.final(again["id"])["status"] == "completed"
        assert svc.health() == [] and "audit" not in svc.status_line()
    finally:
        svc.stop()


def test_an_audit_file_deleted_while_running_is_noticed_and_written_again(signed, signed_vehicle, backend, keys):
    """Review defect: after `rm audit.jsonl` the records of later commands went to the unlinked file."""
    path = signed_vehicle.state_dir / AUDIT_FILE
    first, second = command(), command()
    backend.send(keys["backend-1"].sign(first))
    assert backend.final(first["id"])["status"] == "completed"
    path.unlink()
    backend.send(keys["backend-1"].sign(second))
    assert backend.final(second["id"])["status"] == "completed"
    assert [(r["phase"], r["id"]) for r in read_records(path)] == [("started", second["id"]),
                                                                   ("finished", second["id"])]
    assert signed.registry.get_sample_value("sovd_audit_log_lost_total", {"how": "deleted"}) == 1


def test_a_damaged_last_line_is_reported_at_start(mqtt_vehicle, sim, backend):
    mqtt_vehicle.state_dir.mkdir(parents=True)
    (mqtt_vehicle.state_dir / AUDIT_FILE).write_bytes(b'{"phase": "started", "id": "x"}\n{"phase": "fin')
    svc = start(mqtt_vehicle, backend)
    try:
        (event,) = backend.wait_for(lambda s: s.topic == backend.topics.events and b"audit_log_damaged" in s.payload,
                                    10)
        assert (event.json()["damage"], event.json()["bytes"]) == ("truncated", len(b'{"phase": "fin'))
        assert svc.registry.get_sample_value("sovd_audit_log_damaged_total") == 1
        body = command(expires=None)
        backend.send(body)
        assert backend.final(body["id"])["status"] == "completed"
    finally:
        svc.stop()
    records = read_records(mqtt_vehicle.state_dir / AUDIT_FILE)
    assert records[1] is None and records[2]["phase"] == "damaged"
    assert [r["phase"] for r in records[3:]] == ["started", "finished"]


def test_a_signed_command_with_expires_at_on_an_unsynchronized_clock_is_clock_unsynchronized(
        signed_vehicle, keys, sim, backend):
    """Issue 15 meets issue 10's clock: while the device clock is not known to be right (no time sync yet,
    as after a boot without RTC), `expires_at` cannot be judged, so a signed command carrying one is
    refused `clock_unsynchronized` like any other: not `expired` (the freshness window is not trusted
    either), not an authentication failure, nothing run. The clock's sync source is injected (no
    timesyncd/NTP state can be set here); the wall clock is the real one, so signatures stay valid."""
    clock = Clock(signed_vehicle.state_dir / "clock.json", kernel=lambda: False, daemon_present=lambda: True)
    svc = start(signed_vehicle, backend, clock)
    try:
        far, near = command(expires=7 * 24 * 3600), command()  # far: beyond max_expiry_ahead_s on a right clock
        for body in (far, near):
            backend.send(keys["backend-1"].sign(body))
            final = backend.final(body["id"])
            assert (final["status"], final["error"]["code"]) == ("rejected", "clock_unsynchronized")
        assert sim.ecu("engine").received[0x14] == 0
        assert all(not failures(svc, reason) for reason in ("expired", "bad_signature", "missing"))
        assert read_records(svc.config.state_dir / AUDIT_FILE) == []  # nothing ran, nothing audited
    finally:
        svc.stop()


def test_an_unsigned_message_without_an_id_is_one_rejected_message_not_two(signed_vehicle, sim, backend):
    """With every command signed, an unsigned message without an id was counted rejected twice: as
    `unauthenticated` by the signature gate and as `undecodable` with its invalid_message event. One message
    is one count: the one its event names; the authentication failure is still counted by its reason."""
    svc = start(dataclasses.replace(signed_vehicle, security=dataclasses.replace(signed_vehicle.security,
                                                                                 require_signature="all")), backend)
    try:
        def rejected(reason):
            return svc.registry.get_sample_value("sovd_rejected_messages_total", {"reason": reason})

        backend.send(json.dumps({"component": "engine", "command": "read_data", "params": {"data": "vin"}}).encode())
        event = backend.wait_for(lambda s: s.topic == backend.topics.events and b"invalid_message" in s.payload, 10)
        assert event[0].json()["reason"] == "undecodable" and "not authenticated (missing)" in event[0].json()["detail"]
        assert (rejected("undecodable"), rejected("unauthenticated")) == (1, 0)
        assert failures(svc, "missing") == 1
    finally:
        svc.stop()
