"""Serves a simulator's bus over the socketcand protocol on TCP, so another process (an agent with
python-can's `socketcand` interface, `sovd-edge uds`) can reach the simulated ECUs without kernel CAN.

Speaks what python-can's client expects: `< hi >`, then `< ok >` for `< open CH >` and for
`< rawmode >`, each a separate write, and no frame before that handshake ends; then frames both
ways (`< frame ID SEC.USEC HEX >` out, `< send ID LEN B0 B1 ... >` in). Classic CAN only: the
protocol has no FD frames.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time

import can

log = logging.getLogger(__name__)

_SEND = re.compile(r"< send ([0-9A-Fa-f]{1,8}) ([0-9A-Fa-f]{1,2})((?: [0-9A-Fa-f]{1,2})*) >")


def frame_text(msg: can.Message) -> str:
    can_id = f"{msg.arbitration_id:08X}" if msg.is_extended_id else f"{msg.arbitration_id:03X}"
    return f"< frame {can_id} {msg.timestamp:.6f} {bytes(msg.data).hex().upper()} >"


def parse_send(text: str) -> can.Message | None:
    match = _SEND.fullmatch(text.strip())
    if match is None:
        return None
    can_id, length, data = match.group(1), int(match.group(2), 16), bytes(int(b, 16) for b in match.group(3).split())
    if length != len(data) or length > 8:
        return None
    return can.Message(arbitration_id=int(can_id, 16), data=data, is_extended_id=len(can_id) > 3)


class _Client:
    def __init__(self, hub: Hub, conn: socket.socket, peer: str) -> None:
        self.hub, self.conn, self.peer = hub, conn, peer
        self.ready = False
        self.lock = threading.Lock()

    def write(self, text: str) -> bool:
        try:
            with self.lock:
                self.conn.sendall(text.encode("ascii"))
            return True
        except OSError:
            return False

    def serve(self) -> None:
        buffer = ""
        try:
            self.write("< hi >")
            while not self.hub.stopping.is_set():
                data = self.conn.recv(4096)
                if not data:
                    return
                buffer += data.decode("ascii", errors="replace")
                while (end := buffer.find(">")) != -1:
                    message, buffer = buffer[buffer.find("<"):end + 1], buffer[end + 1:]
                    self._handle(message)
        except OSError:
            return
        finally:
            self.hub.drop(self)

    def _handle(self, message: str) -> None:
        if message.startswith("< open ") or message == "< rawmode >":
            self.write("< ok >")
            self.ready = message == "< rawmode >" or self.ready
            return
        if message.startswith("< send "):
            msg = parse_send(message)
            if msg is None:
                log.warning("hub: bad frame from %s: %s", self.peer, message)
                return
            self.hub.from_client(self, msg)
            return
        log.debug("hub: ignoring %s from %s", message, self.peer)


class Hub:
    """A TCP gateway to one (virtual) CAN bus; frames from one client also reach the others."""

    def __init__(self, bus_factory: type[can.BusABC] | object, host: str, port: int) -> None:
        self._bus: can.BusABC = bus_factory()  # type: ignore[operator]
        self._server = socket.create_server((host, port))
        self._server.settimeout(0.5)  # closing does not wake accept(): poll for the stop flag instead
        self.port = self._server.getsockname()[1]
        self.stopping = threading.Event()
        self._clients: list[_Client] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept, name="hub-accept", daemon=True),
                         threading.Thread(target=self._relay, name="hub-relay", daemon=True)]
        self.skipped_fd = 0

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        log.info("socketcand hub listening", extra={"port": self.port})

    def stop(self) -> None:
        self.stopping.set()
        self._server.close()
        with self._lock:
            for client in self._clients:
                client.conn.close()
        for thread in self._threads:
            thread.join(2)
        self._bus.shutdown()

    def drop(self, client: _Client) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
        client.conn.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, peer = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = _Client(self, conn, f"{peer[0]}:{peer[1]}")
            with self._lock:
                self._clients.append(client)
            threading.Thread(target=client.serve, name=f"hub-{client.peer}", daemon=True).start()

    def _relay(self) -> None:
        """Frames on the simulator's bus go to every client that finished its handshake."""
        while not self.stopping.is_set():
            msg = self._bus.recv(0.2)
            if msg is not None:
                self._broadcast(msg, None)

    def from_client(self, sender: _Client, msg: can.Message) -> None:
        msg.timestamp = time.time()
        try:
            self._bus.send(msg)
        except can.CanError as err:
            log.warning("hub: cannot put a frame on the bus: %s", err)
        self._broadcast(msg, sender)

    def _broadcast(self, msg: can.Message, sender: _Client | None) -> None:
        if msg.is_fd or msg.is_error_frame or msg.is_remote_frame:
            self.skipped_fd += msg.is_fd
            return
        text = frame_text(msg)
        with self._lock:
            clients = [c for c in self._clients if c.ready and c is not sender]
        for client in clients:
            if not client.write(text):
                self.drop(client)
