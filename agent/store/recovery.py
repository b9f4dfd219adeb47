"""Opens the store at start, and when it is damaged, moves it aside and starts a fresh one, saying why.

Damaged means: SQLite cannot open it (bad header), PRAGMA quick_check finds bad pages, its WAL holds
committed frames SQLite would silently skip (unreadable WAL header, or whole transactions behind a
broken frame), or it shrank to nothing where a store had existed (a marker file of our own, next
to the database, says one did). The damaged files are kept, renamed with a UTC timestamp.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.store.sqlite import Store, StoreError
from agent.store.writer import DAMAGE_CODES, code_of

log = logging.getLogger(__name__)

WAL_MAGIC = (0x377F0682, 0x377F0683)  # checksums in little-endian / big-endian words
WAL_VERSION = 3007000
WAL_HEADER = 32
FRAME_HEADER = 24


@dataclass(frozen=True)
class Recovery:
    """What was wrong with the store found at start, and where its files went."""

    reason: str  # unreadable | damaged | torn_wal | vanished
    detail: str
    moved: tuple[str, ...]  # file names in the state dir, as renamed


def marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".marker")


def open_store(path: Path, on_error: Callable[[StoreError], None] | None = None,
               now: Callable[[], float] = time.time,
               wall: Callable[[], float] = time.time) -> tuple[Store, Recovery | None]:
    """The store at `path`, and a Recovery when it had to be replaced by a fresh one. `now` stamps the
    store's rows (the service's agent time); `wall` dates the moved files and the marker, which people read.

    Raises StoreError when the store cannot be opened for a reason other than damage (no access,
    read-only, locked, I/O errors: its files are left alone), or when not even a fresh store can be
    created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    problem = _vanished(path) or _wal_problem(path)
    store: Store | None = None
    if problem is None:
        try:
            store = Store(path, on_error, now)
        except StoreError as err:
            if not is_damage(err):
                raise  # cannot open, read-only, locked, I/O: the files may be sound; never move them
            problem = ("unreadable", str(err.cause))
    if store is not None:
        try:
            found = store.quick_check()
        except StoreError as err:
            if not is_damage(err):
                store.close()
                raise
            found = [str(err.cause)]
        if found != ["ok"]:
            problem = ("damaged", "PRAGMA quick_check: " + "; ".join(found[:3]))
    recovery = None
    if problem is not None:
        if store is not None:
            store.close()
        reason, detail = problem[0], " ".join(problem[1].split())[:400]
        moved = _move_aside(path, wall())
        recovery = Recovery(reason, detail, moved)
        log.error("store %s: moved aside and replaced by an empty one: %s", reason, detail,
                  extra={"store": str(path), "moved_to": list(moved)})
        store = Store(path, on_error, now)
    assert store is not None
    _write_marker(path, wall())
    return store, recovery


def is_damage(err: StoreError) -> bool:
    """SQLite says the file's content is bad (SQLITE_CORRUPT, SQLITE_NOTADB), not that it cannot get at it."""
    return code_of(err.cause) in DAMAGE_CODES


def _vanished(path: Path) -> tuple[str, str] | None:
    """A store existed here (our marker says so) and now the database is missing or empty."""
    marker = marker_path(path)
    if not marker.exists():
        return None
    size = path.stat().st_size if path.exists() else None
    if size:
        return None
    try:
        created = json.loads(marker.read_text()).get("created_at", "an earlier start")
    except (OSError, ValueError, AttributeError):
        created = "an earlier start"
    state = "missing" if size is None else "empty (0 bytes)"
    return "vanished", f"{path.name} is {state}, but a store existed here since {created}"


def _wal_problem(path: Path) -> tuple[str, str] | None:
    wal = path.with_name(path.name + "-wal")
    try:
        data = wal.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        return "torn_wal", f"{wal.name} cannot be read: {err.strerror or err}"
    why = check_wal(data)
    return ("torn_wal", f"{wal.name}: {why}") if why else None


def check_wal(data: bytes) -> str | None:
    """Why SQLite would skip committed transactions in this WAL, or None when it reads it all.

    Nothing committed can be lost to a WAL shorter than its header, nor to a broken frame in the
    last transaction (a power cut while it was written: with synchronous=FULL it was never
    acknowledged). Lost is what follows a broken frame and holds a commit before the last one.
    A torn last committed transaction cannot be told from an uncommitted one and is not reported.
    """
    if len(data) < WAL_HEADER:
        return None
    magic, version, page_size, _, salt1, salt2, ck1, ck2 = struct.unpack(">8I", data[:WAL_HEADER])
    if magic not in WAL_MAGIC or version != WAL_VERSION:
        return "the WAL header is unreadable (bad magic number or version)"
    order = ">" if magic & 1 else "<"
    if (ck1, ck2) != _checksum(data[:24], order, (0, 0)):
        return "the WAL header checksum does not match"
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        return f"the WAL header names an impossible page size ({page_size})"
    sums = (ck1, ck2)
    frame = FRAME_HEADER + page_size
    offset = WAL_HEADER
    while offset + frame <= len(data):
        header = data[offset:offset + FRAME_HEADER]
        _, _, f_salt1, f_salt2, f_ck1, f_ck2 = struct.unpack(">6I", header)
        if (f_salt1, f_salt2) != (salt1, salt2):
            break  # the end of this generation (older frames follow), or a broken frame
        sums = _checksum(header[:8] + data[offset + FRAME_HEADER:offset + frame], order, sums)
        if sums != (f_ck1, f_ck2):
            break
        offset += frame
    broken = (offset - WAL_HEADER) // frame + 1
    commits = 0
    for later in range(offset + frame, len(data) - frame + 1, frame):
        _, size, f_salt1, f_salt2, _, _ = struct.unpack(">6I", data[later:later + FRAME_HEADER])
        commits += (f_salt1, f_salt2) == (salt1, salt2) and size > 0
    if commits >= 2:
        return f"frame {broken} is broken and {commits} committed transactions after it cannot be read"
    return None


def wal_page(data: bytes, page: int) -> bytes | None:
    """The newest committed copy of database page `page` in this WAL (what SQLite reads instead of the
    database file's), or None when the WAL holds none: frames are read while salts and checksums hold, and
    a copy counts once a commit frame follows it."""
    if len(data) < WAL_HEADER:
        return None
    magic, version, page_size, _, salt1, salt2, ck1, ck2 = struct.unpack(">8I", data[:WAL_HEADER])
    if magic not in WAL_MAGIC or version != WAL_VERSION or page_size < 512 or page_size > 65536 \
            or page_size & (page_size - 1):
        return None
    order = ">" if magic & 1 else "<"
    if (ck1, ck2) != _checksum(data[:24], order, (0, 0)):
        return None
    sums = (ck1, ck2)
    frame = FRAME_HEADER + page_size
    found = pending = None
    offset = WAL_HEADER
    while offset + frame <= len(data):
        header = data[offset:offset + FRAME_HEADER]
        number, size, f_salt1, f_salt2, f_ck1, f_ck2 = struct.unpack(">6I", header)
        if (f_salt1, f_salt2) != (salt1, salt2):
            break
        sums = _checksum(header[:8] + data[offset + FRAME_HEADER:offset + frame], order, sums)
        if sums != (f_ck1, f_ck2):
            break
        if number == page:
            pending = data[offset + FRAME_HEADER:offset + frame]
        if size > 0:  # a commit: what it carried is the database now
            found = pending if pending is not None else found
            pending = None
        offset += frame
    return found


def _checksum(data: bytes, order: str, start: tuple[int, int]) -> tuple[int, int]:
    s1, s2 = start
    words = struct.unpack(f"{order}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s1 = (s1 + words[i] + s2) & 0xFFFFFFFF
        s2 = (s2 + words[i + 1] + s1) & 0xFFFFFFFF
    return s1, s2


def _move_aside(path: Path, now: float) -> tuple[str, ...]:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    moved = []
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if not source.exists():
            continue
        target = path.with_name(f"{path.name}.damaged-{stamp}{suffix}")
        n = 1
        while target.exists():
            target = path.with_name(f"{path.name}.damaged-{stamp}.{n}{suffix}")
            n += 1
        os.replace(source, target)
        moved.append(target.name)
    _sync_dir(path.parent)
    return tuple(moved)


def _write_marker(path: Path, now: float) -> None:
    """Our note that a store exists here, written once, durably (its absence proves nothing)."""
    marker = marker_path(path)
    if marker.exists():
        return
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    temporary = marker.with_name(marker.name + ".tmp")
    try:
        with temporary.open("w") as out:
            out.write(json.dumps({"created_at": created, "store": path.name}) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, marker)
        _sync_dir(path.parent)
    except OSError as err:
        log.warning("cannot write the store marker %s: %s", marker, err.strerror or err)


def _sync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
