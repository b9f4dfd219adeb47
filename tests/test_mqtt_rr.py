"""Protocol revision 1.1, a reply topic gets the final response only: proven with the real `mosquitto_rr`.

`mosquitto_rr` (mosquitto-clients) is the standard MQTT request/response tool: it subscribes to its
reply topic, publishes the request with that Response Topic, prints the FIRST message that arrives
and exits. Whatever it prints is what any request/response client takes as the answer. The agent
runs in-process on a real Mosquitto with the real simulator; the `backend` fixture also listens on
`replies/#`, so it sees every message the agent sent to a reply topic (and validates each against
docs/asyncapi.yaml).
"""

import dataclasses
import json
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DATA, ROOT

from agent.bus.owner import wait_until
from agent.devtools.local_broker import LocalBroker
from agent.devtools.sim.simulator import Simulator
from agent.system.service import Service

RR = shutil.which("mosquitto_rr") or "/usr/bin/mosquitto_rr"  # hw/dev-setup installs mosquitto-clients
VIN = {"values": {"vin": "TEST0VEHICLE00001"}}


def new_id(prefix: str = "rr") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def read_vin(**fields) -> dict:
    return {"id": new_id(), "component": "engine", "command": "read_data", "params": {"data": "vin"}, **fields}


def mosquitto_rr(broker: LocalBroker, vehicle: str, reply_topic: str, body: dict, version: str = "5",
                 *extra: str) -> list[dict]:
    """Runs the real `mosquitto_rr` once; returns the messages it printed (it prints one, then exits)."""
    done = subprocess.run([RR, "-h", "127.0.0.1", "-p", str(broker.port), "-V", version, "-q", "1",
                           "-t", f"sovd/{vehicle}/commands", "-e", reply_topic, "-m", json.dumps(body),
                           "-W", "30", *extra], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"mosquitto_rr exited {done.returncode}: {done.stderr}"
    return [json.loads(line) for line in done.stdout.splitlines()]


def statuses(replies: list[dict]) -> list[tuple[str, int, bool]]:
    return [(r["status"], r["seq"], bool(r.get("duplicate"))) for r in replies]


# ---- MQTT 5 Response Topic -----------------------------------------------------------------------

def test_mosquitto_rr_gets_the_completed_vin_read_as_its_one_response(service, backend, broker, mqtt_vehicle):
    body, reply = read_vin(), f"replies/{new_id('vin')}"
    printed = mosquitto_rr(broker, mqtt_vehicle.vehicle, reply, body, "5", "-D", "publish", "correlation-data",
                           "rr-corr-1")
    assert len(printed) == 1
    answer = printed[0]
    assert (answer["id"], answer["status"], answer["final"], answer["seq"]) == (body["id"], "completed", True, 1)
    assert answer["result"] == VIN
    # the final is the last message the agent sends for a command, and one topic keeps its order:
    # once the backend has it, anything else sent to the reply topic would have arrived before it
    assert backend.final(body["id"], topic=reply) == answer
    seen = [s for s in backend.seen if s.topic == reply]
    assert len(seen) == 1 and seen[0].correlation == b"rr-corr-1"
    assert backend.replies(body["id"]) == []  # nothing on the default responses/{id} either


def test_mosquitto_rr_gets_an_nrc_failure_as_its_one_response(service, backend, broker, mqtt_vehicle, sim):
    body, reply = read_vin(params={"data": "0x1234"}), f"replies/{new_id('nrc')}"  # a DID the ECU lacks
    printed = mosquitto_rr(broker, mqtt_vehicle.vehicle, reply, body)
    assert len(printed) == 1
    answer = printed[0]
    assert (answer["status"], answer["final"], answer["seq"]) == ("failed", True, 1)
    assert answer["error"] == {"code": "negative_response", "message": answer["error"]["message"],
                               "nrc": "0x31", "nrc_name": "RequestOutOfRange", "service": "0x22"}
    assert backend.final(body["id"], topic=reply) == answer
    assert [s.topic for s in backend.seen if s.topic == reply] == [reply]
    assert sim.ecu("engine").received[0x22] == 1


def test_mosquitto_rr_with_progress_sees_accepted_first(service, backend, broker, mqtt_vehicle):
    body, reply = read_vin(progress=True), f"replies/{new_id('progress')}"
    printed = mosquitto_rr(broker, mqtt_vehicle.vehicle, reply, body)
    assert len(printed) == 1  # mosquitto_rr exits after the first message ...
    assert (printed[0]["status"], printed[0]["final"], printed[0]["seq"]) == ("accepted", False, 1)
    final = backend.final(body["id"], topic=reply)  # ... and the final still followed it there
    assert final["result"] == VIN
    assert statuses(backend.replies(body["id"], reply)) == [("accepted", 1, False), ("completed", 2, False)]


def test_progress_is_validated_strictly_with_its_field(service, backend, broker, mqtt_vehicle, sim):
    for bad in ("yes", 1, [], {"on": True}):
        body, reply = read_vin(progress=bad), f"replies/{new_id('bad')}"
        printed = mosquitto_rr(broker, mqtt_vehicle.vehicle, reply, body)
        assert len(printed) == 1 and printed[0]["status"] == "rejected" and printed[0]["final"] is True
        error = printed[0]["error"]
        assert (error["code"], error["field"]) == ("invalid_command", "progress")
        assert error["message"].startswith("progress: expected true or false")
    assert sim.ecu("engine").received[0x22] == 0


def test_a_reply_topic_reserved_for_the_broker_is_refused_before_anything_runs(service, backend, sim):
    """A topic starting with `$` is the broker's (MQTT 5 section 4.7.2; Mosquitto answers a publish to
    `$SYS/...` with 0x87): run there, a reset would happen and its final be set aside, never seen by the
    backend. Refused on the default topic, like a wildcard, and nothing runs."""
    for response_topic, reply_to in (("$SYS/agent/answers", None), (None, "$share/g/answers")):
        body = read_vin(**({"reply_to": reply_to} if reply_to else {}))
        backend.send(body, response_topic=response_topic, correlation=b"c" if response_topic else None)
        final = backend.final(body["id"])
        field = "response_topic" if response_topic else "reply_to"
        assert (final["status"], final["error"]["code"], final["error"]["field"]) == \
            ("rejected", "invalid_command", field), final
        assert "$" in final["error"]["message"]
    assert sim.ecu("engine").received[0x22] == 0
    assert not [s for s in backend.seen if s.topic == backend.topics.events and b"publish_refused" in s.payload]


def test_default_topic_still_gets_accepted_then_final(service, backend):
    for extra in ({}, {"progress": False}, {"progress": True}):
        body = read_vin(**extra)
        backend.send(body)
        assert backend.final(body["id"])["result"] == VIN
        assert statuses(backend.replies(body["id"])) == [("accepted", 1, False), ("completed", 2, False)]


def test_large_result_chunks_still_reach_the_reply_topic(mqtt_vehicle, sim, backend):
    """The `running` chunks of a large result are part of its final response: they go to a reply topic."""
    config = dataclasses.replace(mqtt_vehicle, mqtt=dataclasses.replace(mqtt_vehicle.mqtt, max_payload_bytes=2048))
    svc = Service(config)
    svc.start()
    try:
        backend.wait_status("online", 10)
        body, reply = read_vin(params={"data": "big_block"}), f"replies/{new_id('big')}"
        backend.send(body, response_topic=reply, correlation=b"big")
        final = backend.final(body["id"], topic=reply)
        replies = backend.replies(body["id"], reply)
        assert [r["status"] for r in replies] == ["running"] * final["chunks"] + ["completed"]
        assert [r["seq"] for r in replies] == list(range(1, len(replies) + 1))  # no `accepted`: chunks from 1
        result = json.loads("".join(r["chunk"]["data"] for r in replies[:-1]))
        assert bytes.fromhex(result["values"]["big_block"]["raw"]) == bytes(i & 0xFF for i in range(4095))
    finally:
        svc.stop()


# ---- duplicates ----------------------------------------------------------------------------------

def test_mosquitto_rr_repeating_a_finished_id_gets_the_final_again(service, backend, broker, mqtt_vehicle, sim):
    body, reply = read_vin(), f"replies/{new_id('again')}"
    first = mosquitto_rr(broker, mqtt_vehicle.vehicle, reply, body)
    again = mosquitto_rr(broker, mqtt_vehicle.vehicle, reply, body)
    assert again == [{**first[0], "duplicate": True}]
    assert sim.ecu("engine").server.executed[0x22] == 1


@pytest.fixture
def held_engine(sim: Simulator) -> Iterator[threading.Event]:
    """Keeps the simulated engine answering NRC 0x78 (response pending) until the event is set.

    A command stays in flight exactly as long as the test needs, without timing guesses. The
    simulator has no hook for this, so its ECU's request handler is wrapped (private attributes).
    """
    ecu, released = sim.ecu("engine"), threading.Event()
    serve = ecu._serve

    def held(request: bytes) -> None:
        while not released.wait(0.05):
            ecu._send(bytes([0x7F, request[0], 0x78]))
        serve(request)

    ecu._serve = held
    try:
        yield released
    finally:
        released.set()


@pytest.mark.parametrize(("reply", "progress", "expected"), [
    ("replies/dup", None, [("completed", 1, False)]),
    ("replies/dup", True, [("accepted", 1, False), ("accepted", 1, True), ("completed", 2, False)]),
    (None, None, [("accepted", 1, False), ("accepted", 1, True), ("completed", 2, False)]),
], ids=["reply-topic", "reply-topic-progress", "default-topic"])
def test_repeated_id_in_flight_gets_its_accepted_again_only_where_non_final_messages_go(
        service, backend, sim, held_engine, reply, progress, expected):
    body = read_vin(timeout_ms=30000, **({"progress": progress} if progress else {}))
    reply = f"{reply}-{body['id']}" if reply else None
    backend.send(body, response_topic=reply, correlation=b"dup" if reply else None)
    assert wait_until(lambda: service.store.get(body["id"]) is not None, 10)
    backend.send(body, response_topic=reply, correlation=b"dup" if reply else None)
    assert wait_until(lambda: service.intake.stats.duplicates == 1, 10)
    assert service.store.get(body["id"]).state in ("queued", "started")  # the repeat came while it ran
    held_engine.set()
    assert backend.final(body["id"], topic=reply)["result"] == VIN
    assert statuses(backend.replies(body["id"], reply)) == expected
    assert sim.ecu("engine").server.executed[0x22] == 1


# ---- MQTT 3.1.1 with reply_to --------------------------------------------------------------------

def test_mqtt_3_1_1_reply_to_gets_the_final_only_unless_progress(legacy, broker):
    config, backend = legacy
    body = read_vin(reply_to=f"legacy/{new_id('r')}")
    printed = mosquitto_rr(broker, config.vehicle, body["reply_to"], body, "311")
    assert statuses(printed) == [("completed", 1, False)] and printed[0]["result"] == VIN
    assert backend.final(body["id"], topic=body["reply_to"]) == printed[0]
    assert statuses(backend.replies(body["id"], body["reply_to"])) == [("completed", 1, False)]
    chatty = read_vin(reply_to=f"legacy/{new_id('p')}", progress=True)
    printed = mosquitto_rr(broker, config.vehicle, chatty["reply_to"], chatty, "311")
    assert statuses(printed) == [("accepted", 1, False)]
    backend.final(chatty["id"], topic=chatty["reply_to"])
    assert statuses(backend.replies(chatty["id"], chatty["reply_to"])) == [("accepted", 1, False),
                                                                           ("completed", 2, False)]


# ---- `sovd-edge call` against both topic styles ---------------------------------------------------

def call(config: Path, broker: LocalBroker, vehicle: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "call", "-c", str(config), "--broker", broker.url,
                           "--vehicle", vehicle, "--wait", "30", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=90)


def printed_statuses(done: subprocess.CompletedProcess) -> list[tuple[str, int, bool]]:
    return statuses([json.loads(line) for line in done.stdout.splitlines()])


def test_call_cli_on_the_default_topic_and_on_a_reply_topic(service, backend, broker, mqtt_vehicle):
    config, vehicle = DATA / "vehicle.yaml", mqtt_vehicle.vehicle
    default = call(config, broker, vehicle, "engine", "read_data", "data=vin")
    assert default.returncode == 0, default.stderr
    assert printed_statuses(default) == [("accepted", 1, False), ("completed", 2, False)]
    reply = call(config, broker, vehicle, "--reply-topic", f"replies/{new_id('call')}", "engine", "read_data",
                 "data=vin")
    assert reply.returncode == 0, reply.stderr
    assert printed_statuses(reply) == [("completed", 1, False)]
    assert json.loads(reply.stdout)["result"] == VIN
    progress = call(config, broker, vehicle, "--reply-topic", "replies/shared", "--progress", "engine",
                    "read_data", "data=0x1234")
    assert progress.returncode == 1, progress.stderr  # failed (NRC 0x31): not completed
    assert printed_statuses(progress) == [("accepted", 1, False), ("failed", 2, False)]
    bad = call(config, broker, vehicle, "--reply-topic", "replies/+/x", "engine", "read_data", "data=vin")
    assert bad.returncode == 2 and "--reply-topic 'replies/+/x' is not a topic" in bad.stderr


def test_call_cli_reply_topic_on_mqtt_3_1_1(legacy, broker, tmp_path):
    config, backend = legacy
    config_file = tmp_path / "legacy.yaml"
    config_file.write_text((DATA / "vehicle.yaml").read_text() + '\nmqtt: {protocol: "3.1.1"}\n')
    command_id = new_id("call")
    done = call(config_file, broker, config.vehicle, "--id", command_id, "--reply-topic", "legacy/call", "engine",
                "read_data", "data=vin")
    assert done.returncode == 0, done.stderr
    assert printed_statuses(done) == [("completed", 1, False)]
    assert json.loads(done.stdout) == backend.final(command_id, topic="legacy/call")  # sent there via `reply_to`
    assert backend.replies(command_id) == []
