"""The outbox pump against a link that answers with PUBACK reason codes or a broker packet limit: a
temp-dir SQLite store and the real Outbox thread; the link is a stand-in that records what it is
handed (the broker's side of these cases runs against real Mosquitto in test_broker_limits.py)."""

import json
import threading

import pytest

from agent.bus.owner import wait_until
from agent.config.model import StoreConfig
from agent.fleet import outbox as outbox_module
from agent.fleet.outbox import Outbox
from agent.fleet.packets import PacketTooLargeError, packet_size
from agent.store.sqlite import Outgoing, Store, StoreError
from agent.wire import messages as m


class Link:
    """Hands out mids; `answer(code)` PUBACKs everything handed so far with that reason code."""

    def __init__(self, max_packet: int | None = None) -> None:
        self.max_packet = max_packet
        self.full = False
        self.handed: list[tuple[int, Outgoing]] = []
        self.outbox: Outbox | None = None
        self._lock = threading.Lock()

    def publish(self, message: Outgoing, on_mid=lambda mid: None) -> int | None:
        if self.full:  # paho cannot take more now
            return None
        size = packet_size(message.topic, message.payload, message.correlation)
        if self.max_packet is not None and size > self.max_packet:
            raise PacketTooLargeError(size, self.max_packet)
        with self._lock:  # as the real link does under paho's lock: noted before any PUBACK can come
            mid = len(self.handed) + 1
            self.handed.append((mid, message))
            on_mid(mid)
        return mid

    def answer(self, code: int, after: int = 0) -> None:
        assert self.outbox is not None
        with self._lock:
            mids = [mid for mid, _ in self.handed[after:]]
        for mid in mids:
            self.outbox.published(mid, code)


def pump(tmp_path, link, refused, *messages):
    """A store holding `messages` (committed, as the service writes them) and its outbox, started."""
    store = Store(tmp_path / "agent.db")
    outbox = Outbox(store, StoreConfig(), link.publish, connected=lambda: True, on_refused=refused.append)
    link.outbox = outbox
    batch = store.batch()
    for message in messages:
        batch.publish(message)
    batch.commit()
    outbox.start()
    return store, outbox


def threadless(tmp_path, *payloads, connected=lambda: True, **options):
    """A store and its outbox without a thread of its own (every hand-over runs on the test's thread;
    `options` go to Outbox): `payloads` stored and handed over on a connection just up.
    Returns (link, store, outbox)."""
    link = Link()
    store = Store(tmp_path / "agent.db")
    outbox = Outbox(store, StoreConfig(), link.publish, connected=connected, **options)
    link.outbox = outbox
    for payload in payloads:
        batch = store.batch()
        batch.publish(Outgoing("t", payload))
        batch.commit()
    outbox.send_now()
    return link, store, outbox


def test_quota_exceeded_is_retried_with_backoff_then_delivered(tmp_path):
    link, refused = Link(), []
    store, outbox = pump(tmp_path, link, refused, Outgoing("sovd/V/responses/a", b'{"id":"a"}', None, "a"))
    try:
        assert wait_until(lambda: len(link.handed) == 1, 5)
        link.answer(0x97)  # quota exceeded: not delivered, still stored
        assert wait_until(lambda: len(link.handed) == 2, 5)  # handed again after the backoff
        assert store.outbox_stats()[0] == 1 and not refused
        link.answer(0x00, after=1)
        assert wait_until(lambda: store.outbox_stats()[0] == 0, 5)
        assert outbox.acknowledged == 1 and not refused
    finally:
        outbox.stop()
        store.close()


@pytest.mark.parametrize(("code", "name"), [(0x87, "not_authorized"), (0x90, "topic_name_invalid"),
                                            (0x95, "packet_too_large")])
def test_a_refusal_that_can_never_pass_is_set_aside_never_deleted_as_delivered(tmp_path, code, name):
    """Protocol section Session: the three codes it names as never passing (0x87, 0x90, 0x95) are moved aside
    at once, not retried and not deleted as if delivered."""
    link, refused = Link(), []
    store, outbox = pump(tmp_path, link, refused, Outgoing("sovd/V/responses/a", b'{"id":"a"}', None, "a"))
    try:
        assert wait_until(lambda: len(link.handed) == 1, 5)
        link.answer(code)
        assert wait_until(lambda: len(refused) == 1, 5)
    finally:
        outbox.stop()
    assert (refused[0].reason, refused[0].code) == (name, code)
    assert len(link.handed) == 1  # never handed over again
    assert store.outbox_stats()[0] == 0 and outbox.acknowledged == 0
    [(kept, reason)] = store.refused_messages()
    assert kept.message.payload == b'{"id":"a"}' and reason == name
    store.close()


def big_final() -> dict:
    """A final response of about 6 KB, with a result that can be cut into chunks."""
    return {"id": "big", "component": "engine", "command": "read_data", "status": "completed", "final": True,
            "seq": 2, "result": {"values": {"blob": {"raw": "ab" * 3000}}}}


def as_response(final: dict) -> Outgoing:
    return Outgoing(f"sovd/V/responses/{final['id']}", m.encode(final), None, final["id"])


def chunks_delivered(link: Link, store: Store, outbox: Outbox, refused: list) -> None:
    """The re-cut chunks of the first message handed over are all handed over and acknowledged: the outbox
    is empty, with no retry left behind and nothing set aside."""
    assert wait_until(lambda: len(link.handed) > 2 and json.loads(link.handed[-1][1].payload)["final"], 5)
    link.answer(0x00, after=1)
    assert wait_until(lambda: store.outbox_stats()[0] == 0, 5)
    assert outbox._retries == {} and not refused


def test_a_stored_response_larger_than_the_broker_takes_is_sent_in_chunks(tmp_path):
    """Stored before the broker's limit was known (e.g. while offline): split when it is handed over."""
    link, refused = Link(max_packet=1500), []
    final = big_final()
    store, outbox = pump(tmp_path, link, refused, as_response(final))
    try:
        assert wait_until(lambda: link.handed and json.loads(link.handed[-1][1].payload).get("final") is True, 5)
        link.answer(0x00)
        assert wait_until(lambda: store.outbox_stats()[0] == 0, 5)
    finally:
        outbox.stop()
        store.close()
    pieces = [json.loads(message.payload) for _, message in link.handed]
    assert all(packet_size(message.topic, message.payload, None) <= 1500 for _, message in link.handed)
    chunks = [p for p in pieces if p["status"] == "running"]
    assert pieces[-1]["chunks"] == len(chunks) > 1 and "result" not in pieces[-1]
    assert [p["seq"] for p in pieces] == list(range(2, 2 + len(pieces)))
    assert json.loads("".join(c["chunk"]["data"] for c in chunks)) == final["result"]
    assert not refused


def test_a_retried_message_re_cut_for_the_broker_leaves_no_retry_behind(tmp_path):
    """A response refused for now (quota exceeded) that the broker's packet limit, learnt meanwhile, makes
    too large when it is retried is re-cut into chunks; the retry entry of the row that left the outbox
    goes with it (it used to stay, marked in flight for ever, one per such message for the process's life)."""
    link, refused = Link(), []
    final = big_final()
    store, outbox = pump(tmp_path, link, refused, as_response(final))
    try:
        assert wait_until(lambda: len(link.handed) == 1, 5)
        link.max_packet = 1500  # the broker's limit, e.g. from the CONNACK of a new connection
        link.answer(0x97)
        chunks_delivered(link, store, outbox, refused)
    finally:
        outbox.stop()
        store.close()


def test_a_message_that_cannot_be_split_is_set_aside_as_too_large(tmp_path):
    link, refused = Link(max_packet=200), []
    unsplittable = Outgoing("sovd/V/events", json.dumps({"type": "x", "pad": "y" * 500}).encode())
    store, outbox = pump(tmp_path, link, refused, unsplittable)
    try:
        assert wait_until(lambda: len(refused) == 1, 5)
    finally:
        outbox.stop()
    assert refused[0].reason == "packet_too_large" and not link.handed
    assert store.outbox_stats()[0] == 0 and len(store.refused_messages()) == 1
    store.close()


def test_refused_messages_are_bounded_oldest_forgotten_and_counted(tmp_path):
    from agent.store.sqlite import REFUSED_KEEP

    store = Store(tmp_path / "agent.db")
    batch = store.batch()
    for n in range(REFUSED_KEEP + 5):
        batch.publish(Outgoing("sovd/V/events", f'{{"n":{n}}}'.encode()))
    batch.commit()
    forgotten = sum(store.set_aside(row.n, "not_authorized") for row in store.pending(0, REFUSED_KEEP + 5))
    kept = store.refused_messages()
    assert forgotten == 5 and len(kept) == REFUSED_KEEP
    assert json.loads(kept[0][0].message.payload) == {"n": 5}  # the oldest went first
    assert store.outbox_stats()[0] == 0
    store.close()


def test_never_more_in_flight_than_the_broker_receive_maximum(tmp_path):
    """CONNACK said Receive Maximum 3: at most 2 of ours in flight (one place stays for the status)."""
    link = Link()
    store = Store(tmp_path / "agent.db")
    outbox = Outbox(store, StoreConfig(), link.publish, connected=lambda: True, window=lambda: 3)
    link.outbox = outbox
    batch = store.batch()
    for n in range(10):
        batch.publish(Outgoing("sovd/V/events", f'{{"n":{n}}}'.encode()))
    batch.commit()
    outbox.start()
    try:
        assert wait_until(lambda: len(link.handed) == 2, 5)
        outbox.wake()
        assert not wait_until(lambda: len(link.handed) > 2, 0.3)  # nothing more without a PUBACK
        link.answer(0x00)
        assert wait_until(lambda: len(link.handed) == 4, 5)
    finally:
        outbox.stop()
        store.close()


def test_send_now_hands_stored_messages_over_on_the_calling_thread_in_order(tmp_path):
    """The thread that committed messages publishes them itself (no outbox thread here at all), the
    older stored ones first; with the link down nothing is handed over and nothing is lost."""
    link, threads = Link(), []
    publish = link.publish
    link.publish = lambda message, on_mid: threads.append(threading.current_thread().name) or publish(message, on_mid)
    store = Store(tmp_path / "agent.db")
    up = [False]
    outbox = Outbox(store, StoreConfig(), link.publish, connected=lambda: up[0])
    link.outbox = outbox
    try:
        for payload in (b"1", b"2"):
            batch = store.batch()
            batch.publish(Outgoing("t", payload))
            batch.commit()
            outbox.send_now()
        assert link.handed == []  # the link is down: they wait in the store
        up[0] = True
        batch = store.batch()
        batch.publish(Outgoing("t", b"3"))
        batch.commit()
        outbox.send_now()
        assert [message.payload for _, message in link.handed] == [b"1", b"2", b"3"]
        assert set(threads) == {threading.current_thread().name}
        outbox.send_now()  # nothing new: nothing handed twice
        assert len(link.handed) == 3
    finally:
        store.close()


def test_send_now_while_the_outbox_thread_is_in_a_pass_leaves_the_message_to_it(tmp_path):
    link, refused = Link(), []
    store, outbox = pump(tmp_path, link, refused)
    try:
        with outbox._pass:  # the outbox thread's pass, as it holds it
            batch = store.batch()
            batch.publish(Outgoing("t", b"later"))
            batch.commit()
            outbox.send_now()
            assert link.handed == []  # not handed over behind the pass's back
        assert wait_until(lambda: len(link.handed) == 1, 5)  # the outbox thread was woken and took it
    finally:
        outbox.stop()
        store.close()


def test_pubacks_alone_are_settled_without_reading_the_outbox_again(tmp_path):
    """A pass woken only by PUBACKs deletes the delivered rows; it reads the outbox only when something
    may have been stored since (a wake), when the last hand-over was cut short by the window, or when
    its wait times out."""
    link = Link()
    store = Store(tmp_path / "agent.db")
    outbox = Outbox(store, StoreConfig(), link.publish, connected=lambda: True)
    outbox._next_wait = lambda: 60.0  # no timed-out pass during the test: only wakes count
    link.outbox = outbox
    batch = store.batch()
    for i in range(3):
        batch.publish(Outgoing("t", b"%d" % i))
    batch.commit()
    reads = []
    pending = store.pending
    store.pending = lambda after, limit: reads.append(after) or pending(after, limit)
    outbox.start()
    outbox.wake()
    try:
        assert wait_until(lambda: len(link.handed) == 3, 5)
        before = len(reads)
        link.answer(0)
        assert wait_until(lambda: store.outbox_stats()[0] == 0, 5)  # settled and deleted
        assert len(reads) == before
        batch = store.batch()
        batch.publish(Outgoing("t", b"next"))
        batch.commit()
        outbox.wake()
        assert wait_until(lambda: len(link.handed) == 4, 5)
    finally:
        outbox.stop()
        store.close()


def test_the_callbacks_of_one_commit_read_the_outbox_once_and_a_later_commit_is_read_again(tmp_path):
    """Under load one commit carries several finals, and each one's callback hands over (`send_now`):
    the first reads the outbox and hands over everything, the others find nothing committed since and
    do not read it again. Any commit after that read, even one that stores no message, makes the next
    hand-over read again, so nothing committed is left behind."""
    link = Link()
    store = Store(tmp_path / "agent.db")
    outbox = Outbox(store, StoreConfig(), link.publish, connected=lambda: True)
    link.outbox = outbox
    reads = []
    pending = store.pending
    store.pending = lambda after, limit: reads.append(after) or pending(after, limit)
    try:
        done = threading.Event()
        for i in range(3):  # three finals in one commit, each with its callback
            batch = store.batch()
            batch.publish(Outgoing("t", b"%d" % i))
            batch.commit_later(lambda error: outbox.send_now(), company=True)
        store.flush()
        assert [message.payload for _, message in link.handed] == [b"0", b"1", b"2"]
        assert len(reads) == 1
        outbox.send_now()
        assert len(reads) == 1  # still nothing new
        store.acknowledge([1])  # a commit without a message: read again, find nothing, hand over nothing
        store.flush()
        outbox.send_now()
        assert len(reads) == 2 and len(link.handed) == 3
        batch = store.batch()
        batch.publish(Outgoing("t", b"3"))
        batch.commit_later(lambda error: done.set(), company=True)  # no callback of its own hands over
        store.flush()
        assert done.is_set()
        outbox.send_now()
        assert [message.payload for _, message in link.handed][-1] == b"3"
    finally:
        store.close()


def test_a_commit_landing_while_the_outbox_is_read_is_read_by_the_next_hand_over(tmp_path):
    """Another thread commits a message just after the outbox was read (the read did not see it): the
    generation is noted before the read, so the next hand-over reads again instead of skipping."""
    link = Link()
    store = Store(tmp_path / "agent.db")
    outbox = Outbox(store, StoreConfig(), link.publish, connected=lambda: True)
    link.outbox = outbox
    pending = store.pending

    def read_then_another_commit(after, limit):
        rows = pending(after, limit)
        if not rows:
            return rows
        store.pending = pending  # once
        batch = store.batch()
        batch.publish(Outgoing("t", b"late"))
        batch.commit()
        return rows

    try:
        batch = store.batch()
        batch.publish(Outgoing("t", b"first"))
        batch.commit()
        store.pending = read_then_another_commit
        outbox.send_now()
        assert [message.payload for _, message in link.handed] == [b"first"]
        outbox.send_now()
        assert [message.payload for _, message in link.handed] == [b"first", b"late"]
    finally:
        store.close()


def test_send_soon_messages_go_with_the_next_send_now_in_order(tmp_path):
    """Messages allowed to wait (the `accepted` of a command that starts at once) are taken along by the
    next hand-over on a committing thread, before what that thread stored, and never handed twice."""
    link = Link()
    store = Store(tmp_path / "agent.db")
    outbox = Outbox(store, StoreConfig(), link.publish, connected=lambda: True)  # no outbox thread at all
    link.outbox = outbox
    try:
        batch = store.batch()
        batch.publish(Outgoing("t", b"accepted"))
        batch.commit()
        outbox.send_soon(60.0)
        assert link.handed == []  # it waits
        batch = store.batch()
        batch.publish(Outgoing("t", b"final"))
        batch.commit()
        outbox.send_now()
        assert [message.payload for _, message in link.handed] == [b"accepted", b"final"]
        outbox.send_now()
        assert len(link.handed) == 2
    finally:
        store.close()


class _Wakes:
    """PUBACKs for messages the outbox never handed over (the status, telemetry states): each wakes the
    outbox thread, every `every` seconds, while the `with` block runs."""

    def __init__(self, outbox: Outbox, every: float = 0.002) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(outbox, every), daemon=True)
        self._thread.start()

    def _run(self, outbox: Outbox, every: float) -> None:
        while not self._stop.wait(every):
            outbox.published(10_000_000, 0)

    def __enter__(self) -> "_Wakes":
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_due_retry_is_handed_over_while_pubacks_keep_waking_the_outbox(tmp_path):
    """A message the broker refused for now (quota exceeded) is handed over again at its due time even
    when PUBACKs of other messages wake the outbox thread more often than that: the due time is a
    deadline, not a wait that each wake starts again."""
    link, refused = Link(), []
    store, outbox = pump(tmp_path, link, refused, Outgoing("sovd/V/responses/a", b'{"id":"a"}', None, "a"))
    try:
        assert wait_until(lambda: len(link.handed) == 1, 5)
        with _Wakes(outbox):
            link.answer(0x97)
            assert wait_until(lambda: len(link.handed) == 2, 5)  # RETRY_MIN_S after the refusal
    finally:
        outbox.stop()
        store.close()


def test_the_timed_read_of_the_outbox_is_not_put_off_by_pubacks_waking_it(tmp_path, monkeypatch):
    """The outbox thread reads the outbox at least every IDLE_WAIT_S (the safety net for a message stored
    with no wake, e.g. a deferred write stored by a round without a hand-over of its own), however often
    PUBACKs of other messages wake it in between."""
    monkeypatch.setattr("agent.fleet.outbox.IDLE_WAIT_S", 0.3)
    link, refused = Link(), []
    store, outbox = pump(tmp_path, link, refused, Outgoing("t", b"first"))
    try:
        assert wait_until(lambda: len(link.handed) == 1, 5)  # the first pass is over
        with _Wakes(outbox):
            batch = store.batch()
            batch.publish(Outgoing("t", b"stored without a wake"))
            batch.commit()
            assert wait_until(lambda: len(link.handed) == 2, 5)
    finally:
        outbox.stop()
        store.close()


def test_send_soon_messages_go_by_themselves_when_their_time_comes(tmp_path, monkeypatch):
    """With no final to take it along, the outbox thread hands a held message over at its due time; its
    own idle wait is made long here, so only the due time can be what sends it."""
    monkeypatch.setattr("agent.fleet.outbox.IDLE_WAIT_S", 60.0)
    link, refused = Link(), []
    store, outbox = pump(tmp_path, link, refused, Outgoing("t", b"first"))
    try:
        outbox.wake()
        assert wait_until(lambda: len(link.handed) == 1, 5)
        batch = store.batch()
        batch.publish(Outgoing("t", b"held"))
        batch.commit()
        outbox.send_soon(0.05)
        assert wait_until(lambda: len(link.handed) == 2, 5)
        assert link.handed[1][1].payload == b"held"
    finally:
        outbox.stop()
        store.close()


class _WakeDuringTake(Outbox):
    """An Outbox whose thread, the first time it takes the `_fresh` flag once armed, meets a wake from
    another thread right after reading it (the interleaving a preemption between the read and the
    reset of the flag gives)."""

    armed: threading.Event | None = None
    on_take: object = None

    @property
    def _fresh(self) -> bool:
        value = self.__dict__["fresh"]
        armed = self.armed
        if armed is not None and armed.is_set() and threading.current_thread().name == "outbox":
            armed.clear()
            waker = threading.Thread(target=self.on_take)
            waker.start()
            waker.join(0.3)  # a wake that waits for the take to end is as good as one after it
        return value

    @_fresh.setter
    def _fresh(self, value: bool) -> None:
        self.__dict__["fresh"] = value


def test_a_wake_between_reading_and_resetting_the_stored_flag_is_not_lost(tmp_path):
    """A message committed and woken for while the outbox thread takes the 'something was stored' flag
    (in a pass woken by a PUBACK alone) is handed over on the next pass: the flag a waker sets is never
    reset unread. Once, the reset overwrote it, the pass skipped the store and the message waited for
    a timed-out pass (none comes while PUBACKs keep waking it)."""
    link = Link()
    store = Store(tmp_path / "agent.db")
    outbox = _WakeDuringTake(store, StoreConfig(), link.publish, connected=lambda: True)
    outbox._next_wait = lambda: 60.0  # no timed-out pass during the test: only wakes count
    link.outbox = outbox

    def store_and_wake() -> None:
        batch = store.batch()
        batch.publish(Outgoing("t", b"second"))
        batch.commit()
        outbox.wake()

    outbox.on_take = store_and_wake
    outbox.armed = threading.Event()
    batch = store.batch()
    batch.publish(Outgoing("t", b"first"))
    batch.commit()
    outbox.start()
    outbox.wake()
    try:
        assert wait_until(lambda: len(link.handed) == 1, 5)
        outbox.armed.set()
        link.answer(0)  # a PUBACK alone wakes the next pass
        assert wait_until(lambda: not outbox.armed.is_set(), 5)
        assert wait_until(lambda: len(link.handed) == 2, 5)
        assert link.handed[1][1].payload == b"second"
    finally:
        outbox.stop()
        store.close()


def test_a_retry_due_while_the_link_is_down_does_not_spin_the_outbox_thread(tmp_path, monkeypatch):
    """A refused message's retry falls due while the link is down: no pass can hand it over, so its due
    time stays in the past. The outbox thread then waits its idle time (the link coming up wakes it),
    where it once waited the 10 ms floor again and again for as long as the link stayed down."""
    monkeypatch.setattr("agent.fleet.outbox.RETRY_MIN_S", 0.0)  # the retry is due at once
    up = [True]
    link, store, outbox = threadless(tmp_path, b"refused for now", connected=lambda: up[0])  # passes by hand
    try:
        link.answer(0x97)  # quota exceeded: retried after the backoff
        with outbox._pass:
            outbox._settle_acks()
        assert store.outbox_stats()[0] == 1
        up[0] = False
        assert outbox._next_wait() == outbox_module.IDLE_WAIT_S
        up[0] = True
        assert outbox._next_wait() < outbox_module.IDLE_WAIT_S  # connected: the due retry is handed over soon
    finally:
        store.close()


def test_a_retry_due_while_the_window_is_full_does_not_spin_the_outbox_thread(tmp_path, monkeypatch):
    """A refused message's retry is due but the broker's Receive Maximum has no room: no pass can hand it
    over until a PUBACK makes room, and that PUBACK wakes the thread. The thread waits its idle time
    meanwhile, where it once passed every 10 ms for as long as the window stayed full."""
    monkeypatch.setattr("agent.fleet.outbox.RETRY_MIN_S", 0.0)  # the retry is due at once
    window = [3]  # room for 2 of ours
    link, store, outbox = threadless(tmp_path, b"refused for now", b"in flight", window=lambda: window[0])
    try:
        assert len(link.handed) == 2
        outbox.published(1, 0x97)
        with outbox._pass:
            outbox._settle_acks()
        assert outbox._next_wait() <= 0  # room for one: the retry goes on the next pass
        window[0] = 2  # room for 1 of ours, taken by the one in flight
        assert outbox._next_wait() > outbox_module.IDLE_WAIT_S / 2
        outbox.published(2, 0x00)  # room again: the wake's pass hands the retry over
        outbox.send_now()
        assert [message.payload for _, message in link.handed][2:] == [b"refused for now"]
    finally:
        store.close()


def test_a_retry_the_link_cannot_take_now_is_handed_over_on_a_later_pass(tmp_path, monkeypatch):
    """A message refused for now (quota exceeded) falls due for its retry while the link cannot take
    more (`publish` returns None): it is due again on the next pass and handed over once the link takes
    it. Once, it was marked in flight before the link was asked, stayed so with no PUBACK to come, and
    was never handed over again in this process."""
    monkeypatch.setattr("agent.fleet.outbox.RETRY_MIN_S", 0.0)  # the retry is due at once
    link, store, outbox = threadless(tmp_path, b"refused for now")  # passes by hand
    try:
        link.answer(0x97)  # quota exceeded: retried after the backoff
        with outbox._pass:
            outbox._settle_acks()
        link.full = True
        outbox.send_now()  # the retry is due; the link cannot take it now
        assert len(link.handed) == 1
        link.full = False
        outbox.send_now()
        assert [message.payload for _, message in link.handed] == [b"refused for now"] * 2
    finally:
        store.close()


def test_a_deferred_message_stored_by_a_commit_round_that_fails_half_way_is_read(tmp_path):
    """Writes deferred while the storage failed are stored at the start of the next commit round; when
    the storage fails again half-way through them, the round ends in error, yet what was stored before
    the failure is in the outbox: the store's generation rose for it, so the next hand-over reads the
    outbox instead of skipping the read as if nothing had been committed since its last one."""
    link, store, outbox = threadless(tmp_path, b"first")
    try:
        assert [message.payload for _, message in link.handed] == [b"first"]
        with store._lock:  # two writes deferred while the storage failed; it still has no page to spare
            for payload in (b"small", b"x" * 200_000):
                deferred = store.batch()
                deferred.publish(Outgoing("t", payload))
                store._deferred.append(deferred.statements)
            pages = store._db.execute("PRAGMA page_count").fetchone()[0]
            store._db.execute(f"PRAGMA max_page_count = {pages}")
        unrelated = store.batch()
        unrelated.forget("nothing")
        with pytest.raises(StoreError):
            unrelated.commit()  # the round stores the small one, then fails on the large one
        assert store.deferred == 1
        outbox.send_now()
        assert [message.payload for _, message in link.handed] == [b"first", b"small"]
        with store._lock:
            store._db.execute("PRAGMA max_page_count = 1073741823")
        store.retry_deferred()
        outbox.send_now()
        assert [len(message.payload) for _, message in link.handed] == [5, 5, 200_000]
    finally:
        store.close()


def settle(outbox: Outbox) -> None:
    """What the outbox thread's pass does before it hands over: PUBACKs and messages the link struck."""
    with outbox._pass:
        outbox._settle_acks()
        outbox._settle_taken_back()


def test_a_message_the_link_struck_is_set_aside_and_a_retried_one_stays(tmp_path, monkeypatch):
    """The link judges which message the broker cuts connections on (test_cuts.py: the first paho
    resends, whoever published it). The outbox sets that row aside as `connection_dropped`; its other
    rows, a retried one included, stay to be delivered."""
    monkeypatch.setattr("agent.fleet.outbox.RETRY_MIN_S", 0.0)  # the retry is due at once
    refused = []
    link, store, outbox = threadless(tmp_path, b"refused for now", b"poison", on_refused=refused.append)
    try:
        outbox.published(1, 0x97)
        settle(outbox)
        outbox.send_now()  # the retry: mid 3
        assert [message.payload for _, message in link.handed] == [b"refused for now", b"poison", b"refused for now"]
        outbox.struck(2)
        outbox.struck(99)  # not the outbox's: nothing happens
        settle(outbox)
        assert [r.message.payload for r in refused] == [b"poison"]
        assert [r.reason for r in refused] == ["connection_dropped"]
        assert [row.message.payload for row in store.pending(0, 10)] == [b"refused for now"]
        outbox.published(3, 0x00)
        settle(outbox)
        store.flush()
        assert store.outbox_stats()[0] == 0 and outbox._retries == {}
    finally:
        store.close()


def test_quota_exceeded_for_ever_keeps_retrying_past_a_thousand_refusals(tmp_path, monkeypatch):
    """0x97 is retried for as long as it takes (a broker's daily quota may refuse for a day: over a
    thousand retries a minute apart). The backoff stays at RETRY_MAX_S; once, 2 ** attempts overflowed
    a float at the 1025th refusal, the pass failed, and the message was never handed over again."""
    monkeypatch.setattr("agent.fleet.outbox.RETRY_MIN_S", 0.0)  # every retry is due at once
    link, store, outbox = threadless(tmp_path, b"over quota")
    try:
        for refusals in range(1, 1100):
            assert len(link.handed) == refusals
            outbox.published(link.handed[-1][0], 0x97)
            settle(outbox)
            outbox.send_now()
        outbox.published(link.handed[-1][0], 0x00)
        settle(outbox)
        store.flush()
        assert store.outbox_stats()[0] == 0 and outbox.acknowledged == 1
    finally:
        store.close()


def test_a_retried_row_the_bounds_dropped_leaves_no_retry_behind(tmp_path, monkeypatch):
    """A row refused for now and handed over again is dropped by the bounds pass while in flight; when
    the broker refuses it again, its retry entry goes with it (it used to stay, marked in flight for
    ever: one per such row for the life of the process)."""
    monkeypatch.setattr("agent.fleet.outbox.RETRY_MIN_S", 0.0)
    link = Link()
    store = Store(tmp_path / "agent.db")
    outbox = Outbox(store, StoreConfig(outbox_max_messages=1), link.publish, connected=lambda: True)
    link.outbox = outbox
    try:
        batch = store.batch()
        batch.publish(Outgoing("t", b"old"))
        batch.commit()
        outbox.send_now()
        outbox.published(1, 0x97)
        settle(outbox)
        outbox.send_now()  # the retry, in flight as mid 2
        batch = store.batch()
        batch.publish(Outgoing("t", b"new"))  # the count bound now drops the old one
        batch.commit()
        outbox.maintain()
        assert outbox.dropped == 1
        outbox.published(2, 0x97)
        settle(outbox)
        assert outbox._retries == {}
    finally:
        store.close()


def test_a_struck_row_that_was_a_retry_leaves_no_retry_behind(tmp_path, monkeypatch):
    """A row refused for now, handed over again, then struck by the link: its retry entry goes with it."""
    monkeypatch.setattr("agent.fleet.outbox.RETRY_MIN_S", 0.0)
    refused = []
    _, store, outbox = threadless(tmp_path, b"refused, then cut on", on_refused=refused.append)
    try:
        outbox.published(1, 0x97)
        settle(outbox)
        outbox.send_now()  # the retry, in flight as mid 2
        outbox.struck(2)
        settle(outbox)
        assert [r.reason for r in refused] == ["connection_dropped"]
        assert outbox._retries == {}
    finally:
        store.close()


def test_a_response_re_cut_into_chunks_is_never_stored_beside_them(tmp_path):
    """The chunks and the deletion of the response they replace are one commit: whenever the process
    dies, the outbox holds the original or its chunks, never both. Once, the chunks were committed
    first and the original deleted by a later, unsynced write: a crash or power loss in between sent
    both after the restart, the original re-cut for whatever limit the broker then had, so the backend
    could get two sets of chunks whose `seq` numbers mean different pieces (or an old set it cannot
    take any more, set aside piece by piece, beside a complete new one)."""
    import sqlite3

    link, refused = Link(max_packet=1500), []
    final = big_final()
    store = Store(tmp_path / "agent.db")
    outbox = Outbox(store, StoreConfig(), link.publish, connected=lambda: True, on_refused=refused.append)
    link.outbox = outbox
    batch = store.batch()
    batch.publish(as_response(final))
    batch.commit()
    committed: list[list[bool]] = []  # after each commit: for every stored row, is it a chunk's message
    write = store._write

    def write_and_look(*args, **kwargs):
        write(*args, **kwargs)
        with sqlite3.connect(tmp_path / "agent.db") as db:  # what a crash right now would leave
            committed.append([b'"result"' not in payload for payload, in db.execute("SELECT payload FROM outbox")])

    store._write = write_and_look
    try:
        outbox.send_now()  # re-cuts it
        outbox.send_now()  # hands the chunks over
        assert len(link.handed) > 2 and not refused
        assert committed and all(all(chunks) or not any(chunks) for chunks in committed), committed
    finally:
        store.close()


def test_a_message_acknowledged_but_not_yet_settled_is_never_struck(tmp_path):
    """A PUBACK arrived, but the outbox thread has not settled it yet (busy in a long pass) when the link
    strikes the same mid (paho may already have given it to another publisher's message): that message
    is no longer on the wire, so no cut is its doing. It is settled as delivered, never set aside as
    `connection_dropped` (an ERROR, a metric and an Event saying a delivered message was not)."""
    refused = []
    _, store, outbox = threadless(tmp_path, b"delivered", on_refused=refused.append)
    try:
        outbox.published(1, 0x00)  # not settled yet
        outbox.struck(1)
        settle(outbox)
        store.flush()
        assert refused == []
        assert outbox.acknowledged == 1 and store.outbox_stats()[0] == 0
    finally:
        store.close()


def test_refusals_for_quota_do_not_count_towards_setting_a_message_aside(tmp_path, monkeypatch):
    """Quota exceeded is retried for as long as it takes; MAX_ATTEMPTS bounds the other refusals that may
    pass (0x80 unspecified, ...). A message refused for quota again and again, then once for another
    such reason, is retried; it is set aside at its MAX_ATTEMPTS-th refusal of that other kind. Once,
    the quota refusals counted too: a broker under load answering 0x97 a few times and then 0x80 once
    had a deliverable response set aside at once."""
    monkeypatch.setattr("agent.fleet.outbox.RETRY_MIN_S", 0.0)  # every retry is due at once
    refused = []
    link, store, outbox = threadless(tmp_path, b"refused for now", on_refused=refused.append)
    try:
        codes = [0x97] * outbox_module.MAX_ATTEMPTS + [0x80] * (outbox_module.MAX_ATTEMPTS - 1)
        for code in codes:
            outbox.published(link.handed[-1][0], code)
            settle(outbox)
            outbox.send_now()
        assert refused == [] and len(link.handed) == len(codes) + 1  # still retried
        outbox.published(link.handed[-1][0], 0x80)
        settle(outbox)
        assert [(r.reason, r.code) for r in refused] == [("unspecified_error", 0x80)]
        assert outbox._retries == {}
    finally:
        store.close()


def test_a_response_the_link_withdraws_as_over_a_limit_learned_later_is_sent_in_chunks(tmp_path):
    """Handed over before the link learned the broker's limit from its cuts (cuts.py), a response over that
    limit is taken back by the link (`too_large`): it is re-cut into chunks and sent again, not left in
    paho's session to cut STRIKES more connections and then be set aside."""
    link, refused = Link(), []
    final = big_final()
    message = as_response(final)
    store, outbox = pump(tmp_path, link, refused, message)
    try:
        assert wait_until(lambda: len(link.handed) == 1, 5)
        link.max_packet = 1500  # learned by the link from the cuts on another message
        assert outbox.too_large(1, packet_size(message.topic, message.payload, None), 1500)
        assert not outbox.too_large(99, 5000, 1500)  # not one of the outbox's: the link says so itself
        chunks_delivered(link, store, outbox, refused)
    finally:
        outbox.stop()
        store.close()
    assert all(packet_size(m_.topic, m_.payload, None) <= 1500 for _, m_ in link.handed[1:])
