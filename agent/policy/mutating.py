"""Which commands change a vehicle's state: the one definition signatures and the audit log share. Pure."""

from __future__ import annotations

from agent.config.model import ALL_COMMANDS

# Reading data or faults (UDS or OBD-II) and keeping a session alive change nothing on the vehicle; every other
# command (writes, clears, resets, sessions, unlocks, routines, I/O control, raw requests) may.
READ_ONLY = frozenset({"read_data", "read_faults", "tester_present", "obd"})
MUTATING = frozenset(ALL_COMMANDS) - READ_ONLY


def is_mutating(command: object) -> bool:
    """True for every command that may change the vehicle, and for anything that is not a known read."""
    return not (isinstance(command, str) and command in READ_ONLY)
