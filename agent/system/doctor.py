"""Checks a running system against an agent config: interface, bitrate, bus state, ISO-TP, broker, state dir.
It only looks: no check creates, writes or changes anything."""

from __future__ import annotations

import errno
import json
import os
import pwd
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import can

from agent.bus.canstate import CanLink, read_link
from agent.bus.kernel_isotp import kernel_isotp_available
from agent.config.model import AgentConfig
from agent.config.transport import isotp_address
from agent.discover.probe import listen, tester_present
from agent.discover.tap import BusTap
from agent.store.recovery import check_wal, marker_path, wal_page
from agent.store.schema import SCHEMA_VERSION
from agent.system.service import STORE_FILE
from agent.system.statelock import LOCK_FILE

SQLITE_HEADER = b"SQLite format 3\x00"
USER_VERSION_AT = 60  # PRAGMA user_version in the database header (big-endian, 4 bytes, signed)

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"


@dataclass(frozen=True)
class Check:
    name: str
    result: str
    detail: str
    fix: str = ""


def run_checks(config: AgentConfig, reader: type[object] | None = None) -> list[Check]:
    """Every check, in order; `reader` replaces the kernel query in tests."""
    checks = [Check("config", OK, f"{len(config.ecus)} ECUs, vehicle {config.vehicle}")]
    checks += _bus_checks(config, read_link if reader is None else reader)  # type: ignore[arg-type]
    checks.append(_broker(config))
    checks.append(_state_dir(config.state_dir))
    checks.append(store_check(config.state_dir))
    return checks


def _bus_checks(config: AgentConfig, reader: object) -> list[Check]:
    bus = config.bus
    if bus.interface != "socketcan":
        return [Check("interface", SKIP, f"{bus.interface}:{bus.channel} is not a kernel interface")]
    link: CanLink | None = reader(bus.channel)  # type: ignore[operator]
    if link is None:
        fix = f"sudo hw/vcan-up {bus.channel}" if bus.channel.startswith("vcan") else (
            "CAN HAT: check the dtoverlay in /boot/firmware/config.txt and `dmesg | grep -i mcp`; "
            "development without a HAT: sudo hw/vcan-up and bus.channel: vcan0 in the config")
        return [Check("interface", FAIL, f"{bus.channel} does not exist", fix)]
    state = "up" if link.up else "down"
    checks = [Check("interface", OK if link.up else FAIL, f"{bus.channel} ({link.kind}) is {state}",
                    "" if link.up else f"sudo hw/can-up {bus.channel} {bus.bitrate} (or enable systemd-networkd)")]
    if link.kind == "can":
        if link.bitrate is None:
            checks.append(Check("bitrate", FAIL, "not configured", f"sudo hw/can-up {bus.channel} {bus.bitrate}"))
        elif link.bitrate != bus.bitrate:
            checks.append(Check("bitrate", FAIL, f"{link.bitrate} on the interface, {bus.bitrate} in the config",
                                "make hw/networkd/80-can.network (BitRate=) and bus.bitrate agree with the vehicle"))
        else:
            checks.append(Check("bitrate", OK, f"{link.bitrate} bit/s, sample point {link.sample_point}"))
        state_result = {"error-active": OK, "error-warning": WARN}.get(link.state, FAIL)
        checks.append(Check("bus state", state_result, f"{link.state}, TEC {link.tx_errors} REC {link.rx_errors}",
                            "" if state_result == OK else "check termination (120 ohm each end), ground and bitrate"))
    else:
        checks.append(Check("bus state", SKIP, f"{link.kind} has no controller state"))
    if bus.isotp == "userspace":
        checks.append(Check("kernel ISO-TP", SKIP, "userspace ISO-TP configured"))
    else:
        available = kernel_isotp_available()
        result = OK if available else (FAIL if bus.isotp == "kernel" else WARN)
        checks.append(Check("kernel ISO-TP", result, "available" if available else "not available (can-isotp module)",
                            "" if available else "sudo modprobe can-isotp, or set bus.isotp: userspace"))
    return checks


def _broker(config: AgentConfig) -> Check:
    host, port, tls = config.mqtt.host_port_tls
    try:
        with socket.create_connection((host, port), timeout=3):
            pass
    except OSError as err:
        return Check("broker", FAIL, f"{host}:{port} unreachable: {err.strerror or err}",
                     "check mqtt.broker, the network (cellular) and the broker; the agent retries by itself")
    return Check("broker", OK, f"{host}:{port} accepts connections{' (TLS)' if tls else ''}")


def _state_dir(path: Path) -> Check:
    """Whether the agent could use `path`, judged by looking only: a check changes nothing it checks."""
    fix = f"systemd creates it (StateDirectory=); by hand: install -d -o sovd-edge {path}"
    who = " (as root)" if os.geteuid() == 0 else ""
    if path.is_dir():
        owner = path.stat().st_uid
        try:
            foreign = sorted(p.name for p in path.iterdir() if p.stat().st_uid != owner)
        except OSError:
            foreign = []
        if foreign:  # e.g. an agent run as root: the lock and store it made lock the owner (the service) out
            return Check("state dir", FAIL, f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} in {path} "
                         f"belong to another user than the directory's ({_user(owner)})",
                         f"sudo chown -R {_user(owner)}: {path}")
        lock = path / LOCK_FILE
        if (lock.exists() or lock.is_symlink()) and not lock.is_file():
            return Check("state dir", FAIL, f"{lock} is not a file: the agent cannot lock {path}",
                         f"move it away (the agent makes its own {LOCK_FILE})")
        if os.access(path, os.W_OK | os.X_OK):
            refused = _refuses_writes(path)
            if refused:
                return Check("state dir", FAIL, f"{path} is on a file system that refuses writes: {refused}",
                             "an SD card the kernel took read-only after an I/O error? `dmesg | grep -i ext4`; "
                             "check the card (fsck) and reboot")
            return Check("state dir", OK, f"{path} is writable{who}")
        return Check("state dir", FAIL, f"{path} is not writable{who}", fix)
    if path.exists():
        return Check("state dir", FAIL, f"{path} exists but is not a directory", fix)
    parent = next(p for p in path.absolute().parents if p.exists())  # "/" exists
    if not parent.is_dir():
        return Check("state dir", FAIL, f"{path} does not exist and {parent} is not a directory", fix)
    if os.access(parent, os.W_OK | os.X_OK):
        return Check("state dir", OK, f"{path} does not exist yet; the agent creates it in {parent}{who}")
    return Check("state dir", FAIL, f"{path} does not exist and {parent} is not writable{who}", fix)


def _refuses_writes(path: Path) -> str | None:
    """Why the file system under `path` refuses writes, or None. ext4 taking itself read-only after an I/O
    error (errors=remount-ro, an SD card's commonest death) still passes access(2) and statvfs on recent
    kernels; fsync(2) of the directory says EROFS there, and changes nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None  # the checks above speak for a directory that cannot be opened
    try:
        os.fsync(fd)
    except OSError as err:  # EINVAL: a file system that cannot sync directories, no verdict
        return err.strerror or str(err) if err.errno in (errno.EROFS, errno.EIO) else None
    finally:
        os.close(fd)
    return None


def store_check(state_dir: Path) -> Check:
    """What `run` will meet in the store's files, judged by reading them only: FAIL where it cannot open
    them (it exits 73), warn where it will move a damaged store aside and start an empty ledger
    (agent/store/recovery.py: the same tests), ok otherwise. Opens no database (that could write)."""
    path = state_dir / STORE_FILE
    if not state_dir.is_dir():
        return Check("store", SKIP, f"no state dir at {state_dir} to look in")
    move = "move it away, or remove it: the agent then starts an empty ledger"
    for name in (STORE_FILE, f"{STORE_FILE}-wal", f"{STORE_FILE}-shm"):
        part = state_dir / name
        if (part.exists() or part.is_symlink()) and not part.is_file():
            return Check("store", FAIL, f"{part} is not a file: the agent cannot open its store", move)
        if part.is_file() and not os.access(part, os.R_OK | os.W_OK):
            return Check("store", FAIL, f"{part} cannot be read and written by this user: the agent cannot open "
                         "its store", f"sudo chown -R {_user(state_dir.stat().st_uid)}: {state_dir}")
    recovered = "the agent moves it aside at start, begins an empty ledger and publishes store_recovered"
    marker = marker_path(path)
    size = path.stat().st_size if path.exists() else None
    if not size:
        if marker.exists():
            try:
                since = json.loads(marker.read_text()).get("created_at", "an earlier start")
            except (OSError, ValueError, AttributeError):
                since = "an earlier start"
            state = "missing" if size is None else "empty (0 bytes)"
            return Check("store", WARN, f"{path} is {state}, but a store existed here since {since}: the agent "
                         "begins an empty ledger and publishes store_recovered")
        return Check("store", OK, f"no store yet in {state_dir}; the agent creates {STORE_FILE}")
    try:
        with path.open("rb") as f:
            header = f.read(USER_VERSION_AT + 4)
        wal = path.with_name(path.name + "-wal")
        wal_data = wal.read_bytes() if wal.exists() else b""
        why = check_wal(wal_data) if wal.exists() else None
    except OSError as err:
        return Check("store", FAIL, f"{path} cannot be read: {err.strerror or err}", move)
    if header[:len(SQLITE_HEADER)] != SQLITE_HEADER:
        return Check("store", WARN, f"{path} is not a SQLite database: {recovered}")
    # page 1 as SQLite reads it: the WAL's newest committed copy (not checkpointed yet: a newer agent's
    # stamp before a power cut), else the file's; signed, as PRAGMA user_version reads it (a negative one
    # is no newer agent's: run brings it up like an older one)
    first = wal_page(wal_data, 1) or header
    version = int.from_bytes(first[USER_VERSION_AT:USER_VERSION_AT + 4], "big", signed=True)
    if version > SCHEMA_VERSION:
        return Check("store", FAIL, f"{path} has schema version {version}, written by a newer agent (this one knows "
                     f"up to {SCHEMA_VERSION}): the agent refuses it and exits 65",
                     "install the newer agent again, or move the store aside (an empty ledger is begun)")
    if why:
        return Check("store", WARN, f"{wal}: {why}: {recovered}")
    return Check("store", OK, f"{path}: {size} bytes{', with its WAL' if wal.exists() else ''}")


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'CHECK':<{width}}  RESULT  DETAIL"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.result:<6}  {c.detail}")
        if c.fix:
            lines.append(f"{'':<{width}}  {'':<6}  fix: {c.fix}")
    return "\n".join(lines)


def traffic_checks(config: AgentConfig, listen_s: float = 2.0, probe: bool = True,
                   reader: Callable[[str], CanLink | None] = read_link,
                   factory: Callable[[], can.BusABC] | None = None) -> list[Check]:
    """Listens on the bus (frames seen, error counters rising meanwhile: a wrong bitrate), then sends
    TesterPresent to each configured ECU (unless `probe` is off). Opens a bus connection of its own."""
    if config.simulate:
        return [Check("traffic", SKIP, "the config's ECUs are simulated inside the agent (simulate:)")]
    try:
        tap = BusTap(config.bus, factory)
    except (can.CanError, OSError, ValueError, ImportError, NotImplementedError) as err:
        return [Check("traffic", FAIL, f"cannot open {config.bus.interface}:{config.bus.channel}: {err}",
                      f"sudo hw/can-up {config.bus.channel} {config.bus.bitrate}")]
    with tap:
        traffic = listen(tap, listen_s, reader)
        frames = sum(n for _, _, n, _ in traffic.ids)
        checks = [Check("frames", OK, f"{frames} frames from {len(traffic.ids)} ids in {traffic.seconds:g} s")
                  if frames else
                  Check("frames", WARN, f"no frames in {traffic.seconds:g} s",
                        "ignition on? OBD-II port: CAN-H pin 6, CAN-L pin 14, ground 4/5; bitrate (500 kbit/s on "
                        "most cars)")]
        rising = traffic.errors_rising
        if rising is None:
            checks.append(Check("error counters", SKIP, f"{config.bus.interface} reports no controller counters"))
        elif rising:
            before, after = traffic.before, traffic.after
            seen = (f"TEC {before.tx_errors}->{after.tx_errors}, REC {before.rx_errors}->{after.rx_errors}"
                    if before and after else f"{traffic.error_frames} error frames")
            checks.append(Check("error counters", FAIL, f"rising while listening ({seen})",
                                "most likely a wrong bitrate: try 500000, then 250000 (hw/can-up); "
                                "then wiring and termination"))
        else:
            checks.append(Check("error counters", OK, "steady while listening"))
        for ecu in config.ecus if probe else ():
            answer = tester_present(tap, ecu.addressing, ecu.isotp.padding, max(ecu.timing.p2_ms / 1000, 0.05))
            where = f"0x{isotp_address(ecu.addressing).get_tx_arbitration_id():X}"
            checks.append(Check(f"ecu {ecu.name}", OK, f"answers TesterPresent on {where}") if answer is not None
                          else Check(f"ecu {ecu.name}", FAIL, f"no answer to TesterPresent on {where}",
                                     "ignition on? CAN ids and addressing in the config (sovd-edge discover finds "
                                     "them)"))
    return checks
