"""The benchmark's sections, each measuring the agent next to its baseline in the same run, interleaved."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.devtools.local_broker import LocalBroker
from bench import durability, e2e
from bench.configs import demo_config, fleet_config, write
from bench.probe import rss_mib
from bench.procs import Subject, agent_argv, bridge_argv, spawn
from bench.stats import median, per, percentile, summary

BROKERS = {"mosquitto_defaults": "", "broker_nodelay": "set_tcp_nodelay true\n"}
# The agent, the naive bridge with TCP_NODELAY (the fair baseline: the agent sets it too) and the
# same bridge with paho's default (Nagle on), which is what a naive bridge gets without trying.
E2E_SUBJECTS = ("agent", "bridge", "bridge_nagle")


@dataclass(frozen=True)
class Settings:
    rounds: int = 3  # e2e visits per subject, in rotating order
    latency_commands: int = 40  # per round, one at a time
    load_s: float = 3.0  # per round, with `window` outstanding per component
    window: int = 16
    executor_commands: int = 300  # per round and client
    frames_transfers: int = 15  # 4000-byte PDUs per round and client
    idle_windows: int = 3
    idle_window_s: float = 5.0
    idle_settle_s: float = 3.0
    startup_runs: int = 3
    commit_probes: int = 200  # synced SQLite commits timed on the agent's disk (the latency floor)


SMOKE = Settings(rounds=1, latency_commands=3, load_s=0.3, window=4, executor_commands=5, frames_transfers=2,
                 idle_windows=1, idle_window_s=0.5, idle_settle_s=0.2, startup_runs=1,
                 commit_probes=5)


def _start_subject(kind: str, workdir: Path, broker: LocalBroker, tag: str) -> Subject:
    config = demo_config(workdir / f"state-{tag}", broker.url)
    path = write(config, workdir / f"{tag}.yaml")
    argv = agent_argv(path, broker.url) if kind == "agent" else bridge_argv(path, broker.url, kind == "bridge_nagle")
    subject = spawn(kind, argv, workdir / f"{tag}.log")
    subject.vehicle = config["vehicle"]
    return subject


# ---- end to end ------------------------------------------------------------------------------------

def run_e2e(settings: Settings, workdir: Path, log: Any) -> dict[str, Any]:
    brokers = {name: LocalBroker(workdir / name, extra=extra).start() for name, extra in BROKERS.items()}
    subjects: dict[tuple[str, str], Subject] = {}
    backends: dict[str, e2e.Backend] = {}
    try:
        for broker_name, broker in brokers.items():
            backends[broker_name] = e2e.Backend(broker.url)
            for kind in E2E_SUBJECTS:
                subjects[(broker_name, kind)] = _start_subject(kind, workdir, broker, f"{broker_name}-{kind}")
        for (broker_name, _), subject in subjects.items():
            subject.wait_ready()
            e2e.wait_answering(backends[broker_name], subject)
        log("e2e: all subjects answer")
        phases: dict[tuple[str, str, str], list[e2e.Phase]] = {}
        order = list(subjects)
        for rnd in range(settings.rounds):
            visit = order[rnd % len(order):] + order[:rnd % len(order)]  # rotate so no one always goes first
            for key in visit:
                phase = e2e.one_at_a_time(backends[key[0]], subjects[key], settings.latency_commands)
                phases.setdefault((*key, "one_at_a_time"), []).append(phase)
            for key in reversed(visit):
                phase = e2e.under_load(backends[key[0]], subjects[key], settings.load_s, settings.window)
                phases.setdefault((*key, "under_load"), []).append(phase)
            log(f"e2e: round {rnd + 1}/{settings.rounds} done")
        result: dict[str, Any] = {}
        for (broker_name, kind), subject in subjects.items():
            result.setdefault(broker_name, {})[kind] = {
                "one_at_a_time": _summarise(phases[(broker_name, kind, "one_at_a_time")], load=False),
                "under_load": _summarise(phases[(broker_name, kind, "under_load")], load=True),
                "rss_mib": rss_mib(subject.pid),
            }
        result["unmatched_responses"] = sum(b.foreign for b in backends.values())
        result["synced_commit_ms"] = durability.synced_commits(workdir, settings.commit_probes)
        return result
    finally:
        for backend in backends.values():
            backend.close()
        for subject in subjects.values():
            subject.stop()
        for broker in brokers.values():
            broker.stop()


def _summarise(phases: list[e2e.Phase], load: bool) -> dict[str, Any]:
    latencies = [x for p in phases for x in p.latencies_ms]
    commands = sum(p.completed for p in phases)
    syncs = None if any(p.syncs is None for p in phases) else sum(p.syncs or 0 for p in phases)
    out: dict[str, Any] = {
        "latency_ms": summary(latencies),
        "commands": commands,
        "errors": sum(p.errors for p in phases),
        "cpu_ms_per_command": per(sum(p.cpu_ns for p in phases) / 1e6, commands),
        "fsyncs_per_command": per(syncs, commands),
        "fsyncs_per_command_by_call": None if syncs is None else {
            call: per(sum((p.sync_calls or {}).get(call, 0) for p in phases), commands)
            for call in (phases[0].sync_calls or {})},
        "context_switches_per_command": per(sum(p.context_switches for p in phases), commands, 1),
    }
    if load:
        rates = [p.completed / p.elapsed_s for p in phases if p.elapsed_s > 0]
        out["throughput_per_s"] = round(median(rates) or 0, 1)
        out["throughput_per_s_rounds"] = [round(r, 1) for r in rates]
    else:
        out["p50_ms_rounds"] = [round(percentile(p.latencies_ms, 50) or 0, 2) for p in phases]
    return out


# ---- in-process: executor vs udsoncan, ISO-TP per frame -----------------------------------------

def _inproc(mode: str, count: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "bench.inproc", mode, str(count)], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"bench.inproc {mode} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_inproc(settings: Settings, log: Any) -> dict[str, Any]:
    """Each client in its own fresh process, alternating which goes first in each round."""
    pairs = {"executor": (("executor", "udsoncan"), settings.executor_commands),
             "isotp": (("link", "isotp"), settings.frames_transfers)}
    runs: dict[str, list[dict[str, Any]]] = {}
    for rnd in range(settings.rounds):
        for modes, count in pairs.values():
            for mode in modes if rnd % 2 == 0 else reversed(modes):
                runs.setdefault(mode, []).append(_inproc(mode, count))
        log(f"in-process: round {rnd + 1}/{settings.rounds} done")

    def client(mode: str) -> dict[str, Any]:
        got = runs[mode]
        n = sum(r["n"] for r in got)
        frames = sum(r["frames"] for r in got)
        cpu_ns = sum(r["client_cpu_ns"] for r in got)
        return {"latency_ms": summary([x for r in got for x in r["latency_ms"]], 3),
                "client_cpu_ms_per_exchange": per(cpu_ns / 1e6, n), "exchanges": n,
                "frames": frames, "client_cpu_us_per_frame": per(cpu_ns / 1e3, frames, 2),
                "simulator_cpu_ms_per_exchange": per(sum(r["peer_cpu_ns"] for r in got) / 1e6, n)}

    return {"executor": {"agent_executor": client("executor"), "udsoncan_client": client("udsoncan")},
            "isotp": {"agent_link": client("link"), "can_isotp_stack": client("isotp")}}


# ---- idle with 8 ECUs ------------------------------------------------------------------------------

def run_idle(settings: Settings, workdir: Path, broker: LocalBroker, log: Any) -> dict[str, Any]:
    """The agent with 8 ECUs (nothing simulated, connected to the broker) next to 8 bare can-isotp
    stacks on one bus and notifier, measured over the same windows."""
    config = write(fleet_config(workdir / "state-idle", broker.url), workdir / "idle.yaml")
    agent = spawn("agent", agent_argv(config, broker.url), workdir / "idle-agent.log")
    stacks = spawn("stacks", ["-m", "bench.inproc", "stacks", "8"], workdir / "idle-stacks.log",
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        agent.wait_ready()
        assert stacks.proc.stdout is not None
        if stacks.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"bare stacks did not start: {stacks.log_tail()}")
        time.sleep(settings.idle_settle_s)
        samples: dict[str, list[tuple[float, float]]] = {"agent": [], "stacks": []}
        for _ in range(settings.idle_windows):
            before = {s.name: s.probe.read() for s in (agent, stacks)}
            start = time.monotonic()
            time.sleep(settings.idle_window_s)
            elapsed = time.monotonic() - start
            for s in (agent, stacks):
                spent = s.probe.read() - before[s.name]
                samples[s.name].append((spent.cpu_ns / 1e9 / elapsed * 100, spent.context_switches / elapsed))
        log("idle: done")

        def figures(subject: Subject) -> dict[str, Any]:
            got = samples[subject.name]
            return {"cpu_percent_of_a_core": round(median([c for c, _ in got]) or 0, 3),
                    "context_switches_per_s": round(median([x for _, x in got]) or 0, 1),
                    "rss_mib": rss_mib(subject.pid), "windows": len(got)}

        return {"agent_8_ecus": figures(agent), "can_isotp_8_stacks": figures(stacks)}
    finally:
        agent.stop()
        stacks.stop()


# ---- exec -> READY ---------------------------------------------------------------------------------

def run_startup(settings: Settings, workdir: Path, broker: LocalBroker, log: Any) -> dict[str, Any]:
    """Seconds from exec to READY=1 on the notify socket: the agent with the demo's ECUs and the bridge."""
    times: dict[str, list[float]] = {"agent": [], "bridge": []}
    for run in range(settings.startup_runs):
        for kind in ("agent", "bridge") if run % 2 == 0 else ("bridge", "agent"):
            subject = _start_subject(kind, workdir, broker, f"startup-{kind}-{run}")
            try:
                times[kind].append(subject.wait_ready() * 1000)
            finally:
                subject.stop()
    log("exec -> READY: done")
    return {kind: {"ready_ms": summary(values, 1), "runs_ms": [round(v, 1) for v in values]}
            for kind, values in times.items()}
