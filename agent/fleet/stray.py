"""Messages the broker delivers on topics the link no longer subscribes to (a part of MqttLink).

The session is persistent: it outlives the agent's configuration, and with it the subscriptions of an
earlier run (another prefix, collection since turned off). What comes on them is never a command.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from agent.fleet.topics import Topics

log = logging.getLogger(__name__)

STRAY_TOPICS_LOGGED = 64  # topics of stray messages logged (once each); beyond it they are only counted


class StrayHandling:
    """MqttLink inherits it; `_stray` runs on the MQTT loop thread, in the message callback."""

    _client: mqtt.Client
    _generation: int
    _stray_topics: set[str]
    topics: Topics
    stats: Any
    config: Any
    ack: Callable[[int, int, int | None], None]

    def _stray(self, message: mqtt.MQTTMessage, plan: bool) -> None:
        """A message on a topic the link does not subscribe to now: the persistent session still holds a
        subscription of an earlier run (another prefix, collection since turned off). Not a command: it is
        acknowledged (it would hold a place in the broker's window for ever), counted, logged once per topic,
        and the subscription it came on is dropped where the link can name it."""
        self.stats.stray += 1
        self.ack(message.mid, message.qos, self._generation)
        topic = str(message.topic)
        self._client.unsubscribe(self.topics.plans_filter if plan else topic)
        if topic not in self._stray_topics and len(self._stray_topics) < STRAY_TOPICS_LOGGED:
            self._stray_topics.add(topic)
            log.warning("message on a topic the agent does not subscribe to (a subscription left in the broker's "
                        "session by an earlier configuration): ignored, not a command",
                        extra={"broker": self.config.broker, "topic": topic})
