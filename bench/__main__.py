"""`python -m bench`: the agent next to its baselines, in one run; prints a table and the JSON.

    .venv/bin/python -m bench                 # the full suite (a few minutes)
    .venv/bin/python -m bench --smoke         # every figure, tiny counts (CI keeps the suite working)
    .venv/bin/python -m bench --json out.json --only e2e,startup

Ratios (agent / baseline) are the headline: the machines are shared and noisy, absolute numbers move.
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent import __version__
from agent.devtools.local_broker import LocalBroker
from bench import suite
from bench.configs import ROOT
from bench.probe import ProcessProbe
from bench.stats import ratio, render

SECTIONS = ("startup", "idle", "inproc", "e2e")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts: seconds, not minutes (for CI)")
    parser.add_argument("--json", type=Path, help="also write the JSON result to this file")
    parser.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--rounds", type=int, help="override the number of interleaved rounds")
    parser.add_argument("--workdir", type=Path,
                        help="where state, configs and logs go (default: a new directory under /var/tmp, "
                             "disk-backed so that fsync costs what it costs on a disk)")
    args = parser.parse_args(argv)
    only = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(","))
    if unknown := [s for s in only if s not in SECTIONS]:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    settings = suite.SMOKE if args.smoke else suite.Settings()
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        settings = dataclasses.replace(settings, rounds=args.rounds)
    parent = Path("/var/tmp") if Path("/var/tmp").is_dir() else None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sovd-bench-", dir=parent))
    workdir.mkdir(parents=True, exist_ok=True)
    result = run(settings, only, workdir, smoke=args.smoke)
    text = json.dumps(result, indent=2)
    print(table(result))
    print()
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if result["failures"]:
        print(f"\nsections failed; logs kept in {workdir}", file=sys.stderr)
        return 1
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def compile_sources() -> str:
    """Byte-compiles the agent and the bench (what `pip install` does on a device, and what an editable
    install under PYTHONDONTWRITEBYTECODE never gets): otherwise every subject would compile its
    modules at each start, and exec -> READY would measure the compiler."""
    ok = all(compileall.compile_dir(ROOT / package, quiet=1) for package in ("agent", "bench"))
    return "compiled before the run (as pip install does)" if ok else "compilation failed: modules compiled at start"


def run(settings: suite.Settings, only: tuple[str, ...], workdir: Path, smoke: bool) -> dict[str, Any]:
    started = time.monotonic()
    bytecode = compile_sources()
    probe = ProcessProbe(os.getpid())
    result: dict[str, Any] = {
        "suite": "sovd-edge bench", "mode": "smoke" if smoke else "full", "agent_version": __version__,
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "settings": dataclasses.asdict(settings),
        "bytecode": bytecode,
        "probe": {"cpu_and_context_switches": probe.method,
                  "fsyncs": probe.sync_unavailable
                  or "perf tracepoints syscalls:sys_enter_fdatasync + sys_enter_fsync"},
        "failures": {},
    }
    probe.close()
    with LocalBroker(workdir / "broker-shared") as broker:
        for section in SECTIONS:
            if section not in only:
                continue
            _log(f"{section} ...")
            try:
                if section == "startup":
                    result["startup"] = suite.run_startup(settings, workdir, broker, _log)
                elif section == "idle":
                    result["idle"] = suite.run_idle(settings, workdir, broker, _log)
                elif section == "inproc":
                    result.update(suite.run_inproc(settings, _log))
                else:
                    result["e2e"] = suite.run_e2e(settings, workdir, _log)
            except Exception as err:  # one section failing must not lose the others' figures
                result["failures"][section] = f"{type(err).__name__}: {err}"
                _log(f"{section} FAILED: {err}")
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["duration_s"] = round(time.monotonic() - started, 1)
    result["headline"] = headline(result)
    return result


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def headline(r: dict[str, Any]) -> dict[str, Any]:
    """Agent / baseline ratios (lower is better for the agent, except throughput)."""
    out: dict[str, Any] = {"e2e": {}}
    for broker in suite.BROKERS:
        agent, bridge = _get(r, "e2e", broker, "agent"), _get(r, "e2e", broker, "bridge")
        nagle = _get(r, "e2e", broker, "bridge_nagle")
        out["e2e"][broker] = {
            "p50": ratio(_get(agent, "one_at_a_time", "latency_ms", "p50"),
                         _get(bridge, "one_at_a_time", "latency_ms", "p50")),
            "p99": ratio(_get(agent, "one_at_a_time", "latency_ms", "p99"),
                         _get(bridge, "one_at_a_time", "latency_ms", "p99")),
            "p50_vs_bridge_without_nodelay": ratio(_get(agent, "one_at_a_time", "latency_ms", "p50"),
                                                   _get(nagle, "one_at_a_time", "latency_ms", "p50")),
            "throughput": ratio(_get(agent, "under_load", "throughput_per_s"),
                                _get(bridge, "under_load", "throughput_per_s")),
            "cpu_per_command_under_load": ratio(_get(agent, "under_load", "cpu_ms_per_command"),
                                                _get(bridge, "under_load", "cpu_ms_per_command")),
            "p50_floor": ratio(_floor_ms(r, bridge), _get(bridge, "one_at_a_time", "latency_ms", "p50")),
            "agent_fsyncs_per_command": {"one_at_a_time": _get(agent, "one_at_a_time", "fsyncs_per_command"),
                                         "under_load": _get(agent, "under_load", "fsyncs_per_command")},
        }
    out["executor_p50"] = ratio(_get(r, "executor", "agent_executor", "latency_ms", "p50"),
                                _get(r, "executor", "udsoncan_client", "latency_ms", "p50"))
    out["executor_cpu"] = ratio(_get(r, "executor", "agent_executor", "client_cpu_ms_per_exchange"),
                                _get(r, "executor", "udsoncan_client", "client_cpu_ms_per_exchange"))
    out["isotp_cpu_per_frame"] = ratio(_get(r, "isotp", "agent_link", "client_cpu_us_per_frame"),
                                       _get(r, "isotp", "can_isotp_stack", "client_cpu_us_per_frame"))
    out["idle_cpu_8_ecus"] = ratio(_get(r, "idle", "agent_8_ecus", "cpu_percent_of_a_core"),
                                   _get(r, "idle", "can_isotp_8_stacks", "cpu_percent_of_a_core"))
    out["idle_context_switches_8_ecus"] = ratio(_get(r, "idle", "agent_8_ecus", "context_switches_per_s"),
                                                _get(r, "idle", "can_isotp_8_stacks", "context_switches_per_s"))
    out["rss_demo_after_load"] = ratio(_get(r, "e2e", "mosquitto_defaults", "agent", "rss_mib", "rss"),
                                       _get(r, "e2e", "mosquitto_defaults", "bridge", "rss_mib", "rss"))
    out["exec_to_ready"] = ratio(_get(r, "startup", "agent", "ready_ms", "p50"),
                                 _get(r, "startup", "bridge", "ready_ms", "p50"))
    return out


def _floor_ms(r: dict[str, Any], bridge: dict[str, Any] | None) -> float | None:
    """The lowest one-at-a-time p50 exactly-once allows here: the bridge's round trip plus the two synced
    commits on a command's path (bench/durability.py)."""
    commit = _get(r, "e2e", "synced_commit_ms", "p50")
    base = _get(bridge, "one_at_a_time", "latency_ms", "p50")
    return None if commit is None or base is None else round(base + 2 * commit, 2)


def table(r: dict[str, Any]) -> str:
    rows: list[tuple[str, Any, Any, Any]] = []
    for broker, label in (("mosquitto_defaults", "Mosquitto defaults"), ("broker_nodelay", "set_tcp_nodelay true")):
        agent, bridge = _get(r, "e2e", broker, "agent"), _get(r, "e2e", broker, "bridge")
        nagle = _get(r, "e2e", broker, "bridge_nagle")
        if agent is None:
            continue
        for q in ("p50", "p99"):
            a = _get(agent, "one_at_a_time", "latency_ms", q)
            b = _get(bridge, "one_at_a_time", "latency_ms", q)
            rows.append((f"one at a time {q} ms, {label}", a, b, ratio(a, b)))
        a, b = _get(agent, "one_at_a_time", "latency_ms", "p50"), _get(nagle, "one_at_a_time", "latency_ms", "p50")
        rows.append((f"  same p50, bridge without TCP_NODELAY, {label}", a, b, ratio(a, b)))
        floor = _floor_ms(r, bridge)
        if floor is not None:
            b = _get(bridge, "one_at_a_time", "latency_ms", "p50")
            rows.append((f"  floor p50 ms: bridge + 2 synced commits, {label}", floor, b, ratio(floor, b)))
        a, b = _get(agent, "under_load", "throughput_per_s"), _get(bridge, "under_load", "throughput_per_s")
        rows.append((f"throughput /s, {r['settings']['window']} outstanding per component, {label}", a, b,
                     ratio(a, b)))
        for phase, name in (("one_at_a_time", "one at a time"), ("under_load", "under load")):
            a, b = _get(agent, phase, "cpu_ms_per_command"), _get(bridge, phase, "cpu_ms_per_command")
            rows.append((f"CPU ms per command {name} (incl. simulator), {label}", a, b, ratio(a, b)))
        for phase, name in (("one_at_a_time", "one at a time"), ("under_load", "under load")):
            a, b = _get(agent, phase, "fsyncs_per_command"), _get(bridge, phase, "fsyncs_per_command")
            rows.append((f"fsyncs per command {name}, {label}", a, b, None))
        errors = sum((_get(x, p, "errors") or 0)
                     for x in (agent, bridge, nagle) for p in ("one_at_a_time", "under_load"))
        if errors:
            rows.append((f"  ERRORS (non-completed or missing answers), {label}", errors, None, None))
    pairs = [
        ("executor p50 ms vs udsoncan Client", ("executor", "agent_executor", "latency_ms", "p50"),
         ("executor", "udsoncan_client", "latency_ms", "p50")),
        ("executor client CPU ms vs udsoncan Client", ("executor", "agent_executor", "client_cpu_ms_per_exchange"),
         ("executor", "udsoncan_client", "client_cpu_ms_per_exchange")),
        ("ISO-TP client CPU us per CAN frame vs can-isotp", ("isotp", "agent_link", "client_cpu_us_per_frame"),
         ("isotp", "can_isotp_stack", "client_cpu_us_per_frame")),
        ("idle CPU % of a core, 8 ECUs vs 8 can-isotp stacks", ("idle", "agent_8_ecus", "cpu_percent_of_a_core"),
         ("idle", "can_isotp_8_stacks", "cpu_percent_of_a_core")),
        ("idle context switches /s, same", ("idle", "agent_8_ecus", "context_switches_per_s"),
         ("idle", "can_isotp_8_stacks", "context_switches_per_s")),
        ("RSS MiB, 8 ECUs idle vs 8 can-isotp stacks", ("idle", "agent_8_ecus", "rss_mib", "rss"),
         ("idle", "can_isotp_8_stacks", "rss_mib", "rss")),
        ("RSS MiB, demo after load vs bridge", ("e2e", "mosquitto_defaults", "agent", "rss_mib", "rss"),
         ("e2e", "mosquitto_defaults", "bridge", "rss_mib", "rss")),
        ("exec -> READY p50 ms vs bridge", ("startup", "agent", "ready_ms", "p50"),
         ("startup", "bridge", "ready_ms", "p50")),
    ]
    for name, a_path, b_path in pairs:
        a, b = _get(r, *a_path), _get(r, *b_path)
        if a is not None or b is not None:
            rows.append((name, a, b, ratio(a, b)))
    title = (f"sovd-edge bench ({r['mode']}, {r['duration_s']} s, load {r['machine']['loadavg_at_start']} -> "
             f"{r['machine']['loadavg_at_end']}); baseline: naive bridge / bare library; ratio = agent / baseline")
    failures = "".join(f"\nFAILED {k}: {v}" for k, v in r["failures"].items())
    return render(rows, title) + failures


if __name__ == "__main__":
    sys.exit(main())
