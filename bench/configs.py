"""The configs the benchmark runs: the demo vehicle with a private identity, and an idle 8-ECU vehicle."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "config" / "demo.yaml"
DEMO_SIM = ROOT / "config" / "sim" / "demo-vehicle.yaml"
FRAMES_SIM = Path(__file__).resolve().parent / "data" / "frames-sim.yaml"
VIN = "WVWZZZ1JZXW000001"  # what every demo ECU answers for DID 0xF190
COMPONENTS = ("engine", "abs", "adas")  # the demo's ECUs; every one describes `vin`
FLEET_SIZE = 8


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10].upper()}"


def demo_config(state_dir: Path, broker: str) -> dict[str, Any]:
    """config/demo.yaml with its own vehicle id, CAN channel and state, and the metrics on a free port."""
    config = yaml.safe_load(DEMO.read_text())
    config.update(vehicle=unique("BENCH"), simulate=[str(DEMO_SIM)], state_dir=str(state_dir))
    config["bus"]["channel"] = unique("bench-")
    config["mqtt"]["broker"] = broker
    config["metrics"]["listen"] = "127.0.0.1:0"
    return config


def fleet_ecus(count: int = FLEET_SIZE) -> list[dict[str, Any]]:
    """`count` ECUs on normal 11-bit ids 0x700+i / 0x780+i (the same addresses the bare stacks use)."""
    return [{"name": f"ecu{i}", "addressing": {"mode": "normal_11bit", "request_id": 0x700 + i,
                                               "response_id": 0x780 + i},
             "isotp": {"padding": 0xCC},
             "dids": [{"name": "vin", "id": 0xF190, "codec": "ascii", "length": 17}]} for i in range(count)]


def fleet_config(state_dir: Path, broker: str, count: int = FLEET_SIZE) -> dict[str, Any]:
    """An idle vehicle of `count` ECUs on a virtual bus, nothing simulated: what idling costs per ECU."""
    return {"vehicle": unique("IDLE"), "bus": {"interface": "virtual", "channel": unique("bench-idle-")},
            "state_dir": str(state_dir), "mqtt": {"broker": broker}, "metrics": {"listen": "127.0.0.1:0"},
            "ecus": fleet_ecus(count)}


def write(config: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
