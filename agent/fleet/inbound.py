"""Incoming packets kept to the size the agent announces: the head of a larger one is kept, the rest dropped.

With MQTT 5 the agent announces a Maximum Packet Size and a broker must not send more; with 3.1.1 there
is nothing to announce, and Mosquitto forwards messages up to 256 MB. paho reads a packet whole into
memory whatever its size (and the link copies its payload): one huge command could have the agent
killed for memory on a 1 GB Pi, and be redelivered to it after every restart. paho has no public hook
for this; its socket read is wrapped here, on the link's client, before it connects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from agent.wire.decode import SALVAGE_MAX_BYTES

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024  # bytes of an oversized packet read (and dropped) at a time
# Read whole: packets up to the size whose id intake still reads (to answer a command too large), plus room
# for the topic and properties; of a larger one (MQTT 3.1.1 cannot refuse it; with MQTT 5 a broker that
# ignores the Maximum Packet Size announced sends it), only the head.
KEEP_IN = SALVAGE_MAX_BYTES + 16 * 1024


def keep_heads(client: mqtt.Client, limit: int, on_oversize: Callable[[int], None]) -> None:
    """Makes `client` keep at most `limit` bytes of any incoming packet: the first `limit - 1` and its last
    byte (paho takes an empty read for a closed connection, so the read that ends the packet is never
    empty). The rest is read from the socket and dropped as it comes. A PUBLISH keeps its topic, packet
    id and properties (they come first) and the head of its payload: it is still handed on, decided as
    too large, and acknowledged. `on_oversize(bytes)` is called once per such packet, with its full size."""
    try:
        read = client._sock_recv
        client._in_packet  # noqa: B018 (present: the state the wrapper reads)
    except AttributeError as err:
        log.error("cannot bound incoming packets in this paho (%s): a huge message is read whole", err)
        return
    seen: list[Any] = [None]  # the packet (paho's dict for it) already reported

    def bounded(bufsize: int) -> bytes:
        packet = client._in_packet
        if not packet["have_remaining"] or packet["remaining_length"] <= limit:
            return read(bufsize)
        if seen[0] is not packet:
            seen[0] = packet
            on_oversize(packet["remaining_length"])
        while True:
            left = packet["to_process"]
            if left <= 1:
                return read(left)  # the last byte (never more: the next packet follows): a non-empty read
            data = read(min(bufsize, READ_CHUNK, left - 1))
            if not data:
                return data  # the connection closed
            room = max(0, limit - 1 - len(packet["packet"]))
            if len(data) > room:
                packet["to_process"] -= len(data) - room  # dropped: counted as read
                with client._msgtime_mutex:  # a slow link dropping megabytes is not a silent broker
                    client._last_bytes_received = getattr(mqtt, "time_func", time.monotonic)()
            if room:
                return data[:room]

    client._sock_recv = bounded  # type: ignore[method-assign]
