"""TCP_NODELAY on the agent's broker connection: on the first socket, after a reconnect, and under TLS.

Without it, the PUBACK, `accepted` and final response (small writes in a row) each wait for the
broker's delayed ACK. Read back from the real socket paho opened to a real Mosquitto.
"""

import dataclasses
import logging
import socket
import uuid

import pytest

from agent.bus.owner import wait_until
from agent.config.model import TlsConfig
from agent.devtools.local_broker import BrokerTls, LocalBroker
from agent.fleet.sockethooks import no_delay
from agent.system.service import Service


def nodelay(link):
    sock = link._client.socket()  # paho's socket of the current connection
    assert sock is not None
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_set_on_connect_and_again_after_the_broker_restarts(service, broker):
    first = service.link._client.socket()
    assert nodelay(service.link)
    broker.restart()
    assert wait_until(lambda: service.link.connected and service.link._client.socket() not in (None, first), 20), \
        service.link.last_error
    assert nodelay(service.link)


@pytest.fixture
def tls_broker(pki, tmp_path):
    tls = BrokerTls(pki / "ca.pem", pki / "server.pem", pki / "server.key", require_certificate=True)
    with LocalBroker(tmp_path / "tls-broker", tls=tls) as running:
        yield running


def test_set_under_tls(vehicle, tls_broker, pki, tmp_path):
    tls = TlsConfig(ca_file=pki / "ca.pem", cert_file=pki / "client.pem", key_file=pki / "client.key")
    config = dataclasses.replace(vehicle, vehicle=f"VN{uuid.uuid4().hex[:10].upper()}", state_dir=tmp_path / "state",
                                 mqtt=dataclasses.replace(vehicle.mqtt, broker=tls_broker.url, tls=tls))
    svc = Service(config)
    svc.start()
    try:
        assert svc.link.wait_connected(10), svc.link.last_error
        assert nodelay(svc.link)
    finally:
        svc.stop()


def test_a_socket_that_refuses_is_logged_not_raised(caplog):
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)  # no TCP options on a unix socket
    with left, right, caplog.at_level(logging.WARNING, logger="agent.fleet.sockethooks"):
        no_delay(None, None, left)
    assert "cannot set TCP_NODELAY" in caplog.text
