"""An outside review of the agent's observability, as the central Prometheus team and its on-call see it:
what the agent exports, what the shipped rules and federation make of it. Each test here failed before
the fix it names. Real prometheus-client, real promtool and Prometheus, real Mosquitto and simulator."""

import itertools
import subprocess
import urllib.request
import uuid

import can
import yaml
from conftest import DATA, ROOT
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_prometheus import chain, wait_value  # noqa: F401 (a fixture)

from agent.bus.canstate import parse_ip_link
from agent.bus.monitor import BusMonitor
from agent.bus.owner import BusOwner
from agent.config.model import BusConfig
from agent.metrics.registry import AgentMetrics, AgentState

IPROUTE2 = DATA / "iproute2"
COUNTERS = ("rx_frames", "tx_frames", "rx_bytes", "tx_bytes", "bus_off", "restarts")


def kernel_monitor(readings):
    """A bus monitor on socketcan whose kernel reads are the recorded `ip` outputs in `readings` (None:
    `ip` failed this time: timed out on a loaded Pi, the adapter re-enumerating). There is no socketcan
    in this kernel, so the reader is the one thing not real here."""
    owner = BusOwner(BusConfig(interface="socketcan", channel="can0"))
    owner._up.set()  # not started: it only provides its counters and up/down
    owner.counters.frames_rx, owner.counters.bytes_rx = 40, 320  # what the agent itself saw: far fewer frames
    feed = iter(readings)

    def reader(interface):
        name = next(feed)
        return None if name is None else parse_ip_link((IPROUTE2 / f"{name}.json").read_text(), interface)

    changes = []
    monitor = BusMonitor(BusConfig(interface="socketcan", channel="can0"), owner, 60,
                         lambda *change: changes.append(change), reader=reader)
    return monitor, changes


def scrape_bus(reading):
    registry = CollectorRegistry()
    AgentMetrics(registry, "V", ["engine"], state=lambda: AgentState(bus=reading))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples if s.name.startswith("sovd_can_")}


def test_a_failed_kernel_read_never_sends_the_can_counters_backwards():
    """Once, one failed `ip` call switched the counters' source from the kernel (every frame since the
    interface came up) to the agent's own: sovd_can_frames_total fell from 10154 to 40 and rose again,
    sovd_can_bus_off_total fell from 3 to 0 and rose again. Prometheus takes each fall for a reset: a
    phantom rate spike of 10 000 frames, a phantom bus-off for increase(), a phantom 100 % bus load."""
    monitor, _ = kernel_monitor(["bus-off", None, "bus-off"])
    seen = [monitor.poll() for _ in range(3)]
    for before, after in itertools.pairwise(seen):
        for name in COUNTERS:
            assert getattr(after, name) >= getattr(before, name), (name, before, after)
    failed = seen[1]
    assert (failed.rx_frames, failed.bus_off, failed.restarts) == (10154, 3, 2)
    assert failed.state == "unknown" and failed.tx_errors is None  # not known this time, and said so
    assert failed.load is None  # no figure rather than 0 % (or 100 % on the next poll)
    assert seen[2].load == 0.0  # the kernel's counters did not move between the good reads
    samples = scrape_bus(failed)
    assert samples[("sovd_can_frames_total", (("direction", "rx"), ("interface", "can0")))] == 10154
    assert samples[("sovd_can_bus_off_total", (("interface", "can0"),))] == 3


def promtool_unit(tmp_path, tests, rule_files=("alerts.yml",)):
    """Runs `promtool test rules` on `tests` (unit-test groups) against the shipped rules."""
    unit = {"rule_files": [str(ROOT / "config/prometheus" / name) for name in rule_files],
            "evaluation_interval": "1m", "tests": tests}
    path = tmp_path / "review_test.yml"
    path.write_text(yaml.safe_dump(unit, sort_keys=False))
    result = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def series(name, values, **labels):
    return {"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def test_bus_off_alert_fires_for_bus_offs_the_scrapes_never_see(tmp_path):
    """hw/can-up sets restart-ms 100: the controller is back 100 ms after a bus-off, while the bus monitor
    reads the state every 5 s, the edge scrapes every 15 s and the central federates every 30 s. The alert
    watched only the state gauge (`bus-off` for 1 min): a vehicle going bus-off again and again never
    showed it at an evaluation and never paged. The kernel's bus-off counter sees each one."""
    state = {"vehicle": "V1", "interface": "can0"}
    flapping = [series("sovd_can_bus_state", "0x20", sovd_can_bus_state="bus-off", **state),
                series("sovd_can_bus_state", "1x20", sovd_can_bus_state="error-active", **state),
                series("sovd_can_bus_off_total", "0 0 1 1 1 2 2 3 3 3 3 3 3 3 3 3 3 3 3 3 3", **state)]
    old = {"vehicle": "V2", "interface": "can0"}  # bus-offs from before the agent started: nothing new
    steady = [series("sovd_can_bus_state", "0x20", sovd_can_bus_state="bus-off", **old),
              series("sovd_can_bus_off_total", "7x20", **old)]
    summary = "V1: CAN interface can0 went bus-off in the last 10 min or is bus-off"
    runbook = rule("SovdCanBusOff")["annotations"]["runbook"]
    promtool_unit(tmp_path, [{
        "interval": "1m", "input_series": flapping + steady,
        "alert_rule_test": [
            {"eval_time": "8m", "alertname": "SovdCanBusOff", "exp_alerts": [
                {"exp_labels": {"severity": "critical", **state},
                 "exp_annotations": {"summary": summary, "runbook": runbook}}]},
            {"eval_time": "19m", "alertname": "SovdCanBusOff", "exp_alerts": []},  # 10 min without one: resolved
        ]}])


def rule(name):
    rules = [r for g in yaml.safe_load((ROOT / "config/prometheus/alerts.yml").read_text())["groups"]
             for r in g["rules"]]
    (found,) = [r for r in rules if r.get("alert") == name]
    return found


def scrape(service):
    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_server.port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_writes_the_store_dropped_while_it_failed_are_exported(service, monkeypatch):
    """While the disk is full, writes wait in memory (at most MAX_DEFERRED); beyond that one is dropped: a
    final response or a ledger state lost for good. The store counted it (`deferred_dropped`) and logged
    it, but no metric showed it: the fleet could not see which vehicles lost data. Made here with a full
    database (SQLite's max_page_count: SQLite's own SQLITE_FULL) and a bound of 0."""
    from agent.store import group
    from agent.store.sqlite import Outgoing, StoreError

    before = scrape(service)
    assert before[("sovd_store_deferred_dropped_total", ())] == 0  # there before the first loss: increase() sees it
    store = service.store
    with store._lock:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")
    monkeypatch.setattr(group, "MAX_DEFERRED", 0)
    try:
        batch = store.batch()
        batch.publish(Outgoing(f"review/{uuid.uuid4().hex}", b"z" * 50_000))  # a topic no one reads
        try:
            batch.commit(defer=True)
        except StoreError:
            pass
        else:
            raise AssertionError("the full database took a 50 kB write")
        assert store.deferred_dropped == 1
        found = scrape(service)
        assert found[("sovd_store_deferred_dropped_total", ())] == 1
        assert found[("sovd_store_available", ())] == 0
    finally:
        with store._lock:
            store._db.execute("PRAGMA max_page_count = 1073741823")


def test_can_send_and_receive_errors_and_dropped_frames_are_exported(mqtt_vehicle, sim, backend):
    """The bus owner counts failed sends, failed receives and frames a full ISO-TP queue dropped (a
    transfer broken under a command); none of the three was exported. A send error that is retried does
    not rebuild the bus, so before this fix it left no trace in any metric. FaultyBus (a VirtualBus whose
    send raises on demand, as socketcan's does with "Network is down") stands in for a failing interface."""
    from test_bus_recovery import Faults, FaultyBus

    from agent.bus.frames import FRAME_QUEUE_SIZE
    from agent.bus.owner import wait_until
    from agent.system.service import Service

    faults = Faults()
    svc = Service(mqtt_vehicle, bus_factory=lambda: FaultyBus(faults, channel=mqtt_vehicle.bus.channel, fd=True))
    svc.start()
    try:
        channel = mqtt_vehicle.bus.channel
        interface = (("interface", channel),)
        found = scrape(svc)
        for name in ("sovd_can_send_errors_total", "sovd_can_receive_errors_total", "sovd_can_frames_dropped_total",
                     "sovd_can_handler_errors_total"):
            assert found[(name, interface)] == 0, name
        faults.send = 1  # ENOBUFS for a moment: retried, no rebuild
        body = {"id": f"r-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "read_data",
                "params": {"data": "vin"}}
        backend.send(body)
        assert backend.final(body["id"])["status"] == "completed"
        owner = svc.runtime.owner
        with can.Bus(interface="virtual", channel=channel, receive_own_messages=False) as other:
            for _ in range(FRAME_QUEUE_SIZE + 5):  # the engine's response id, while its link reads nothing
                other.send(can.Message(arbitration_id=0x7E8, is_extended_id=False, data=b"\x30\x00\x00"))
            assert wait_until(lambda: owner.counters.frames_rx >= FRAME_QUEUE_SIZE + 5, 30)
        svc.bus_monitor.poke()  # read now, not in bus_state_interval_s
        dropped = ("sovd_can_frames_dropped_total", interface)
        assert wait_until(lambda: scrape(svc).get(dropped) == owner.counters.dropped, 10), owner.counters
        found = scrape(svc)
        assert found[("sovd_can_send_errors_total", interface)] == 1
        assert found[dropped] >= 5
        assert found[("sovd_can_bus_rebuilds_total", interface)] == 0
    finally:
        svc.stop()


def test_federation_carries_no_created_series(chain, service):  # noqa: F811 (the fixture)
    """prometheus-client exports a `<counter>_created` gauge (its creation time) beside every counter and
    histogram child: on a fresh agent 113 of the 278 series the central Prometheus federated were these,
    a constant per agent start that no rule or panel reads, times every vehicle of the fleet, and on
    the vehicle's SD card as well. The edge drops them at scrape, and the federation does not ask."""
    edge, central = chain
    vehicle = service.config.vehicle
    wait_value(central, f'count({{vehicle="{vehicle}",__name__=~"sovd_.+"}})', lambda v: v > 0)
    wait_value(edge, 'count(sovd_build_info)', lambda v: v > 0)
    assert edge.query('{__name__=~".+_created"}') == []
    assert central.query('{__name__=~".+_created"}') == []
    names = {r["metric"]["__name__"] for r in central.query(f'{{vehicle="{vehicle}"}}')}
    for needed in ("commands_executed_total", "sovd_command_timeout_total", "sovd_build_info",
                   "sovd_can_bus_state", "sovd_store_recoveries_total", "sovd_collection_readings_total", "up"):
        assert needed in names, needed


# The reasons README.md documents for these counters.
REJECTION_REASONS = ("invalid_command", "unknown_component", "not_permitted", "busy", "storage_unavailable",
                     "clock_unsynchronized", "unauthenticated", "undecodable", "bad_id", "internal", "retained",
                     "duplicate", "duplicate_in_flight")
REFUSAL_REASONS = ("unspecified_error", "implementation_specific_error", "not_authorized", "topic_name_invalid",
                   "packet_identifier_in_use", "quota_exceeded", "payload_format_invalid", "packet_too_large",
                   "other", "connection_dropped")


def test_counters_of_known_reasons_are_there_at_zero_before_the_first_event(service):
    """sovd_publish_refused_total (a response the broker will never take: lost) and
    sovd_rejected_messages_total appeared only with their first event, at 1: increase() and rate() need
    a sample before it, so the first refusal (often the only one) was invisible to any rule, and a
    rule could not tell "none yet" from "not exported"."""
    found = scrape(service)
    for reason in REJECTION_REASONS:
        assert found.get(("sovd_rejected_messages_total", (("reason", reason),))) == 0, reason
    for reason in REFUSAL_REASONS:
        assert found.get(("sovd_publish_refused_total", (("reason", reason),))) == 0, reason


def test_messages_lost_for_good_page_someone(tmp_path):
    """Responses and events dropped by the outbox bounds, set aside because the broker will never take
    them, or writes the failing store dropped from memory: each is a result the backend will never get,
    and no alert watched any of them (SovdOutboxBackingUp only watches what still waits)."""
    quiet = [series("sovd_outbox_dropped_total", "0x60", vehicle="V3"),
             series("sovd_publish_refused_total", "0x60", vehicle="V3", reason="not_authorized"),
             series("sovd_store_deferred_dropped_total", "0x60", vehicle="V3")]
    lost = [series("sovd_outbox_dropped_total", "0x10 40x50", vehicle="V1"),
            series("sovd_publish_refused_total", "0x10 1x50", vehicle="V2", reason="not_authorized"),
            series("sovd_publish_refused_total", "0x60", vehicle="V2", reason="packet_too_large"),
            series("sovd_store_deferred_dropped_total", "0x10 3x50", vehicle="V4")]
    runbook = rule("SovdMessagesLost")["annotations"]["runbook"]

    def fired(vehicle):
        return {"exp_labels": {"severity": "warning", "vehicle": vehicle}, "exp_annotations": {
            "summary": f"{vehicle}: the agent lost responses or events for good in the last hour",
            "runbook": runbook}}

    promtool_unit(tmp_path, [{
        "interval": "1m", "input_series": quiet + lost,
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "SovdMessagesLost", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "SovdMessagesLost",
             "exp_alerts": [fired("V1"), fired("V2"), fired("V4")]},
        ]}])


def test_store_recovered_alert_fires_for_a_recovery_as_the_agent_exports_it(tmp_path, mqtt_vehicle, sim):
    """A damaged store is found and replaced while the agent starts, before its endpoint serves a single
    scrape: the first sample Prometheus ever gets from that process is already 1. The alert asked for
    increase(...[1h]) > 0, which needs an earlier 0 from the same series within the hour: after a power
    loss longer than that (the usual cause of the damage) it never fired. (Its unit test fed a 0 then a
    1 from one process, which cannot happen.) The first scrape of a real recovered agent is checked
    here, then the alert on series of that shape."""
    from agent.system.service import STORE_FILE, Service

    mqtt_vehicle.state_dir.mkdir(parents=True)
    (mqtt_vehicle.state_dir / STORE_FILE).write_bytes(b"not a database, a torn write" * 100)
    svc = Service(mqtt_vehicle)
    svc.start()
    try:
        found = scrape(svc)
        reason = svc.store_recovery.reason
        assert found[("sovd_store_recoveries_total", (("reason", reason),))] == 1  # the very first sample
        started = found[("process_start_time_seconds", ())]
    finally:
        svc.stop()
    assert started > 0
    # V1 was off for hours after the power loss: its agent's series start at 1 when it comes back at 1 min.
    recovered = [series("sovd_store_recoveries_total", "_ 1x120", job="sovd-edge", vehicle="V1", reason=reason),
                 series("process_start_time_seconds", "_ 60x120", job="sovd-edge", vehicle="V1")]
    healthy = [series("sovd_store_recoveries_total", "0x120", job="sovd-edge", vehicle="V2", reason=reason),
               series("process_start_time_seconds", "0x120", job="sovd-edge", vehicle="V2")]
    rule_ = rule("SovdStoreRecovered")["annotations"]
    promtool_unit(tmp_path, [{
        "interval": "1m", "input_series": recovered + healthy,
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "SovdStoreRecovered", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "vehicle": "V1"},
                 "exp_annotations": {"summary": "V1: the agent found its store damaged at start and began with an "
                                                "empty one", "runbook": rule_["runbook"]}}]},
            {"eval_time": "90m", "alertname": "SovdStoreRecovered", "exp_alerts": []},  # an hour after that start
        ]}])


def test_one_failed_command_on_a_quiet_vehicle_does_not_page(tmp_path):
    """SovdCommandSuccessRateLow had no `for:`: the ratio over 5 min is 0 from the first evaluation after
    a quiet vehicle's only command failed (an NRC for a DID the ECU lacks, a policy refusal), so one
    command fired it at once, and resolved it five minutes later. A low rate that lasts still fires."""
    labels = {"command": "read_data", "component": "engine"}
    one = [series("commands_executed_total", "0x3 1x30", vehicle="V1", status="failed", **labels),
           series("commands_executed_total", "0x33", vehicle="V1", status="completed", **labels)]
    poor = [series("commands_executed_total", "0+3x33", vehicle="V2", status="failed", **labels),
            series("commands_executed_total", "0+3x33", vehicle="V2", status="completed", **labels)]
    annotations = rule("SovdCommandSuccessRateLow")["annotations"]
    promtool_unit(tmp_path, [{
        "interval": "1m", "input_series": one + poor,
        "alert_rule_test": [
            {"eval_time": f"{minute}m", "alertname": "SovdCommandSuccessRateLow", "exp_alerts": []}
            for minute in range(0, 10)] + [
            {"eval_time": "30m", "alertname": "SovdCommandSuccessRateLow", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "vehicle": "V2"}, "exp_annotations": {
                    "summary": "V2: only 50% of diagnostic commands completed over 5 min",
                    "runbook": annotations["runbook"]}}]},
        ]}])


def test_a_metrics_address_that_cannot_be_bound_names_the_setting_that_exists(tmp_path, broker):
    """Every failure to open the endpoint ended "(is another agent or exporter using it? set
    metrics.listen_port)": no such setting exists (it is `metrics.listen`, HOST:PORT, or --metrics-listen),
    and for an address that is not this host's, or a name that does not resolve, nothing is "using it".
    The on-call engineer was sent looking for a second exporter and a key the config refuses."""
    import socket
    import sys

    from test_failure_paths import agent_config

    def run(listen):
        path = agent_config(tmp_path, broker.url, metrics_port=1)
        config = yaml.safe_load(path.read_text())
        config["metrics"] = {"listen": listen}
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run([sys.executable, "-m", "agent", "run", "-c", str(path), "--log-format", "json"],
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
        errors = [line for line in result.stderr.splitlines() if '"level": "ERROR"' in line]
        assert result.returncode == 69 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        return errors[0]

    for listen in ("192.0.2.1:9469", "no-such-host.invalid:9469"):  # TEST-NET-1: never this host's
        line = run(listen)
        assert listen in line and "metrics.listen" in line, line
        assert "listen_port" not in line and "using it" not in line, line
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = run(f"127.0.0.1:{port}")
    assert "in use" in line and "using it" in line and "metrics.listen" in line and "listen_port" not in line, line


def test_every_metric_the_alerts_read_is_one_the_agent_exports(service, backend):
    """A renamed metric or label leaves an alert that can never fire, and promtool cannot tell: each
    metric name in alerts.yml (and each label an alert selects on) is checked against a real scrape of
    a running agent that has answered one command."""
    import re

    body = {"id": f"a-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "read_data", "params": {"data": "vin"}}
    backend.send(body)
    backend.final(body["id"])
    exported: dict[str, set[str]] = {}
    for (name, labels) in scrape(service):
        exported.setdefault(name, set()).update(key for key, _ in labels)
    exported["up"] = {"job", "instance"}  # Prometheus' own, per target
    checked = 0
    for alert in [r for g in yaml.safe_load((ROOT / "config/prometheus/alerts.yml").read_text())["groups"]
                  for r in g["rules"]]:
        for name, selector in re.findall(r"\b((?:sovd|command|commands|process|up)\w*)\s*(\{[^}]*\})?", alert["expr"]):
            assert name in exported, f"{alert['alert']}: {name} is not exported"
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector or ""):
                assert label in exported[name] | {"vehicle", "job", "instance"}, f"{alert['alert']}: {name}{{{label}}}"
            checked += 1
    assert checked >= 19


SPEED = {"component": "engine", "data": ["engine_speed", "oil_temp"], "every_ms": 100, "export": True}
RPM = {"component": "engine", "data": "engine_speed", "unit": "rpm"}


def test_an_exported_value_the_ecu_no_longer_gives_is_not_shown_as_current(vehicle, sim, tmp_path):
    """sovd_ecu_value kept the last value read for as long as the plan exported it: an engine ECU that
    stopped answering went on showing 750 rpm on the fleet dashboard for hours. A reading that fails
    removes the value's series (sovd_collection_readings_total says why); the next good one brings it
    back. Real collector, simulator and virtual bus."""
    from collect_support import plan, rig, with_collect

    from agent.devtools.sim.config import fault_from_dict

    with rig(with_collect(vehicle, plans=(plan(signals=[SPEED]),)), tmp_path) as r:
        r.out.wait(lambda: r.registry.get_sample_value("sovd_ecu_value", RPM) == 750)
        sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "no_answer": True})])
        r.out.wait(lambda: r.readings("engine", "timeout") >= 1, timeout=30)
        assert r.collector.wait_idle(5)  # the reading that timed out is handled in full
        assert r.registry.get_sample_value("sovd_ecu_value", RPM) is None
        sim.ecu("engine").set_faults([])
        r.out.wait(lambda: r.registry.get_sample_value("sovd_ecu_value", RPM) == 750, timeout=30)


def test_exported_values_are_not_shown_as_current_while_the_vehicle_sleeps(vehicle, sim, tmp_path):
    """Paused collection (the vehicle asleep) reads nothing, yet sovd_ecu_value went on showing the last
    engine speed of a parked car. The values go with the pause and come back with the readings."""
    from collect_support import plan, rig, with_collect

    from agent.config.model import SleepConfig

    traffic = sim.vehicle_traffic(period_s=0.05)
    config = with_collect(vehicle, sleep=SleepConfig(silence_ms=400), plans=(plan(signals=[SPEED]),))
    with rig(config, tmp_path) as r:
        r.out.wait(lambda: r.registry.get_sample_value("sovd_ecu_value", RPM) == 750)
        traffic.sleep()
        r.out.wait(lambda: r.out.of_type("collection_paused"))
        assert r.collector.wait_idle(5)
        assert r.registry.get_sample_value("sovd_collection_paused") == 1
        assert r.registry.get_sample_value("sovd_ecu_value", RPM) is None
        traffic.wake()
        r.out.wait(lambda: r.registry.get_sample_value("sovd_ecu_value", RPM) == 750, timeout=30)


def test_a_rejected_collection_plan_is_counted(vehicle, sim, tmp_path):
    """A plan the agent cannot apply is answered with a plan_rejected event and a WARNING line, and no
    metric: a backend that publishes a broken plan to the whole fleet collects nothing anywhere, and
    the fleet's Prometheus could not see it. Counted by where the plan came from, there at 0 before."""
    import json

    from collect_support import plan, rig, with_collect

    with rig(with_collect(vehicle, plans=(plan(signals=[SPEED]),)), tmp_path) as r:
        for source in ("mqtt", "config", "store"):
            assert r.registry.get_sample_value("sovd_collection_plans_rejected_total", {"source": source}) == 0
        r.collector.submit_plan("broken", json.dumps(plan("broken", signals=[{"component": "warp"}])).encode())
        r.out.wait(lambda: r.out.of_type("plan_rejected"))
        assert r.collector.wait_idle(5)
        assert r.registry.get_sample_value("sovd_collection_plans_rejected_total", {"source": "mqtt"}) == 1


def test_every_warning_and_error_the_agent_logs_is_counted(service):
    """Many error paths had a log line and no metric: an outbox, telemetry-lane, collection or store-writer
    pass that failed on an unexpected exception and retries, a worker thread that died and was restarted,
    a clock that could not be persisted, a keepalive that failed... The fleet saw nothing of a vehicle
    logging a traceback every second. Every WARNING and ERROR line of the agent's loggers is counted by
    level (the journal says which); shown with an outbox pass that fails once (the bug injected)."""
    from agent.bus.owner import wait_until

    key = ("sovd_log_messages_total", (("level", "error"),))
    before = scrape(service)
    for level in ("warning", "error", "critical"):
        assert ("sovd_log_messages_total", (("level", level),)) in before, level
    outbox = service.outbox
    settle = outbox._settle_acks

    def broken():
        outbox._settle_acks = settle
        raise RuntimeError("a bug")

    outbox._settle_acks = broken
    outbox.wake()
    assert wait_until(lambda: outbox._settle_acks is settle, 10)  # the failing pass ran
    assert wait_until(lambda: scrape(service)[key] >= before[key] + 1, 10)


def test_the_dashboard_shows_what_is_lost_and_what_fails():
    """No panel showed a message lost for good (outbox bounds, broker refusals, the store), a failed CAN
    send or a dropped frame, or how much the agent logs: an on-call engineer paged by SovdMessagesLost
    found nothing on the fleet dashboard. (test_prometheus checks that every query returns data.)"""
    import json

    dashboard = json.loads((ROOT / "config/grafana/edge-fleet.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for name in ("sovd_outbox_dropped_total", "sovd_publish_refused_total", "sovd_store_deferred_dropped_total",
                 "sovd_log_messages_total", "sovd_can_send_errors_total", "sovd_can_receive_errors_total",
                 "sovd_can_frames_dropped_total", "sovd_can_handler_errors_total"):
        assert name in exprs, name


def test_the_load_after_a_failed_kernel_read_spans_the_time_since_the_last_good_one(monkeypatch):
    """A failed read restarted the load interval with the held counters, so the next good read put two
    intervals' frames into one: twice the bus load. The monitor's clock is a fake here (5 s per poll)."""
    import json
    import types

    from agent.bus import monitor as busmonitor
    from agent.bus.canstate import bus_load, frame_bits

    clock = [0.0]
    monkeypatch.setattr(busmonitor, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    first = (IPROUTE2 / "error-active.json").read_text()
    later = json.loads(first)
    later[0]["stats64"]["rx"]["packets"] += 1000
    later[0]["stats64"]["rx"]["bytes"] += 8000
    monitor, _ = kernel_monitor([])
    links = iter([parse_ip_link(first, "can0"), None, parse_ip_link(json.dumps(later), "can0")])
    monitor._reader = lambda interface: next(links)
    monitor.poll()
    clock[0] = 5.0
    assert monitor.poll().load is None
    clock[0] = 10.0
    assert monitor.poll().load == bus_load(frame_bits(1000, 8000), 10.0, 500000)


def test_every_rule_evaluates_without_error_on_the_real_federated_series(chain, service, backend):  # noqa: F811
    """promtool's unit tests feed series shaped by hand; a rule can still fail at evaluation on the real
    ones (a many-to-many match, a label that makes two series out of one). The central Prometheus of the
    live chain evaluates every shipped rule on what the agent really exports: each one must be healthy."""
    from agent.bus.owner import wait_until

    _, central = chain
    body = {"id": f"e-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "read_data", "params": {"data": "vin"}}
    backend.send(body)
    backend.final(body["id"])
    vehicle = service.config.vehicle
    wait_value(central, f'count(sovd_store_recoveries_total{{vehicle="{vehicle}"}})', lambda v: v > 0)

    def rules():
        return [r for g in central.api("rules")["groups"] for r in g["rules"]]

    assert wait_until(lambda: rules() and all(r.get("lastEvaluation", "").startswith("20") for r in rules()), 30)
    assert wait_until(lambda: all(r["health"] == "ok" for r in rules()), 5), \
        [(r["name"], r["health"], r.get("lastError")) for r in rules()]
    assert len(rules()) == 12


def test_no_can_figures_are_served_before_the_bus_monitor_has_read_them(mqtt_vehicle, sim):
    """Service.start() opens the endpoint first and starts the bus monitor last (after the bus, restart
    recovery and collection): a scrape in between got the monitor's empty reading, 0 for every CAN
    counter. After an agent restart on a socketcan interface whose kernel had counted bus-offs, the
    series went N (old process), 0, N: Prometheus takes the 0 for a reset and increase() for N new
    bus-offs, so SovdCanBusOff (critical) fired for ten minutes; frames showed a spike of every frame
    since the interface came up. Nothing is served until the first read."""
    from agent.system.service import Service

    svc = Service(mqtt_vehicle)
    monitor, _ = kernel_monitor(["bus-off"])  # a socketcan interface whose kernel counted 3 bus-offs
    svc.bus_monitor = monitor
    svc.metrics_server.start()  # as Service.start() does first
    try:
        found = scrape(svc)
        assert [key for key in found if key[0].startswith("sovd_can_")] == []
        monitor.poll()  # as Service.start() does last
        found = scrape(svc)
        assert found[("sovd_can_bus_off_total", (("interface", "can0"),))] == 3
    finally:
        svc.metrics_server.stop()
        svc.store.close()
