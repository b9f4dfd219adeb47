"""The floor under the agent's one-at-a-time latency: what one synced SQLite commit costs on this disk.

Exactly-once execution needs two synced commits on a command's path when commands come one at a
time (agent/store/sqlite.py says why: the start mark before the run, the final response after it),
and a naive bridge makes none. The bridge's round trip plus two such commits is the lowest latency
the agent can reach here, whatever else it does; the suite reports it beside the measured figures.
The commit measured is the store's kind: WAL journal, synchronous=FULL, one small row per commit.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stats import summary


def synced_commits(directory: Path, count: int) -> dict[str, Any]:
    """Milliseconds per synced commit of a ~300-byte row into a WAL database in `directory`."""
    with tempfile.TemporaryDirectory(dir=directory, prefix="commit-probe-") as tmp:
        db = sqlite3.connect(Path(tmp) / "probe.db", isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE t (id TEXT PRIMARY KEY, body BLOB)")
            times = []
            for n in range(count + 5):
                start = time.perf_counter()
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO t VALUES (?, ?)", (f"c-{n}", b"x" * 300))
                db.execute("COMMIT")
                if n >= 5:  # the first commits create the WAL and its index
                    times.append((time.perf_counter() - start) * 1000)
        finally:
            db.close()
    return summary(times, 3)
