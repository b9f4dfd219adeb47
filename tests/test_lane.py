"""The telemetry lane's states against the broker's answers: the lane alone on a real store, its link a
recording stand-in (collect_support.RecordingLink) whose PUBACKs the test gives; the same paths run
against real Mosquitto in test_collect_limits.py and test_broker_limits.py."""

from __future__ import annotations

import json

import pytest
from collect_support import RecordingLink

from agent.fleet.lane import MAX_FAILED, TelemetryLane
from agent.fleet.refusals import Refusal
from agent.store.collection import CollectionStore
from agent.store.sqlite import Store
from agent.wire import messages as m


@pytest.fixture
def lane_on(tmp_path):
    """`lane_on()`: (lane, link, tables, refusals reported) over one store; called again, a new lane over
    the same store: the agent after a restart."""
    store = Store(tmp_path / "agent.db")

    def start() -> tuple[TelemetryLane, RecordingLink, CollectionStore, list[Refusal]]:
        link, refused, tables = RecordingLink(), [], CollectionStore(store)
        return TelemetryLane(tables, link.publish, lambda: True, lambda: None, on_refused=refused.append), \
            link, tables, refused

    yield start
    store.close()


def put_state(tables: CollectionStore, component: str, value: float) -> None:
    tables.put_states([(component, f"s/{component}", m.encode(m.state_message(component, 1.0, {"x": (value, 1.0)},
                                                                              None)))])


def values(link: RecordingLink) -> list[float]:
    return [json.loads(o.payload)["values"]["x"]["value"] for o in link.sent]


def test_a_state_leaves_the_store_only_once_the_broker_acknowledged_it(lane_on):
    """Once, a state counted as sent as soon as paho had it: a restart before its PUBACK lost it (a vehicle
    asleep after the restart kept an old state at the broker). One state per component is in flight; a
    newer one stored meanwhile goes after the PUBACK."""
    lane, link, tables, _ = lane_on()
    put_state(tables, "engine", 1)
    assert lane.pass_once() is True and values(link) == [1]
    put_state(tables, "engine", 2)
    assert lane.pass_once() is True and values(link) == [1]  # the first still awaits its PUBACK
    again, relink, _, _ = lane_on()  # a restart: the newest state is still unsent
    assert again.pass_once() is True and values(relink) == [2]
    lane.published(1, 0x00)
    assert lane.pass_once() is True and values(link) == [1, 2]
    lane.published(2, 0x10)  # "no matching subscribers" is delivery too
    assert lane.pass_once() is False and tables.unsent_states() == []


def test_a_state_the_broker_never_takes_is_set_aside_and_reported_and_the_next_one_goes(lane_on):
    lane, link, tables, refused = lane_on()
    put_state(tables, "engine", 1)
    lane.pass_once()
    lane.published(1, 0x87)  # not authorized (an ACL without the state topics)
    assert lane.pass_once() is False and values(link) == [1]
    assert [(r.reason, r.code, r.message.topic, r.message.retain) for r in refused] == \
        [("not_authorized", 0x87, "s/engine", True)]
    assert lane.states_refused == 1 and tables.unsent_states() == []
    put_state(tables, "engine", 2)
    assert lane.pass_once() is True and values(link) == [1, 2]


def test_a_state_struck_by_the_link_is_set_aside_as_connection_dropped(lane_on):
    lane, link, tables, refused = lane_on()
    put_state(tables, "engine", 1)
    lane.pass_once()
    lane.struck(1)
    lane.struck(1)  # a second word on the same mid changes nothing
    lane.published(5, 0x00)  # not the lane's
    assert lane.pass_once() is False
    assert [(r.reason, r.code) for r in refused] == [("connection_dropped", None)]
    assert tables.unsent_states() == [] and len(link.sent) == 1


def test_a_state_refused_for_now_is_retried_and_set_aside_only_after_repeated_refusals_other_than_quota(
        lane_on, monkeypatch):
    monkeypatch.setattr("agent.fleet.lane.RETRY_MIN_S", 0.0)  # every retry is due at once
    lane, link, tables, refused = lane_on()
    put_state(tables, "engine", 1)
    lane.pass_once()
    for _ in range(20):  # quota exceeded: retried for as long as it takes
        lane.published(len(link.sent), 0x97)
        assert lane.pass_once() is True
    assert len(link.sent) == 21 and refused == []
    for n in range(MAX_FAILED):
        lane.published(len(link.sent), 0x80)
        lane.pass_once()
        assert len(link.sent) == 22 + n - (n == MAX_FAILED - 1)
    assert [r.reason for r in refused] == ["unspecified_error"] and tables.unsent_states() == []


def test_a_newer_state_starts_its_own_count_of_refusals(lane_on, monkeypatch):
    """Refusals of the state it replaced are not its own: it gets MAX_FAILED of them before it is set aside."""
    monkeypatch.setattr("agent.fleet.lane.RETRY_MIN_S", 0.0)
    lane, link, tables, refused = lane_on()
    put_state(tables, "engine", 1)
    lane.pass_once()
    for _ in range(MAX_FAILED - 2):
        lane.published(len(link.sent), 0x80)
        lane.pass_once()
    put_state(tables, "engine", 2)  # stored while state 1's retry is in flight
    lane.published(len(link.sent), 0x80)  # state 1's refusal MAX_FAILED - 1: its retry is the newer state
    lane.pass_once()
    assert values(link)[-1] == 2
    lane.published(len(link.sent), 0x80)
    lane.pass_once()
    assert refused == [] and values(link)[-1] == 2  # refused once only: it goes again
    for _ in range(MAX_FAILED - 1):
        lane.published(len(link.sent), 0x80)
        lane.pass_once()
    assert [r.reason for r in refused] == ["unspecified_error"] and json.loads(refused[0].message.payload)[
        "values"]["x"]["value"] == 2


def test_a_state_refused_for_now_waits_for_its_retry_and_holds_no_other_component(lane_on):
    lane, link, tables, _ = lane_on()
    put_state(tables, "body", 1)
    put_state(tables, "engine", 2)
    lane.pass_once()
    lane.published(1, 0x97)  # body: retried in RETRY_MIN_S
    lane.published(2, 0x00)
    assert lane.pass_once() is True
    assert [o.topic for o in link.sent] == ["s/body", "s/engine"]  # not yet again
    assert [row.component for row in tables.unsent_states()] == ["body"]


def test_a_state_the_link_cannot_take_now_stays_unsent_for_the_next_pass(lane_on):
    lane, link, tables, _ = lane_on()
    put_state(tables, "engine", 1)
    link.full = True
    assert lane.pass_once() is True and link.sent == []
    link.full = False
    assert lane.pass_once() is True and values(link) == [1]


def test_a_state_the_link_withdraws_as_over_a_limit_learned_later_goes_again_unsent_till_then(lane_on):
    """The link learned the broker's limit from its cuts after this state was published and took it back
    (`too_large`): it is neither acknowledged nor refused, stays unsent and goes again on the next pass
    (made to fit the limit then); a mid not the lane's is not claimed."""
    lane, link, tables, refused = lane_on()
    put_state(tables, "engine", 1)
    lane.pass_once()
    assert lane.too_large(1, 9000, 4000) is True
    assert lane.too_large(7, 9000, 4000) is False
    assert lane.pass_once() is True and values(link) == [1, 1]
    lane.published(2, 0x00)
    assert lane.pass_once() is False and tables.unsent_states() == [] and not refused
