"""paho's socket hooks, set by the link on its client: how every broker socket is written to."""

from __future__ import annotations

import logging
import socket
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)


def no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """TCP_NODELAY on every new broker socket: the PUBACK, `accepted` and final response are small
    writes in a row, and with Nagle's algorithm each waits for the broker's delayed ACK (~40 ms)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as err:
        log.warning("cannot set TCP_NODELAY on the broker connection: %s", err)


def written_by_the_loop(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Set as paho's `on_socket_register_write`: with it, a publish (ack, disconnect) from another thread only
    queues its packet and wakes the loop thread, which writes it. Without it paho writes to the socket on the
    calling thread (we run `loop()` ourselves, not `loop_start()`), concurrently with the loop thread and the
    other publishers: a partial write of a large packet interleaved with another packet's bytes, and the
    broker cut the connection for a malformed packet (then judged the message's fault, cuts.py); and a
    publisher whose write failed ran the disconnect callbacks holding paho's message lock, waiting for the
    callback lock the loop thread held while it waited for that message lock (a deadlock)."""
