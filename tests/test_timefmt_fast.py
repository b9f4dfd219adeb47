"""format_rfc3339's once-per-second formatting gives exactly datetime's text. Pure."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from agent.wire.messages import encode, encode_final, split_result
from agent.wire.timefmt import format_rfc3339


def reference(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_same_text_as_datetime_at_rounding_edges_and_at_random():
    rng = random.Random(12)
    edges = [0.0, 0.0005, 0.9995, 0.9999994, 0.9999995, 1.9999999, 1764000000.9995, 253402300799.5,
             -0.5, -1.0000001, -86400.25]
    seconds = [rng.randrange(0, 4 * 10**9) for _ in range(500)]
    samples = edges + [s + k / 1e7 for s in seconds for k in (0, 4, 5, 4999, 5000, 9999994, 9999995, 9999999)]
    samples += [rng.uniform(0, 4e9) for _ in range(20000)]
    for epoch in samples:
        assert format_rfc3339(epoch) == reference(epoch), epoch


def test_a_final_is_encoded_once_and_split_as_before():
    small = {"id": "a", "status": "completed", "final": True, "seq": 2, "result": {"values": {"vin": "X"}}}
    assert encode_final(small, 1000) == [(small, encode(small))]
    large = {"id": "a", "component": "c", "command": "read_data", "status": "completed", "final": True, "seq": 2,
             "result": {"values": {"blob": "x" * 5000}}}
    pieces = encode_final(large, 1500)
    assert [message for message, _ in pieces] == split_result(large, 1500)
    assert all(payload == encode(message) for message, payload in pieces) and len(pieces) > 2
