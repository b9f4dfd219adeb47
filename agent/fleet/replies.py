"""Where a command's answers go: the reply topic chosen for it, the check of the ones it asks for, and
whether its non-final messages go there (protocol revision 1.1)."""

from __future__ import annotations

from typing import Any

from agent.fleet.packets import Incoming
from agent.fleet.topics import Topics, is_publishable
from agent.wire.command import topic_name_problem
from agent.wire.parse import InvalidCommandError


def choose_reply_topic(topics: Topics, item: Incoming, body: dict[str, Any], command_id: str) -> str:
    """The Response Topic, else `reply_to`, else the default `responses/{id}`. A command that gives a reply
    topic it may not have (`check_reply_topics`) is answered on the default topic, even when the other one
    it gives is usable: the protocol sends its refusal there ("Reply topics are checked")."""
    given = [candidate for candidate in (item.response_topic, body.get("reply_to")) if candidate is not None]
    for candidate in given:
        if not (isinstance(candidate, str) and is_publishable(candidate) and topics.reply_problem(candidate) is None):
            return topics.responses(command_id)
    return given[0] if given else topics.responses(command_id)


def check_reply_topics(topics: Topics, item: Incoming, body: dict[str, Any]) -> None:
    """A Response Topic or `reply_to` must be a topic one may publish to, and not this vehicle's own."""
    problems = []
    for field, candidate in (("response_topic", item.response_topic), ("reply_to", body.get("reply_to"))):
        if isinstance(candidate, str):
            problem = topic_name_problem(candidate) or topics.reply_problem(candidate)
            if problem:
                problems.append((field, f"{candidate!r} cannot be a reply topic: {problem}"))
    if problems:
        raise InvalidCommandError(problems, body.get("id"))


def takes_progress(item: Incoming, body: dict[str, Any], reply_topic: str) -> bool:
    """Whether non-final messages (`accepted`, an in-flight duplicate's reply) go to `reply_topic`.

    Protocol revision 1.1: always on the default `responses/{id}`; on a Response Topic or `reply_to`
    the command gave, only with `"progress": true`, because request/response clients take the
    first message there as the answer. Final responses and the `running` chunks of a large
    result go everywhere.
    """
    chosen = reply_topic in (item.response_topic, body.get("reply_to"))
    return not chosen or body.get("progress") is True
