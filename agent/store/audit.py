"""The audit log file: append-only JSON lines in the state dir, each record fsynced, rotated by size.

A record is on the disk before `append` returns. Power lost in the middle of a write can leave a
last line without its newline (or a line that is not JSON): `open` finds it, reports it as
`Damage`, and ends it with a newline so that every later record starts a line of its own (the
caller then appends a record of the damage, so the next start does not report it again). The
damaged line itself stays as it was: an audit log is never rewritten.

Before each record the open file is compared with what the path names (device and inode): a file
deleted or replaced behind the agent's back (`rm`, a logrotate that does not tell it) would take the
records to an inode no one can read. Such a file is reported (ERROR log line, `on_lost`) and a fresh
one is opened at the path, its directory entry fsynced, before the record is written.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
TAIL_BYTES = 256 * 1024  # a record is at most a command (64 KiB) plus its outcome; this reaches the last one


@dataclass(frozen=True)
class Damage:
    """What `open` found at the end of the file: `truncated` (no final newline) or `unreadable` (not JSON)."""

    kind: str
    bytes: int
    file: str


class AuditLog:
    """One writer for `{directory}/audit.jsonl` and its rotations `audit.jsonl.1` .. `.{keep}` (oldest last)."""

    def __init__(self, directory: Path, max_bytes: int, keep: int,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.path = directory / AUDIT_FILE
        self._on_lost = on_lost or (lambda how: None)  # "deleted" or "replaced": the open file was
        self._max_bytes = max_bytes
        self._keep = keep
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0

    def open(self) -> Damage | None:
        """Opens the file for appending; returns the damage a power loss left at its end, if any."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            damage = _inspect(self.path)
            self._reopen()
            if damage is not None and damage.kind == "truncated":
                self._write(b"\n")  # the next record starts a line of its own
            return damage

    def append(self, record: dict[str, Any]) -> None:
        """Writes one record and fsyncs it (OSError when it cannot: the caller must not go on as if written)."""
        line = json.dumps(record, separators=(",", ":"), default=str).encode() + b"\n"  # ASCII: never unencodable
        with self._lock:
            if self._fd is None:
                self._reopen()
            else:
                self._check_path()
            if self._size > 0 and self._size + len(line) > self._max_bytes:
                self._rotate()
            self._write(line)

    def close(self) -> None:
        with self._lock:
            self._close()

    def files(self) -> list[Path]:
        """The current file and the rotated ones that exist, newest first."""
        rotated = [self.path.with_name(f"{AUDIT_FILE}.{i}") for i in range(1, self._keep + 1)]
        return [p for p in (self.path, *rotated) if p.exists()]

    # ---- under the lock ------------------------------------------------------------------------
    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _reopen(self) -> None:
        self._close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size

    def _check_path(self) -> None:
        """Reopens the path when the open file is no longer the one it names (deleted, or replaced)."""
        assert self._fd is not None
        mine = os.fstat(self._fd)
        try:
            there = os.stat(self.path)
        except FileNotFoundError:
            how = "deleted"
        else:
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                return
            how = "replaced"
            if _same_file(self.path.with_name(f"{AUDIT_FILE}.1"), mine):  # rotated by another writer (`uds`)
                log.info("the audit log was rotated by another process; writing the new file",
                         extra={"file": str(self.path)})
                self._reopen()
                return
        log.error("the audit log file was %s while the agent had it open; a fresh file is written at %s from "
                  "now on (records written since the change went with the old file)", how, self.path,
                  extra={"file": str(self.path), "how": how})
        try:
            self._on_lost(how)
        except Exception:
            log.exception("audit log loss callback failed")
        self._reopen()
        _fsync_dir(self.path.parent)  # the new file's directory entry survives a power loss too

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError:
            self._close()  # reopened (and its size read again) on the next append
            raise
        self._size += len(data)

    def _rotate(self) -> None:
        """audit.jsonl -> .1 -> .2 ... -> .keep (the oldest is dropped); the directory entry is fsynced."""
        self._close()
        for index in range(self._keep - 1, 0, -1):
            older = self.path.with_name(f"{AUDIT_FILE}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{AUDIT_FILE}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{AUDIT_FILE}.1"))
        _fsync_dir(self.path.parent)
        log.info("audit log rotated", extra={"file": str(self.path), "keep": self._keep})
        self._reopen()


def _same_file(path: Path, mine: os.stat_result) -> bool:
    try:
        found = os.stat(path)
    except OSError:
        return False
    return (found.st_dev, found.st_ino) == (mine.st_dev, mine.st_ino)


def _inspect(path: Path) -> Damage | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with path.open("rb") as f:
        f.seek(max(0, size - TAIL_BYTES))
        tail = f.read()
    if not tail.endswith(b"\n"):
        return Damage("truncated", len(tail) - (tail.rfind(b"\n") + 1), str(path))
    last = tail[:-1].rsplit(b"\n", 1)[-1]
    if not last.strip():
        return None
    try:
        json.loads(last)
    except ValueError:
        return Damage("unreadable", len(last) + 1, str(path))
    return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path) -> list[dict[str, Any] | None]:
    """Every line of an audit file as a record; None for a line that is not one (damage). For tools and tests."""
    records: list[dict[str, Any] | None] = []
    for line in path.read_bytes().splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            records.append(None)
            continue
        records.append(value if isinstance(value, dict) else None)
    return records
