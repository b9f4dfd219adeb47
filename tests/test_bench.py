"""The benchmark suite keeps working: `python -m bench --smoke` runs as a real subprocess (real Mosquitto,
the agent and the naive bridge as processes, the simulator) and its JSON carries every figure.

No timing is asserted: the figures only have to exist, be numbers, and come from correct answers.
"""

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT

from agent.config.model import MqttConfig
from agent.fleet.caller import Caller
from bench.configs import demo_config, write

BROKERS = ("mosquitto_defaults", "broker_nodelay")
E2E_SUBJECTS = ("agent", "bridge", "bridge_nagle")
PHASE_FIGURES = ("latency_ms.p50", "latency_ms.p99", "cpu_ms_per_command", "context_switches_per_command")
SYNC_FIGURE = "fsyncs_per_command"
OTHER_FIGURES = [
    *(f"executor.{c}.{f}" for c in ("agent_executor", "udsoncan_client")
      for f in ("latency_ms.p50", "latency_ms.p99", "client_cpu_ms_per_exchange")),
    *(f"isotp.{c}.client_cpu_us_per_frame" for c in ("agent_link", "can_isotp_stack")),
    *(f"idle.{c}.{f}" for c in ("agent_8_ecus", "can_isotp_8_stacks")
      for f in ("cpu_percent_of_a_core", "context_switches_per_s", "rss_mib.rss")),
    *(f"startup.{k}.ready_ms.p50" for k in ("agent", "bridge")),
    *(f"headline.e2e.{b}.{f}" for b in BROKERS
      for f in ("p50", "p99", "p50_floor", "throughput", "cpu_per_command_under_load")),
    "e2e.synced_commit_ms.p50",
    *(f"headline.{f}" for f in ("executor_p50", "executor_cpu", "isotp_cpu_per_frame", "idle_cpu_8_ecus",
                                "idle_context_switches_8_ecus", "rss_demo_after_load", "exec_to_ready")),
]


def figure(data, path):
    for key in path.split("."):
        assert isinstance(data, dict) and key in data, f"missing {path} (at {key})"
        data = data[key]
    return data


def is_number(value):
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "result.json"
    done = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_run_reports_every_figure(smoke):
    result, stdout = smoke
    assert result["mode"] == "smoke" and result["failures"] == {}
    syncs_counted = result["probe"]["fsyncs"].startswith("perf tracepoints")
    for broker in BROKERS:
        for subject in E2E_SUBJECTS:
            base = f"e2e.{broker}.{subject}"
            for phase in ("one_at_a_time", "under_load"):
                assert figure(result, f"{base}.{phase}.errors") == 0, f"{base}.{phase} had wrong or missing answers"
                assert figure(result, f"{base}.{phase}.commands") > 0
                for name in PHASE_FIGURES:
                    assert is_number(figure(result, f"{base}.{phase}.{name}")), f"{base}.{phase}.{name}"
                syncs = figure(result, f"{base}.{phase}.{SYNC_FIGURE}")
                assert is_number(syncs) if syncs_counted else syncs is None
            assert is_number(figure(result, f"{base}.under_load.throughput_per_s"))
            assert is_number(figure(result, f"{base}.rss_mib.rss"))
    for path in OTHER_FIGURES:
        assert is_number(figure(result, path)), path
    # The frame counts are the simulator's: both clients fetched the same PDUs, so the same frames.
    assert figure(result, "isotp.agent_link.frames") == figure(result, "isotp.can_isotp_stack.frames") > 0
    # The readable table comes before the JSON on stdout.
    assert stdout.index("ratio = agent / baseline") < stdout.index('"suite": "sovd-edge bench"')


@pytest.mark.slow
def test_the_bridge_never_syncs_and_the_agent_does(smoke):
    """The fsync count measures something real: the bridge has no store, the agent's ledger is durable."""
    result, _ = smoke
    if not result["probe"]["fsyncs"].startswith("perf tracepoints"):
        pytest.skip(f"fsyncs not countable here: {result['probe']['fsyncs']}")
    for broker in BROKERS:
        assert figure(result, f"e2e.{broker}.bridge.one_at_a_time.fsyncs_per_command") == 0
        assert figure(result, f"e2e.{broker}.agent.one_at_a_time.fsyncs_per_command") > 0


def test_bad_arguments_are_refused_before_anything_starts():
    for module, args in (("bench", ["--only", "nonsense"]), ("bench", ["--rounds", "0"]),
                         ("bench.inproc", ["nonsense", "3"]), ("bench.inproc", ["executor", "x"])):
        done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and done.stderr, (module, args, done.stderr)


def test_the_naive_bridge_survives_malformed_commands(tmp_path, broker):
    """The baseline must not fall over mid-run: garbage in, then a good command still gets its answer."""
    config = demo_config(tmp_path / "state", broker.url)
    path = write(config, tmp_path / "bridge.yaml")
    bridge = subprocess.Popen([sys.executable, "-m", "bench.bridge", "-c", str(path), "--broker", broker.url],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=(tmp_path / "bridge.log").open("wb"))
    try:
        with Caller(MqttConfig(broker=broker.url), config["vehicle"]) as backend:
            backend.subscribe(f"{backend.topics.base}/#")
            answered = None
            for attempt in range(100):  # until its subscription is in place
                backend.send({"id": f"probe-{attempt}", "component": "engine", "command": "read_data",
                              "params": {"data": "vin"}})
                try:
                    answered = backend.final(f"probe-{attempt}", timeout=0.5)
                    break
                except TimeoutError:
                    assert bridge.poll() is None, (tmp_path / "bridge.log").read_text()
            assert answered is not None and answered["status"] == "completed"
            for bad in (b"", b"\xff\xfe", b"[]", b"null", b'{"id": 7}', b'{"id": "a/#"}', b'{"id": "x"}',
                        b'{"id": "y", "component": "nope", "params": {"data": "vin"}}',
                        b'{"id": "z", "component": "engine", "params": {"data": ["vin", 3]}}'):
                backend.send(bad)
            assert backend.final("x")["status"] == "failed" and backend.final("y")["status"] == "failed"
            assert backend.final("z")["status"] == "failed"
            backend.send({"id": "after", "component": "abs", "command": "read_data", "params": {"data": "vin"}})
            assert backend.final("after")["result"] == {"values": {"vin": "WVWZZZ1JZXW000001"}}
            assert not any("a/#" in s.topic for s in backend.seen)
    finally:
        bridge.terminate()
        assert bridge.wait(20) == 0, (tmp_path / "bridge.log").read_text()
