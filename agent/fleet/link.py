"""The MQTT session on the paho client (made in pahoclient.py): persistent, reconnected with jittered backoff.

paho runs on our own named thread (client.loop), so reconnects, backoff and heartbeats are ours
to see. Every callback is guarded: an exception in one is logged and counted, never allowed to
kill the network loop. What a lost connection says is judged apart: a message the broker cuts our
connections on (cuts.py), another agent with our client id taking the session (takeover.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config.model import MqttConfig
from agent.fleet.causes import refusal_name, uninformative
from agent.fleet.cuts import CutHandling, CutJudge
from agent.fleet.inflight import keep_within_receive_maximum
from agent.fleet.packets import Incoming, PacketTooLargeError, packet_size
from agent.fleet.pahoclient import new_client
from agent.fleet.takeover import FLAP_S, TAKEOVER_BACKOFF_S, TakeoverWatch
from agent.fleet.topics import Topics
from agent.fleet.unexpected import Unexpected
from agent.store.sqlite import Outgoing
from agent.wire.decode import MAX_COMMAND_BYTES, MAX_ENVELOPE_BYTES

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 60.0
# Announced Maximum Packet Size: the largest command plus room for its topic and properties
# (Response Topic, Correlation Data). The broker drops anything larger instead of sending it to us.
PACKET_HEADROOM = 16 * 1024
MAX_PACKET_IN = MAX_COMMAND_BYTES + PACKET_HEADROOM
MAX_PACKET_SIGNED = MAX_ENVELOPE_BYTES + PACKET_HEADROOM  # where signatures are checked: the largest envelope
# One connect attempt blocks the loop thread: the name lookup (the resolver's retries: 10 s per silent
# nameserver, up to three), paho's 5 s per address that drops SYNs, 5 s of TLS handshake. Waiting that
# long is no wedge (health.py); an attempt that outlasts this is.
CONNECT_LIMIT_S = 120.0


@dataclass
class LinkStats:
    reconnects: int = 0
    messages_in: int = 0
    messages_out: int = 0
    callback_errors: int = 0
    refusals: dict[str, int] = field(default_factory=dict)  # CONNACK refusals by reason (causes.REFUSALS)
    taken_over: int = 0
    oversize: int = 0  # incoming packets over KEEP_IN (inbound.py), cut to their head as they were read
    stray: int = 0  # messages on topics not subscribed to now (left in the session by an earlier config)
    dropped: int = 0  # messages nobody tracks dropped from paho's session (struck, or over a learned limit)


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(method)
    def wrapper(self: MqttLink, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception:
            self.stats.callback_errors += 1
            log.exception("MQTT callback %s failed", method.__name__)

    return wrapper


class MqttLink(CutHandling, Unexpected):
    """Connects, keeps connecting, subscribes to commands and publishes what it is given."""

    def __init__(self, config: MqttConfig, topics: Topics, client_id: str, status: Callable[[str], bytes],
                 on_command: Callable[[Incoming], None], on_published: Callable[[int, int], None],
                 on_connection: Callable[[bool], None], wall: Callable[[], float] = time.time,
                 on_plan: Callable[[str, bytes, Callable[[], None]], None] | None = None,
                 on_struck: Callable[[int], bool] = lambda mid: False,
                 on_too_large: Callable[[int, int, int], bool] = lambda mid, size, limit: False,
                 on_status_refused: Callable[[int], None] = lambda code: None,
                 max_packet_in: int = MAX_PACKET_IN) -> None:
        """`on_published(mid, reason code)`: a PUBACK. `on_struck(mid)`: a message the broker cut
        connections on (cuts.py), dropped from paho's session: never acknowledged, never resent.
        `on_too_large(mid, packet bytes, limit)`: one held unacknowledged over the limit learned from such
        cuts, dropped from paho's session to be made smaller or set aside, as if the broker had announced
        the limit before it was published. Both return whether the mid was the callee's (else the link
        logs the message as lost: one published around the store). `on_status_refused(code)`: the broker
        refused the link's own status message (PUBACK reason code >= 0x80); the link logs it.
        `max_packet_in`: the Maximum Packet Size announced (MQTT 5), MAX_PACKET_SIGNED where signed
        envelopes are taken."""
        self.config = config
        self.topics = topics
        self.client_id = client_id
        self._wall = wall
        self.stats = LinkStats()
        self._status = status
        self._on_command = on_command
        self._on_published = on_published
        self._on_connection = on_connection
        self._on_plan = on_plan  # collection plans (retained, on plans/+): only when collection is wired in
        self._on_struck = on_struck
        self._on_too_large = on_too_large
        self._on_status_refused = on_status_refused
        self._max_packet_in = max_packet_in
        self._v5 = config.protocol == "5"
        self._host, self._port, _ = config.host_port_tls
        self._client = new_client(config, client_id, (topics.status, status("offline")), self._note_paho_error,
                                  self._oversize)
        self._client.on_connect = self._connected
        self._client.on_disconnect = self._disconnected
        self._client.on_message = self._message
        self._client.on_publish = self._published
        self._paho_error: str | None = None  # paho's last error line: the real cause behind a disconnect
        self._refusal: str | None = None
        self._connected_event = threading.Event()
        self._opening = threading.Lock()  # held while a connection is opened, and by `ack` (see there)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat = time.monotonic()
        self.connecting_since: float | None = None  # a connect attempt blocks the loop thread since then
        self.last_error: str | None = None
        self._announced_max_packet: int | None = None  # from CONNACK; None: the broker announced none
        self._learned_max_packet: int | None = None  # from messages the broker cut the connection on (cuts.py)
        self.broker_receive_maximum = 65535  # from CONNACK: QoS 1 messages it takes unacknowledged
        self.last_disconnect_code: int | None = None  # reason code of the last lost connection (MQTT 5)
        self.last_cut_short = False  # the last connection was lost within FLAP_S of being accepted
        self._unacked: set[int] = set()  # mids of our publishes without a PUBACK yet
        self._status_mids: set[int] = set()  # the status messages among them (never judged poison)
        self._cuts = CutJudge()
        self._takeover = TakeoverWatch(self._v5)
        self._up_since: float | None = None
        self._dropping = False  # this connection is being dropped by us (its setup failed), not cut by the broker
        self._generation = 0  # counts connections
        self._stray_topics: set[str] = set()  # topics of stray messages logged so far (`_stray`)

    # ---- public --------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected_event.is_set()

    @property
    def broker_max_packet(self) -> int | None:
        """The largest packet the broker takes: what it announced, or less once it cut connections on
        a message it did not take (cuts.py); None when neither says."""
        known = [n for n in (self._announced_max_packet, self._learned_max_packet) if n is not None]
        return min(known) if known else None

    def wait_connected(self, timeout: float) -> bool:
        return self._connected_event.wait(timeout)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def publish(self, message: Outgoing, on_mid: Callable[[int], None] | None = None) -> int | None:
        """Hands a QoS 1 message to paho; returns its mid (PUBACK comes to on_published with its reason
        code). `on_mid(mid)` is called before that PUBACK can be handled: paho calls on_published under
        its own lock, held here until `on_mid` has noted the mid (a PUBACK may come back before paho's
        publish returns; one for a mid not yet noted was once lost, and the message kept as in flight).
        Raises PacketTooLargeError when the broker's Maximum Packet Size (announced or learned) is smaller."""
        limit = self.broker_max_packet
        if limit is not None and (size := packet_size(message.topic, message.payload, message.correlation)) > limit:
            raise PacketTooLargeError(size, limit)
        properties = None
        if self._v5 and message.correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = message.correlation
        with getattr(self._client, "_out_message_mutex", contextlib.nullcontext()):  # an RLock: paho takes it too
            info = self._client.publish(message.topic, message.payload, qos=1, retain=message.retain,
                                        properties=properties)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                log.warning("publish refused by the client: %s", mqtt.error_string(info.rc))
                return None
            # Noted while no PUBACK can be handled. Not connected (NO_CONN): paho keeps the message and sends
            # it on the next connection, so it is ours to track like any other.
            self._unacked.add(info.mid)
            if on_mid is not None:
                on_mid(info.mid)
        self.stats.messages_out += 1
        return info.mid

    def payload_limit(self, topic: str, correlation: bytes | None = None) -> int | None:
        """The largest payload the broker takes on `topic` (None: no announced limit)."""
        if self.broker_max_packet is None:
            return None
        return self.broker_max_packet - packet_size(topic, b"", correlation)

    def forget(self, mid: int) -> None:
        """Drops an unacknowledged message from paho's session state, so that it is not resent on the next
        connection (one the broker will never take: it would cut every connection that carries it).
        paho has no public call for this; its queue is touched under its own lock."""
        self._unacked.discard(mid)
        try:
            with self._client._out_message_mutex:
                message = self._client._out_messages.pop(mid, None)
                if message is not None and message.qos > 0 and self._client._inflight_messages > 0:
                    self._client._inflight_messages -= 1
        except AttributeError as err:  # a paho without these internals: it will resend; the outbox copes
            log.error("cannot drop a message from paho's session state (%s); it may be resent", err)

    def ack(self, mid: int, qos: int, generation: int | None = None) -> None:
        """PUBACK for a command, sent only once it is recorded durably. A PUBACK held across a reconnect
        is not sent (`generation` is the connection the command came on): the broker redelivers it on
        the new connection, and the same packet id may by then name another message. Nor is one sent
        while the link is down: paho would write it on the next connection as soon as its CONNECT (the
        connection count only moves on at CONNACK), acknowledging whatever that packet id names there.
        The check and paho's queueing of the packet are one step against the loop thread opening the
        next connection (`_opening`): paho clears what it had queued when it does. (Checked first without
        the lock: a caller never waits out a connection attempt to learn that the link is down.)"""
        if qos <= 0 or not self.connected:
            return
        with self._opening:
            if self.connected and (generation is None or generation == self._generation):
                self._client.ack(mid, qos)

    def stop(self, timeout: float = 5.0) -> None:
        """Publishes the offline status (when connected), disconnects and joins the loop thread: all in
        `timeout` seconds."""
        end = time.monotonic() + timeout
        if self.connected:
            # noted before its PUBACK can be handled (see `publish`)
            with getattr(self._client, "_out_message_mutex", contextlib.nullcontext()):
                info = self._client.publish(self.topics.status, self._status("offline"), qos=1, retain=True)
                self._status_mids.add(info.mid)
            deadline = time.monotonic() + min(timeout, 3.0)
            while not info.is_published() and time.monotonic() < deadline and self.connected:
                time.sleep(0.02)
        self._stop.set()
        self._client.disconnect()  # queued: the loop thread writes it, if it still runs
        if self._thread is not None:
            self._thread.join(max(0.0, end - time.monotonic()))
        if not self.alive and self._client.want_write():  # it stopped first: the only writer now is this thread
            self._client.loop_write()

    # ---- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        delay = BACKOFF_MIN_S
        opened = False
        first = True
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            if not opened:
                self.connecting_since = time.monotonic()
                error: Exception | None = None
                try:
                    with self._opening:
                        self._open(first)
                    first, opened = False, True
                except (OSError, ssl.SSLError, ValueError) as err:
                    error = err
                self.heartbeat = time.monotonic()  # before the mark is cleared: health reads them the other way
                self.connecting_since = None
                if error is not None:
                    self._fail(f"cannot connect to {self._host}:{self._port}: {error}")
                    self._pause(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, BACKOFF_MAX_S)
                    continue
            try:
                rc = self._client.loop(timeout=0.5)
            except Exception as err:  # paho raises on some socket errors; treat as a lost connection
                rc = mqtt.MQTT_ERR_CONN_LOST
                self._fail(f"connection lost: {type(err).__name__}: {err}")
            if rc != mqtt.MQTT_ERR_SUCCESS and not self._stop.is_set():
                opened = False
                self._set_connected(False)
                # another client with our id (takeover.py): do not fight it every half second
                delay = max(delay, min(BACKOFF_MAX_S, self._takeover.least_delay()))
                self._pause(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BACKOFF_MAX_S)
            elif self.connected:
                delay = BACKOFF_MIN_S

    def _pause(self, seconds: float) -> None:
        """A backoff wait that keeps the heartbeat fresh (a waiting loop is a healthy loop)."""
        end = time.monotonic() + seconds
        while not self._stop.is_set() and (left := end - time.monotonic()) > 0:
            self._stop.wait(min(left, 1.0))
            self.heartbeat = time.monotonic()

    def _open(self, first: bool) -> None:
        if not first:
            self.stats.reconnects += 1
        kwargs: dict[str, Any] = {}
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.config.session_expiry_s
            properties.ReceiveMaximum = self.config.receive_maximum
            properties.MaximumPacketSize = self._max_packet_in
            kwargs = {"clean_start": False, "properties": properties}
        self._client.connect(self._host, self._port, keepalive=self.config.keepalive_s, **kwargs)

    def _fail(self, reason: str) -> None:
        """Records why the link is down. The first meaningful cause of an outage is kept: a later
        attempt that only sees the connection drop (EOF, reset) does not hide the TLS alert or the
        refusal that explains it."""
        if reason == self.last_error:
            return
        if self.last_error is not None and uninformative(reason) and not uninformative(self.last_error):
            log.debug("%s (still down: %s)", reason, self.last_error, extra={"broker": self.config.broker})
            return
        log.warning("%s", reason, extra={"broker": self.config.broker})
        self.last_error = reason

    def _set_connected(self, up: bool) -> None:
        """The connected flag; `on_connection` is told only when it changes."""
        was = self.connected
        if up:
            self._connected_event.set()
        else:
            self._connected_event.clear()
        if was != up:
            self._on_connection(up)

    # ---- paho callbacks (on the loop thread) ---------------------------------------------------
    def _connected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        """Guarded like every callback; and a connection whose setup failed half way is dropped and made
        again: kept, paho would be connected and the agent not (no PUBACKs, no publishes, a fresh loop)."""
        self._dropping = False
        try:
            self._set_up(client, flags, reason, properties)
        except Exception:
            self.stats.callback_errors += 1
            log.exception("setting up the MQTT connection failed: it is dropped and made again")
            self._dropping = True  # its loss is ours: no message is blamed for it, nor another client
            # MQTT 5: reason 0x80, not a normal disconnect, so the broker sends our Will (3.1.1 has no reason: no Will)
            with contextlib.suppress(Exception):
                client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Unspecified error")
                                  if self._v5 else None)

    def _set_up(self, client: mqtt.Client, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            name = refusal_name(getattr(reason, "value", None))
            self.stats.refusals[name] = self.stats.refusals.get(name, 0) + 1
            self._refusal = f"broker refused the connection: {reason}"
            self._fail(self._refusal)
            return
        self._generation += 1
        self._up_since = time.monotonic()
        self.last_disconnect_code, self.last_cut_short = None, False
        mutex, held = getattr(client, "_out_message_mutex", None), getattr(client, "_out_messages", None)
        if mutex is not None and held is not None:  # what paho still holds (and resends now) is in flight
            with mutex:
                self._unacked &= set(held)
                self._status_mids &= set(held)
        self.last_error = self._refusal = self._paho_error = None
        self._announced_max_packet = getattr(properties, "MaximumPacketSize", None) if self._v5 else None
        if self.broker_max_packet is not None:  # paho resends what it holds next: what the broker now refuses
            self._withdraw_over(self.broker_max_packet)  # (a lower limit than before) is made smaller first
        self._cuts.connected()
        self._keep_own_keepalive(client, getattr(properties, "ServerKeepAlive", None) if self._v5 else None)
        receive_maximum = getattr(properties, "ReceiveMaximum", None) if self._v5 else None
        self.broker_receive_maximum = receive_maximum or 65535
        keep_within_receive_maximum(client, self.broker_receive_maximum)
        if self._v5:  # retain-as-published: a retained command keeps its flag, so that it is never run;
            # retain handling 1: it is sent (and reported) once per subscription, not on every reconnect
            client.subscribe(self.topics.commands, options=SubscribeOptions(
                qos=1, retainAsPublished=True, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB))
        else:
            client.subscribe(self.topics.commands, qos=1)
        if self._on_plan is not None:
            client.subscribe(self.topics.plans_filter, qos=1)
        self._status_mids.add(client.publish(self.topics.status, self._status("online"), qos=1, retain=True).mid)
        log.info("connected to broker", extra={"broker": self.config.broker,
                                               "session_present": bool(getattr(flags, "session_present", False)),
                                               "broker_max_packet": self._announced_max_packet,
                                               "broker_receive_maximum": receive_maximum})
        self._set_connected(True)

    @_guarded
    def _disconnected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self._up_since is not None:  # once per connection: paho may report a loss twice (packet, socket)
            self._count_loss(reason)
        if not self._stop.is_set():
            detail = f" ({self._paho_error})" if self._paho_error else ""
            self._fail(self._refusal or f"disconnected from broker: {reason}{detail}")
            self._refusal = self._paho_error = None
        self._set_connected(False)

    def _count_loss(self, reason: Any) -> None:
        """Why and how soon an accepted connection was lost: takeovers, flaps, cuts for a message."""
        assert self._up_since is not None
        self.last_disconnect_code = getattr(reason, "value", None)
        self.last_cut_short = time.monotonic() - self._up_since < FLAP_S
        self._up_since = None
        in_flight = bool(self._unacked)  # as the cut was judged: before `_judge_cut` may drop a message
        # our own disconnect (a stop, a setup that failed), however soon after connecting, says nothing of a
        # message or of another client
        ours, self._dropping = self._stop.is_set() or self._dropping, False
        if not ours:
            self._judge_cut()
        report = self._takeover.lost(self.last_disconnect_code, self.last_cut_short, in_flight, ours)
        if report is not None:
            self.stats.taken_over += 1
            log.error(report, self.client_id, TAKEOVER_BACKOFF_S,
                      extra={"broker": self.config.broker, "takeovers": self._takeover.in_a_row})

    def _note_paho_error(self, text: str) -> None:
        """paho's last error line (causes.PahoLog): the cause reported with the next disconnect."""
        self._paho_error = text

    @_guarded
    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.stats.messages_in += 1
        name = self.topics.plan_name(message.topic)
        if name is not None and self._on_plan is not None:
            # A plan is decided on the collector's thread, which acknowledges it then (`ack`): a removal is an
            # empty message the broker does not retain, lost for good if acknowledged before it was stored.
            ack = functools.partial(self.ack, message.mid, message.qos, self._generation)
            self._on_plan(name, bytes(message.payload), ack)
            return
        if message.topic != self.topics.commands:
            self._stray(message, name is not None)
            return
        props = message.properties if self._v5 else None
        self._on_command(Incoming(
            payload=bytes(message.payload), mid=message.mid, qos=message.qos, dup=bool(message.dup),
            received_at=self._wall(),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation=getattr(props, "CorrelationData", None),
            expiry_interval=getattr(props, "MessageExpiryInterval", None),
            retain=bool(message.retain), generation=self._generation, received_mono=time.monotonic(),
        ))

    @_guarded
    def _published(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        """PUBACK: the reason code (MQTT 5; 0 for 3.1.1) says whether the broker took the message."""
        self._unacked.discard(mid)
        code = int(getattr(reason, "value", 0) or 0)
        if mid in self._status_mids:
            self._status_mids.discard(mid)
            if code >= 0x80:  # nobody else tracks it: said here (a status refused for good would go unseen)
                self._status_refused(code)
        else:
            self._cuts.acknowledged()
        self._on_published(mid, code)
