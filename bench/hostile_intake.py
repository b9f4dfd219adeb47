"""What hostile traffic costs the agent: a stream of malformed, huge and poisonous commands mixed with
valid ones, through a real Mosquitto into the agent with its simulated demo vehicle. Prints JSON:
messages sent and answered, valid commands completed, intake errors, store size before and after,
ledger bytes per command id, and throughput.

    .venv/bin/python bench/hostile_intake.py [--messages 2000] [--burst 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import load_config  # noqa: E402
from agent.devtools.local_broker import LocalBroker  # noqa: E402
from agent.devtools.sim.simulator import simulators_for  # noqa: E402
from agent.fleet.caller import Caller  # noqa: E402
from agent.system.service import Service  # noqa: E402


def hostile(command_id: str, n: int) -> bytes:
    """One of the payloads of issue 10, chosen by n; every one has a readable id."""
    head = f'{{"id": "{command_id}", "component": "engine", '
    kinds = [
        head + '"command": "read_data", "params": {"data": "vin"}, "timeout_ms": ' + "1" * 4400 + "}",
        head + '"command": "\\ud800"}',
        head + '"command": "write_data", "params": {"data": "engine_speed", "value": Infinity}}',
        head + '"command": "write_data", "params": {"data": "engine_speed", "value": 1e308}}',
        head + '"command": "operation", "params": {"routine": "self_test", "action": []}}',
        head + '"command": "read_data", "params": {"data": ' + "[" * 990 + "]" * 990 + "}}",
        head + '"command": "read_data", "params": {"data": "vin"}, "padding": "' + "x" * 60_000 + '"}',
        head + '"command": "read_data", "params": {"data": "' + "y" * 60_000 + '"}}',
    ]
    return kinds[n % len(kinds)].encode()


def store_bytes(state: Path) -> int:
    return sum(p.stat().st_size for p in state.glob("agent.db*") if p.is_file() and "marker" not in p.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--burst", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LocalBroker(Path(tmp) / "broker") as broker:
        base = load_config(ROOT / "config/demo.yaml")
        config = dataclasses.replace(
            base, vehicle=f"BENCH{uuid.uuid4().hex[:8].upper()}", state_dir=Path(tmp) / "state",
            bus=dataclasses.replace(base.bus, channel=f"bench-{uuid.uuid4().hex[:8]}"),
            mqtt=dataclasses.replace(base.mqtt, broker=broker.url),
            metrics=dataclasses.replace(base.metrics, enabled=False))
        service = Service(config, companions=simulators_for(config))
        service.start()
        with Caller(config.mqtt, config.vehicle) as backend:
            backend.subscribe(f"{backend.topics.base}/responses/#")
            assert service.link.wait_connected(10)
            before = store_bytes(config.state_dir)
            ids, valid = [], []
            started = time.monotonic()
            for start in range(0, args.messages, args.burst):
                payloads = []
                for n in range(start, min(args.messages, start + args.burst)):
                    command_id = f"h-{n}"
                    if n % 10 == 9:
                        valid.append(command_id)
                        payloads.append(json.dumps({"id": command_id, "component": "abs", "command": "read_data",
                                                    "params": {"data": "vin"}}).encode())
                    else:
                        payloads.append(hostile(command_id, n))
                    ids.append(command_id)
                backend.send_all(payloads)
            finals = {command_id: backend.final(command_id, timeout=60) for command_id in ids}
            elapsed = time.monotonic() - started
            service.outbox.flush(10)
            ledger = service.store.ledger_bytes()
            with service.store._lock:  # fold the WAL into the database file to measure what stays
                service.store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            after = store_bytes(config.state_dir)
        service.stop()
    print(json.dumps({
        "messages": args.messages, "answered": len(finals),
        "valid_completed": sum(1 for c in valid if finals[c]["status"] == "completed"), "valid_sent": len(valid),
        "intake_errors": service.intake.stats.errors, "store_bytes_before": before, "store_bytes_after": after,
        "ledger_bytes": ledger, "ledger_bytes_per_id": round(ledger / len(ids), 1),
        "messages_per_s": round(len(ids) / elapsed, 1),
    }, indent=2))
    return 0 if len(finals) == args.messages and not service.intake.stats.errors else 1


if __name__ == "__main__":
    sys.exit(main())
