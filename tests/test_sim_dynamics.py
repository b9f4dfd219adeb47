"""The simulator's moving parts: DID waveforms, DTC status schedules, DTC injection (pure, then over CAN)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from agent.config.model import AgentConfig, DidSpec
from agent.devtools.sim.config import load_sim_config
from agent.devtools.sim.dynamics import Schedule, StatusStep, Wave
from agent.devtools.sim.server import UdsServer
from agent.devtools.sim.simulator import Simulator
from agent.errors import ConfigError
from agent.system.local import LocalSession
from agent.wire.command import Status

SPEED = DidSpec(name="engine_speed", id=0xF40C, codec="unsigned", length=2, scale=0.25)

ENGINE = """
ecus:
  - name: engine
    addressing: {mode: normal_11bit, request_id: 0x7E0, response_id: 0x7E8, functional_id: 0x7DF}
    isotp: {padding: 0xCC}
    dids:
      - {id: 0xF190, ascii: TEST0VEHICLE00001}
      - {id: 0xF40C, wave: {shape: triangle, min: 800, max: 3000, period_s: 8, length: 2, scale: 0.25}}
      - {id: 0xF40D, wave: {shape: steps, values: [-10, 20, 90], step_s: 2, codec: signed, length: 1}}
    dtcs:
      - {code: P0301, status: 0x2F, snapshots: [{record: 1, dids: {0xF40C: "0C80"}}]}
      - code: P0171
        schedule: [{at_s: 2, status: 0x09}, {at_s: 4, status: 0x08}, {at_s: 6, status: 0}]
      - code: U0100-87
        status: 0x08
        schedule: [{at_s: 1, status: 0x09}, {at_s: 3, status: 0x08}]
        every_s: 4
"""


def sim_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sim.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def engine(tmp_path: Path) -> UdsServer:
    return UdsServer(load_sim_config(sim_file(tmp_path, ENGINE)).ecus[0], epoch=100.0)


def dtcs(server: UdsServer, now: float, mask: int = 0xFF) -> dict[str, int]:
    answer = server.handle(bytes([0x19, 0x02, mask]), now)
    assert answer is not None and answer[:2] == b"\x59\x02"
    body = answer[3:]
    return {f"{int.from_bytes(body[i:i + 3], 'big'):06X}": body[i + 3] for i in range(0, len(body), 4)}


# ---- pure: waves and schedules -------------------------------------------------------------------

def test_wave_shapes_over_one_period() -> None:
    sine = Wave("sine", SPEED, 800, 3000, period_s=8)
    assert [sine.value_at(t) for t in (0, 4, 8)] == pytest.approx([800, 3000, 800])
    assert sine.value_at(2) == pytest.approx(1900)
    triangle = Wave("triangle", SPEED, 800, 3000, period_s=8)
    assert [triangle.value_at(t) for t in (0, 2, 4, 6)] == pytest.approx([800, 1900, 3000, 1900])
    ramp = Wave("ramp", SPEED, 0, 100, period_s=10)
    assert [ramp.value_at(t) for t in (0, 5, 9.9, 10)] == pytest.approx([0, 50, 99, 0])
    assert Wave("triangle", SPEED, 800, 3000, period_s=8).at(4) == (12000).to_bytes(2, "big")  # 3000 rpm / 0.25


def test_steps_repeat_or_hold_the_last_value() -> None:
    steps = Wave("steps", SPEED, values=(1.0, 2.0, 3.0), step_s=2)
    assert [steps.value_at(t) for t in (0, 1.9, 2, 4, 6, 7.9)] == [1, 1, 2, 3, 1, 1]
    held = Wave("steps", SPEED, values=(1.0, 2.0, 3.0), step_s=2, repeat=False)
    assert [held.value_at(t) for t in (0, 4, 6, 600)] == [1, 3, 3, 3]
    assert held.value_at(-5) == 1  # before the start: the first value


def test_schedule_counts_steps_across_repetitions() -> None:
    once = Schedule((StatusStep(2, 0x09), StatusStep(4, 0)))
    assert [once.current(t) for t in (0, 2, 3, 4, 100)] == [None, (0, 0x09), (0, 0x09), (1, 0), (1, 0)]
    again = Schedule((StatusStep(1, 0x09), StatusStep(3, 0x08)), every_s=4)
    assert [again.current(t) for t in (0.5, 1, 3, 4.5, 5, 7)] == [None, (0, 9), (1, 8), (1, 8), (2, 9), (3, 8)]


# ---- the UDS server: values and DTCs as a tester sees them -----------------------------------------

def test_read_data_sees_the_waves_move(tmp_path: Path) -> None:
    server = engine(tmp_path)
    speeds = [int.from_bytes(server.handle(bytes.fromhex("22F40C"), 100.0 + t)[3:5], "big") * 0.25
              for t in (0, 2, 4, 6)]
    assert speeds == [800, 1900, 3000, 1900]
    temps = [int.from_bytes(server.handle(bytes.fromhex("22F40D"), 100.0 + t)[3:], "big", signed=True)
             for t in (0, 2, 4, 6)]
    assert temps == [-10, 20, 90, -10]
    both = server.handle(bytes.fromhex("22F40CF40D"), 104.0)
    assert both == bytes.fromhex("62F40C2EE0F40D5A")  # grouped reads move together


def test_faults_appear_change_and_clear_on_schedule(tmp_path: Path) -> None:
    server = engine(tmp_path)
    assert dtcs(server, 100.0) == {"030100": 0x2F, "C10087": 0x08}  # P0171 not there before its first step
    assert dtcs(server, 102.0) == {"030100": 0x2F, "C10087": 0x09, "017100": 0x09}
    assert dtcs(server, 104.5) == {"030100": 0x2F, "C10087": 0x08, "017100": 0x08}  # U0100: 2nd round
    assert dtcs(server, 104.5, mask=0x01) == {"030100": 0x2F}
    assert dtcs(server, 106.0) == {"030100": 0x2F, "C10087": 0x09}  # P0171 cleared by its last step
    assert dtcs(server, 200.0) == {"030100": 0x2F, "C10087": 0x08}  # and stays cleared; U0100 repeats


def test_a_clear_holds_until_the_next_step(tmp_path: Path) -> None:
    server = engine(tmp_path)
    assert dtcs(server, 102.0)["017100"] == 0x09
    assert server.handle(bytes.fromhex("14FFFFFF"), 102.5) == b"\x54"
    assert dtcs(server, 102.9) == {}
    assert dtcs(server, 103.0) == {"C10087": 0x08}  # U0100's next step
    assert dtcs(server, 104.0) == {"C10087": 0x08, "017100": 0x08}  # and P0171's


def test_injected_status_keeps_the_configured_snapshots(tmp_path: Path) -> None:
    server = engine(tmp_path)
    server.set_dtc(0x030100, 0x08)
    answer = server.handle(bytes.fromhex("1904030100FF"), 100.0)
    assert answer == bytes.fromhex("5904030100080101F40C0C80")
    server.set_dtc(0x030100, 0)
    assert server.handle(bytes.fromhex("1904030100FF"), 100.0) == bytes.fromhex("7F1931")
    server.set_dtc(0x123456, 0x01)  # never configured: a bare DTC
    assert dtcs(server, 100.0)["123456"] == 0x01


# ---- config errors, each with its path ---------------------------------------------------------------

@pytest.mark.parametrize(("did", "path", "words"), [
    ("{id: 0x1, wave: {shape: square, min: 0, max: 1, length: 1}}", "ecus[0].dids[0].wave.shape", "one of"),
    ("{id: 0x1, wave: {shape: sine, min: 0, max: 300, length: 1}}", "ecus[0].dids[0].wave", "cannot be encoded"),
    ("{id: 0x1, wave: {shape: sine, max: 3, length: 1}}", "ecus[0].dids[0].wave.min", "missing"),
    ("{id: 0x1, wave: {shape: steps, length: 1}}", "ecus[0].dids[0].wave.values", "list of values"),
    ("{id: 0x1, wave: {shape: steps, values: [1, x], length: 1}}", "ecus[0].dids[0].wave.values[1]", "number"),
    ("{id: 0x1, wave: {shape: sine, min: 0, max: 1, length: 9}}", "ecus[0].dids[0].wave.length", "1..8"),
    ("{id: 0x1, wave: {shape: sine, min: 0, max: 1, length: 1, scale: 0}}", "ecus[0].dids[0].wave.scale", "0"),
    ("{id: 0x1, wave: {shape: sine, min: 0, max: 1, length: 1, step_s: 2}}", "ecus[0].dids[0].wave.step_s",
     "unknown key"),
    ("{id: 0x1, hex: '01', wave: {shape: sine, min: 0, max: 1, length: 1}}", "ecus[0].dids[0]", "not wave and hex"),
    ("{id: 0x1, writable: true, wave: {shape: sine, min: 0, max: 1, length: 1}}", "ecus[0].dids[0]", "writable"),
])
def test_bad_waves_are_reported_with_their_path(tmp_path: Path, did: str, path: str, words: str) -> None:
    text = f"ecus:\n  - name: e\n    addressing: {{mode: normal_11bit, request_id: 0x7E0, response_id: 0x7E8}}\n" \
           f"    dids: [{did}]\n"
    with pytest.raises(ConfigError) as caught:
        load_sim_config(sim_file(tmp_path, text))
    assert any(p == path and words in m for p, m in caught.value.problems), caught.value.problems


@pytest.mark.parametrize(("dtc", "path", "words"), [
    ("{code: P0171}", "ecus[0].dtcs[0].status", "missing"),
    ("{code: P0171, schedule: [{at_s: 1}]}", "ecus[0].dtcs[0].schedule[0].status", "missing"),
    ("{code: P0171, schedule: [{at_s: 1, status: 256}]}", "ecus[0].dtcs[0].schedule[0].status", "status byte"),
    ("{code: P0171, schedule: [{at_s: -1, status: 1}]}", "ecus[0].dtcs[0].schedule[0].at_s", ""),
    ("{code: P0171, schedule: [{at_s: 1, status: 1}, {at_s: 1, status: 0}]}", "ecus[0].dtcs[0].schedule",
     "same time"),
    ("{code: P0171, every_s: 5, schedule: [{at_s: 5, status: 1}]}", "ecus[0].dtcs[0].every_s", "after the last"),
    ("{code: P0171, status: 1, every_s: 5}", "ecus[0].dtcs[0].every_s", "give one"),
    ("{code: P0171, schedule: {at_s: 1}}", "ecus[0].dtcs[0].schedule", "expected a list"),
])
def test_bad_schedules_are_reported_with_their_path(tmp_path: Path, dtc: str, path: str, words: str) -> None:
    text = f"ecus:\n  - name: e\n    addressing: {{mode: normal_11bit, request_id: 0x7E0, response_id: 0x7E8}}\n" \
           f"    dtcs: [{dtc}]\n"
    with pytest.raises(ConfigError) as caught:
        load_sim_config(sim_file(tmp_path, text))
    assert any(p == path and words in m for p, m in caught.value.problems), caught.value.problems


# ---- over CAN: the agent reads what moves; injection from a test ------------------------------------

def test_agent_reads_moving_values_and_injected_faults(vehicle: AgentConfig, tmp_path: Path) -> None:
    simulator = Simulator(load_sim_config(sim_file(tmp_path, ENGINE)), bus=vehicle.bus)
    assert simulator.start()
    try:
        with LocalSession(vehicle) as session:
            ecu = simulator.ecu("engine")
            ecu.set_dtc("P0420", 0x08)
            ecu.set_dtc("P0301", 0)
            result = session.run("engine", "read_faults")
            assert result.status is Status.COMPLETED
            codes = {f["code"]: f["status"]["raw"] for f in result.outcome.result["faults"]}
            assert codes["P0420"] == "0x08" and "P0301" not in codes
            assert ecu.dtc_statuses()[0x042000] == 0x08
            speed = session.run("engine", "read_data", {"data": "engine_speed"})
            assert speed.status is Status.COMPLETED
            assert 800 <= speed.outcome.result["values"]["engine_speed"] <= 3000
            with pytest.raises(ValueError):
                ecu.set_dtc("X9999", 1)
            with pytest.raises(ValueError):
                ecu.set_dtc(0x1000000, 1)
    finally:
        simulator.stop()
