"""A scripted MQTT 5 server on a real loopback TCP socket, for broker behaviours Mosquitto cannot be made to
show on demand (a CONNACK held back, Session Present 0 after a reconnect, a PUBACK for a packet id never
sent, a refusal code chosen by the test). The test drives it packet by packet; the agent's side is the
real paho client over a real socket. Only the few packets the link exchanges are encoded here.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 1, 2, 3, 4, 8, 9, 12, 13, 14


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


@dataclass(frozen=True)
class Packet:
    kind: int
    flags: int
    body: bytes

    @property
    def mid(self) -> int:
        """The packet id of a PUBACK or SUBSCRIBE (the first two bytes of its variable header)."""
        return int(struct.unpack("!H", self.body[:2])[0])

    @property
    def topic(self) -> str:
        (n,) = struct.unpack("!H", self.body[:2])
        return self.body[2:2 + n].decode()

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)


class Connection:
    """One accepted client connection. `expect` reads packets in order, answering PINGREQ and SUBSCRIBE
    itself (unless told not to), and keeps every packet read in `seen`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seen: list[Packet] = []
        self._buffer = b""

    def _read_exact(self, n: int, deadline: float) -> bytes:
        while len(self._buffer) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no packet from the client; read so far: {[p.kind for p in self.seen]}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"the client closed the connection; read: {[p.kind for p in self.seen]}")
            self._buffer += chunk
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def read(self, timeout: float = 10.0) -> Packet:
        deadline = time.monotonic() + timeout
        first = self._read_exact(1, deadline)[0]
        length, shift = 0, 0
        while True:
            byte = self._read_exact(1, deadline)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        packet = Packet(first >> 4, first & 0x0F, self._read_exact(length, deadline))
        self.seen.append(packet)
        return packet

    def expect(self, kind: int, timeout: float = 10.0, answer: bool = True) -> Packet:
        """Reads until a packet of `kind` (answering pings and subscriptions on the way)."""
        deadline = time.monotonic() + timeout
        while True:
            packet = self.read(max(0.01, deadline - time.monotonic()))
            if answer and packet.kind == PINGREQ:
                self.send(PINGRESP, 0, b"")
            if answer and packet.kind == SUBSCRIBE:
                self.suback(packet)
            if packet.kind == kind:
                return packet

    def send(self, kind: int, flags: int, body: bytes) -> None:
        self.sock.sendall(bytes([kind << 4 | flags]) + _varint(len(body)) + body)

    def connack(self, session_present: bool = False, reason: int = 0, properties: bytes = b"") -> None:
        self.send(CONNACK, 0, bytes([int(session_present), reason]) + _varint(len(properties)) + properties)

    def suback(self, subscribe: Packet) -> None:
        _, at = _read_varint(subscribe.body, 2)  # after the packet id: the properties' length
        filters = 0
        while at < len(subscribe.body):
            (n,) = struct.unpack("!H", subscribe.body[at:at + 2])
            at += 2 + n + 1
            filters += 1
        self.send(SUBACK, 0, subscribe.body[:2] + b"\x00" + bytes([1] * filters))

    def publish(self, topic: str, payload: bytes, mid: int, qos: int = 1, dup: bool = False,
                retain: bool = False) -> None:
        flags = (0x08 if dup else 0) | qos << 1 | int(retain)
        body = _string(topic) + (struct.pack("!H", mid) if qos else b"") + b"\x00" + payload
        self.send(PUBLISH, flags, body)

    def puback(self, mid: int, reason: int = 0) -> None:
        self.send(PUBACK, 0, struct.pack("!H", mid) + bytes([reason]) + b"\x00")

    def close(self) -> None:
        self.sock.close()


class FakeBroker:
    """Listens on a free loopback port; `accept` hands the test each connection the client opens."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._open: list[Connection] = []

    def accept(self, timeout: float = 10.0) -> Connection:
        self._server.settimeout(timeout)
        sock, _ = self._server.accept()
        connection = Connection(sock)
        self._open.append(connection)
        return connection

    def close(self) -> None:
        for connection in self._open:
            connection.close()
        self._server.close()


class Gate:
    """A TCP relay to a real broker that the test can close: `shut` cuts the connection through it and turns
    new ones away (accepted and closed at once) until `open`. The network between a vehicle and its broker."""

    def __init__(self, broker_port: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._broker_port = broker_port
        self._lock = threading.Lock()
        self._shut = False
        self._sockets: list[socket.socket] = []
        self.connections = 0  # relayed to the broker
        self._threads = [threading.Thread(target=self._accept, name="gate", daemon=True)]
        self._threads[0].start()

    def shut(self) -> None:
        with self._lock:
            self._shut = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _close(sock)

    def open(self) -> None:
        with self._lock:
            self._shut = False

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        self.shut()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                shut = self._shut
            if shut:
                _close(client)
                continue
            try:
                broker = socket.create_connection(("127.0.0.1", self._broker_port))
            except OSError:
                _close(client)
                continue
            with self._lock:
                self.connections += 1
                self._sockets += [client, broker]
            for source, target in ((client, broker), (broker, client)):
                self._threads.append(threading.Thread(target=_pump, args=(source, target), name="gate", daemon=True))
                self._threads[-1].start()


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        _close(source)
        _close(target)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a recv() on it in another thread
    sock.close()
