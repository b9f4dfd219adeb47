"""Seed-to-key algorithms shipped with the agent, and the loader for configured `module:function` ones.

An algorithm is called as `algorithm(level, seed, params) -> key` (udsoncan's convention), with
`params` the mapping from the config. Real ECUs use OEM algorithms: point the config at yours.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from agent.config.ecu import resolve_callable

KeyAlgorithm = Callable[[int, bytes, Mapping[str, Any]], bytes]


def xor_demo(level: int, seed: bytes, params: Mapping[str, Any]) -> bytes:
    """Demo/simulator algorithm: each seed byte XOR a per-level mask (`mask`, default 0x5A + level)."""
    mask = int(params.get("mask", 0x5A + level)) & 0xFF
    return bytes(b ^ mask for b in seed)


def load_algorithm(ref: str) -> KeyAlgorithm:
    return resolve_callable(ref)
