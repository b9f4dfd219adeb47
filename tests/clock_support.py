"""Clocks a test moves by hand (agent time, id retention, wall-clock steps)."""

from __future__ import annotations


class Hands:
    """A wall clock and a monotonic clock the test moves by hand."""

    def __init__(self, wall: float, mono: float = 1000.0) -> None:
        self.wall_at, self.mono_at = wall, mono

    def wall(self) -> float:
        return self.wall_at

    def mono(self) -> float:
        return self.mono_at

    def run(self, seconds: float) -> None:
        """Time passes (both clocks move)."""
        self.wall_at += seconds
        self.mono_at += seconds
