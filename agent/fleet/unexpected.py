"""What the broker does that the link did not ask for, said and counted (a part of MqttLink): messages on
subscriptions an earlier configuration left in the persistent session, packets larger than the agent
reads, a refusal of the link's own status message, a keep-alive that would not notice a dead connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from agent.fleet.inbound import KEEP_IN
from agent.fleet.refusals import reason_name
from agent.fleet.topics import Topics

log = logging.getLogger(__name__)

STRAY_TOPICS_LOGGED = 64  # topics of stray messages logged (once each); beyond it they are only counted


class Unexpected:
    """MqttLink inherits it; each runs on the MQTT loop thread, in a paho callback."""

    _client: mqtt.Client
    _generation: int
    _stray_topics: set[str]
    topics: Topics
    stats: Any
    config: Any
    ack: Callable[[int, int, int | None], None]
    _on_status_refused: Callable[[int], None]

    def _stray(self, message: mqtt.MQTTMessage, plan: bool) -> None:
        """A message on a topic the link does not subscribe to now: the persistent session still holds a
        subscription of an earlier run (another prefix, collection since turned off). Not a command: it is
        acknowledged (it would hold a place in the broker's window for ever), counted, logged once per topic,
        and the subscription it came on is dropped where the link can name it."""
        self.stats.stray += 1
        self.ack(message.mid, message.qos, self._generation)
        topic = str(message.topic)
        if plan or topic:  # an empty topic name (a Topic Alias never allowed) names no subscription
            self._client.unsubscribe(self.topics.plans_filter if plan else topic)
        if topic not in self._stray_topics and len(self._stray_topics) < STRAY_TOPICS_LOGGED:
            self._stray_topics.add(topic)
            log.warning("message on a topic the agent does not subscribe to (a subscription left in the broker's "
                        "session by an earlier configuration): ignored, not a command",
                        extra={"broker": self.config.broker, "topic": topic})

    def _oversize(self, size: int) -> None:
        """An incoming packet over KEEP_IN (inbound.py): only its head is kept (the message is then decided as
        too large, like any other over MAX_COMMAND_BYTES)."""
        self.stats.oversize += 1
        log.warning("a %d-byte packet from the broker, over the %d bytes the agent reads: its head kept, the rest "
                    "dropped as it was read", size, KEEP_IN, extra={"broker": self.config.broker, "bytes": size})

    def _status_refused(self, code: int) -> None:
        log.error("the broker refused the agent's status message (reason code 0x%02X %s): the fleet does not "
                  "see this vehicle online or offline; check the broker's access rules for %s", code,
                  reason_name(code), self.topics.status,
                  extra={"broker": self.config.broker, "topic": self.topics.status, "reason": reason_name(code)})
        self._on_status_refused(code)

    def _keep_own_keepalive(self, client: mqtt.Client, server: int | None) -> None:
        """paho adopts a Server Keep Alive from CONNACK for its pings and for its judgement that the connection
        is dead. One of 0 (none at all) or longer than ours would leave a connection dropped silently by the
        network (a NAT that forgot it) unnoticed for hours or for ever. A client may ping whenever it likes
        (MQTT 5, 3.1.2.10), and the broker only needs it no less often than it asked: ours is kept."""
        ours = self.config.keepalive_s
        if server is None or not ours or (server and server <= ours):
            return
        try:
            client._keepalive = ours
        except AttributeError as err:  # not expected: paho sets it itself; logged all the same
            log.error("cannot keep our keep-alive over the broker's %d s (%s)", server, err)
            return
        log.info("the broker's keep-alive (%d s) is %s: the agent's (%d s) is kept to notice a dead connection",
                 server, "none" if server == 0 else "longer", ours, extra={"broker": self.config.broker})
