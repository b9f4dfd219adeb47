"""Turns the agent's YAML file into an AgentConfig, reporting every problem with its path."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

from agent.config import model as m
from agent.config.reader import (
    InvalidValueError,
    Node,
    Problems,
    boolean,
    choice,
    integer,
    join,
    number,
    text,
)
from agent.errors import ConfigError

NAME = text(r"[a-z][a-z0-9_]{0,62}", "a name of lowercase letters, digits and _ starting with a letter")
VEHICLE = text(r"[^/+#\s]{1,64}", "a vehicle id without / + # or spaces", max_len=64)
CAN_11 = integer(0, 0x7FF, "an 11-bit CAN id")
CAN_29 = integer(0, 0x1FFFFFFF, "a 29-bit CAN id")
BYTE = integer(0, 0xFF, "a byte (0..0xFF)")
FD_LENGTHS = (8, 12, 16, 20, 24, 32, 48, 64)


def load_yaml(path: Path) -> Any:
    """Reads YAML text; a syntax error becomes a ConfigError naming line and column."""
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(str(path), [("", f"cannot read: {err.strerror or err}")]) from err
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(str(path), [("", f"{where}not valid YAML: {problem}")]) from err


def load_config(path: str | Path) -> m.AgentConfig:
    """Loads and validates an agent config file; raises ConfigError listing every problem."""
    path = Path(path)
    return parse_config(load_yaml(path), source=path)


def parse_config(data: Any, source: Path | None = None) -> m.AgentConfig:
    problems = Problems()
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
    state_dir = root.get("state_dir", _path(base), m.AgentConfig.state_dir)
    max_timeout = root.get("max_command_timeout_ms", integer(1, 3_600_000), 60_000)
    log_level = root.get("log_level", choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO")
    simulate = tuple(
        p for p in (root.check(path, item, _existing_file(base)) for path, item in root.items_of("simulate"))
        if p is not None
    )
    root.finish()
    if problems:
        raise ConfigError(str(source or "config"), problems.items)
    return m.AgentConfig(
        vehicle=vehicle, bus=bus, ecus=ecus, mqtt=mqtt, metrics=metrics, store=store, state_dir=state_dir,
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
    )
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
    )
    node.finish()
    return config


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
    seen_rx: dict[tuple[int | None, int | None], str] = {}
    for path, item in root.items_of("ecus"):
        ecu = parse_ecu(Node(item, path, problems), bus)
        if ecu is None:
            continue
        if ecu.name in seen_names:
            problems.add(join(path, "name"), f"{ecu.name!r} is already used by {seen_names[ecu.name]}")
        seen_names.setdefault(ecu.name, path)
        key = (ecu.addressing.response_id, ecu.addressing.source_address)
        if key in seen_rx and ecu.addressing.mode.startswith("normal_") and ecu.addressing.response_id is not None:
            problems.add(join(path, "addressing.response_id"), f"already used by {seen_rx[key]}")
        seen_rx.setdefault(key, path)
        ecus.append(ecu)
    if root.has("ecus") and isinstance(root.data.get("ecus"), list) and not root.data["ecus"]:
        problems.add("ecus", "at least one ECU is needed")
    return tuple(ecus)


def parse_ecu(node: Node, bus: m.BusConfig) -> m.EcuConfig | None:
    """One ECU entry; shared by the agent config and the simulator config."""
    if not node.ok:
        return None
    name = node.get("name", NAME)
    addressing = parse_addressing(node.child("addressing"), node)
    isotp = parse_isotp(node.child("isotp"), bus, node.problems)
    timing = _timing(node.child("timing"))
    dids = _dids(node)
    routines = _named_ids(node, "routines", integer(0, 0xFFFF, "a 16-bit routine id"))
    security = _security(node)
    allow_items = [node.check(p, v, choice(*m.ALL_COMMANDS)) for p, v in node.items_of("allow")]
    allow = frozenset(a for a in allow_items if a) if node.has("allow") else frozenset(m.DEFAULT_ALLOWED)
    queue_size = node.get("queue_size", integer(1, 10_000), 16)
    for index, did in enumerate(dids):
        if did.length is not None and did.length + 3 > isotp.max_pdu:
            node.problems.add(join(node.path, f"dids[{index}].length"),
                              f"{did.length} bytes do not fit isotp.max_pdu {isotp.max_pdu} (with 3 header bytes)")
    node.finish()
    return m.EcuConfig(
        name=name, addressing=addressing, isotp=isotp, timing=timing, dids=dids,
        routines=tuple(m.RoutineSpec(n, i) for n, i in routines), security=security,
        allow=allow, queue_size=queue_size,
    )


def parse_addressing(node: Node | None, parent: Node) -> m.Addressing:
    if node is None:
        parent.problems.add(join(parent.path, "addressing"), "required field is missing")
        return m.Addressing(mode="normal_11bit")
    mode = node.get("mode", choice(*m.ADDRESSING_MODES), "normal_11bit")
    can_id = CAN_29 if mode.endswith("29bit") else CAN_11
    needs_ids = mode != "normal_fixed_29bit"
    addressing = m.Addressing(
        mode=mode,
        request_id=node.get("request_id", can_id) if needs_ids else node.get("request_id", can_id, None),
        response_id=node.get("response_id", can_id) if needs_ids else node.get("response_id", can_id, None),
        functional_id=node.get("functional_id", can_id, None),
        target_address=node.get("target_address", BYTE) if mode.startswith(("extended", "normal_fixed"))
        else node.get("target_address", BYTE, None),
        source_address=node.get("source_address", BYTE) if mode.startswith(("extended", "normal_fixed"))
        else node.get("source_address", BYTE, None),
        address_extension=node.get("address_extension", BYTE) if mode.startswith("mixed")
        else node.get("address_extension", BYTE, None),
    )
    if needs_ids and addressing.request_id is not None and addressing.request_id == addressing.response_id:
        node.problems.add(join(node.path, "response_id"), "must differ from request_id")
    node.finish()
    return addressing


def parse_isotp(node: Node | None, bus: m.BusConfig, problems: Problems) -> m.IsoTpConfig:
    if node is None:
        return m.IsoTpConfig()
    fd = node.get("fd", boolean, False)
    length = node.get("data_length", integer(8, 64), 64 if fd else 8)
    if length not in FD_LENGTHS:
        problems.add(join(node.path, "data_length"), f"{length} is not a CAN FD length ({FD_LENGTHS})")
    elif length > 8 and not fd:
        problems.add(join(node.path, "data_length"), "lengths above 8 need fd: true")
    if fd and not bus.fd:
        problems.add(join(node.path, "fd"), "this ECU uses CAN FD but bus.fd is false")
    config = m.IsoTpConfig(
        padding=node.get("padding", BYTE, None),
        block_size=node.get("block_size", BYTE, 0),
        st_min=node.get("st_min", integer(0, 0xFF, "an ISO-TP STmin byte"), 0),
        fd=fd,
        data_length=length,
        max_pdu=node.get("max_pdu", integer(8, 0xFFFFFFFF), 8192),
    )
    node.finish()
    return config


def _timing(node: Node | None) -> m.Timing:
    if node is None:
        return m.Timing()
    ms = integer(1, 600_000)
    timing = m.Timing(
        p2_ms=node.get("p2_ms", ms, 1000),
        p2_star_ms=node.get("p2_star_ms", ms, 5000),
        request_ms=node.get("request_ms", ms, 10_000),
        s3_keepalive_ms=node.get("s3_keepalive_ms", integer(100, 60_000), 2000),
        busy_retries=node.get("busy_retries", integer(0, 20), 3),
    )
    node.finish()
    return timing


def _dids(node: Node) -> tuple[m.DidSpec, ...]:
    dids: list[m.DidSpec] = []
    names: set[str] = set()
    ids: set[int] = set()
    for path, item in node.items_of("dids"):
        d = Node(item, path, node.problems)
        if not d.ok:
            continue
        spec = parse_did(d)
        if spec.name in names:
            node.problems.add(join(path, "name"), f"duplicate DID name {spec.name!r}")
        if spec.id in ids:
            node.problems.add(join(path, "id"), f"duplicate DID id 0x{spec.id:04X}")
        names.add(spec.name)
        ids.add(spec.id)
        dids.append(spec)
    return tuple(dids)


def parse_did(d: Node) -> m.DidSpec:
    codec = d.get("codec", choice(*m.CODECS), "raw")
    limits = {"ascii": (1, 65535), "unsigned": (1, 8), "signed": (1, 8), "enum": (1, 4), "raw": (1, 65535)}[codec]
    needs_length = codec != "raw"
    length_conv = integer(*limits, f"a {codec} length ({limits[0]}..{limits[1]} bytes)")
    length = d.get("length", length_conv) if needs_length else d.get("length", length_conv, None)
    enum_node = d.child("values")
    enum: list[tuple[int, str]] = []
    if enum_node is not None:
        for key, label in enum_node.data.items():
            key_int = enum_node.convert(str(key), key, integer(0, None))
            label_text = enum_node.convert(str(key), label, text())
            if key_int is not None and label_text is not None:
                enum.append((key_int, label_text))
                enum_node.raw(key)
        enum_node.finish()
    if codec == "enum" and not enum:
        d.problems.add(join(d.path, "values"), "an enum DID needs a values table")
    if codec != "enum" and enum_node is not None:
        d.problems.add(join(d.path, "values"), "only enum DIDs take a values table")
    numeric = codec in ("unsigned", "signed")
    scale = d.get("scale", number(), 1.0)
    offset = d.get("offset", number(), 0.0)
    unit = d.get("unit", text(), None)
    if not numeric and (scale != 1.0 or offset != 0.0 or unit):
        d.problems.add(d.path, f"scale/offset/unit only apply to unsigned and signed DIDs, not {codec}")
    spec = m.DidSpec(
        name=d.get("name", NAME), id=d.get("id", integer(0, 0xFFFF, "a 16-bit DID")), codec=codec,
        length=length, scale=scale, offset=offset, unit=unit, enum=tuple(enum),
        writable=d.get("writable", boolean, False),
    )
    d.finish()
    return spec


def _named_ids(node: Node, key: str, id_conv: Any) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for path, item in node.items_of(key):
        r = Node(item, path, node.problems)
        if r.ok:
            out.append((r.get("name", NAME), r.get("id", id_conv)))
            r.finish()
    return out


def _security(node: Node) -> tuple[m.SecurityLevel, ...]:
    levels: list[m.SecurityLevel] = []
    for path, item in node.items_of("security"):
        s = Node(item, path, node.problems)
        if not s.ok:
            continue
        level = s.get("level", _odd_level)
        algorithm = s.get("algorithm", key_algorithm)
        params_node = s.child("params")
        params = tuple(sorted(params_node.data.items())) if params_node else ()
        if params_node:
            for key in params_node.data:
                params_node.raw(key)
        s.finish()
        levels.append(m.SecurityLevel(level=level, algorithm=algorithm, params=params))
    return tuple(levels)


def _odd_level(value: Any) -> int:
    level = integer(1, 0x7D, "a security level (1..0x7D)")(value)
    if level % 2 == 0:
        raise InvalidValueError(f"{level} is not odd (levels are requestSeed sub-functions: 1, 3, 5, ...)")
    return level


def key_algorithm(value: Any) -> str:
    """A "module:function" reference that must import and be callable."""
    ref = text(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", "a module:function reference")(value)
    try:
        resolve_callable(ref)
    except (ImportError, AttributeError, TypeError) as err:
        raise InvalidValueError(f"{ref!r} cannot be loaded: {err}") from None
    return ref


def resolve_callable(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    target = getattr(importlib.import_module(module_name), attr)
    if not callable(target):
        raise TypeError(f"{ref} is not callable")
    return target
