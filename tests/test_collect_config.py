"""`collect:` in the agent's config: bounds and sleep settings with paths; local plans checked by check-config
as strictly as plans from MQTT."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import DATA, ROOT

from agent.config import load_config, parse_config
from agent.config.model import CollectConfig
from agent.errors import ConfigError
from agent.wire.plan import local_plan_problems


def vehicle_with(collect: object) -> dict:
    data = yaml.safe_load((DATA / "vehicle.yaml").read_text())
    data["collect"] = collect
    return data


def test_defaults_when_absent():
    config = load_config(DATA / "vehicle.yaml")
    assert config.collect.plans == () and config.collect.sleep.silence_ms == 0
    assert config.collect.max_dids_per_request == 8 and config.collect.telemetry_max_bytes == 4 * 1024 * 1024


def test_sleep_settings_and_bounds_are_read():
    config = parse_config(vehicle_with({
        "max_dids_per_request": 4, "telemetry_max_bytes": 65536, "backoff_s": 2, "backoff_max_s": 60,
        "sleep": {"silence_ms": 30000, "condition": {"component": "engine", "data": "oil_temp", "below": 11.8,
                                                     "recheck_ms": 0}},
        "plans": [{"name": "p", "version": 1}]}))
    assert config.collect.max_dids_per_request == 4 and config.collect.sleep.silence_ms == 30000
    assert config.collect.sleep.condition.below == 11.8 and config.collect.plans == ({"name": "p", "version": 1},)


def test_every_problem_has_its_path():
    with pytest.raises(ConfigError) as err:
        parse_config(vehicle_with({"max_dids_per_request": 0, "telemetry_max_bytes": 10, "what": 1,
                                   "sleep": {"silence_ms": -1, "condition": {"component": "engine", "data": "vin",
                                                                             "below": "low"}},
                                   "plans": ["not a plan"]}))
    assert dict(err.value.problems) == {
        "collect.plans[0]": "expected a plan (a mapping), got string 'not a plan'",
        "collect.max_dids_per_request": "0 is out of range 1..64",
        "collect.telemetry_max_bytes": "10 is out of range 16384..1073741824",
        "collect.what": "unknown key",
        "collect.sleep.silence_ms": "-1 is out of range 0..86400000",
        "collect.sleep.condition.below": "expected a number, got string 'low'",
        "collect.sleep.condition.data": "vin is not numeric (codec ascii)",
    }


def test_local_plans_are_validated_with_paths_under_collect(tmp_path):
    config = parse_config(vehicle_with({"plans": [
        {"name": "ok", "version": 1, "signals": [{"component": "engine", "data": ["oil_temp"], "every_ms": 1000}]},
        {"name": "ok", "version": 2, "signals": [{"component": "engine", "data": ["oil_temp"], "every_ms": 1000}]},
        {"name": "bad", "version": 1, "signals": [{"component": "engine", "data": ["vin"], "every_ms": 5,
                                                   "export": True}]}]}))
    assert local_plan_problems(config) == [
        ("collect.plans[1].name", "plan 'ok' is also collect.plans[0]"),
        ("collect.plans[2].signals[0].every_ms", "5 is not an interval of 100..86400000 ms"),
        ("collect.plans[2].signals[0].data[0]", "vin is not a numeric measurement, so it cannot be exported "
                                                "(identifiers such as the VIN never are)")]


def test_check_config_fails_with_78_on_a_bad_local_plan(tmp_path):
    data = vehicle_with({"plans": [{"name": "bad", "version": 1, "signals": []}]})
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "agent", "check-config", "-c", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stderr
    assert "collect.plans[0].signals: a plan reads at least one signal or fault list" in done.stderr
    good = vehicle_with({"plans": [{"name": "p", "version": 1, "faults": [{"component": "engine",
                                                                              "every_ms": 60000}]}]})
    path.write_text(yaml.safe_dump(good))
    done = subprocess.run([sys.executable, "-m", "agent", "check-config", "-c", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "1 collection plans" in done.stdout


def test_plan_bounds_have_small_defaults_and_local_plans_beyond_them_are_a_problem():
    assert (CollectConfig().max_plans, CollectConfig().max_scheduled_requests) == (16, 1024)
    config = parse_config(vehicle_with({"max_plans": 1, "max_scheduled_requests": 50}))
    assert (config.collect.max_plans, config.collect.max_scheduled_requests) == (1, 50)
    with pytest.raises(ConfigError) as err:
        parse_config(vehicle_with({"max_plans": 1, "max_scheduled_requests": 0,
                                   "plans": [{"name": "a", "version": 1}, {"name": "b", "version": 1}]}))
    assert dict(err.value.problems) == {
        "collect.plans": "2 local plans: at most collect.max_plans (1) are applied at once",
        "collect.max_scheduled_requests": "0 is out of range 1..65536"}


def test_check_config_counts_the_local_plans_requests_against_max_scheduled_requests(tmp_path):
    """The collector rejects, at start, a local plan that takes the scheduled requests past their bound;
    check-config said OK to such a config. It counts them as the collector does now: plans in order, one
    request per DID of unknown length (collect.max_dids_per_request groups the others)."""
    dids = [f"0x{i:04X}" for i in range(0x1000, 0x1000 + 30)]  # not in the config: one request each
    plans = [{"name": name, "version": 1, "signals": [{"component": "engine", "data": dids, "every_ms": 60000}]}
             for name in ("a", "b")]
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(vehicle_with({"max_scheduled_requests": 50, "plans": plans})))
    done = subprocess.run([sys.executable, "-m", "agent", "check-config", "-c", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stdout + done.stderr
    assert ("collect.plans[1]: the plan needs 30 requests and the plans before it 30: more than "
            "collect.max_scheduled_requests (50)") in done.stderr
    path.write_text(yaml.safe_dump(vehicle_with({"max_scheduled_requests": 60, "plans": plans})))
    done = subprocess.run([sys.executable, "-m", "agent", "check-config", "-c", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
