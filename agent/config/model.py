"""Frozen, typed configuration objects: what the rest of the agent is handed instead of raw YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ALL_COMMANDS = (
    "read_data", "write_data", "read_faults", "clear_faults", "set_session", "reset",
    "security_access", "operation", "io_control", "tester_present", "raw", "obd",
)
# obd is allowed by default: it only reads (services 0x01, 0x03, 0x07, 0x09, 0x0A), like read_data.
DEFAULT_ALLOWED = ("read_data", "read_faults", "tester_present", "obd")
SIGNATURE_MODES = ("none", "mutating", "all")
ADDRESSING_MODES = (
    "normal_11bit", "normal_29bit", "normal_fixed_29bit",
    "extended_11bit", "extended_29bit", "mixed_11bit", "mixed_29bit",
)
CODECS = ("ascii", "unsigned", "signed", "enum", "raw")
UDS_STANDARDS = (2006, 2013, 2020)
# Services that have a command of their own: `raw` may send them only where that command is allowed.
COMMAND_OF_SERVICE = {
    0x10: "set_session", 0x11: "reset", 0x14: "clear_faults", 0x27: "security_access", 0x2E: "write_data",
    0x2F: "io_control", 0x31: "operation",
}


@dataclass(frozen=True)
class BusConfig:
    interface: str
    channel: str
    fd: bool = False
    bitrate: int = 500_000
    data_bitrate: int | None = None
    isotp: str = "auto"  # auto | kernel | userspace
    receive_own_messages: bool = False
    options: tuple[tuple[str, object], ...] = ()  # extra python-can arguments (socketcand: host, port)


@dataclass(frozen=True)
class TlsConfig:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    verify_hostname: bool = True


@dataclass(frozen=True)
class MqttConfig:
    broker: str = "mqtt://localhost:1883"
    protocol: str = "5"
    prefix: str = "sovd"
    client_id: str | None = None
    session_expiry_s: int = 7 * 24 * 3600
    keepalive_s: int = 30
    username: str | None = None
    password_file: Path | None = None
    password_credential: str | None = None  # name of a systemd credential ($CREDENTIALS_DIRECTORY)
    tls: TlsConfig | None = None
    send_accepted: bool = True
    max_payload_bytes: int = 256 * 1024
    invalid_events_per_minute: int = 10
    # MQTT 5 Receive Maximum: commands the broker may have sent without our PUBACK. A command whose
    # component queue is full waits, recorded but unacknowledged, for room; the broker holds back the rest.
    receive_maximum: int = 32
    # Commands that may wait for room at once (a few hundred bytes of memory each; the command itself is
    # in the ledger). Beyond it: `busy`. Larger than receive_maximum because some brokers (Mosquitto
    # 2.0.11) send past the Receive Maximum after a PUBACK.
    max_waiting_commands: int = 1000

    @property
    def host_port_tls(self) -> tuple[str, int, bool]:
        scheme, _, rest = self.broker.partition("://")
        rest = rest.rstrip("/")
        tls = scheme == "mqtts"
        if rest.startswith("["):
            host, _, port = rest[1:].partition("]:")
        else:
            host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
        return host, int(port) if port else (8883 if tls else 1883), tls


@dataclass(frozen=True)
class StoreConfig:
    ledger_retention_s: int = 7 * 24 * 3600
    outbox_max_messages: int = 10_000
    outbox_max_age_s: int = 7 * 24 * 3600
    ledger_max_bytes: int = 16 * 1024 * 1024  # beyond it the least recently finished ids are forgotten early
    outbox_max_bytes: int = 32 * 1024 * 1024  # beyond it the oldest messages are dropped


@dataclass(frozen=True)
class SigningKey:
    """A backend public key that may sign commands, and what it may sign (None: everything)."""

    key_id: str
    public_key: Path  # PEM (SubjectPublicKeyInfo) of an Ed25519 key; read when the agent starts
    commands: frozenset[str] | None = None
    components: frozenset[str] | None = None


@dataclass(frozen=True)
class AuditConfig:
    max_bytes: int = 1024 * 1024  # the audit file is rotated past this size
    keep: int = 4  # rotated files kept (audit.jsonl.1 .. .keep)


@dataclass(frozen=True)
class SecurityConfig:
    require_signature: str = "none"  # none | mutating | all
    keys: tuple[SigningKey, ...] = ()
    max_expiry_ahead_s: int = 3600
    failure_logs_per_minute: int = 10
    audit: AuditConfig = field(default_factory=AuditConfig)

    @property
    def signatures_configured(self) -> bool:
        """Envelopes are understood (and `cryptography` loaded) only when this is true."""
        return self.require_signature != "none" or bool(self.keys)


@dataclass(frozen=True)
class MetricsTls:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None  # set: clients must present a certificate signed by it


@dataclass(frozen=True)
class MetricsConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 9469
    enabled: bool = True
    tls: MetricsTls | None = None
    bus_state_interval_s: float = 5.0
    reachability_interval_s: float = 0.0  # 0: no periodic TesterPresent probes


@dataclass(frozen=True)
class Addressing:
    mode: str
    request_id: int | None = None
    response_id: int | None = None
    functional_id: int | None = None
    target_address: int | None = None
    source_address: int | None = None
    address_extension: int | None = None


@dataclass(frozen=True)
class IsoTpConfig:
    padding: int | None = None
    block_size: int = 0
    st_min: int = 0
    fd: bool = False
    data_length: int = 8  # CAN (FD) frame payload, 8 for classic CAN
    max_pdu: int = 8192
    wftmax: int = 5  # FC.WAIT frames accepted from the ECU per flow control (can-isotp's default 0 aborts on one)
    bitrate_switch: bool = False  # set when the bus has a data_bitrate and this ECU uses CAN FD


@dataclass(frozen=True)
class Timing:
    p2_ms: int = 1000
    p2_star_ms: int = 5000
    request_ms: int = 10_000
    s3_keepalive_ms: int = 2000
    busy_retries: int = 3


@dataclass(frozen=True)
class DidSpec:
    """One data identifier and how its bytes map to a value."""

    name: str
    id: int
    codec: str = "raw"
    length: int | None = None  # bytes; None = whatever the ECU sends (raw only)
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
    enum: tuple[tuple[int, str], ...] = ()
    writable: bool = False


@dataclass(frozen=True)
class RoutineSpec:
    name: str
    id: int


@dataclass(frozen=True)
class SecurityLevel:
    level: int
    algorithm: str  # "module:function"
    params: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class EcuConfig:
    name: str
    addressing: Addressing
    isotp: IsoTpConfig = field(default_factory=IsoTpConfig)
    timing: Timing = field(default_factory=Timing)
    dids: tuple[DidSpec, ...] = ()
    routines: tuple[RoutineSpec, ...] = ()
    security: tuple[SecurityLevel, ...] = ()
    allow: frozenset[str] = frozenset(DEFAULT_ALLOWED)
    queue_size: int = 16
    dtc_texts: tuple[tuple[str, str], ...] = ()  # `dtcs:` code -> text ("P0301", "P0301-1A" or "0x030100")
    uds_standard: int = 2013  # ISO 14229 edition the ECU follows: how its session response is read
    raw_services: frozenset[int] = frozenset()  # services `raw` may send that have no command of their own
    allow_undeclared_ids: bool = False  # operation/io_control on routines and DIDs the config does not declare

    def did_by_name(self, name: str) -> DidSpec | None:
        return next((d for d in self.dids if d.name == name), None)

    def did_by_id(self, did: int) -> DidSpec | None:
        return next((d for d in self.dids if d.id == did), None)


@dataclass(frozen=True)
class SleepCondition:
    """Pause collection while this numeric DID reads below `below` (e.g. the 12 V supply voltage)."""

    component: str
    data: str
    below: float
    recheck_ms: int = 600_000  # while paused by it, read this one DID again this often (0: only on a bus wake)


@dataclass(frozen=True)
class SleepConfig:
    silence_ms: int = 0  # pause when no vehicle frame was seen for this long (0: never)
    condition: SleepCondition | None = None


@dataclass(frozen=True)
class CollectConfig:
    """`collect:`: local plans (validated by agent.wire.plan: the config layer keeps them as written) and bounds."""

    plans: tuple[dict[str, object], ...] = ()
    max_plans: int = 16  # plans applied at once (local and from MQTT)
    max_scheduled_requests: int = 1024  # requests scheduled across all plans (~1 KiB of memory each)
    max_dids_per_request: int = 8
    telemetry_max_bytes: int = 4 * 1024 * 1024
    backoff_s: float = 1.0
    backoff_max_s: float = 300.0
    sleep: SleepConfig = field(default_factory=SleepConfig)


@dataclass(frozen=True)
class AgentConfig:
    vehicle: str
    bus: BusConfig
    ecus: tuple[EcuConfig, ...]
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    state_dir: Path = Path("/var/lib/sovd-edge")
    max_command_timeout_ms: int = 60_000
    log_level: str = "INFO"
    simulate: tuple[Path, ...] = ()  # simulator files run in-process (virtual bus demos)
    source: Path | None = None

    def ecu(self, name: str) -> EcuConfig | None:
        return next((e for e in self.ecus if e.name == name), None)
