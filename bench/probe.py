"""What a process costs, read from the kernel: CPU time, context switches, fsync-family syscalls, RSS.

Counters come from perf_event_open(2) (through ctypes), opened on the process right after exec with
`inherit` set, so every thread it starts later is counted, including threads that have exited:
- `task-clock` (software event): CPU time in ns;
- `context-switches` (software event): voluntary and involuntary;
- the `syscalls:sys_enter_fdatasync` and `sys_enter_fsync` tracepoints: how many times the process
  asked the kernel to make a file durable. SQLite in WAL mode calls fdatasync on the WAL at every
  commit with synchronous=FULL, and fsync/fdatasync on the database and the WAL at checkpoints.

The tracepoints need tracefs and root (or CAP_PERFMON); when perf_event_open is refused, CPU time
and context switches fall back to /proc (per-thread schedstat and status, summed over the threads
alive at each reading) and the fsync count is reported as unavailable, with the reason.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass
from pathlib import Path

_SYSCALL_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "armv7l": 364, "armv6l": 364, "i686": 336}
_PERF_TYPE_SOFTWARE, _PERF_TYPE_TRACEPOINT = 1, 2
_SW_TASK_CLOCK, _SW_CONTEXT_SWITCHES = 1, 3
_FLAG_INHERIT = 1 << 1
_PERF_FLAG_FD_CLOEXEC = 1 << 3
_ATTR_SIZE_VER0 = 64
_TRACEFS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
SYNC_SYSCALLS = ("fdatasync", "fsync")


class _Attr(ctypes.Structure):
    """struct perf_event_attr up to PERF_ATTR_SIZE_VER0 (64 bytes)."""

    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
                ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
                ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64),
                ("wakeup_events", ctypes.c_uint32), ("bp_type", ctypes.c_uint32), ("config1", ctypes.c_uint64)]


@dataclass(frozen=True)
class Reading:
    """Cumulative counts of one process since it was attached (ns, switches, syscalls)."""

    cpu_ns: int
    context_switches: int
    syncs: dict[str, int] | None  # per syscall name; None when tracepoints are unavailable

    def __sub__(self, other: Reading) -> Reading:
        syncs = None
        if self.syncs is not None and other.syncs is not None:
            syncs = {k: self.syncs[k] - other.syncs[k] for k in self.syncs}
        return Reading(self.cpu_ns - other.cpu_ns, self.context_switches - other.context_switches, syncs)

    @property
    def sync_total(self) -> int | None:
        return None if self.syncs is None else sum(self.syncs.values())


def _tracepoint_id(syscall: str) -> int:
    for root in _TRACEFS:
        path = root / "events" / "syscalls" / f"sys_enter_{syscall}" / "id"
        if path.exists():
            return int(path.read_text())
    raise OSError(errno.ENOENT, "tracefs with syscall tracepoints is not mounted")


def _open_counter(pid: int, kind: int, config: int) -> int:
    number = _SYSCALL_PERF_EVENT_OPEN.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"perf_event_open syscall number unknown on {platform.machine()}")
    attr = _Attr(type=kind, size=_ATTR_SIZE_VER0, config=config, flags=_FLAG_INHERIT)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(number), ctypes.byref(attr), ctypes.c_int(pid), ctypes.c_int(-1),
                      ctypes.c_int(-1), ctypes.c_ulong(_PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open: {os.strerror(err)}")
    return int(fd)


def _read_counter(fd: int) -> int:
    return int(struct.unpack("Q", os.read(fd, 8))[0])


class ProcessProbe:
    """Counters of one process (and all its threads). Attach right after exec, before it starts threads."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fds: dict[str, int] = {}
        self.method = "perf_event_open"
        self.sync_unavailable: str | None = None
        try:
            self._fds["cpu"] = _open_counter(pid, _PERF_TYPE_SOFTWARE, _SW_TASK_CLOCK)
            self._fds["ctx"] = _open_counter(pid, _PERF_TYPE_SOFTWARE, _SW_CONTEXT_SWITCHES)
        except OSError as err:
            self.close()
            self.method = f"/proc (perf_event_open refused: {err.strerror or err})"
        try:
            for name in SYNC_SYSCALLS:
                self._fds[name] = _open_counter(pid, _PERF_TYPE_TRACEPOINT, _tracepoint_id(name))
        except OSError as err:
            for name in SYNC_SYSCALLS:
                fd = self._fds.pop(name, None)
                if fd is not None:
                    os.close(fd)
            self.sync_unavailable = f"syscall tracepoints unavailable: {err.strerror or err}"

    def read(self) -> Reading:
        if "cpu" in self._fds:
            cpu, ctx = _read_counter(self._fds["cpu"]), _read_counter(self._fds["ctx"])
        else:
            cpu, ctx = proc_cpu_ns(self.pid), proc_context_switches(self.pid)
        syncs = None if self.sync_unavailable else {n: _read_counter(self._fds[n]) for n in SYNC_SYSCALLS}
        return Reading(cpu, ctx, syncs)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _tasks(pid: int) -> list[Path]:
    return list(Path(f"/proc/{pid}/task").iterdir())


def proc_cpu_ns(pid: int) -> int:
    """CPU time of the threads alive now (schedstat's first field, ns)."""
    total = 0
    for task in _tasks(pid):
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return total


def proc_context_switches(pid: int) -> int:
    total = 0
    for task in _tasks(pid):
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total


def rss_mib(pid: int) -> dict[str, float]:
    """Resident memory now and at its peak (VmRSS, VmHWM), in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss": round(fields["VmRSS"], 1), "peak": round(fields["VmHWM"], 1)}


def thread_cpu_ns(native_ids: list[int]) -> int:
    """CPU time of some threads of this process (schedstat, ns): to leave a simulator's share out."""
    total = 0
    for tid in native_ids:
        try:
            total += int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total
