"""Turns the agent's YAML file into an AgentConfig, reporting every problem with its path."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from agent.config import model as m
from agent.config.collect import parse_collect
from agent.config.ecu import parse_ecu
from agent.config.model import ALL_COMMANDS
from agent.config.reader import (
    InvalidValueError,
    Node,
    Problems,
    boolean,
    choice,
    describe,
    integer,
    join,
    number,
    text,
)
from agent.config.transport import isotp_address, rx_ids
from agent.errors import ConfigError

VEHICLE = text(r"[^/+#\s]{1,64}", "a vehicle id without / + # or spaces", max_len=64)


MAX_CONFIG_BYTES = 4 * 1024 * 1024  # far above any real config; /dev/zero or a disk image stops here, not in RAM


def load_yaml(path: Path) -> Any:
    """Reads YAML text; a syntax error becomes a ConfigError naming line and column, and so does a file that
    is not UTF-8 text, is larger than MAX_CONFIG_BYTES or nests too deeply to be a config."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(str(path), [("", f"cannot read: {err.strerror or err}")]) from err
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(str(path), [("", f"larger than {MAX_CONFIG_BYTES // 1024 // 1024} MiB: not a config file "
                                           "(wrong path?)")])
    try:
        text_ = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(str(path), [("", f"line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); "
                                           "is it a YAML file?")]) from None
    try:
        return yaml.safe_load(text_)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        if isinstance(err, yaml.reader.ReaderError):  # a control character: no mark, a position instead
            where = f"line {text_.count(chr(10), 0, err.position) + 1}: "
        problem = (getattr(err, "problem", None) or str(err)).splitlines()[0]
        raise ConfigError(str(path), [("", f"{where}not valid YAML: {problem}")]) from err
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(str(path), [("", "not valid YAML: nested deeper than any config is")]) from None


def load_config(path: str | Path) -> m.AgentConfig:
    """Loads and validates an agent config file; raises ConfigError listing every problem."""
    path = Path(path)
    return parse_config(load_yaml(path), source=path)


def parse_config(data: Any, source: Path | None = None) -> m.AgentConfig:
    problems = Problems()
    if not isinstance(data, Mapping):  # an empty file, a list, a scalar: say so, then what is required
        empty = data is None
        problems.add("(top level)", "the file is empty" if empty else f"expected a mapping, got {describe(data)}")
        data = {}
    root = Node(data, "", problems)
    base = source.parent if source else Path.cwd()
    vehicle = root.get("vehicle", VEHICLE)
    bus = _bus(root.child("bus"), problems)
    if not root.has("bus"):
        problems.add("bus", "required field is missing")
    ecus = _ecus(root, bus, problems)
    mqtt = _mqtt(root.child("mqtt"), base)
    metrics = _metrics(root.child("metrics"), base)
    store = _store(root.child("store"))
    security = _security(root.child("security"), base, {e.name for e in ecus})
    collect = parse_collect(root.child("collect"), ecus)
    state_dir = root.get("state_dir", _path(base), m.AgentConfig.state_dir)
    max_timeout = root.get("max_command_timeout_ms", integer(1, 3_600_000), 60_000)
    log_level = root.get("log_level", choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO")
    simulate = tuple(
        p for p in (root.check(path, item, _existing_file(base)) for path, item in root.items_of("simulate"))
        if p is not None
    )
    if store.outbox_max_bytes < 4 * mqtt.max_payload_bytes:
        problems.add("store.outbox_max_bytes", f"{store.outbox_max_bytes} is less than four messages of "
                     f"mqtt.max_payload_bytes ({mqtt.max_payload_bytes})")
    root.finish()
    if problems:
        raise ConfigError(str(source or "config"), problems.items)
    return m.AgentConfig(
        vehicle=vehicle, bus=bus, ecus=ecus, mqtt=mqtt, metrics=metrics, store=store, security=security,
        collect=collect,
        state_dir=state_dir,
        max_command_timeout_ms=max_timeout, log_level=log_level, simulate=simulate, source=source,
    )


def _path(base: Path):
    def convert(value: Any) -> Path:
        return base / text()(value)

    return convert


def _existing_file(base: Path):
    def convert(value: Any) -> Path:
        path = base / text()(value)
        if not path.is_file():
            raise InvalidValueError(f"no such file: {path}")
        return path

    return convert


def _bus(node: Node | None, problems: Problems) -> m.BusConfig:
    if node is None:
        return m.BusConfig(interface="virtual", channel="missing")
    fd = node.get("fd", boolean, False)
    bus = m.BusConfig(
        interface=node.get("interface", text(r"[a-z0-9_]+", "a python-can interface name")),
        channel=node.get("channel", text()),
        fd=fd,
        bitrate=node.get("bitrate", integer(10_000, 1_000_000, "a CAN bitrate (10000..1000000)"), 500_000),
        data_bitrate=node.get("data_bitrate", integer(500_000, 8_000_000, "a CAN FD data bitrate"), None),
        isotp=node.get("isotp", choice("auto", "kernel", "userspace"), "auto"),
        receive_own_messages=node.get("receive_own_messages", boolean, False),
        options=_options(node.child("options")),
    )
    if bus.data_bitrate is not None and not fd:
        problems.add(join(node.path, "data_bitrate"), "only meaningful with fd: true")
    if bus.isotp == "kernel" and bus.interface != "socketcan":
        problems.add(join(node.path, "isotp"), "kernel ISO-TP needs interface: socketcan")
    node.finish()
    return bus


def _options(node: Node | None) -> tuple[tuple[str, object], ...]:
    """Extra keyword arguments for can.Bus: names and scalar values only."""
    if node is None:
        return ()
    options = []
    for key, value in node.data.items():
        node.raw(key)
        if not isinstance(key, str) or not key.isidentifier():
            node.problems.add(join(node.path, str(key)), "expected a python-can argument name")
        elif not isinstance(value, str | int | float | bool):
            node.problems.add(join(node.path, key), "expected a string, number or boolean")
        else:
            options.append((key, value))
    return tuple(sorted(options))


def _mqtt(node: Node | None, base: Path) -> m.MqttConfig:
    if node is None:
        return m.MqttConfig()
    if node.has("password"):
        node.raw("password")
        node.problems.add(join(node.path, "password"),
                          "clear-text passwords are not accepted; use password_file or a systemd credential")
    tls_node = node.child("tls")
    tls = None
    if tls_node is not None:
        tls = m.TlsConfig(
            ca_file=tls_node.get("ca_file", _path(base), None),
            cert_file=tls_node.get("cert_file", _path(base), None),
            key_file=tls_node.get("key_file", _path(base), None),
            verify_hostname=tls_node.get("verify_hostname", boolean, True),
        )
        if (tls.cert_file is None) != (tls.key_file is None):
            node.problems.add(tls_node.path, "cert_file and key_file go together (client certificate)")
        tls_node.finish()
    config = m.MqttConfig(
        broker=node.get("broker", broker_url, m.MqttConfig.broker),
        protocol=node.get("protocol", _mqtt_protocol, "5"),
        prefix=node.get("prefix", text(r"[^+#\s]+(/[^+#\s]+)*", "a topic prefix without + # or spaces"), "sovd"),
        client_id=node.get("client_id", text(r"[A-Za-z0-9._:-]{1,128}", "a client id", max_len=128), None),
        session_expiry_s=node.get("session_expiry_s", integer(0, 0xFFFFFFFF), m.MqttConfig.session_expiry_s),
        keepalive_s=node.get("keepalive_s", integer(5, 3600), 30),
        username=node.get("username", text(), None),
        password_file=node.get("password_file", _path(base), None),
        password_credential=node.get("password_credential", text(r"[A-Za-z0-9._-]+", "a credential name"), None),
        tls=tls,
        send_accepted=node.get("send_accepted", boolean, True),
        max_payload_bytes=node.get("max_payload_bytes", integer(1024, 256 * 1024 * 1024), 256 * 1024),
        invalid_events_per_minute=node.get("invalid_events_per_minute", integer(0, 10_000), 10),
        receive_maximum=node.get("receive_maximum", integer(1, 65535), m.MqttConfig.receive_maximum),
        max_waiting_commands=node.get("max_waiting_commands", integer(0, 1_000_000),
                                      m.MqttConfig.max_waiting_commands),
    )
    if config.receive_maximum > max(1, config.max_waiting_commands):
        node.problems.add(join(node.path, "receive_maximum"),
                          f"must not exceed max_waiting_commands ({config.max_waiting_commands}): the agent "
                          "announces only what it can hold without refusing `busy`")
    if config.password_file and config.password_credential:
        node.problems.add(join(node.path, "password_credential"), "give password_file or password_credential, not both")
    node.finish()
    return config


def _store(node: Node | None) -> m.StoreConfig:
    if node is None:
        return m.StoreConfig()
    config = m.StoreConfig(
        ledger_retention_s=node.get("ledger_retention_s", integer(60, 10 * 365 * 86400), 7 * 86400),
        outbox_max_messages=node.get("outbox_max_messages", integer(10, 10_000_000), 10_000),
        outbox_max_age_s=node.get("outbox_max_age_s", integer(60, 10 * 365 * 86400), 7 * 86400),
        ledger_max_bytes=node.get("ledger_max_bytes", integer(64 * 1024, 1 << 40, "a byte count (64 KiB or more)"),
                                  m.StoreConfig.ledger_max_bytes),
        outbox_max_bytes=node.get("outbox_max_bytes", integer(1024 * 1024, 1 << 40, "a byte count (1 MiB or more)"),
                                  m.StoreConfig.outbox_max_bytes),
    )
    node.finish()
    return config


KEY_ID = text(r"[A-Za-z0-9._:-]{1,64}", "a key id of 1-64 A-Z a-z 0-9 . _ : -", max_len=64)


def _security(node: Node | None, base: Path, components: set[str]) -> m.SecurityConfig:
    """`security:`: which commands need a signature, the keys that may sign them, the audit log."""
    if node is None:
        return m.SecurityConfig()
    mode = node.get("require_signature", choice(*m.SIGNATURE_MODES), "none")
    keys = _signing_keys(node.child("keys"), base, components)
    if mode not in (None, "none") and not keys and node.ok:
        node.problems.add(join(node.path, "keys"), f"require_signature: {mode} needs at least one key")
    audit_node = node.child("audit")
    audit = m.AuditConfig()
    if audit_node is not None:
        audit = m.AuditConfig(
            max_bytes=audit_node.get("max_bytes", integer(4096, 1024**3), m.AuditConfig.max_bytes),
            keep=audit_node.get("keep", integer(1, 1000), m.AuditConfig.keep),
        )
        audit_node.finish()
    config = m.SecurityConfig(
        require_signature=mode or "none", keys=keys,
        max_expiry_ahead_s=node.get("max_expiry_ahead_s", integer(1, 7 * 86400), 3600),
        failure_logs_per_minute=node.get("failure_logs_per_minute", integer(0, 10_000), 10),
        audit=audit,
    )
    node.finish()
    return config


def _signing_keys(node: Node | None, base: Path, components: set[str]) -> tuple[m.SigningKey, ...]:
    """`security.keys`: key id -> {public_key, commands, components}; several at once for rotation."""
    if node is None:
        return ()
    keys = []
    for key_id in list(node.data):
        node.raw(key_id)
        path = join(node.path, str(key_id))
        if node.check(path, key_id, KEY_ID) is None:
            continue
        entry = Node(node.data[key_id], path, node.problems)
        public_key = entry.get("public_key", _path(base))
        commands = _names(entry, "commands", set(ALL_COMMANDS), "a command")
        allowed_components = _names(entry, "components", components, "a component of this config")
        entry.finish()
        if entry.ok and public_key is not None:
            keys.append(m.SigningKey(key_id, public_key, commands, allowed_components))
    return tuple(keys)


def _names(node: Node, key: str, known: set[str], what: str) -> frozenset[str] | None:
    """A non-empty list of names from `known` (None when the key is absent: no limit)."""
    if not node.has(key):
        return None
    names = set()
    raw = node.data.get(key)
    if isinstance(raw, list) and not raw:
        node.problems.add(join(node.path, key), "an empty list allows nothing; leave the key out for no limit")
    known = {name for name in known if isinstance(name, str)}  # an ECU without a valid name is reported already
    for path, item in node.items_of(key):
        if not isinstance(item, str) or item not in known:
            node.problems.add(path, f"{describe(item)} is not {what} (known: {', '.join(sorted(known))})")
        else:
            names.add(item)
    return frozenset(names)


def broker_url(value: Any) -> str:
    """mqtt://HOST[:PORT] or mqtts://HOST[:PORT]."""
    url = text()(value)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("mqtt", "mqtts") or not rest or "/" in rest.rstrip("/"):
        raise InvalidValueError(f"{url!r} is not mqtt://HOST:PORT or mqtts://HOST:PORT")
    host, colon, port = rest.rstrip("/").rpartition(":") if rest.count(":") == 1 or "]" in rest else ("", "", "")
    if colon and not (port.isdigit() and 0 < int(port) < 65536 and host):
        raise InvalidValueError(f"{url!r} has an invalid port")
    return url


def _mqtt_protocol(value: Any) -> str:
    value = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
    return choice("5", "3.1.1")(value)


def _metrics(node: Node | None, base: Path) -> m.MetricsConfig:
    if node is None:
        return m.MetricsConfig()
    listen = node.get("listen", host_port, None)
    tls_node = node.child("tls")
    tls = None
    if tls_node is not None:
        tls = m.MetricsTls(cert_file=tls_node.get("cert_file", _path(base)),
                           key_file=tls_node.get("key_file", _path(base)),
                           client_ca_file=tls_node.get("client_ca_file", _path(base), None))
        tls_node.finish()
    config = m.MetricsConfig(
        listen_host=listen[0] if listen else m.MetricsConfig.listen_host,
        listen_port=listen[1] if listen else m.MetricsConfig.listen_port,
        enabled=node.get("enabled", boolean, True),
        tls=tls,
        bus_state_interval_s=node.get("bus_state_interval_s", number(0.1, 3600), 5.0),
        reachability_interval_s=node.get("reachability_interval_s", number(0, 3600), 0.0),
    )
    node.finish()
    return config


def host_port(value: Any) -> tuple[str, int]:
    """HOST:PORT, with [v6]:PORT for IPv6; port 0 means any free port."""
    raw = text()(value)
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        raise InvalidValueError(f"{raw!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _ecus(root: Node, bus: m.BusConfig, problems: Problems) -> tuple[m.EcuConfig, ...]:
    if not root.has("ecus"):
        problems.add("ecus", "required field is missing")
    ecus: list[m.EcuConfig] = []
    seen_names: dict[str, str] = {}
    seen_rx: dict[tuple[int, bool], str] = {}
    for path, item in root.items_of("ecus"):
        ecu = parse_ecu(Node(item, path, problems), bus)
        if ecu is None:
            continue
        if ecu.name in seen_names:
            problems.add(join(path, "name"), f"{ecu.name!r} is already used by {seen_names[ecu.name]}")
        seen_names.setdefault(ecu.name, path)
        for key in _rx_ids(ecu):
            # frames are routed by CAN id alone: two ECUs answering on one id (whatever their address
            # bytes) would leave one of them never hearing its answers
            if key in seen_rx:
                where = "addressing.response_id" if ecu.addressing.response_id is not None else "addressing"
                problems.add(join(path, where), f"already used by {seen_rx[key]}")
            seen_rx.setdefault(key, path)
        ecus.append(ecu)
    if root.has("ecus") and isinstance(root.data.get("ecus"), list) and not root.data["ecus"]:
        problems.add("ecus", "at least one ECU is needed")
    return tuple(ecus)


def _rx_ids(ecu: m.EcuConfig) -> list[tuple[int, bool]]:
    """The CAN ids the ECU answers on (from can-isotp's view of its address, so every mode counts)."""
    addressing = ecu.addressing
    try:
        return rx_ids(isotp_address(addressing))
    except (ValueError, KeyError, TypeError):  # the address itself is reported as a problem already
        if addressing.response_id is None:
            return []
        return [(addressing.response_id, addressing.mode.endswith("29bit"))]
