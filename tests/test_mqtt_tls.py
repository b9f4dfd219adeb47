"""The link's security: TLS with server verification, client certificates, credentials, key file mode.

Certificates are generated at test time with openssl; Mosquitto requires a client certificate.
"""

import dataclasses
import subprocess
import sys
import uuid

import pytest
import yaml
from conftest import DATA, ROOT

from agent.config.model import TlsConfig
from agent.devtools.local_broker import BrokerTls, LocalBroker
from agent.fleet.credentials import LinkSetupError, password_of
from agent.system.service import Service


@pytest.fixture(scope="module")
def tls_broker(pki, tmp_path_factory):
    tls = BrokerTls(pki / "ca.pem", pki / "server.pem", pki / "server.key", require_certificate=True)
    with LocalBroker(tmp_path_factory.mktemp("tls-broker"), tls=tls) as running:
        yield running


def tls_config(vehicle, tls_broker, pki, client="client", tmp_path=None):
    tls = TlsConfig(ca_file=pki / "ca.pem", cert_file=pki / f"{client}.pem", key_file=pki / f"{client}.key")
    return dataclasses.replace(vehicle, vehicle=f"VS{uuid.uuid4().hex[:10].upper()}",
                               state_dir=tmp_path / "state",
                               mqtt=dataclasses.replace(vehicle.mqtt, broker=tls_broker.url, tls=tls))


def test_mutual_tls_round_trip(vehicle, sim, tls_broker, pki, tmp_path):
    from agent.fleet.caller import Caller

    config = tls_config(vehicle, tls_broker, pki, tmp_path=tmp_path)
    svc = Service(config)
    svc.start()
    try:
        assert svc.link.wait_connected(10), svc.link.last_error
        with Caller(config.mqtt, config.vehicle) as backend:
            backend.subscribe(f"{backend.topics.base}/#")
            backend.wait_status("online", 10)  # the agent has subscribed: the command is not sent into a void
            body = {"id": "tls-1", "component": "engine", "command": "read_data", "params": {"data": "vin"}}
            backend.send(body)
            assert backend.final("tls-1")["status"] == "completed"
    finally:
        svc.stop()


def test_wrong_client_certificate_is_refused_and_logged(vehicle, tls_broker, pki, tmp_path, caplog):
    config = tls_config(vehicle, tls_broker, pki, client="intruder", tmp_path=tmp_path)
    svc = Service(config)
    svc.start()
    try:
        assert not svc.link.wait_connected(3)
        assert svc.link.last_error is not None
        assert "unknown ca" in svc.link.last_error.lower() or "certificate" in svc.link.last_error.lower()
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "agent.fleet.link"]
        assert any("unknown ca" in w.lower() or "certificate" in w.lower() for w in warnings), warnings
    finally:
        svc.stop()


def test_server_not_signed_by_our_ca_is_refused(vehicle, tls_broker, pki, tmp_path):
    config = tls_config(vehicle, tls_broker, pki, tmp_path=tmp_path)
    config = dataclasses.replace(config, mqtt=dataclasses.replace(
        config.mqtt, tls=dataclasses.replace(config.mqtt.tls, ca_file=pki / "rogue.pem")))
    svc = Service(config)
    svc.start()
    try:
        assert not svc.link.wait_connected(3)
        assert "certificate verify failed" in svc.link.last_error
    finally:
        svc.stop()


def test_world_readable_key_refused_with_exit_78(pki, tls_broker, tmp_path):
    loose = tmp_path / "loose.key"
    loose.write_bytes((pki / "client.key").read_bytes())
    loose.chmod(0o644)
    config = yaml.safe_load((DATA / "vehicle.yaml").read_text())
    config["state_dir"] = str(tmp_path / "state")
    config["mqtt"] = {"broker": tls_broker.url, "tls": {"ca_file": str(pki / "ca.pem"),
                                                         "cert_file": str(pki / "client.pem"),
                                                         "key_file": str(loose)}}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "agent", "run", "-c", str(path), "--log-format", "json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 78
    assert "world-readable" in result.stderr and "chmod 600" in result.stderr
    # `call` with the same config refuses it the same way (it used to send the key over TLS regardless)
    result = subprocess.run([sys.executable, "-m", "agent", "call", "-c", str(path), "--status"],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 78, result.stderr
    assert "world-readable" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_password_from_file_or_systemd_credential(tmp_path, vehicle):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    by_file = dataclasses.replace(vehicle.mqtt, password_file=secret)
    assert password_of(by_file) == "s3cret"
    by_credential = dataclasses.replace(vehicle.mqtt, password_credential="pw")
    assert password_of(by_credential, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "s3cret"
    with pytest.raises(LinkSetupError, match="CREDENTIALS_DIRECTORY"):
        password_of(by_credential, {})
    with pytest.raises(LinkSetupError, match="cannot read"):
        password_of(dataclasses.replace(vehicle.mqtt, password_file=tmp_path / "missing"))


def test_username_and_password_reach_the_broker(tmp_path_factory, tmp_path, vehicle, sim):
    workdir = tmp_path_factory.mktemp("auth-broker")
    passwords = workdir / "passwords"
    passwords.write_text("vehicle:s3cret\n")
    subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True, capture_output=True)
    passwords.chmod(0o600)
    extra = f"password_file {passwords}\n"
    broker = LocalBroker(workdir, extra=extra)
    broker._write_config = _no_anonymous(broker._write_config, broker)
    with broker:
        secret = tmp_path / "pw"
        secret.write_text("s3cret")
        good = dataclasses.replace(vehicle, state_dir=tmp_path / "a", mqtt=dataclasses.replace(
            vehicle.mqtt, broker=broker.url, username="vehicle", password_file=secret))
        svc = Service(good)
        svc.start()
        try:
            assert svc.link.wait_connected(10), svc.link.last_error
        finally:
            svc.stop()
        secret.write_text("wrong")
        bad = Service(dataclasses.replace(good, state_dir=tmp_path / "b"))
        bad.start()
        try:
            assert not bad.link.wait_connected(2)
            assert (bad.link.last_error or "").startswith("broker refused the connection: Not authorized")
            # said where an operator looks: systemd's STATUS= line and the metrics, not only the log
            assert "broker unreachable (broker refused the connection: Not authorized)" in bad.status_line()
            assert bad.registry.get_sample_value("sovd_mqtt_connections_refused_total",
                                                 {"reason": "not_authorized"}) >= 1
        finally:
            bad.stop()


def _no_anonymous(write, broker):
    def wrapped():
        write()
        text = broker.config_file.read_text().replace("allow_anonymous true", "allow_anonymous false")
        broker.config_file.write_text(text)

    return wrapped


def test_the_backend_client_uses_the_links_tls_rules(vehicle, pki, tmp_path):
    """`sovd-edge call` with the agent's own config reached no broker the agent reached with
    `verify_hostname: false` (its client set TLS up its own way), and took a key file others may read."""
    import os

    from pki import make_cert

    from agent.fleet.caller import Caller

    make_cert(pki, "ca", "elsewhere", "broker.fleet.invalid", san="DNS:broker.fleet.invalid")
    tls = BrokerTls(pki / "ca.pem", pki / "elsewhere.pem", pki / "elsewhere.key", require_certificate=True)
    with LocalBroker(tmp_path / "broker", tls=tls) as broker:
        config = dataclasses.replace(tls_config(vehicle, broker, pki, tmp_path=tmp_path).mqtt)
        unchecked = dataclasses.replace(config, tls=dataclasses.replace(config.tls, verify_hostname=False))
        with Caller(unchecked, vehicle.vehicle) as backend:  # 127.0.0.1 is not the certificate's name
            backend.subscribe(backend.topics.status)
        key = tmp_path / "open.key"
        key.write_bytes((pki / "client.key").read_bytes())
        os.chmod(key, 0o644)
        with pytest.raises(LinkSetupError, match=r"open\.key"):
            Caller(dataclasses.replace(unchecked, tls=dataclasses.replace(unchecked.tls, key_file=key)),
                   vehicle.vehicle)
