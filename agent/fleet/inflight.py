"""paho's window of QoS 1 messages on the wire, kept within the broker's Receive Maximum (MQTT 5).

paho caps what it has in flight at 20 by default and resends everything it holds at once on a new
connection; the broker may announce less (HiveMQ: 10; Mosquitto's `max_inflight_messages`) and cut a
connection that exceeds it (0x93). paho has no public call to change the window once connected, so
its state is set here under its own lock, from the CONNACK callback, before paho resends.
"""

from __future__ import annotations

import logging

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

PAHO_IN_FLIGHT = 20  # paho's own default: at most this many of our QoS 1 messages on the wire at once


def keep_within_receive_maximum(client: mqtt.Client, receive_maximum: int) -> None:
    """Called on CONNACK: our QoS 1 messages without a PUBACK stay within the broker's Receive Maximum on
    this connection, whoever published them (the outbox, the telemetry lane's states, the status, a
    refusal sent around the store; the outbox alone keeps within it for its own). paho is told the
    window, and of what it is about to resend what exceeds the window waits, in order, until PUBACKs
    make room: paho sends it then."""
    limit = min(PAHO_IN_FLIGHT, receive_maximum)
    try:
        with client._out_message_mutex:
            client._max_inflight_messages = limit
            room = limit - 1  # the status, published next, goes first
            waiting = False  # once one waits, all after it wait: paho sends waiting ones in order
            for message in client._out_messages.values():
                if message.qos == 0:
                    continue
                if message.state == mqtt.mqtt_ms_queued or (message.state == mqtt.mqtt_ms_publish
                                                            and (waiting or room <= 0)):
                    message.state = mqtt.mqtt_ms_queued
                    waiting = True
                else:  # resent now, or sent already (published while the CONNACK was on its way)
                    room -= 1
    except AttributeError as err:  # a paho without these internals: its own window (PAHO_IN_FLIGHT) holds
        log.error("cannot set the broker's Receive Maximum in paho (%s); messages may exceed it", err)
