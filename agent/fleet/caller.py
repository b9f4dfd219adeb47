"""The backend side of protocol v1, for `sovd-edge call` and the tests: publish commands, watch replies."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config.model import MqttConfig
from agent.fleet.credentials import password_of, use_tls
from agent.fleet.topics import Topics

if TYPE_CHECKING:
    from agent.policy.signature import Signer


@dataclass(frozen=True)
class Seen:
    """One message the caller received."""

    topic: str
    payload: bytes
    retained: bool
    correlation: bytes | None
    at: float

    def json(self) -> Any:
        return json.loads(self.payload)


class BrokerUnreachableError(ConnectionError):
    """The broker cannot be reached, or it did not accept the connection in time."""


class Caller:
    """An MQTT client that records everything it is subscribed to.

    With a `signer`, every command is sent in a signed envelope (protocol section Signed commands).
    By default its session is clean and short-lived. With `session_expiry_s` (and a fixed `client_id`)
    the broker keeps its subscriptions and queues replies while it is away, as a real backend's
    session does: reconnecting with the same id picks up what was published meanwhile.
    """

    def __init__(self, config: MqttConfig, vehicle: str, client_id: str | None = None,
                 session_expiry_s: int = 0, signer: Signer | None = None) -> None:
        self.topics = Topics(config.prefix, vehicle)
        self.signer = signer
        self._v5 = config.protocol == "5"
        self._host, self._port, tls = config.host_port_tls
        self._broker = config.broker
        self._session_expiry_s = session_expiry_s
        persistent = session_expiry_s > 0
        self._client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                   client_id=client_id or f"sovd-call-{uuid.uuid4().hex[:10]}",
                                   protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
                                   clean_session=None if self._v5 else not persistent)
        password = password_of(config)
        if config.username or password:
            self._client.username_pw_set(config.username or "", password)
        if tls or config.tls:  # the link's own rules: verify_hostname, a key file others may not read
            use_tls(self._client, config)
        self._client.on_message = self._on_message
        self.seen: list[Seen] = []
        self._changed = threading.Condition()

    def __enter__(self) -> Caller:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, timeout: float = 10.0) -> None:
        """Connects; BrokerUnreachableError (a ConnectionError) names the broker and the cause."""
        try:
            if self._v5:
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = self._session_expiry_s
                self._client.connect(self._host, self._port, keepalive=30,
                                     clean_start=self._session_expiry_s == 0, properties=properties)
            else:
                self._client.connect(self._host, self._port, keepalive=30)
        except OSError as err:
            raise BrokerUnreachableError(f"cannot connect to the broker {self._broker}: {err.strerror or err}") from err
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        while not self._client.is_connected():
            if time.monotonic() > deadline:
                self._client.loop_stop()
                raise BrokerUnreachableError(f"no connection to the broker {self._broker} within {timeout:g} s")
            time.sleep(0.01)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def subscribe(self, topic: str, timeout: float = 5.0) -> None:
        done = threading.Event()
        self._client.on_subscribe = lambda *args: done.set()
        self._client.subscribe(topic, qos=1)
        if not done.wait(timeout):
            raise TimeoutError(f"subscription to {topic} not confirmed")

    def send(self, body: dict[str, Any] | bytes, response_topic: str | None = None, correlation: bytes | None = None,
             expiry_s: int | None = None) -> None:
        """Publishes a command (QoS 1) and waits for the broker's PUBACK; signed when the caller has a signer."""
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        if self.signer is not None:
            payload = self.signer.wrap(payload)
        properties = None
        if self._v5 and (response_topic or correlation is not None or expiry_s is not None):
            properties = Properties(PacketTypes.PUBLISH)
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation is not None:
                properties.CorrelationData = correlation
            if expiry_s is not None:
                properties.MessageExpiryInterval = expiry_s
        info = self._client.publish(self.topics.commands, payload, qos=1, properties=properties)
        info.wait_for_publish(10)

    def publish_plan(self, name: str, plan: dict[str, Any] | bytes | None) -> None:
        """Publishes a collection plan, retained, on `plans/{name}` (None: the empty message that removes it);
        waits for the broker's PUBACK."""
        payload = b"" if plan is None else plan if isinstance(plan, bytes) else json.dumps(plan).encode()
        self._client.publish(self.topics.plans(name), payload, qos=1, retain=True).wait_for_publish(10)

    def request(self, body: dict[str, Any], reply_topic: str | None = None, expiry_s: int | None = None) -> str:
        """Subscribes to where the command's responses will come, sends it, and returns that topic.

        Without `reply_topic` that is the default `responses/{id}`. With it, MQTT 5 sends it as the
        Response Topic with the command id as Correlation Data, and MQTT 3.1.1 as the body's
        `reply_to`; only the final response comes there unless the body asks `"progress": true`.
        """
        command_id = str(body["id"])
        topic = reply_topic or self.topics.responses(command_id)
        self.subscribe(topic)
        if reply_topic is None:
            self.send(body, expiry_s=expiry_s)
        elif self._v5:
            self.send(body, response_topic=reply_topic, correlation=command_id.encode(), expiry_s=expiry_s)
        else:
            self.send({**body, "reply_to": reply_topic}, expiry_s=expiry_s)
        return topic

    def send_all(self, payloads: list[bytes], timeout: float = 10.0) -> None:
        """Publishes raw command payloads back to back (QoS 1), then waits for every PUBACK: a burst."""
        infos = [self._client.publish(self.topics.commands, payload, qos=1) for payload in payloads]
        for info in infos:
            info.wait_for_publish(timeout)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        props = message.properties if self._v5 else None
        seen = Seen(message.topic, bytes(message.payload), bool(message.retain),
                    getattr(props, "CorrelationData", None), time.time())
        with self._changed:
            self.seen.append(seen)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[Seen], bool], timeout: float, count: int = 1) -> list[Seen]:
        """The first `count` messages matching `predicate`; TimeoutError if fewer arrive in time."""
        with self._changed:
            ok = self._changed.wait_for(lambda: len([s for s in self.seen if predicate(s)]) >= count, timeout)
            matched = [s for s in self.seen if predicate(s)]
        if not ok:
            raise TimeoutError(f"{len(matched)} of {count} expected messages within {timeout} s")
        return matched[:count]

    def wait_replies(self, command_id: str, count: int, timeout: float,
                     topic: str | None = None) -> list[dict[str, Any]]:
        """The first `count` responses to `command_id` on `topic` (default `responses/{id}`), in arrival order.

        Messages for other ids on a shared reply topic are skipped; TimeoutError if fewer arrive in time.
        """
        wanted = topic or self.topics.responses(command_id)
        found = self.wait_for(lambda s: s.topic == wanted and _id_of(s) == command_id, timeout, count)
        return [s.json() for s in found]

    def replies(self, command_id: str, topic: str | None = None) -> list[dict[str, Any]]:
        wanted = topic or self.topics.responses(command_id)
        with self._changed:
            return [s.json() for s in self.seen if s.topic == wanted and _id_of(s) == command_id]

    def wait_status(self, state: str, timeout: float) -> Seen:
        """The first status message (retained or live) whose `state` is `state`: online or offline."""
        return self.wait_for(lambda s: s.topic == self.topics.status and _field(s, "state") == state, timeout)[0]

    def final(self, command_id: str, timeout: float = 10.0, topic: str | None = None) -> dict[str, Any]:
        wanted = topic or self.topics.responses(command_id)
        found = self.wait_for(lambda s: s.topic == wanted and _id_of(s) == command_id and _is_final(s), timeout)
        return found[0].json()


def _field(seen: Seen, key: str) -> Any:
    """`key` of a JSON object payload; None for anything else (a caller may see foreign messages)."""
    try:
        body = seen.json()
    except ValueError:
        return None
    return body.get(key) if isinstance(body, dict) else None


def _id_of(seen: Seen) -> str | None:
    return _field(seen, "id")


def _is_final(seen: Seen) -> bool:
    body = seen.json()
    return isinstance(body, dict) and body.get("final") is True
