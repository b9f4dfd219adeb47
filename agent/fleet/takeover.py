"""Whether our MQTT session is being taken over by another connection with our client id.

Two agents started with one vehicle's config share a client id, and a broker keeps one session per id:
each new connection takes the session from the other, for ever. Seen from the link that is only a
stream of disconnects, so it is told apart here, to be said plainly (is a second agent running?) and
not fought every half second. A broker may say so (DISCONNECT 0x8E, MQTT 5); Mosquitto 2.0.11 just
closes the older connection, so connections cut again and again within seconds of being accepted, with
nothing of ours in flight, count as the same thing. Pure: the link feeds it each lost connection
(`TakeoverWatch.lost`), logs what it reports and backs off by it (`TakeoverWatch.least_delay`).
"""

from __future__ import annotations

from agent.fleet.packets import CUT_FOR_A_MESSAGE

SESSION_TAKEN_OVER = 0x8E
TAKEOVER_BACKOFF_S = 10.0  # at least this long before reconnecting after our session was taken over
FLAP_S = 5.0  # a connection cut this soon after it was accepted counts as a flap
FLAPS = 3  # flaps in a row that are reported (as a likely takeover) and slow the reconnects down


class TakeoverWatch:
    """Counts lost connections that look like a takeover: said by the broker (MQTT 5 only), or FLAPS
    flaps in a row. `in_a_row` is how many consecutive connections ended that way (0: none lately)."""

    def __init__(self, mqtt5: bool) -> None:
        self._mqtt5 = mqtt5
        self.in_a_row = 0  # consecutive connections that ended in a session takeover
        self._flaps = 0  # consecutive connections cut within FLAP_S of being accepted

    def lost(self, reason: int | None, cut_short: bool, in_flight: bool, stopping: bool) -> str | None:
        """One accepted connection was lost: `reason` its DISCONNECT reason code (None when none came),
        `cut_short` within FLAP_S of being accepted, `in_flight` with messages of ours unacknowledged
        (a cut those explain is judged by cuts.py, not taken for a takeover), `stopping` by our own
        disconnect. Returns the log format (one %r for the client id, one %.0f for the backoff) when
        this loss is to be reported as a takeover, else None."""
        said = self._mqtt5 and reason == SESSION_TAKEN_OVER
        flap = cut_short and not in_flight and reason not in CUT_FOR_A_MESSAGE
        self._flaps = self._flaps + 1 if flap and not stopping else 0
        self.in_a_row = self.in_a_row + 1 if said or self._flaps >= FLAPS else 0
        if not (said or self._flaps == FLAPS):
            return None
        why = "the broker says another connection with our client id %r took over the session" if said \
            else f"the broker closed our connection {FLAPS} times in a row within {FLAP_S:.0f} s of accepting " \
                 "it: most likely another connection with our client id %r takes over the session"
        return why + ": is a second agent running with this vehicle's config? reconnecting in %.0f s or more"

    def least_delay(self) -> float:
        """The shortest wait before reconnecting (0 when no takeover lately): TAKEOVER_BACKOFF_S, doubling
        with each takeover in a row, so that two agents with one id do not fight every half second."""
        return TAKEOVER_BACKOFF_S * 2 ** (self.in_a_row - 1) if self.in_a_row else 0.0
