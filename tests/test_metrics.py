"""The Prometheus endpoint of a running agent: names, buckets, labels, OpenMetrics, promtool, TLS."""

import dataclasses
import re
import ssl
import subprocess
import time
import urllib.request

import pytest
from conftest import DATA
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent.bus.canstate import parse_ip_link
from agent.bus.monitor import BusMonitor
from agent.bus.owner import BusOwner
from agent.config.model import BusConfig, MetricsTls
from agent.devtools.sim.config import fault_from_dict
from agent.metrics.registry import DURATION_BUCKETS, AgentMetrics
from agent.system.service import Service


def scrape(port, accept=None, context=None, scheme="http"):
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/metrics")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=5, context=context) as response:
        return response.headers["Content-Type"], response.read().decode()


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def run(service, backend, component, command, params, **extra):
    body = {"id": f"m-{time.monotonic_ns()}", "component": component, "command": command, "params": params, **extra}
    backend.send(body)
    return backend.final(body["id"])


def test_required_names_and_edge_metrics(service, backend, sim):
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "match": "0100", "no_answer": True})])
    run(service, backend, "engine", "read_data", {"data": "vin"})
    run(service, backend, "engine", "read_data", {"data": "0x1234"})  # NRC 0x31
    run(service, backend, "engine", "read_data", {"data": "idle_mode"})  # timeout
    run(service, backend, "body", "clear_faults", {})  # not permitted
    run(service, backend, "warp", "read_data", {"data": "vin"})  # unknown component: label "unknown"
    backend.send(b"garbage")
    backend.wait_for(lambda s: b"invalid_message" in s.payload, 5)
    _, text = scrape(service.metrics_server.port)
    found = samples(text)
    engine = (("command", "read_data"), ("component", "engine"))
    assert found[("commands_executed_total", (*engine, ("status", "completed")))] == 1
    assert found[("commands_executed_total", (*engine, ("status", "failed")))] == 1
    assert found[("commands_executed_total", (*engine, ("status", "timeout")))] == 1
    assert found[("commands_executed_total", (("command", "clear_faults"), ("component", "body"),
                                              ("status", "rejected")))] == 1
    assert found[("commands_executed_total", (("command", "read_data"), ("component", "unknown"),
                                              ("status", "rejected")))] == 1  # protocol 1.1: nothing ran
    assert found[("sovd_rejected_messages_total", (("reason", "unknown_component"),))] == 1
    assert found[("sovd_command_timeout_total", (("component", "engine"),))] == 1
    assert found[("sovd_negative_responses_total", (("component", "engine"), ("nrc", "0x31"),
                                                    ("service", "0x22")))] == 1
    assert found[("sovd_rejected_messages_total", (("reason", "not_permitted"),))] == 1
    assert found[("sovd_rejected_messages_total", (("reason", "undecodable"),))] == 1
    assert found[("command_execution_duration_seconds_count", engine)] == 3
    buckets = sorted(float(dict(k[1])["le"]) for k in found if k[0] == "command_execution_duration_seconds_bucket"
                     and dict(k[1]).get("component") == "engine" and dict(k[1]).get("command") == "read_data")
    assert buckets == [*DURATION_BUCKETS, float("inf")]
    assert found[("sovd_response_chunks_total", ())] == 0
    assert found[("sovd_mqtt_connected", ())] == 1
    assert found[("sovd_outbox_pending_messages", ())] >= 0
    assert ("sovd_outbox_oldest_pending_age_seconds", ()) in found and ("sovd_outbox_dropped_total", ()) in found
    assert found[("sovd_store_available", ())] == 1 and found[("sovd_ledger_dropped_total", ())] == 0
    assert found[("sovd_store_errors_total", (("operation", "write"),))] == 0
    assert found[("sovd_intake_errors_total", (("stage", "decide"),))] == 0
    assert found[("sovd_store_recoveries_total", (("reason", "torn_wal"),))] == 0
    assert found[("sovd_command_queue_depth", (("component", "engine"),))] == 0
    assert found[("sovd_commands_in_flight", ())] == 0
    assert found[("sovd_uds_answers_discarded_total", (("component", "engine"),))] == 0
    assert found[("sovd_mqtt_messages_received_total", ())] >= 6 and ("sovd_mqtt_reconnects_total", ()) in found
    channel = service.config.bus.channel
    assert found[("sovd_can_bus_state", (("interface", channel), ("sovd_can_bus_state", "unknown")))] == 1
    assert found[("sovd_can_bus_state", (("interface", channel), ("sovd_can_bus_state", "bus-off")))] == 0
    assert found[("sovd_can_frames_total", (("direction", "tx"), ("interface", channel)))] > 0
    assert ("sovd_can_bytes_total", (("direction", "rx"), ("interface", channel))) in found
    assert found[("sovd_ecu_reachable", (("component", "engine"),))] == 0  # its last request timed out
    assert found[("sovd_build_info", (("vehicle", service.config.vehicle), ("version", "0.1.0")))] == 1
    assert ("process_resident_memory_bytes", ()) in found and ("python_info", ()) in {(k[0], ()) for k in found}
    for name, labels in found:
        for key, value in labels:
            assert not re.fullmatch(r"m-\d+", value), f"{name} has a command id as label {key}"


def test_openmetrics_negotiation(service):
    content_type, text = scrape(service.metrics_server.port, accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and text.rstrip().endswith("# EOF")
    content_type, text = scrape(service.metrics_server.port)
    assert content_type.startswith("text/plain") and "# TYPE commands_executed_total counter" in text


def test_promtool_finds_nothing(service, backend):
    run(service, backend, "engine", "read_data", {"data": "vin"})
    _, text = scrape(service.metrics_server.port)
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "" and result.stderr.strip() == "", (
        result.stdout + result.stderr)


def test_labels_are_bounded():
    metrics = AgentMetrics(CollectorRegistry(), "V", ["engine"])
    for i in range(50):
        metrics.final(f"component-{i}", f"command-{i}", "failed", None, {"code": "unknown_component"})
    values = {s.labels["component"] for s in metrics.executed.collect()[0].samples}
    assert values == {"engine", "unknown"}


def test_bus_monitor_reports_kernel_state_changes_and_load():
    readings = iter(["error-active", "error-warning", "bus-off", "bus-off", "error-active"])
    changes = []

    def reader(interface):
        return parse_ip_link((DATA / "iproute2" / f"{next(readings)}.json").read_text(), "can0")

    owner = BusOwner(BusConfig(interface="socketcan", channel="can0"))
    owner._up.set()  # the owner is not started here; it only provides counters and up/down
    monitor = BusMonitor(BusConfig(interface="socketcan", channel="can0"), owner, 60, lambda *a: changes.append(a),
                         reader=reader)
    for _ in range(5):
        monitor.poll()
    assert changes == [("can0", "error-active", "unknown"), ("can0", "error-warning", "error-active"),
                       ("can0", "bus-off", "error-warning"), ("can0", "error-active", "bus-off")]
    assert monitor.reading.load == 0.0  # the recorded counters did not move between polls
    owner._up.clear()
    monitor._reader = lambda interface: parse_ip_link((DATA / "iproute2" / "error-active.json").read_text(), "can0")
    assert monitor.poll().state == "stopped"  # the agent lost the bus, whatever the kernel says


def test_reachability_probe(mqtt_vehicle, sim, backend):
    config = dataclasses.replace(mqtt_vehicle, metrics=dataclasses.replace(mqtt_vehicle.metrics,
                                                                          reachability_interval_s=0.2))
    svc = Service(config)
    svc.start()
    try:
        time.sleep(0.6)
        found = samples(scrape(svc.metrics_server.port)[1])
        assert found[("sovd_ecu_reachable", (("component", "engine"),))] == 1
        sim.ecu("body").set_faults([fault_from_dict({"service": 0x3E, "no_answer": True})])
        time.sleep(0.8)
        found = samples(scrape(svc.metrics_server.port)[1])
        assert found[("sovd_ecu_reachable", (("component", "body"),))] == 0
        assert found[("sovd_ecu_reachable", (("component", "engine"),))] == 1
    finally:
        svc.stop()


def test_tls_endpoint_with_client_certificates(mqtt_vehicle, sim, pki):
    tls = MetricsTls(cert_file=pki / "server.pem", key_file=pki / "server.key", client_ca_file=pki / "ca.pem")
    config = dataclasses.replace(mqtt_vehicle, metrics=dataclasses.replace(mqtt_vehicle.metrics, tls=tls))
    svc = Service(config)
    svc.start()
    try:
        good = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        good.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        _, text = scrape(svc.metrics_server.port, context=good, scheme="https")
        assert "commands_executed_total" in text
        no_cert = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            scrape(svc.metrics_server.port, context=no_cert, scheme="https")
    finally:
        svc.stop()


def test_discarded_answers_are_a_counter_per_component():
    from prometheus_client import generate_latest

    from agent.metrics.registry import AgentState

    registry = CollectorRegistry()
    state = AgentState(answers_discarded={"engine": 3, "body": 0})
    AgentMetrics(registry, "V", ["engine", "body"], state=lambda: state)
    found = samples(generate_latest(registry).decode())
    assert found[("sovd_uds_answers_discarded_total", (("component", "engine"),))] == 3
    assert found[("sovd_uds_answers_discarded_total", (("component", "body"),))] == 0


def test_a_state_that_fails_half_way_drops_its_series_not_the_scrape(caplog):
    """The agent-state collector promised that a failure drops its series for one scrape, never the scrape,
    but only reading the state was guarded: a value that failed while the families were built (half of them
    yielded already) failed the whole scrape. Pure: a registry, and a state with a field a bug left None."""
    from prometheus_client import generate_latest

    from agent.metrics.registry import AgentMetrics, AgentState

    registry = CollectorRegistry()
    AgentMetrics(registry, "V1", ["engine"], state=lambda: AgentState(answers_discarded=None))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert "commands_executed_total" in text  # the scrape stands
    assert "sovd_command_queue_depth" not in text  # this collector's series are all left out, not half of them
    assert any("reading the agent state failed" in r.getMessage() for r in caplog.records)


def test_a_state_that_fails_on_every_scrape_logs_its_traceback_once_until_it_works_again(caplog):
    """Prometheus scrapes every 15 s: a bug in the agent state logged a traceback on each, thousands a day on the
    SD card, where the agent's other repeating failures (frame handlers, keepalives) log once until they work
    again. Pure: a registry, and a state that fails until it is fixed."""
    import logging

    from prometheus_client import generate_latest

    from agent.metrics.registry import AgentMetrics, AgentState

    broken = {"now": True}

    def state() -> AgentState:
        return AgentState(answers_discarded=None if broken["now"] else {})  # type: ignore[arg-type]

    def errors() -> int:
        return len([r for r in caplog.records if r.levelno >= logging.ERROR and "agent state" in r.getMessage()])

    registry = CollectorRegistry()
    AgentMetrics(registry, "V1", ["engine"], state=state)
    for _ in range(3):
        generate_latest(registry)
    assert errors() == 1
    broken["now"] = False
    assert "sovd_command_queue_depth" in generate_latest(registry).decode()
    broken["now"] = True
    generate_latest(registry)
    assert errors() == 2  # failing again after it worked: said again
