"""The real daemon (`python -m agent run`, the simulator, a real Mosquitto) SIGKILLed at each durable step
of a command's way, then started again on the same state dir: the protocol's promises must hold.

The kill is aimed by tests/killpoint.py: the daemon sends SIGKILL to itself at the named step for one
command id (a kill from outside cannot be aimed between two writes). Nothing is mocked. The simulated
ECUs journal every request they execute to a file (line-buffered, it outlives the kill): that count is
how the tests know what ran on the vehicle, and how often.

Promised (docs/protocol.md, spec rev 1.1): a command never runs twice; it has exactly one final outcome
(responses are at least once: a repeat is the same message, same seq, which the backend dedups by
id + seq), `interrupted` for one that started and did not finish; nothing accepted is lost.
"""

from __future__ import annotations

import json
import signal
import sys
import uuid
from pathlib import Path

import pytest
from mqtt_support import AgentProcess, daemon_files, validate_published

from agent.config.model import MqttConfig
from agent.fleet.caller import Caller

KILLPOINT = Path(__file__).with_name("killpoint.py")


class KilledAgent(AgentProcess):
    """The agent, armed to SIGKILL itself at `point` for `command_id`."""

    def __init__(self, base: AgentProcess, point: str, command_id: str) -> None:
        self.__dict__.update(base.__dict__)
        self.args = [sys.executable, str(KILLPOINT), point, command_id, *base.args[3:]]

    def died(self, timeout: float = 20) -> bool:
        assert self.proc is not None
        return self.proc.wait(timeout) == -signal.SIGKILL


@pytest.fixture
def setup(tmp_path, broker):
    vehicle = f"VK{uuid.uuid4().hex[:12].upper()}"
    config = daemon_files(tmp_path, broker.url, vehicle, f"kill-{uuid.uuid4().hex[:8]}")
    agent = AgentProcess(config, broker.url, tmp_path / "state", tmp_path / "journal")
    backend = Caller(MqttConfig(broker=broker.url), vehicle)
    backend.connect()
    backend.subscribe(f"{backend.topics.base}/#")
    killed: list[AgentProcess] = []
    yield agent, backend, tmp_path, killed
    for process in [agent, *killed]:
        process.ensure_stopped()
    backend.close()


def routine(tag: str) -> dict:
    """A mutating command (its audit record and start mark are written when its turn comes)."""
    return {"id": f"op-{tag}-{uuid.uuid4().hex[:6]}", "component": "engine", "command": "operation",
            "params": {"routine": "self_test", "action": "start", "data": "beef"}}


def ran(tmp: Path) -> int:
    """How often the simulated engine executed the routine's request."""
    path = tmp / "journal"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(1 for line in lines if line == "engine 31010203beef")


def finals(backend: Caller, command_id: str) -> list[dict]:
    topic = backend.topics.responses(command_id)
    return [s.json() for s in backend.seen if s.topic == topic and s.json().get("final")]


def kill_at(setup, point: str, body: dict | None = None) -> tuple[AgentProcess, Caller, Path, dict]:
    """Sends one command (a routine by default) to an agent armed at `point`, waits for it to die there,
    starts a plain agent."""
    agent, backend, tmp, killed = setup
    body = body or routine(point)
    armed = KilledAgent(agent, point, body["id"])
    killed.append(armed)
    armed.start()
    backend.send(body)
    assert armed.died(), f"the agent did not die at {point}: {agent.log.read_text()[-3000:]}"
    agent.start()
    return agent, backend, tmp, body


def settle(agent: AgentProcess, backend: Caller) -> None:
    """Everything the restarted agent had to send has reached the backend: a later command's final came
    back (MQTT keeps one publisher's order), and a clean stop found the outbox empty."""
    probe = {"id": f"probe-{uuid.uuid4().hex[:6]}", "component": "engine", "command": "read_data",
             "params": {"data": "vin"}}
    backend.send(probe)
    assert backend.final(probe["id"], timeout=15)["status"] == "completed"
    assert agent.terminate() == 0
    backend.wait_status("offline", 10)


def interrupted_event(backend: Caller, command_id: str) -> list[str]:
    found = backend.wait_for(lambda s: s.topic == backend.topics.events and b"agent_started" in s.payload
                             and command_id.encode() in s.payload, 10)
    return json.loads(found[0].payload)["interrupted"]


def test_killed_after_the_intake_commit_before_the_puback(setup):
    """The broker redelivers the command (no PUBACK); the ledger knows it: it runs once, answered once."""
    agent, backend, tmp, body = kill_at(setup, "intake_committed")
    final = backend.final(body["id"], timeout=20)
    settle(agent, backend)
    assert final["status"] == "completed"
    assert ran(tmp) == 1
    assert [f["status"] for f in finals(backend, body["id"])] == ["completed"]
    validate_published(backend.seen, backend.topics.base)


def test_a_read_killed_after_the_intake_commit_before_the_puback(setup):
    """A read sent to an idle worker is marked started by the intake's own commit (store docstring): the
    crash reports it `interrupted` although it never ran, and the redelivered message is a repeat."""
    body = {"id": f"rd-{uuid.uuid4().hex[:6]}", "component": "engine", "command": "read_data",
            "params": {"data": "vin"}}
    agent, backend, tmp, body = kill_at(setup, "intake_committed", body)
    final = backend.final(body["id"], timeout=20)
    settle(agent, backend)
    assert final["status"] == "interrupted"
    journal = (tmp / "journal").read_text().splitlines() if (tmp / "journal").exists() else []
    assert journal.count("engine 22f190") == 1  # the settle's probe only: the read itself never ran
    assert len(finals(backend, body["id"])) == 1


def test_killed_after_the_start_mark_before_the_ecu_request(setup):
    agent, backend, tmp, body = kill_at(setup, "marked_started")
    final = backend.final(body["id"], timeout=20)
    assert interrupted_event(backend, body["id"]) == [body["id"]]
    settle(agent, backend)
    assert final["status"] == "interrupted" and final["error"]["code"] == "interrupted"
    assert ran(tmp) == 0  # never sent to the ECU, and never re-run after the restart
    assert len(finals(backend, body["id"])) == 1


def test_killed_after_the_ecu_answered_before_the_final_is_stored(setup):
    agent, backend, tmp, body = kill_at(setup, "ecu_answered")
    final = backend.final(body["id"], timeout=20)
    settle(agent, backend)
    assert final["status"] == "interrupted"
    assert ran(tmp) == 1  # ran once; not again after the restart
    assert len(finals(backend, body["id"])) == 1


def test_killed_after_the_final_is_stored_before_it_is_published(setup):
    agent, backend, tmp, body = kill_at(setup, "final_stored")
    final = backend.final(body["id"], timeout=20)
    settle(agent, backend)
    assert final["status"] == "completed"  # from the outbox, after the restart
    assert ran(tmp) == 1
    assert len(finals(backend, body["id"])) == 1


def test_killed_after_the_final_is_published_before_the_outbox_forgets_it(setup):
    """At least once: the broker had taken the final (its PUBACK came) and delivers it; the restarted agent
    sends it again from the outbox, as the very same message (id, seq, content): the backend dedups."""
    agent, backend, tmp, body = kill_at(setup, "final_published")
    settle(agent, backend)
    sent = finals(backend, body["id"])
    assert len(sent) == 2 and sent[1] == sent[0], sent
    assert sent[0]["status"] == "completed"
    assert ran(tmp) == 1


def test_killed_inside_a_telemetry_write_before_its_commit(setup):
    """The transaction queueing a telemetry batch never commits: the store opens sound after the restart
    (nothing moved aside, no store_recovered event), the retained plan is applied again, and batches go on
    with numbers that never repeat one the backend already has."""
    agent, backend, tmp, killed = setup
    armed = KilledAgent(agent, "collection_write", "-")
    killed.append(armed)
    armed.start()
    plan = {"name": "pt", "version": 1, "signals": [{"component": "engine", "data": ["engine_speed"],
                                                     "every_ms": 100}],
            "batch": {"max_age_ms": 300, "max_samples": 50}}
    backend.publish_plan("pt", plan)
    try:
        assert armed.died(), agent.log.read_text()[-3000:]
        agent.start()
        topic = f"{backend.topics.base}/telemetry"
        batches = [s.json() for s in backend.wait_for(lambda s: s.topic == topic, 15, count=3)]
        assert [b["seq"] for b in batches] == sorted({b["seq"] for b in batches})
        assert all(b["plan"] == "pt" and b["samples"] for b in batches)
        assert not any(s.topic == backend.topics.events and b"store_recovered" in s.payload for s in backend.seen)
        assert sorted(p.name for p in (tmp / "state").iterdir() if "damaged" in p.name) == []
        assert agent.terminate() == 0
    finally:
        backend.publish_plan("pt", None)


def routine_on(n: int) -> dict:
    return {"id": f"burst-{n}-{uuid.uuid4().hex[:6]}", "component": "engine", "command": "operation",
            "params": {"routine": "self_test", "action": "start", "data": f"{n:04x}"}}


# the burst takes 11 to 15 rounds here; never fewer than 6 (an intake commit, each routine's own start mark
# at its turn, the last final): every N below is reached
@pytest.mark.parametrize("round_", [1, 2, 3, 4, 6])
def test_killed_after_any_commit_of_a_burst_every_promise_holds(setup, round_):
    """A burst of routines (engine) and reads (body), and the agent killed right after the store's Nth commit
    round, whatever that round carried (intake groups, start marks, finals, outbox deletes share rounds).
    After the restart: every id has a final, one outcome each (a repeat is the same message), no routine ran
    twice, a `completed` one ran once, and one that never reached the ECU is not `completed`."""
    agent, backend, tmp, killed = setup
    armed = KilledAgent(agent, "commit_round", str(round_))
    killed.append(armed)
    armed.start()
    routines = [routine_on(n) for n in range(1, 5)]
    reads = [{"id": f"rd-{n}-{uuid.uuid4().hex[:6]}", "component": "body", "command": "read_data",
              "params": {"data": "vin"}} for n in range(3)]
    for body in [x for pair in zip(routines, reads, strict=False) for x in pair] + routines[len(reads):]:
        backend.send(body)
    assert armed.died(), agent.log.read_text()[-3000:]
    agent.start()
    for body in routines + reads:
        backend.final(body["id"], timeout=30)
    settle(agent, backend)
    journal = (tmp / "journal").read_text().splitlines() if (tmp / "journal").exists() else []
    for n, body in enumerate(routines, 1):
        outcomes = finals(backend, body["id"])
        assert all(f == outcomes[0] for f in outcomes), outcomes
        executed = journal.count(f"engine 31010203{n:04x}")
        assert executed <= 1, (body["id"], executed)
        status = outcomes[0]["status"]
        assert status in ("completed", "interrupted"), outcomes[0]
        if status == "completed":
            assert executed == 1
    for body in reads:
        outcomes = finals(backend, body["id"])
        assert all(f == outcomes[0] for f in outcomes) and outcomes[0]["status"] in ("completed", "interrupted")
    validate_published(backend.seen, backend.topics.base)
