"""Intake's door for signed commands: envelopes unwrapped, failures answered on the default topic.

A message that fails authentication is answered `rejected`/`unauthenticated` on
`{prefix}/{vehicle}/responses/{id}` (never on a Response Topic or `reply_to` it chose), runs nothing
and is not recorded in the ledger: an unverified message must not claim an id that a genuine
command may carry later. Nor is it answered when its id is one the agent already holds: that answer
would contradict the genuine command's. A failure without a readable id goes on to intake as an id-less
Undecodable, so it gets the invalid_message event any such message gets. Every failure is counted;
WARNING log lines are rate-limited.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from agent.fleet.packets import Incoming
from agent.fleet.topics import Topics
from agent.policy.signature import Authenticator, Body, Passed, Refused
from agent.store.sqlite import Outgoing
from agent.wire import messages as m
from agent.wire.command import ErrorCode, Status, command_fields
from agent.wire.decode import Undecodable, readable_id

log = logging.getLogger(__name__)

WINDOW_S = 60.0
RECENT_IDS = 4096  # ids passed lately: held by the ledger soon, maybe not yet committed (same intake group)


class SignatureGate:
    """Called by intake for each decoded message: `(body, key_id)` to go on with, or None when refused."""

    def __init__(self, authenticator: Authenticator, topics: Topics, on_failure: Callable[[str, bool], None],
                 known: Callable[[str], bool], logs_per_minute: int,
                 clock: Callable[[], float] = time.monotonic,
                 clock_trusted: Callable[[], bool] = lambda: True) -> None:
        self._authenticator = authenticator
        self._topics = topics
        self._on_failure = on_failure
        self._known = known
        # Whether the wall clock is known to be right; while it is not, the freshness window is left to the
        # general expires_at rule (clock_unsynchronized) instead of refusing signed commands as `expired`.
        self._clock_trusted = clock_trusted
        self._logs_per_minute = logs_per_minute
        self._clock = clock
        self._logged: list[float] = []
        self._passed: OrderedDict[str, None] = OrderedDict()
        self.suppressed = 0  # failures not logged since the last line that was

    def __call__(self, item: Incoming, body: Body,
                 publish: Callable[[Outgoing], None]) -> tuple[Body, str | None] | None:
        verdict = self._authenticator.check(body, item.received_at, self._clock_trusted())
        if isinstance(verdict, Passed):
            if isinstance(verdict.body, dict) and (command_id := readable_id(verdict.body)) is not None:
                self._passed[command_id] = None
                self._passed.move_to_end(command_id)
                if len(self._passed) > RECENT_IDS:
                    self._passed.popitem(last=False)
            return verdict.body, verdict.key_id
        self._refuse(item, verdict, publish)
        if verdict.command_id is None:  # no id to answer: the invalid_message event, as without signatures
            return Undecodable(f"not authenticated ({verdict.reason}): {verdict.message}", "", None), None
        return None

    def _refuse(self, item: Incoming, refused: Refused, publish: Callable[[Outgoing], None]) -> None:
        # one refused message, one count: one without an id is counted by intake with its invalid_message
        self._on_failure(str(refused.reason), refused.command_id is not None)
        command_id = refused.command_id
        answered = command_id is not None and command_id not in self._passed and not self._known(command_id)
        if command_id is not None and answered:
            message = m.refusal_message(command_id, refused.shown(), Status.REJECTED, ErrorCode.UNAUTHENTICATED,
                                        refused.message, item.received_at, **refused.details())
            publish(Outgoing(self._topics.responses(command_id), m.encode(message), None, command_id))
        self._log(refused, len(item.payload), answered)

    def _log(self, refused: Refused, size: int, answered: bool) -> None:
        now = self._clock()
        self._logged = [t for t in self._logged if now - t < WINDOW_S]
        if len(self._logged) >= self._logs_per_minute:
            self.suppressed += 1
            return
        self._logged.append(now)
        shown = refused.shown()
        fields = command_fields(refused.command_id or "", shown.get("component"), shown.get("command"))
        log.warning("command not authenticated (%s): %s", refused.reason, refused.message, extra={
            **fields, "reason": str(refused.reason), "key_id": refused.key_id or "", "bytes": size,
            "suppressed_before": self.suppressed, "answered": answered})
        self.suppressed = 0
