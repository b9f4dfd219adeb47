"""The naive bridge the agent is measured against: paho subscriber -> udsoncan Client -> publish the answer.

No durability, no queue, no policy: each command runs inside paho's on_message, one at a time for
the whole vehicle, and is acknowledged when the callback returns. It reads the agent's config for
the vehicle id, the ECUs' addresses and DIDs, and runs the same simulated ECUs in-process on the
same kind of virtual bus (as the agent does with `simulate:`). It answers `read_data` only.

    python -m bench.bridge -c AGENT_CONFIG --broker mqtt://HOST:PORT [--nagle]

TCP_NODELAY is set on its MQTT socket, as on the agent's; `--nagle` leaves paho's default (Nagle on).
Sends systemd's READY=1 to $NOTIFY_SOCKET once connected, so exec -> READY compares like for like.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import threading
from typing import Any

import can
import isotp
import paho.mqtt.client as mqtt
import udsoncan
from udsoncan.client import Client
from udsoncan.connections import PythonIsoTpConnection

from agent.config import load_config
from agent.config.transport import isotp_address, isotp_params
from agent.devtools.sim.simulator import simulators_for

SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class HexCodec(udsoncan.DidCodec):
    def __init__(self, length: int) -> None:
        self.length = length

    def encode(self, value: Any) -> bytes:
        return bytes.fromhex(value)

    def decode(self, data: bytes) -> Any:
        return data.hex()

    def __len__(self) -> int:
        return self.length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    parser.add_argument("--nagle", action="store_true", help="leave TCP_NODELAY off (paho's default)")
    args = parser.parse_args()
    config = load_config(args.config)
    simulators = simulators_for(config)
    for sim in simulators:
        sim.start()
    bus = can.Bus(interface=config.bus.interface, channel=config.bus.channel, fd=config.bus.fd, ignore_config=True)
    notifier = can.Notifier(bus, [])
    clients: dict[str, tuple[Client, dict[str, int]]] = {}
    for ecu in config.ecus:
        stack = isotp.NotifierBasedCanStack(bus, notifier, address=isotp_address(ecu.addressing),
                                            params=isotp_params(ecu.isotp))
        codecs = {d.id: udsoncan.AsciiCodec(d.length) if d.codec == "ascii" else HexCodec(d.length)
                  for d in ecu.dids if d.length is not None}
        client = Client(PythonIsoTpConnection(stack), request_timeout=ecu.timing.request_ms / 1000,
                        config={**udsoncan.configs.default_client_config, "data_identifiers": codecs})
        client.open()
        clients[ecu.name] = (client, {d.name: d.id for d in ecu.dids if d.id in codecs})
    base = f"{config.mqtt.prefix}/{config.vehicle}"

    def on_message(mqttc: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
            command_id = body["id"]
            if not isinstance(command_id, str) or not SAFE_ID.fullmatch(command_id):
                return  # nowhere safe to answer
        except (ValueError, TypeError, KeyError):
            return
        reply: dict[str, Any] = {"id": command_id, "final": True}
        try:
            client, dids = clients[body["component"]]
            names = body["params"]["data"]
            names = [names] if isinstance(names, str) else names
            values = client.read_data_by_identifier([dids[n] for n in names]).service_data.values
            reply.update(status="completed", result={"values": {n: values[dids[n]] for n in names}})
        except Exception as err:  # naive: anything that goes wrong is a failed response
            reply.update(status="failed", error={"code": "internal", "message": f"{type(err).__name__}: {err}"})
        mqttc.publish(f"{base}/responses/{command_id}", json.dumps(reply), qos=1)

    mqttc = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    mqttc.on_connect = lambda c, *_: c.subscribe(f"{base}/commands", qos=1)
    mqttc.on_message = on_message
    if not args.nagle:
        mqttc.on_socket_open = lambda c, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    host, port = args.broker.removeprefix("mqtt://").rsplit(":", 1)
    mqttc.connect(host, int(port))
    mqttc.loop_start()
    if address := os.environ.get("NOTIFY_SOCKET"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.sendto(b"READY=1", "\0" + address[1:] if address.startswith("@") else address)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    mqttc.disconnect()
    mqttc.loop_stop()
    for client, _ in clients.values():
        client.close()
    notifier.stop()
    bus.shutdown()
    for sim in simulators:
        sim.stop()


if __name__ == "__main__":
    main()
