"""The agent's exception hierarchy: one base, each subclass also a matching built-in.

May import: nothing of the agent (standard library only)."""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError, ValueError):
    """A configuration file is invalid; carries every problem found, each with its path."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = list(problems)
        shown = [f"{path}: {message}" if path else message for path, message in problems]
        if len(shown) == 1:  # one problem, one line
            super().__init__(f"{source}: {shown[0]}")
        else:
            super().__init__(f"{source}: {len(shown)} problems\n" + "\n".join(f"  {line}" for line in shown))


class BusDownError(AgentError, ConnectionError):
    """The CAN bus is not usable right now (send failed, interface down, being rebuilt)."""


class TransportTimeoutError(AgentError, TimeoutError):
    """An ISO-TP transfer did not complete in time."""
