"""Which message the broker cuts our connections on, and what that says about its size limit.

A broker that will not take a message may close the connection instead of refusing it with a PUBACK
(Mosquitto does so for a message over a `message_size_limit`, which it does not announce). paho resends
its unacknowledged messages first thing on every new connection, so that one message would cut every
connection for ever and silence everything behind it: responses, states, telemetry, whoever published
it. Judged here, for all of them, from the order paho resends in (`CutJudge`), and acted on by the link
(`CutHandling`, which MqttLink inherits).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection
from typing import Any

import paho.mqtt.client as mqtt

from agent.fleet.packets import CUT_FOR_A_MESSAGE, packet_size

log = logging.getLogger(__name__)

STRIKES = 3  # connections in a row cut before any PUBACK while the same message led paho's resend queue
# Never learn a limit below this: a cut on a smaller message is unlikely to be about its size, and under it a
# response could no longer be cut into chunks (refusals.rechunk needs 1 KiB of payload per chunk).
MIN_LEARNED_PACKET = 4096


class CutJudge:
    """Counts connections cut on the same message. A connection the broker cut for a protocol error or an
    oversize packet, or within seconds of accepting it, before any PUBACK of ours, while the same message
    was first in line, is a strike against that message; STRIKES in a row mark it as one the broker will
    never take. (When the cut comes while the packet is still being written, the broker's reason code
    never arrives: hence the short-lived connection as the other sign.)"""

    def __init__(self) -> None:
        self._acked_this_connection = False
        self._strikes: tuple[int | None, int] = (None, 0)  # (mid first in line, connections cut so far)

    def connected(self) -> None:
        self._acked_this_connection = False

    def acknowledged(self) -> None:
        """A PUBACK for one of our messages (not the link's own status): whatever led went through."""
        self._acked_this_connection = True
        self._strikes = (None, 0)

    def lost(self, first_in_line: int | None, reason: int | None, short: bool) -> int | None:
        """The connection was lost with `first_in_line` (a mid) first among the messages paho will resend;
        returns that mid when this was its STRIKES-th cut in a row (the caller drops it), else None."""
        if (reason not in CUT_FOR_A_MESSAGE and not short) or first_in_line is None:
            self._strikes = (None, 0)
            return None
        if self._acked_this_connection:
            return None
        mid, count = self._strikes
        count = count + 1 if mid == first_in_line else 1
        if count >= STRIKES:
            self._strikes = (None, 0)
            return first_in_line
        self._strikes = (first_in_line, count)
        return None


def learned_limit(struck_packet: int, known: int | None) -> int | None:
    """The Maximum Packet Size to keep to after the broker would not take a `struck_packet`-byte packet
    (`known`: the limit kept to so far, None for none); None when there is nothing to learn. Half the
    struck size: the real limit is unknown, and halving finds one under it in a few strikes where one
    byte less could take hundreds. Never below MIN_LEARNED_PACKET: a small message is not cut for size."""
    if struck_packet <= MIN_LEARNED_PACKET:
        return None
    limit = max(MIN_LEARNED_PACKET, struck_packet // 2)
    return limit if known is None or limit < known else None


def held_packet_size(message: mqtt.MQTTMessage) -> int:
    """Bytes of the PUBLISH packet paho sends for a message it holds (as the link's own check counts them)."""
    correlation = getattr(message.properties, "CorrelationData", None) if message.properties else None
    return packet_size(message.topic, message.payload, correlation)


def first_in_line(client: mqtt.Client, skip: Collection[int]) -> tuple[int, int, str] | None:
    """(mid, packet bytes, topic) of the first QoS 1 message paho holds unacknowledged, other than `skip`
    (the link's status messages: published after the resends on each connection, and small): the message
    paho resends first on the next connection. paho has no public call for this; None without its
    internals (then nothing is ever judged poison, and such a message keeps cutting: logged)."""
    try:
        with client._out_message_mutex:
            for mid, message in client._out_messages.items():
                if message.qos > 0 and mid not in skip:
                    return mid, held_packet_size(message), str(message.topic)
    except AttributeError as err:
        log.error("cannot see paho's unacknowledged messages (%s); a message the broker cuts the "
                  "connection on is not recognised", err)
    return None


class CutHandling:
    """The link's side of the judge (MqttLink inherits it): after each lost connection, the message the
    broker would not take is dropped from paho's session and handed back to its publisher, and the size
    it teaches is kept to. Runs on the MQTT loop thread, in the disconnect callback."""

    _client: mqtt.Client
    _cuts: CutJudge
    _status_mids: set[int]
    _learned_max_packet: int | None
    _on_struck: Callable[[int], bool]
    _on_too_large: Callable[[int, int, int], bool]
    last_disconnect_code: int | None
    last_cut_short: bool
    stats: Any
    config: Any
    forget: Callable[[int], None]  # MqttLink.forget: drops a mid from paho's session

    def _judge_cut(self) -> None:
        """A message first in line when STRIKES connections in a row were cut on it is dropped from paho's
        session before it reconnects (it would be resent first and cut the next one too), its publisher
        is told, and later messages are kept under a size the broker takes (cuts.learned_limit): those paho
        holds already over it are handed back too (each would cut STRIKES more connections in its turn)."""
        first = first_in_line(self._client, self._status_mids)
        struck = self._cuts.lost(first[0] if first else None, self.last_disconnect_code, self.last_cut_short)
        if struck is None or first is None:
            return
        _, size, topic = first
        self.forget(struck)
        limit = learned_limit(size, self._learned_max_packet)
        if limit is not None:
            self._learned_max_packet = limit
            log.warning("the broker cut %d connections in a row on a %d-byte message without announcing a size "
                        "limit: messages over %d bytes are made smaller or set aside from now on (announce "
                        "the limit with the broker's max_packet_size)", STRIKES, size, limit,
                        extra={"broker": self.config.broker, "bytes": size, "max_packet": limit})
        if not self._on_struck(struck):
            self._lost(topic, size, "connection_dropped")
        if limit is not None:
            self._withdraw_over(limit)

    def _withdraw_over(self, limit: int) -> None:
        """Drops from paho's session the messages it holds over `limit` and hands them back (on_too_large)."""
        over: list[tuple[int, str, int]] = []
        # (a paho without these internals: they are cut on in their turn)
        with contextlib.suppress(AttributeError), self._client._out_message_mutex:
            for mid, message in self._client._out_messages.items():
                size = held_packet_size(message)
                if message.qos > 0 and mid not in self._status_mids and size > limit:
                    over.append((mid, str(message.topic), size))
        for mid, topic, size in over:
            self.forget(mid)
            if not self._on_too_large(mid, size, limit):
                self._lost(topic, size, "packet_too_large")

    def _lost(self, topic: str, size: int, reason: str) -> None:
        """A message dropped from paho's session that no publisher tracks (sent around the store)."""
        self.stats.dropped += 1
        log.error("the broker will not take a message sent around the store: dropped, not delivered (%s)", reason,
                  extra={"broker": self.config.broker, "topic": topic, "bytes": size, "reason": reason})
