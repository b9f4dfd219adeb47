"""The shipped broker configuration (config/mosquitto/): a real Mosquitto runs config/mosquitto/mosquitto.conf
with only its paths and port replaced (certificates from the test PKI, accounts made with mosquitto_passwd) and
the ACL file as shipped. The agent works under it; a vehicle's account cannot read another vehicle's commands
nor publish on another vehicle's status, and the backend's account is held to the reverse."""

import dataclasses
import os
import pwd
import subprocess
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from conftest import ROOT
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config.model import MqttConfig, TlsConfig
from agent.devtools.local_broker import BrokerTls, LocalBroker
from agent.fleet.caller import Caller
from agent.system.service import Service

SHIPPED = ROOT / "config/mosquitto"
NOT_AUTHORIZED = 0x87


class ShippedBroker(LocalBroker):
    """LocalBroker running the shipped mosquitto.conf; only paths, the port and the run-as user change."""

    def __init__(self, workdir, pki, passwords):
        super().__init__(workdir, tls=BrokerTls(pki / "ca.pem", pki / "server.pem", pki / "server.key", False))
        self._passwords = passwords

    def _write_config(self):
        text = (SHIPPED / "mosquitto.conf").read_text()
        replacements = {
            "listener 8883": f"listener {self.port} 127.0.0.1",
            "/etc/mosquitto/certs/ca.pem": str(self.tls.ca_file),
            "/etc/mosquitto/certs/broker.pem": str(self.tls.cert_file),
            "/etc/mosquitto/certs/broker.key": str(self.tls.key_file),
            "/etc/mosquitto/sovd.passwd": str(self._passwords),
            "/etc/mosquitto/sovd.acl": str(SHIPPED / "sovd.acl"),
            "/var/lib/mosquitto/": f"{self.workdir}/",
        }
        for old, new in replacements.items():
            assert old in text, f"the shipped config no longer has {old!r}"
            text = text.replace(old, new)
        user = pwd.getpwuid(os.getuid()).pw_name
        self.config_file.write_text(f"user {user}\n{text}\nlog_dest stderr\n")


@pytest.fixture(scope="module")
def accounts(tmp_path_factory):
    """Two vehicles and the backend, each with its own password (mosquitto_passwd, as an operator does)."""
    directory = tmp_path_factory.mktemp("accounts")
    names = {"va": f"VA{uuid.uuid4().hex[:8].upper()}", "vb": f"VB{uuid.uuid4().hex[:8].upper()}",
             "backend": "backend"}
    passwd = directory / "sovd.passwd"
    for n, name in enumerate(names.values()):
        subprocess.run(["mosquitto_passwd", *([] if n else ["-c"]), "-b", str(passwd), name, f"secret-{name}"],
                       check=True, capture_output=True)
        (directory / name).write_text(f"secret-{name}\n")
        os.chmod(directory / name, 0o600)
    os.chmod(passwd, 0o600)
    return names, directory


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory, pki, accounts):
    _, directory = accounts
    with ShippedBroker(tmp_path_factory.mktemp("acl-broker"), pki, directory / "sovd.passwd") as running:
        yield running


def mqtt_config(broker, pki, accounts, who):
    names, directory = accounts
    return MqttConfig(broker=broker.url, username=names[who], password_file=directory / names[who],
                      tls=TlsConfig(ca_file=pki / "ca.pem"))


class Client:
    """A raw MQTT 5 client with an account's credentials; records SUBACK and PUBACK reason codes."""

    def __init__(self, config):
        host, port, _ = config.host_port_tls
        self._client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                   client_id=f"probe-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self._client.username_pw_set(config.username, config.password_file.read_text().strip())
        self._client.tls_set(ca_certs=str(config.tls.ca_file))
        self._client.on_subscribe = self._subscribed
        self._client.on_publish = self._published
        self._client.on_message = self._message
        self.granted: dict[int, list[int]] = {}
        self.acked: dict[int, int] = {}
        self.received: list[str] = []  # topics of live (not retained) messages
        self._changed = threading.Condition()
        self._client.connect(host, port)
        self._client.loop_start()

    def _subscribed(self, client, userdata, mid, reason_codes, properties):
        with self._changed:
            self.granted[mid] = [int(r.value) for r in reason_codes]
            self._changed.notify_all()

    def _published(self, client, userdata, mid, reason_code, properties):
        with self._changed:
            self.acked[mid] = int(reason_code.value)
            self._changed.notify_all()

    def _message(self, client, userdata, message):
        if message.retain:  # a retained copy from before this test (e.g. an agent's offline status)
            return
        with self._changed:
            self.received.append(message.topic)
            self._changed.notify_all()

    def subscribe(self, topic):
        _, mid = self._client.subscribe(topic, qos=1)
        with self._changed:
            assert self._changed.wait_for(lambda: mid in self.granted, 10)
            return self.granted[mid][0]

    def publish(self, topic, payload=b"{}"):
        """The PUBACK reason code (MQTT 5: 0x87 when the ACL denies it)."""
        info = self._client.publish(topic, payload, qos=1, properties=Properties(PacketTypes.PUBLISH))
        with self._changed:
            assert self._changed.wait_for(lambda: info.mid in self.acked, 10)
            return self.acked[info.mid]

    def wait_received(self, topic):
        with self._changed:
            assert self._changed.wait_for(lambda: topic in self.received, 10), topic

    def close(self):
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def clients():
    opened = []

    def open_client(config):
        opened.append(Client(config))
        return opened[-1]

    yield open_client
    for client in opened:
        client.close()


def test_the_agent_works_under_the_acl(acl_broker, pki, accounts, vehicle, sim, tmp_path):
    names, _ = accounts
    config = dataclasses.replace(vehicle, vehicle=names["va"], state_dir=tmp_path / "state",
                                 mqtt=mqtt_config(acl_broker, pki, accounts, "va"))
    with Caller(mqtt_config(acl_broker, pki, accounts, "backend"), names["va"]) as backend:
        backend.subscribe(f"{backend.topics.base}/#")
        agent = Service(config)
        agent.start()
        try:
            backend.wait_status("online", 10)  # its own status: allowed (and its Last Will)
            body = {"id": "acl-1", "component": "engine", "command": "read_data", "params": {"data": "vin"}}
            backend.send(body)  # the backend writes the vehicle's commands; the vehicle reads them
            final = backend.final("acl-1")  # the vehicle writes its responses; the backend reads them
            assert final["result"] == {"values": {"vin": "TEST0VEHICLE00001"}}
            backend.wait_for(lambda s: s.topic == backend.topics.events and b"agent_started" in s.payload, 10)
        finally:
            agent.stop()
        backend.wait_status("offline", 10)


def test_a_vehicle_cannot_read_another_vehicles_commands(acl_broker, pki, accounts, clients):
    names, _ = accounts
    va = clients(mqtt_config(acl_broker, pki, accounts, "va"))
    backend = clients(mqtt_config(acl_broker, pki, accounts, "backend"))
    # Mosquitto 2.0 grants the subscriptions and checks `read` on every message it would deliver.
    for topic in (f"sovd/{names['vb']}/commands", "sovd/+/commands", "sovd/#"):
        va.subscribe(topic)
    assert backend.publish(f"sovd/{names['vb']}/commands") == 0
    assert backend.publish(f"sovd/{names['vb']}/plans/p") == 0
    assert backend.publish(f"sovd/{names['va']}/commands") == 0
    va.wait_received(f"sovd/{names['va']}/commands")  # published after the others: they would be here by now
    assert set(va.received) == {f"sovd/{names['va']}/commands"}


def test_a_vehicle_cannot_publish_on_another_vehicles_status(acl_broker, pki, accounts, clients):
    names, _ = accounts
    va = clients(mqtt_config(acl_broker, pki, accounts, "va"))
    backend = clients(mqtt_config(acl_broker, pki, accounts, "backend"))
    assert backend.subscribe(f"sovd/{names['vb']}/#") == 1
    assert backend.subscribe(f"sovd/{names['va']}/#") == 1
    for topic in ("status", "events", "responses/x", "telemetry", "state/engine"):
        assert va.publish(f"sovd/{names['vb']}/{topic}") == NOT_AUTHORIZED, topic
    assert va.publish(f"sovd/{names['vb']}/commands") == NOT_AUTHORIZED  # nor command another vehicle
    assert va.publish(f"sovd/{names['va']}/commands") == NOT_AUTHORIZED  # nor itself
    assert va.publish(f"sovd/{names['va']}/events") == 0  # its own: delivered
    backend.wait_received(f"sovd/{names['va']}/events")
    assert backend.received == [f"sovd/{names['va']}/events"]


def test_the_backend_account_is_held_to_the_reverse(acl_broker, pki, accounts, clients):
    names, _ = accounts
    backend = clients(mqtt_config(acl_broker, pki, accounts, "backend"))
    assert backend.publish(f"sovd/{names['va']}/status") == NOT_AUTHORIZED
    assert backend.publish(f"sovd/{names['va']}/responses/x") == NOT_AUTHORIZED
    backend.subscribe(f"sovd/{names['va']}/#")
    assert backend.publish(f"sovd/{names['va']}/commands") == 0
    assert backend.publish(f"sovd/{names['va']}/plans/p") == 0
    va = Client(mqtt_config(acl_broker, pki, accounts, "va"))
    try:
        assert va.publish(f"sovd/{names['va']}/events") == 0
    finally:
        va.close()
    backend.wait_received(f"sovd/{names['va']}/events")  # it reads what vehicles write, not what it writes
    assert backend.received == [f"sovd/{names['va']}/events"]
