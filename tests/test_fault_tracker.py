"""FaultTracker: successive fault readings become fault_changed Events; the set survives a restart.

Uses a real SQLite store in a temp dir; the readings are `read_faults` entries as the executor builds them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.collect.faults import FaultTracker
from agent.store.sqlite import Store
from agent.wire.dtc import fault_dict

P0301, P0420, C0035, U0100_87 = 0x030100, 0x042000, 0x403500, 0xC10087


def reading(*faults: tuple[int, int], **extra: Any) -> list[dict[str, Any]]:
    return [{**fault_dict(dtc, status), **extra} for dtc, status in faults]


def changes(events: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    return [(e["code"], e["change"], e["previous"]["raw"], e["status"]["raw"]) for e in events]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    opened = Store(tmp_path / "agent.db")
    yield opened
    opened.close()


def test_new_status_cleared(store: Store) -> None:
    tracker = FaultTracker(store, clock=lambda: 1_800_000_000.0)
    first = tracker.observe("engine", reading((P0301, 0x2F), (P0420, 0x08)))
    assert changes(first) == [("P0301", "new", "0x00", "0x2F"), ("P0420", "new", "0x00", "0x08")]
    assert first[0]["type"] == "fault_changed" and first[0]["at"] == "2027-01-15T08:00:00.000Z"
    assert first[0]["component"] == "engine" and first[0]["dtc"] == "0x030100" and first[0]["status"]["confirmed"]
    assert "status_mask" not in first[0]
    assert tracker.observe("engine", reading((P0301, 0x2F), (P0420, 0x08))) == []  # nothing changed
    assert changes(tracker.observe("engine", reading((P0301, 0x2E), (P0420, 0x08)))) == [
        ("P0301", "status", "0x2F", "0x2E")]
    assert changes(tracker.observe("engine", reading((P0420, 0x08)))) == [("P0301", "cleared", "0x2E", "0x00")]
    assert changes(tracker.observe("engine", [])) == [("P0420", "cleared", "0x08", "0x00")]
    assert tracker.known("engine") == {} and store.fault_set("engine") == {}


def test_components_are_compared_separately(store: Store) -> None:
    tracker = FaultTracker(store)
    tracker.observe("engine", reading((P0301, 0x2F)))
    assert changes(tracker.observe("abs", reading((C0035, 0x24)))) == [("C0035", "new", "0x00", "0x24")]
    assert tracker.observe("engine", reading((P0301, 0x2F))) == []


def test_a_fault_outside_the_mask_is_not_cleared(store: Store) -> None:
    tracker = FaultTracker(store)
    tracker.observe("engine", reading((P0301, 0x2F), (C0035, 0x24)))  # everything, mask 0xFF
    # a plan's reading with mask 0x09 (test failed | confirmed) does not list the pending-only C0035
    assert tracker.observe("engine", reading((P0301, 0x2F)), status_mask=0x09) == []
    assert tracker.known("engine") == {P0301: 0x2F, C0035: 0x24}
    # P0301 leaves the mask: its bits inside it are clear now, those outside are the last known ones
    left = tracker.observe("engine", [], status_mask=0x09)
    assert changes(left) == [("P0301", "status", "0x2F", "0x26")] and left[0]["status_mask"] == "0x09"
    # a full reading then tells the rest
    assert changes(tracker.observe("engine", reading((C0035, 0x24)))) == [("P0301", "cleared", "0x26", "0x00")]
    assert tracker.observe("engine", [], status_mask=0x00) == []  # a mask of 0 says nothing at all
    assert tracker.known("engine") == {C0035: 0x24}


def test_the_set_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    store = Store(path)
    FaultTracker(store).observe("engine", reading((P0301, 0x2F), (P0420, 0x08)))
    store.close()
    store = Store(path)  # the agent restarted
    try:
        tracker = FaultTracker(store)
        assert tracker.observe("engine", reading((P0301, 0x2F), (P0420, 0x08))) == []
        assert changes(tracker.observe("engine", reading((P0301, 0x2F)))) == [("P0420", "cleared", "0x08", "0x00")]
    finally:
        store.close()
    store = Store(path)
    try:
        assert store.fault_set("engine") == {P0301: 0x2F}
    finally:
        store.close()


def test_text_and_evidence(store: Store) -> None:
    tracker = FaultTracker(store, texts={"engine": {"P0301": "Cylinder 1 misfire", "0xC10087": "Lost ECM"}})
    snapshots = [{"record": 1, "values": {"engine_speed": 800}}]
    events = tracker.observe("engine", [
        {**fault_dict(P0301, 0x2F), "snapshots": snapshots, "extended_data": "05"},
        {**fault_dict(U0100_87, 0x09), "text": "from the reading", "snapshots_error": {"code": "timeout"}},
        {**fault_dict(P0420, 0x08)},
    ])
    by_code = {e["code"]: e for e in events}
    assert by_code["P0301"]["text"] == "Cylinder 1 misfire"
    assert by_code["P0301"]["snapshots"] == snapshots and by_code["P0301"]["extended_data"] == "05"
    assert by_code["U0100"]["text"] == "from the reading" and by_code["U0100"]["failure_type"] == "0x87"
    assert by_code["U0100"]["snapshots_error"] == {"code": "timeout"}
    assert "text" not in by_code["P0420"] and "snapshots" not in by_code["P0420"]
    cleared = tracker.observe("engine", [])
    assert {e["code"]: e.get("text") for e in cleared} == {"P0301": "Cylinder 1 misfire", "U0100": "Lost ECM",
                                                          "P0420": None}
    assert all("snapshots" not in e for e in cleared)


@pytest.mark.parametrize("bad", [
    "P0301", None, 42, {"code": "X"}, {"dtc": "0x030100"}, {"dtc": "0x030100", "status": {"raw": "zz"}},
    {"dtc": "0x1000000", "status": {"raw": "0x01"}}, {"dtc": 3, "status": {"raw": "0x01"}},
    {"code": 17, "status": {"raw": "0x01"}}, {"dtc": "0x030100", "status": ["0x2F"]},
])
def test_a_bad_entry_is_skipped_and_clears_nothing(store: Store, bad: Any) -> None:
    problems: list[str] = []
    tracker = FaultTracker(store, on_problem=problems.append)
    tracker.observe("engine", reading((P0301, 0x2F), (P0420, 0x08)))
    events = tracker.observe("engine", [bad, *reading((P0420, 0x09))])
    assert changes(events) == [("P0420", "status", "0x08", "0x09")]  # P0301 not cleared: it may be the bad one
    assert tracker.unreadable == 1 and tracker.known("engine") == {P0301: 0x2F, P0420: 0x09}
    assert problems == ["unreadable"]


def test_a_reading_that_is_not_a_list_changes_nothing(store: Store) -> None:
    tracker = FaultTracker(store)
    tracker.observe("engine", reading((P0301, 0x2F)))
    assert tracker.observe("engine", {"faults": []}) == []  # type: ignore[arg-type]
    assert tracker.unreadable == 1 and tracker.known("engine") == {P0301: 0x2F}


def test_into_the_callers_batch(store: Store) -> None:
    tracker = FaultTracker(store)
    batch = store.batch()
    assert len(tracker.observe("engine", reading((P0301, 0x2F)), batch=batch)) == 1
    assert store.fault_set("engine") == {}  # not yet: the caller commits
    batch.commit()
    assert store.fault_set("engine") == {P0301: 0x2F}
    batch = store.batch()
    tracker.observe("engine", [], batch=batch)
    tracker.forget("engine")  # the caller's commit failed: compare with the store again
    assert changes(tracker.observe("engine", [])) == [("P0301", "cleared", "0x2F", "0x00")]


def test_the_bound_keeps_known_faults_first(store: Store) -> None:
    problems: list[str] = []
    tracker = FaultTracker(store, max_faults=3, on_problem=problems.append)
    tracker.observe("engine", reading((0x000100, 1), (0x000200, 1)))
    events = tracker.observe("engine", reading(*[(0x000100 + (i << 8), 1) for i in range(6)]))
    assert [e["dtc"] for e in events] == ["0x000300"]  # one more fits; three are dropped
    assert tracker.dropped == 3 and set(tracker.known("engine")) == {0x000100, 0x000200, 0x000300}
    assert problems == ["over_bound"]


def test_every_kind_of_event_matches_the_asyncapi_schema(store: Store) -> None:
    from mqtt_support import VALIDATORS

    tracker = FaultTracker(store, texts={"engine": {"P0301": "Cylinder 1 misfire"}})
    events = tracker.observe("engine", [{**fault_dict(P0301, 0x2F), "snapshots": [{"record": 1, "values": {}}],
                                         "extended_data": "05"},
                                        {**fault_dict(P0420, 0x08), "snapshots_error": {"code": "timeout",
                                                                                        "message": "no answer"}}])
    events += tracker.observe("engine", reading((P0301, 0x2E)), status_mask=0x01)
    events += tracker.observe("engine", [])
    assert {e["change"] for e in events} == {"new", "status", "cleared"}
    for event in events:
        assert not list(VALIDATORS["Event"].iter_errors(event)), event
    broken = {**events[0], "change": "gone"}
    assert list(VALIDATORS["Event"].iter_errors(broken))  # the schema can fail
