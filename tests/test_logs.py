"""Logs as journald receives them: JSON lines, the command's id/component/command, no frames above DEBUG."""

import json
import logging
import uuid

from mqtt_support import AgentProcess

from agent.fleet.caller import Caller
from agent.system.logs import HumanFormatter, JsonFormatter
from agent.wire.command import command_fields


def test_json_and_human_formatters():
    record = logging.LogRecord("agent.x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.__dict__.update(command_fields("c-1", "engine", "read_data"))
    line = json.loads(JsonFormatter().format(record))
    assert {k: line[k] for k in ("level", "logger", "message", "command_id", "component", "command")} == {
        "level": "INFO", "logger": "agent.x", "message": "hello world", "command_id": "c-1", "component": "engine",
        "command": "read_data"}
    assert line["time"].endswith("+00:00")
    human = HumanFormatter().format(record)
    assert "hello world" in human and "command_id=c-1" in human


def test_agent_log_lines_about_commands_carry_id_component_and_command(tmp_path, broker):
    import yaml
    from conftest import DATA

    config = yaml.safe_load((DATA / "vehicle.yaml").read_text())
    vehicle = f"VL{uuid.uuid4().hex[:10].upper()}"
    config.update(vehicle=vehicle, simulate=[str(DATA / "vehicle-sim.yaml")], log_level="INFO")
    config["bus"]["channel"] = f"logs-{uuid.uuid4().hex[:6]}"
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
    agent = AgentProcess(tmp_path / "agent.yaml", broker.url, tmp_path / "state").start()
    try:
        from agent.config.model import MqttConfig

        with Caller(MqttConfig(broker=broker.url), vehicle) as backend:
            backend.subscribe(f"{backend.topics.base}/#")
            backend.wait_status("online", 10)
            bodies = [
                {"id": "ok-1", "component": "engine", "command": "read_data", "params": {"data": "vin"}},
                {"id": "bad-1", "component": "engine", "command": "read_data", "params": {"data": 1}},
                {"id": "nope-1", "component": "body", "command": "clear_faults"},
            ]
            for body in bodies:
                backend.send(body)
            for command_id in ("ok-1", "bad-1", "nope-1"):
                backend.final(command_id)
            backend.send(bodies[0])  # a duplicate of a finished command
            backend.wait_for(lambda s: b'"duplicate"' in s.payload, 10)
    finally:
        assert agent.terminate() == 0
    records = [json.loads(line) for line in agent.log.read_text().splitlines() if line.startswith("{")]
    about_commands = [r for r in records if "command_id" in r]
    assert {r["command_id"] for r in about_commands} >= {"ok-1", "bad-1", "nope-1"}
    for record in about_commands:
        assert record["component"] and record["command"], record
    messages = {r["message"] for r in about_commands}
    assert "command completed" in messages  # one INFO line per command that ran: its outcome
    assert not [r for r in records if r["level"] == "DEBUG"]
    assert not [r for r in records if r["logger"].startswith(("can", "isotp", "udsoncan", "Connection"))]
