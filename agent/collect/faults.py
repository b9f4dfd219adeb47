"""Fault changes: successive fault readings of a component compared into `fault_changed` Events.

What a reading tells. A `read_faults` reading with status mask M (ReadDTCInformation 0x19 0x02)
returns every DTC whose status has a bit in M, with its whole status byte. So:
- a DTC in the reading has exactly the status it carries;
- a DTC absent from the reading has none of M's bits set; its bits outside M are unknown, and keep
  their last known value.
The tracker keeps, per component, the last known status of each DTC (0x00: not stored) and
derives the new one from each reading by those two rules. Then, per DTC:
- unknown before (or 0x00) and now not 0x00: `new` (`previous` is 0x00);
- known before and now 0x00: `cleared` (`status` is 0x00) and the DTC is forgotten;
- known before and now another status: `status`.
So a DTC simply outside a reading's mask is never reported `cleared`: a plan reading with mask
0x09 says nothing about a fault that is only pending (0x04), and a DTC that leaves the mask keeps
its last known bits outside it (reported as a `status` change, with `status_mask` in the Event).
With the default mask 0xFF an absent DTC is cleared.

The first reading of a component ever reports each of its faults as `new`: the backend has heard
of none of them. The set is kept in the store, so a restart does not report old faults again.
Readings of one component are compared in the order they are observed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.store.sqlite import Batch, Store
from agent.wire import messages as m
from agent.wire.dtc import parse_code, with_text

log = logging.getLogger(__name__)

MAX_FAULTS = 2048  # DTCs kept per component: more than one 4095-byte ISO-TP answer can list (1023)


class FaultTracker:
    """Compares each fault reading of a component with the last known set, persists the new set, and
    returns the `fault_changed` Event payloads. Thread-safe: workers of several components call it."""

    def __init__(self, store: Store, texts: Mapping[str, Mapping[str, str]] | None = None,
                 clock: Callable[[], float] = time.time, max_faults: int = MAX_FAULTS,
                 on_problem: Callable[[str], None] | None = None) -> None:
        """`texts`: component -> DTC key -> text, from the components' `dtcs:` config (keys as there:
        "0x030100", "P0301-1A" or "P0301"); `clock` stamps the Events (wall clock, for display);
        `on_problem(reason)` counts what is skipped: `unreadable` entries, DTCs `over_bound`."""
        self._store = store
        self._texts = {name: tuple(table.items()) for name, table in (texts or {}).items()}
        self._clock = clock
        self._max = max_faults
        self._on_problem = on_problem or (lambda reason: None)
        self._known: dict[str, dict[int, int]] = {}
        self._lock = threading.Lock()
        self.unreadable = 0  # fault entries that could not be understood (counted, logged, skipped)
        self.dropped = 0  # DTCs beyond max_faults, not tracked

    def observe(self, component: str, faults: list[dict[str, Any]], *, status_mask: int = 0xFF,
                batch: Batch | None = None) -> list[dict[str, Any]]:
        """The Events for one reading (`faults`: the entries of a `read_faults` result, read with
        `status_mask`). The new set goes into `batch` when given (the caller commits it with the Events:
        both or neither), else it is committed here. Never raises for a bad entry: it is skipped and
        counted, and then the reading clears nothing (an absent DTC might be the unreadable one)."""
        read, complete = self._read(component, faults)
        with self._lock:
            known = self._load(component)
            now = self._clock()
            events: list[dict[str, Any]] = []
            after = {dtc: status & ~status_mask & 0xFF for dtc, status in known.items()} if complete else dict(known)
            after.update((dtc, status) for dtc, (status, _) in read.items())
            after = self._bounded(component, known, after)
            for dtc in sorted(set(known) | set(after)):
                before, now_status = known.get(dtc, 0), after.get(dtc, 0)
                if before == now_status:
                    continue
                change = "new" if not before else "cleared" if not now_status else "status"
                evidence = read.get(dtc, (0, None))[1]
                events.append(m.fault_changed(component, dtc, change, now_status, before, now,
                                              text=self._text(component, dtc, evidence), evidence=evidence,
                                              status_mask=status_mask))
            current = {dtc: status for dtc, status in after.items() if status}
            if current != known:
                own = batch if batch is not None else self._store.batch()
                own.save_fault_set(component, current)
                if batch is None:
                    own.commit()
            self._known[component] = current
        for event in events:
            log.info("fault %s %s on %s", event["code"], event["change"], component,
                     extra={"component": component, "dtc": event["dtc"], "change": event["change"],
                            "status": event["status"]["raw"], "previous": event["previous"]["raw"]})
        return events

    def forget(self, component: str) -> None:
        """Drops the in-memory set of a component (e.g. when the caller's commit failed): the next reading
        is compared with what the store holds, and changes not yet published are reported again."""
        with self._lock:
            self._known.pop(component, None)

    def known(self, component: str) -> dict[int, int]:
        """The last known set of a component: 24-bit DTC -> status byte."""
        with self._lock:
            return dict(self._load(component))

    # ---- helpers -------------------------------------------------------------------------------
    def _load(self, component: str) -> dict[int, int]:
        if component not in self._known:
            self._known[component] = self._store.fault_set(component)
        return self._known[component]

    def _read(self, component: str, faults: list[dict[str, Any]]) -> tuple[dict[int, tuple[int, Any]], bool]:
        """{dtc: (status, entry)} of a reading, and whether every entry could be read."""
        read: dict[int, tuple[int, Any]] = {}
        complete = isinstance(faults, list)
        for index, entry in enumerate(faults if complete else []):
            try:
                dtc, status = _dtc_and_status(entry)
            except (AttributeError, KeyError, TypeError, ValueError) as err:
                complete = False
                self.unreadable += 1
                self._on_problem("unreadable")
                log.warning("fault entry %d of %s unreadable, skipped: %s", index, component, err,
                            extra={"component": component, "entry": repr(entry)[:200]})
                continue
            read[dtc] = (status, entry)
        if not isinstance(faults, list):
            self.unreadable += 1
            self._on_problem("unreadable")
            log.warning("fault reading of %s is not a list, ignored", component, extra={"component": component})
        return read, complete

    def _bounded(self, component: str, known: dict[int, int], after: dict[int, int]) -> dict[int, int]:
        """At most max_faults DTCs: the ones already known first, then the lowest new ones."""
        present = [dtc for dtc, status in after.items() if status]
        if len(present) <= self._max:
            return after
        keep = sorted(present, key=lambda dtc: (dtc not in known, dtc))[:self._max]
        over = len(present) - self._max
        self.dropped += over
        self._on_problem("over_bound")
        log.error("%s reports %d DTCs; %d beyond the bound of %d are not tracked", component, len(present), over,
                  self._max, extra={"component": component})
        kept = set(keep) | {dtc for dtc, status in after.items() if not status}
        return {dtc: status for dtc, status in after.items() if dtc in kept}

    def _text(self, component: str, dtc: int, evidence: Any) -> str | None:
        if isinstance(evidence, dict) and isinstance(evidence.get("text"), str):
            return evidence["text"]
        return with_text({}, self._texts.get(component, ()), dtc).get("text")


def _dtc_and_status(entry: Any) -> tuple[int, int]:
    """(24-bit DTC, status byte) of a `read_faults` entry: {"dtc": "0x030100", "status": {"raw": "0x2F"}}
    (or, without "dtc", {"code": "P0301-1A"})."""
    if not isinstance(entry, dict):
        raise TypeError(f"expected an object, got {type(entry).__name__}")
    raw_dtc = entry.get("dtc")
    dtc = int(raw_dtc, 16) if isinstance(raw_dtc, str) else parse_code(entry["code"])
    status = int(entry["status"]["raw"], 16)
    if not 0 <= dtc <= 0xFFFFFF or not 0 <= status <= 0xFF:
        raise ValueError(f"DTC {dtc:#x} or status {status:#x} out of range")
    return dtc, status
