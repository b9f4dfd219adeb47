"""Collection's pure parts: request grouping, the due-time heap, the budget, backoff, batches and on-change."""

from __future__ import annotations

import json

from conftest import DATA

from agent.collect.schedule import Backoff, Budget, Schedule, plan_tasks
from agent.collect.telemetry import Telemetry, changed
from agent.config import load_config
from agent.wire import command as c
from agent.wire import messages as m
from agent.wire.plan import parse_plan

CONFIG = load_config(DATA / "vehicle.yaml")


def make(body: dict) -> object:
    return parse_plan({"name": "p", "version": 1, **body}, CONFIG)


def test_dids_of_one_signal_are_grouped_up_to_the_limit_and_unknown_lengths_go_alone():
    plan = make({"signals": [{"component": "engine", "data": ["engine_speed", "oil_temp", "idle_mode", "0x1234"],
                              "every_ms": 1000}]})
    tasks = plan_tasks(plan, max_dids=2)
    assert [[d.name for d in t.params.dids] for t in tasks] == [["engine_speed", "oil_temp"], ["idle_mode"],
                                                                 ["0x1234"]]
    assert [[d.name for d in t.params.dids] for t in plan_tasks(plan, max_dids=8)] == [
        ["engine_speed", "oil_temp", "idle_mode"], ["0x1234"]]


def test_signals_of_one_component_and_interval_share_requests():
    plan = make({"signals": [{"component": "engine", "data": ["engine_speed"], "every_ms": 1000, "export": True},
                             {"component": "engine", "data": ["oil_temp"], "every_ms": 1000, "on_change": True},
                             {"component": "engine", "data": ["idle_mode"], "every_ms": 500},
                             {"component": "body", "data": ["vin"], "every_ms": 1000}]})
    tasks = plan_tasks(plan, max_dids=8)
    assert [(t.component, t.every_s, [d.name for d in t.params.dids]) for t in tasks] == [
        ("engine", 1.0, ["engine_speed", "oil_temp"]), ("engine", 0.5, ["idle_mode"]), ("body", 1.0, ["vin"])]
    assert [s.on_change for s, _ in tasks[0].items] == [False, True]  # each value keeps its own signal


def test_obd_pids_go_six_to_a_request_and_faults_are_one_task():
    pids = ["0x04", "0x05", "0x0C", "0x0D", "0x0F", "0x10", "0x11"]
    plan = make({"signals": [{"component": "engine", "pids": pids, "every_ms": 1000}],
                 "faults": [{"component": "engine", "every_ms": 5000, "status_mask": "0x08"}]})
    tasks = plan_tasks(plan, max_dids=8)
    assert [t.params for t in tasks[:2]] == [c.Obd(pids=(4, 5, 12, 13, 15, 16)), c.Obd(pids=(17,))]
    assert tasks[2].params == c.ReadFaults(status_mask=0x08) and tasks[2].every_s == 5.0


def test_the_heap_runs_each_task_once_per_interval_and_does_not_catch_up_after_a_gap():
    plan = make({"signals": [{"component": "engine", "data": ["oil_temp"], "every_ms": 1000},
                             {"component": "engine", "data": ["idle_mode"], "every_ms": 500},
                             {"component": "body", "data": ["vin"], "every_ms": 500}]})
    schedule = Schedule()
    schedule.set_plan("p", plan_tasks(plan, 8), now=100.0)
    first = schedule.due(100.0)  # components start together; one component's requests are spread
    assert sorted((t.component, t.every_s) for t in first) == [("body", 0.5), ("engine", 1.0)]
    assert [(t.component, t.every_s) for t in schedule.due(100.25)] == [("engine", 0.5)]
    assert [t.component for t in schedule.due(100.5)] == ["body"]
    assert [(t.component, t.every_s) for t in schedule.due(100.75)] == [("engine", 0.5)]
    assert sorted(t.component for t in schedule.due(101.0)) == ["body", "engine"]
    ran = schedule.due(160.0)  # a minute later (paused): each once, not 120 times
    assert sorted((t.component, t.every_s) for t in ran) == [("body", 0.5), ("engine", 0.5), ("engine", 1.0)]
    assert schedule.next_due() == 160.5
    schedule.remove_plan("p")
    assert schedule.next_due() is None and schedule.due(1000.0) == []


def test_the_budget_never_allows_more_than_its_rate():
    budget = Budget(rate=4.0, now=0.0)
    taken = sum(budget.take(t / 100) for t in range(0, 1000))  # asking every 10 ms for 10 s
    assert taken <= 4 * 10 + 1
    assert taken >= 4 * 10 - 1
    slow = Budget(0.5, 0.0)
    assert slow.take(0.0) and not slow.take(1.0) and slow.ready_at(1.0) == 2.0 and slow.take(2.0)


def test_backoff_doubles_up_to_its_cap_and_an_answer_clears_it():
    backoff = Backoff(base_s=1.0, cap_s=5.0)
    assert [backoff.failed("engine", 0.0) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.blocked_until("engine", 1.0) == 5.0 and backoff.blocked_until("body", 1.0) is None
    assert backoff.answered("engine") and not backoff.answered("engine")
    assert backoff.blocked_until("engine", 1.0) is None


def test_changed_uses_the_deadband_for_numbers_only():
    assert not changed(10.0, 10.4, 0.5) and changed(10.0, 10.6, 0.5) and changed(1, 2, 0.0)
    assert not changed("eco", "eco", 5.0) and changed("eco", "normal", 5.0)
    assert changed(True, False, 5.0)  # booleans are not numbers here


def test_batches_close_at_max_samples_or_max_age_and_on_change_skips_repeats():
    plan = make({"signals": [{"component": "engine", "data": ["oil_temp"], "every_ms": 1000, "on_change": True,
                              "deadband": 1.0}], "batch": {"max_age_ms": 5000, "max_samples": 3}})
    signal, item = plan.signals[0], plan.signals[0].items[0]
    t = Telemetry()
    t.set_plan(plan, seq=41)
    kept = [t.reading("p", signal, item, v, at=1000.0 + i, now=float(i)) for i, v in enumerate([20, 20.5, 22, 22])]
    assert kept == [True, False, True, False] and t.suppressed == 2
    assert t.due(3.0) == []
    assert t.next_due() == 5.0
    [batch] = t.due(5.0)
    assert (batch["plan"], batch["version"], batch["seq"]) == ("p", 1, 42)
    assert [s["value"] for s in batch["samples"]] == [20, 22]
    assert batch["samples"][0] == {"component": "engine", "data": "oil_temp", "value": 20,
                                   "at": "1970-01-01T00:16:40.000Z"}
    for i, v in enumerate([30, 40, 50]):
        t.reading("p", signal, item, v, at=2000.0, now=10.0 + i)
    assert [b["seq"] for b in t.due(12.0)] == [43]  # full at 3 samples before its age
    [(component, state)] = t.states()
    assert component == "engine" and state["values"]["oil_temp"]["value"] == 50 and "faults" not in state
    assert t.states() == []  # nothing new: no state


def test_state_carries_the_last_faults_and_forgets_values_no_plan_reads():
    plan = make({"signals": [{"component": "engine", "data": ["oil_temp"], "every_ms": 1000}]})
    t = Telemetry()
    t.set_plan(plan, 0)
    t.reading("p", plan.signals[0], plan.signals[0].items[0], 5, at=10.0, now=0.0)
    t.faults("engine", [{"code": "P0301", "status": {"raw": "0x2F"}, "text": "misfire"}], at=11.0)
    [(_, state)] = t.states()
    assert state["faults"] == [{"code": "P0301", "status": {"raw": "0x2F"}}]
    t.forget_values(set())
    [(_, state)] = t.states()
    assert state["values"] == {}


def test_a_batch_closes_before_it_outgrows_the_message_size():
    plan = make({"signals": [{"component": "engine", "data": ["oil_temp"], "every_ms": 1000}]})
    t = Telemetry(max_bytes=1000)
    t.set_plan(plan, 0)
    n = 0
    while not t.due(0.0):
        t.reading("p", plan.signals[0], plan.signals[0].items[0], n, at=10.0, now=0.0)
        n += 1
    assert 5 < n < 20


def _sizes_fit(batches: list[dict], limit: int) -> bool:
    return all(len(m.encode(b)) <= limit for b in batches)


def test_a_batch_is_cut_before_a_sample_would_take_it_past_the_limit():
    """Samples of very different sizes (one reading can add ~8 KiB): every batch stays within the limit,
    exactly, and no sample is lost or reordered."""
    plan = make({"signals": [{"component": "engine", "data": ["oil_temp", "big_block"], "every_ms": 1000}],
                 "batch": {"max_age_ms": 3_600_000, "max_samples": 10_000}})
    small, big = plan.signals[0].items
    limit = 12_000
    t = Telemetry(max_bytes=limit)
    t.set_plan(plan, 0)
    sent: list[dict] = []
    values = []
    for n in range(40):
        item, value = (big, "ab" * (1000 + 97 * n)) if n % 3 == 0 else (small, n)
        values.append(value)
        assert t.reading("p", plan.signals[0], item, value, at=10.0, now=0.0)
        sent += t.cut()
    sent += t.flush()
    assert len(sent) > 3 and _sizes_fit(sent, limit)
    assert [s["value"] for b in sent for s in b["samples"]] == values
    assert [b["seq"] for b in sent] == list(range(1, len(sent) + 1))
    assert max(len(m.encode(b)) for b in sent) > limit - 2_000  # batches are filled, not cut early


def test_a_sample_that_alone_exceeds_the_limit_is_left_out_and_counted():
    plan = make({"signals": [{"component": "engine", "data": ["oil_temp", "big_block"], "every_ms": 1000,
                              "on_change": True}]})
    small, big = plan.signals[0].items
    t = Telemetry(max_bytes=2_000)
    t.set_plan(plan, 0)
    assert t.reading("p", plan.signals[0], small, 1, at=10.0, now=0.0)
    assert not t.reading("p", plan.signals[0], big, "ff" * 4095, at=10.0, now=0.0)
    assert t.too_large == 1
    assert t.reading("p", plan.signals[0], small, 2, at=10.0, now=0.0)
    [batch] = t.flush()
    assert [s["data"] for s in batch["samples"]] == ["oil_temp", "oil_temp"] and t.cut() == []


def test_a_smaller_limit_cuts_open_batches_again():
    plan = make({"signals": [{"component": "engine", "data": ["big_block"], "every_ms": 1000}],
                 "batch": {"max_age_ms": 5000, "max_samples": 10_000}})
    [item] = plan.signals[0].items
    t = Telemetry(max_bytes=50_000)
    t.set_plan(plan, 0)
    for n in range(10):
        t.reading("p", plan.signals[0], item, f"{n:02x}" * (600 if n < 9 else 3000), at=10.0, now=1.0)
    assert t.cut() == []
    dropped = t.set_limit(4_000, now=2.0)
    assert [len(e["value"]) for e in dropped] == [6000]  # alone too large now: left out
    assert t.too_large == 1 and t.next_due() == 6.0  # the open batch keeps its age
    sent = t.cut() + t.flush()
    assert _sizes_fit(sent, 4_000) and sum(len(b["samples"]) for b in sent) == 9


def test_a_state_too_large_is_trimmed_largest_value_first_or_refused_when_nothing_fits():
    state = m.state_message("engine", 10.0, {"big": ("ab" * 3000, 10.0), "mid": ("x" * 500, 10.0),
                                             "speed": (812.5, 10.0)}, [{"code": "P0301", "status": {}}])
    whole = m.encode(state)
    assert m.trim_state(whole, len(whole)) is whole
    trimmed = json.loads(m.trim_state(whole, 1000))
    assert trimmed["truncated"] == ["big"] and sorted(trimmed["values"]) == ["mid", "speed"]
    assert trimmed["faults"] == state["faults"]
    assert json.loads(m.trim_state(whole, 300))["truncated"] == ["big", "mid"]
    assert m.trim_state(whole, 100) is None  # not even its faults and time fit
    assert m.trim_state(b"not json", 5) is None
