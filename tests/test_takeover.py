"""The takeover watch on its own (pure: fed lost connections, no broker): what it reports and when."""

from agent.fleet.packets import CUT_FOR_A_MESSAGE
from agent.fleet.takeover import FLAPS, SESSION_TAKEN_OVER, TAKEOVER_BACKOFF_S, TakeoverWatch


def test_a_takeover_the_broker_says_is_reported_every_time_and_slows_reconnects_more_each_time():
    watch = TakeoverWatch(mqtt5=True)
    first = watch.lost(SESSION_TAKEN_OVER, cut_short=False, in_flight=True, stopping=False)
    assert first is not None and "says another connection" in first and "second agent" in first
    assert watch.least_delay() == TAKEOVER_BACKOFF_S
    assert watch.lost(SESSION_TAKEN_OVER, cut_short=False, in_flight=False, stopping=False) is not None
    assert watch.in_a_row == 2 and watch.least_delay() == 2 * TAKEOVER_BACKOFF_S
    assert watch.lost(None, cut_short=False, in_flight=False, stopping=False) is None  # an ordinary outage
    assert watch.in_a_row == 0 and watch.least_delay() == 0.0


def test_0x8e_means_nothing_over_mqtt_3_1_1():
    watch = TakeoverWatch(mqtt5=False)
    assert watch.lost(SESSION_TAKEN_OVER, cut_short=False, in_flight=False, stopping=False) is None
    assert watch.in_a_row == 0


def test_flaps_in_a_row_are_reported_once_and_keep_the_backoff_until_one_connection_lasts():
    watch = TakeoverWatch(mqtt5=False)
    reports = [watch.lost(None, cut_short=True, in_flight=False, stopping=False) for _ in range(FLAPS + 1)]
    assert reports[:FLAPS - 1] == [None] * (FLAPS - 1) and reports[FLAPS] is None
    assert reports[FLAPS - 1] is not None and f"{FLAPS} times in a row" in reports[FLAPS - 1]
    assert watch.in_a_row == 2
    assert watch.lost(None, cut_short=False, in_flight=False, stopping=False) is None
    assert watch.in_a_row == 0


def test_cuts_that_a_message_explains_or_our_own_stop_are_no_flaps():
    for reason, in_flight, stopping in [(None, True, False), (min(CUT_FOR_A_MESSAGE), False, False),
                                        (None, False, True)]:
        watch = TakeoverWatch(mqtt5=True)
        assert [watch.lost(reason, True, in_flight, stopping) for _ in range(2 * FLAPS)] == [None] * (2 * FLAPS)
        assert watch.in_a_row == 0
