#!/usr/bin/env python3
"""exec -> READY=1 and resident memory of `sovd-edge run`, with signed commands off and on.

Starts the daemon as systemd would (NOTIFY_SOCKET set to a datagram socket of ours), times exec
until READY=1 arrives, reads VmRSS / VmHWM from /proc and whether `cryptography`'s native module is
mapped, then stops it with SIGTERM. Runs the modes interleaved, `--runs` times each, and prints
JSON: per mode the median and min of each figure. The vehicle is config/demo.yaml's ECUs on the
virtual bus without the simulator, metrics off, the broker an unreachable port (READY does not
wait for it).

    bench/startup_rss.py                          # this tree: modes off and signed
    bench/startup_rss.py --baseline ../main       # ... and `off` from another tree (e.g. before signed
                                                  # commands), interleaved with them
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent.parent


def config_for(source: Path, workdir: Path, mode: str) -> Path:
    config = yaml.safe_load((source / "config/demo.yaml").read_text())
    config.pop("simulate", None)
    config["bus"]["channel"] = f"bench-{os.getpid()}-{mode}"
    config["metrics"] = {"enabled": False}
    config["mqtt"] = {"broker": "mqtt://127.0.0.1:9"}
    if mode == "signed":
        keys = workdir / "keys"
        if not (keys / "bench.pub").exists():
            subprocess.run([sys.executable, "-m", "agent", "keygen", "--key-id", "bench", "--dir", str(keys)],
                           cwd=source, check=True, capture_output=True)
        key = {"public_key": str(keys / "bench.pub")}
        config["security"] = {"require_signature": "mutating", "keys": {"bench": key}}
    path = workdir / f"{mode}-{abs(hash(source))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def one_run(source: Path, config: Path, workdir: Path) -> dict[str, float | bool]:
    address = str(workdir / f"notify-{time.monotonic_ns()}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(60)
        env = {**os.environ, "NOTIFY_SOCKET": address, "PYTHONPATH": str(source)}
        state = tempfile.mkdtemp(dir=workdir)
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(config), "--state-dir", state,
                                 "--log-format", "json", "--log-level", "ERROR"],
                                cwd=source, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while b"READY=1" not in notify.recv(4096):
                pass
            ready_s = time.monotonic() - started
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            figures = {"exec_to_ready_ms": round(ready_s * 1000, 1), "rss_kib": status_kib(proc.pid, "VmRSS"),
                       "peak_rss_kib": status_kib(proc.pid, "VmHWM"), "cryptography_loaded": "cryptography" in maps}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    os.unlink(address)
    return figures


def summary(runs: list[dict[str, float | bool]]) -> dict[str, object]:
    out: dict[str, object] = {"runs": len(runs)}
    for key in ("exec_to_ready_ms", "rss_kib", "peak_rss_kib"):
        values = [float(r[key]) for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["cryptography_loaded"] = sorted({bool(r["cryptography_loaded"]) for r in runs})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another source tree whose `off` runs interleaved with ours")
    parser.add_argument("--runs", type=int, default=7, help="runs per mode (interleaved)")
    args = parser.parse_args()
    runs = {"off": (HERE, "off"), "signed": (HERE, "signed")}
    if args.baseline:
        runs["baseline_off"] = (args.baseline.resolve(), "off")
    results: dict[str, list[dict[str, float | bool]]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        configs = {name: config_for(source, workdir, mode) for name, (source, mode) in runs.items()}
        for _ in range(args.runs):
            for name, (source, _) in runs.items():
                results[name].append(one_run(source, configs[name], workdir))
    print(json.dumps({"python": sys.version.split()[0],
                      "trees": {name: imported_from(source) for name, (source, _) in runs.items()},
                      "modes": {name: summary(found) for name, found in results.items()}}, indent=2))
    return 0


def imported_from(source: Path) -> str:
    """Where `agent` comes from when run from `source` (proves the baseline is the tree it claims)."""
    found = subprocess.run([sys.executable, "-c", "import agent; print(agent.__file__)"], cwd=source,
                           env={**os.environ, "PYTHONPATH": str(source)}, capture_output=True, text=True)
    return found.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
