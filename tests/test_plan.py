"""Plan validation (protocol revision 1.1): pure, every problem with its path, as strict as commands."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import DATA

from agent.config import load_config
from agent.wire.plan import InvalidPlanError, parse_plan, plan_identity

CONFIG = load_config(DATA / "vehicle.yaml")


def problems(body: object, name: str | None = None) -> dict[str, str]:
    with pytest.raises(InvalidPlanError) as err:
        parse_plan(body, CONFIG, name)
    return dict(err.value.problems)


def test_the_spec_example_is_a_valid_plan():
    plan = parse_plan({"name": "powertrain", "version": 3,
                       "signals": [{"component": "engine", "data": ["engine_speed", "oil_temp"], "every_ms": 1000,
                                    "on_change": True, "deadband": 0.5, "export": True}],
                       "faults": [{"component": "engine", "every_ms": 60000, "status_mask": "0x09",
                                   "snapshots": False}],
                       "batch": {"max_age_ms": 10000, "max_samples": 500}, "budget": {"requests_per_s": 20}}, CONFIG)
    assert (plan.name, plan.version, plan.requests_per_s) == ("powertrain", 3, 20.0)
    signal = plan.signals[0]
    assert [i.name for i in signal.items] == ["engine_speed", "oil_temp"]
    assert (signal.on_change, signal.deadband, signal.export, signal.every_ms) == (True, 0.5, True, 1000)
    assert plan.faults[0].status_mask == 0x09
    assert (plan.batch.max_age_ms, plan.batch.max_samples) == (10000, 500)


def test_a_signal_may_name_obd_pids_whose_samples_are_named_obd_dot_pid():
    plan = parse_plan({"name": "obd", "version": 1, "signals": [
        {"component": "engine", "pids": ["coolant_temperature", "0x0C"], "every_ms": 500, "export": True}]}, CONFIG)
    items = plan.signals[0].items
    assert [(i.name, i.pid, i.unit) for i in items] == [("obd.coolant_temperature", 0x05, "degC"),
                                                        ("obd.engine_speed", 0x0C, "rpm")]
    assert all(i.numeric for i in items)


def test_every_error_is_reported_at_once_with_its_path():
    found = problems({"name": "p", "version": -1, "extra": 1,
                      "signals": [{"component": "engine", "data": ["nope", 5], "every_ms": 10, "deadband": 1},
                                  {"component": "tractor", "data": ["x"], "every_ms": 1000},
                                  {"component": "engine", "data": ["oil_temp"], "pids": ["0x05"], "every_ms": 100}],
                      "faults": [{"component": "engine", "every_ms": 1000, "status_mask": 0},
                                 {"component": "engine", "every_ms": 2000}],
                      "batch": {"max_samples": 0, "max_age_ms": "soon"}, "budget": {"requests_per_s": float("inf")}})
    assert found == {
        "version": "-1 is not a version (an integer from 0)",
        "extra": "unknown key",
        "signals[0].every_ms": "10 is not an interval of 100..86400000 ms",
        "signals[0].data[0]": "engine has no DID named 'nope' (known: vin, engine_speed, oil_temp, idle_mode, "
                              "big_block)",
        "signals[0].data[1]": 'expected a DID name or "0xNNNN", got int 5',
        "signals[0].deadband": "only used with on_change: true",
        "signals[1].component": "no component named 'tractor' in this vehicle's config (known: engine, body, "
                                "gateway, camera)",
        "signals[2]": "name either data (DIDs) or pids (OBD-II PIDs), not both or neither",
        "faults[0].status_mask": "0 is not a status mask byte (0x01..0xFF)",
        "faults": "engine is watched twice: one fault reading per component",
        "batch.max_samples": "0 is not a count of 1..10000 samples",
        "batch.max_age_ms": "expected an integer, got string 'soon'",
        "budget.requests_per_s": "expected a rate of requests per second above 0 and at most 1000, got float inf",
    }


def test_identifiers_and_text_are_never_exported():
    found = problems({"name": "p", "version": 1, "signals": [
        {"component": "engine", "data": ["vin", "idle_mode", "0xF18C"], "every_ms": 1000, "export": True}]})
    assert set(found) == {"signals[0].data[0]", "signals[0].data[1]", "signals[0].data[2]"}
    assert "identifiers such as the VIN never are" in found["signals[0].data[0]"]


def test_a_value_read_twice_by_one_plan_is_refused():
    found = problems({"name": "p", "version": 1, "signals": [
        {"component": "engine", "data": ["oil_temp"], "every_ms": 1000},
        {"component": "engine", "data": ["oil_temp"], "every_ms": 500}]})
    assert found == {"signals[1].data[0]": "oil_temp of engine is already read by signals[0].data[0]"}


def test_the_topic_name_must_match_the_body():
    assert problems({"name": "a", "version": 1, "signals": [
        {"component": "engine", "data": ["oil_temp"], "every_ms": 1000}]}, name="b") == {
        "name": "'a' differs from the plan's topic name 'b'"}


def test_a_plan_needs_something_to_read_and_a_mapping():
    assert problems({"name": "a", "version": 1}) == {"signals": "a plan reads at least one signal or fault list"}
    assert problems([1, 2]) == {"(top level)": "expected a mapping, got a list"}
    assert problems("plan") == {"(top level)": "expected a mapping, got string 'plan'"}


def test_pids_the_agent_cannot_decode_or_bitmaps_are_refused():
    found = problems({"name": "p", "version": 1, "signals": [
        {"component": "engine", "pids": ["0x00", "0xFE", "warp_speed"], "every_ms": 1000}]})
    assert set(found) == {"signals[0].pids[0]", "signals[0].pids[1]", "signals[0].pids[2]"}


def test_commands_the_component_does_not_allow_are_refused():
    body = load_config(DATA / "vehicle.yaml")
    engine = dataclasses.replace(body.ecus[0], allow=frozenset({"tester_present"}))
    config = dataclasses.replace(body, ecus=(engine, *body.ecus[1:]))
    with pytest.raises(InvalidPlanError) as err:
        parse_plan({"name": "p", "version": 1, "signals": [{"component": "engine", "data": ["oil_temp"],
                                                             "every_ms": 1000}],
                    "faults": [{"component": "engine", "every_ms": 1000}]}, config)
    assert dict(err.value.problems) == {
        "signals[0].data": "read_data is not enabled for engine (config: allow)",
        "faults[0].component": "read_faults is not enabled for engine (config: allow)"}


def test_identity_is_read_as_far_as_possible():
    assert plan_identity({"name": "ok", "version": 4}) == ("ok", 4)
    assert plan_identity({"name": "bad/name", "version": True}) == (None, None)
    assert plan_identity("x") == (None, None)
