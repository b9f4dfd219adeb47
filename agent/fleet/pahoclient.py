"""The paho client as the link uses it, made before it connects: MQTT version and manual PUBACKs, paho's
log lines through our logger, incoming packets kept to what the agent reads, the Last Will, credentials
and TLS, TCP_NODELAY, and every socket write on the loop thread.

Apart from link.py, which owns the session (connect, reconnect, callbacks): this is only what the client
is before the first connect, so that a newcomer finds each setting and why in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import paho.mqtt.client as mqtt

from agent.config.model import MqttConfig
from agent.fleet.causes import PahoLog
from agent.fleet.credentials import password_of, use_tls
from agent.fleet.inbound import KEEP_IN, keep_heads
from agent.fleet.sockethooks import no_delay, written_by_the_loop


def new_client(config: MqttConfig, client_id: str, will: tuple[str, bytes], on_paho_error: Callable[[str], None],
               on_oversize: Callable[[int], None]) -> mqtt.Client:
    """The link's paho client; raises LinkSetupError when a credential or TLS file is unusable.

    `will`: the Last Will's topic and payload. `on_paho_error(text)`: paho's error lines (the cause the
    next disconnect reports). `on_oversize(bytes)`: an incoming packet over KEEP_IN (inbound.py)."""
    v5 = config.protocol == "5"
    _, _, tls = config.host_port_tls
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else False, manual_ack=True,
    )
    # paho formats every packet's debug line for an `on_log` callback whatever the level; its logger is
    # asked only through Logger.log, which checks the level first: errors are caught there instead
    client.enable_logger(PahoLog(logging.getLogger("paho"), on_paho_error))  # type: ignore[arg-type]
    client.max_queued_messages_set(0)
    keep_heads(client, KEEP_IN, on_oversize)
    client.will_set(will[0], will[1], qos=1, retain=True)
    password = password_of(config)
    if config.username is not None or password is not None:
        client.username_pw_set(config.username or "", password)
    if tls or config.tls is not None:
        use_tls(client, config)
    client.on_socket_open = no_delay
    client.on_socket_register_write = written_by_the_loop
    return client
