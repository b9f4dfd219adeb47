"""The agent's clocks: the wall clock and whether it can be trusted, and *agent time*, which no step of
the wall clock can move.

A Pi without a real-time clock boots near 1970 (or at fake-hwclock's last save) and NTP steps the wall
clock later, by months or decades. Durable decisions (how long an id is remembered, how old an outbox
message is) are measured in agent time: seconds the agent has been running, accumulated across
restarts in a small state file, starting from the wall clock of the very first start. It never steps
back and never leaps forward; time the agent was not running is not counted, so retention can only
last longer than configured, never shorter. The wall clock is used for display and for `expires_at`,
and only while it is known to be synchronized.

May import: nothing of the agent (standard library only).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

# The day this agent version was built: a wall clock before it is certainly wrong.
RELEASE_DATE = datetime(2026, 11, 29, tzinfo=UTC).timestamp()
TIMESYNC_DIR = Path("/run/systemd/timesync")  # systemd-timesyncd; `synchronized` appears once it synced
TIME_DAEMON_DIRS = (Path("/run/chrony"), Path("/var/run/chrony"), Path("/run/ntpd.pid"))
SAVE_EVERY_S = 60.0  # agent time is persisted at most this often (a SIGKILL loses at most this much)
SYNC_CACHE_S = 1.0

_STA_UNSYNC = 0x0040
_TIME_ERROR = 5


class _Timex(ctypes.Structure):
    """struct timex of <sys/timex.h> (only `status` is read); padded like the kernel's."""

    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
                ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
                ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
                ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
                ("padding", ctypes.c_int * 11)]


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, looked up once: find_library runs `ldconfig -p` in a subprocess each time, and the
    clock is asked about its synchronization every SYNC_CACHE_S."""
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def kernel_synchronized() -> bool | None:
    """What the kernel's NTP state says (adjtimex(2), read-only; what `timedatectl` shows as "NTP
    synchronized"): True when an NTP daemon (timesyncd, chrony, ntpd) disciplines the clock, False
    when it is marked unsynchronized, None when it cannot be asked."""
    try:
        libc = _libc()
        timex = _Timex()  # modes = 0: read only
        state = libc.adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != _TIME_ERROR and not timex.status & _STA_UNSYNC


def time_daemon_present(timesync_dir: Path = TIMESYNC_DIR, others: tuple[Path, ...] = TIME_DAEMON_DIRS) -> bool:
    """Whether something that will synchronize the clock runs here (so it is worth waiting for)."""
    return timesync_dir.is_dir() or any(p.exists() for p in others)


class Clock:
    """Wall clock, its synchronization, and agent time. Every input is injectable for tests."""

    def __init__(self, state_file: Path | None = None, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 kernel: Callable[[], bool | None] = kernel_synchronized,
                 timesync_dir: Path = TIMESYNC_DIR,
                 daemon_present: Callable[[], bool] | None = None,
                 release: float = RELEASE_DATE) -> None:
        self.wall = wall
        self._monotonic = monotonic
        self._kernel = kernel
        self._timesync_dir = timesync_dir
        self._daemon_present = daemon_present or (lambda: time_daemon_present(timesync_dir))
        self._release = release
        self._state_file = state_file
        self._lock = threading.Lock()
        self._saving = threading.Lock()  # held while the state file is written
        self._sync_cache: tuple[float, bool] | None = None
        # True when a state file was asked for and none could be read (missing, unreadable): agent time then
        # began at the wall clock, and a store that outlived the file knows better (`continue_from`)
        self.restarted = False
        self._base_agent = self._load()
        self._base_mono = monotonic()
        self._saved_at = self._base_mono
        # A state file that could not be read is not overwritten with the wall clock yet: a start that fails before
        # the service asked its store (continue_from) would leave the next start a sound file, and agent time
        # would never go on from the store's stamps. continue_from, the periodic save and a stop write it.
        if state_file is not None and not self.restarted:
            self.save()

    # ---- the wall clock ------------------------------------------------------------------------
    def synchronized(self) -> bool:
        """Whether the wall clock is known to be right.

        systemd-timesyncd's flag file, else the kernel's NTP state (chrony, ntpd, timesyncd all
        clear STA_UNSYNC), else, where no time daemon runs at all, a wall clock later than this
        agent's release date.
        """
        now = self._monotonic()
        with self._lock:
            cached = self._sync_cache
            if cached is not None and now - cached[0] < SYNC_CACHE_S:
                return cached[1]
        answer = self._ask_synchronized()
        with self._lock:
            self._sync_cache = (now, answer)
        return answer

    def _ask_synchronized(self) -> bool:
        if (self._timesync_dir / "synchronized").exists():
            return True
        if self._kernel() is True:
            return True
        if self._daemon_present():
            return False  # a daemon will set it: until then the time is not known
        return self.wall() > self._release

    # ---- agent time ----------------------------------------------------------------------------
    def agent_now(self) -> float:
        """Seconds of accumulated running time (epoch-like: it started at the first start's wall clock)."""
        mono = self._monotonic()
        value = self._base_agent + (mono - self._base_mono)
        if self._state_file is not None and mono - self._saved_at >= SAVE_EVERY_S:
            with self._saving:  # one writer of the state file: two would interleave in its temporary file
                if mono - self._saved_at >= SAVE_EVERY_S:  # not saved by another thread meanwhile
                    self._saved_at = mono
                    self._write(value)
        return value

    def continue_from(self, value: float) -> None:
        """Agent time goes on from `value` instead of the wall clock it restarted from: the newest stamp of a
        store that outlived this clock's state file (or was written by an agent before agent time). Without
        this, a wall clock decades from the one agent time began at would make every id in that store
        older than its retention at once (forgotten early), or younger for decades (never forgotten)."""
        with self._lock:
            self._base_agent = float(value)
            self._base_mono = self._monotonic()
        self.restarted = False
        self.save()

    def save(self) -> None:
        """Persists agent time now (at start, at a clean stop, and every SAVE_EVERY_S on use)."""
        if self._state_file is not None:
            with self._saving:
                self._saved_at = self._monotonic()
                self._write(self._base_agent + (self._saved_at - self._base_mono))

    def _load(self) -> float:
        if self._state_file is None:
            return self.wall()
        if not self._state_file.exists():
            self.restarted = True
            return self.wall()
        try:
            saved = json.loads(self._state_file.read_text())["agent_time"]
            if not isinstance(saved, int | float) or saved != saved or saved in (float("inf"), float("-inf")):
                raise ValueError(f"agent_time is {saved!r}")
            return float(saved)
        except (OSError, ValueError, KeyError, TypeError) as err:
            # Starting again from the wall clock (until a store's stamps say better: continue_from); say so.
            self.restarted = True
            log.error("agent time state unreadable, starting it from the wall clock: %s", err,
                      extra={"file": str(self._state_file)})
            return self.wall()

    def _write(self, value: float) -> None:
        assert self._state_file is not None
        tmp = self._state_file.with_name(self._state_file.name + ".tmp")
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"agent_time": value, "wall": self.wall()}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._state_file)
        except OSError as err:
            log.warning("cannot persist agent time: %s", err, extra={"file": str(self._state_file)})
