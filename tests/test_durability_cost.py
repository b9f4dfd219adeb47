"""What durability costs per command, counted in synced store commits (each one fdatasync of the WAL),
end to end: real Mosquitto, the simulator on the virtual bus, the real service. Nothing is mocked.

The fsync figures themselves (syscalls counted by the kernel) are bench/'s job; here the store's own
count of synced commits pins down which writes are synced.
"""

from __future__ import annotations

import contextlib
import time
import uuid

from agent.clock import Clock
from agent.devtools.sim.config import fault_from_dict
from agent.store.sqlite import Store
from agent.system.service import Service


def command(**fields):
    return {"id": f"d-{uuid.uuid4().hex[:10]}", "component": "engine", "command": "read_data",
            "params": {"data": "vin"}, **fields}


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


@contextlib.contextmanager
def slow_engine(mqtt_vehicle, sim, backend, grace: float = 5.0):
    """The agent, subscribed, with the engine answering ReadDataByIdentifier F190 slowly (15 x NRC 0x78);
    stopped cleanly (SIGTERM's path) with `grace` when the block ends."""
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "match": "F190", "pending": 15})])
    service = Service(mqtt_vehicle)
    service.start()
    try:
        assert service.link.wait_connected(10), service.link.last_error
        backend.wait_status("online", 10)
        yield service
    finally:
        service.stop(grace)


def running(worker, sent) -> bool:
    return worker.in_flight is not None and worker.in_flight.id == sent["id"]


def queue_behind(backend, worker, blocker, *queued) -> None:
    """Sends `blocker` and, once it runs, `queued`: they wait in its worker's queue behind it."""
    backend.send(blocker)
    wait_for(lambda: running(worker, blocker))
    for sent in queued:
        backend.send(sent)
    wait_for(lambda: worker.depth == len(queued))


def busy_elsewhere(sim, backend, service) -> dict:
    """Another component (`body`) kept busy for about 5 s by one slow read: its commits are the company a
    start mark ahead waits for."""
    sim.ecu("body").set_faults([fault_from_dict({"service": 0x22, "match": "F190", "pending": 250})])
    read = command(component="body")
    backend.send(read)
    wait_for(lambda: running(service.runtime.workers["body"], read))
    return read


def ledger_states(mqtt_vehicle, *ids: str) -> list[str]:
    """The ledger state of each id, as the next start will find it."""
    reopened = Store(mqtt_vehicle.state_dir / "agent.db")
    try:
        return [reopened.get(command_id).state for command_id in ids]
    finally:
        reopened.close()


def settled(service: Service) -> bool:
    """The worker is idle, nothing waits to be written, the outbox is empty (its deletes are done)."""
    return (service.runtime.workers["engine"].idle and not service.store._pending
            and service.store.outbox_stats()[0] == 0)


def test_one_command_at_a_time_costs_two_synced_commits(service, backend):
    """The ledger row, its start mark and `accepted` in one commit before the PUBACK; the final in a
    second before it is published; the deletes after the PUBACKs unsynced (store docstring: 2 is the
    floor one at a time)."""
    first = command()
    backend.send(first)
    assert backend.final(first["id"])["status"] == "completed"
    wait_for(lambda: settled(service))
    for _ in range(3):
        before = service.store.synced
        sent = command()
        backend.send(sent)
        final = backend.final(sent["id"])
        assert final["status"] == "completed"
        wait_for(lambda: settled(service))
        assert service.store.synced - before == 2
        assert service.store.get(sent["id"]).state == "final"


def test_a_command_for_an_idle_worker_is_recorded_started_before_its_puback(service, backend, sim):
    """Seen while it runs: its ledger row says started, and one synced commit was made for it (the
    intake's): its worker wrote no start mark of its own."""
    # time enough to look at the ledger while it runs
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "match": "F190", "pending": 20})])
    try:
        wait_for(lambda: settled(service))
        before = service.store.synced
        sent = command()
        backend.send(sent)
        wait_for(lambda: service.runtime.workers["engine"].in_flight is not None)
        assert service.store.get(sent["id"]).state == "started"
        assert service.store.synced - before == 1
        assert backend.final(sent["id"])["status"] == "completed"
    finally:
        sim.ecu("engine").set_faults([])


def test_a_transient_refusal_is_not_synced_nor_remembered(mqtt_vehicle, sim, backend, tmp_path):
    timesync = tmp_path / "timesync"
    timesync.mkdir()  # systemd-timesyncd is there, not yet synchronized
    clock = Clock(mqtt_vehicle.state_dir / "clock.json", kernel=lambda: False, timesync_dir=timesync)
    service = Service(mqtt_vehicle, clock=clock)
    service.start()
    try:
        assert service.link.wait_connected(10), service.link.last_error
        backend.wait_status("online", 10)
        wait_for(lambda: not service.store._pending and service.store.outbox_stats()[0] == 0)
        before = service.store.synced
        refused = command(expires_at="2099-01-01T00:00:00Z")
        backend.send(refused)
        final = backend.final(refused["id"])
        assert final["status"] == "rejected" and final["error"]["code"] == "clock_unsynchronized"
        wait_for(lambda: service.store.outbox_stats()[0] == 0)
        assert service.store.synced == before
        assert service.store.get(refused["id"]) is None
    finally:
        service.stop()


def test_the_next_command_is_marked_started_while_one_runs_and_queued_again_at_a_clean_stop(
        mqtt_vehicle, sim, backend):
    """Pipelined start marks: while a command runs, its worker takes the next one and has its start
    mark written. A clean stop puts that one back to `queued`, so it runs after the restart instead
    of being reported `interrupted`."""
    with slow_engine(mqtt_vehicle, sim, backend) as service:
        worker = service.runtime.workers["engine"]
        blocker, first, second, third = command(), command(), command(), command()
        queue_behind(backend, worker, blocker, first, second, third)
        wait_for(lambda: running(worker, first))
        wait_for(lambda: service.store.get(second["id"]).state == "started")  # marked ahead, not running
        assert worker.in_flight.id == first["id"] and service.store.get(third["id"]).state == "queued"
    assert backend.final(blocker["id"])["status"] == "completed"
    assert backend.final(first["id"])["status"] == "completed"
    assert ledger_states(mqtt_vehicle, second["id"], third["id"]) == ["queued", "queued"]
    sim.ecu("engine").set_faults([])
    again = Service(mqtt_vehicle)
    again.start()
    try:
        assert backend.final(second["id"])["status"] == "completed"
        assert backend.final(third["id"])["status"] == "completed"
    finally:
        again.stop()


def test_a_start_mark_ahead_waits_for_company_and_its_worker_commits_it_when_its_turn_comes(
        mqtt_vehicle, sim, backend, monkeypatch):
    """While another component is busy, a mark written ahead waits for another commit to carry it (under
    load, that component's or the intake's: one fsync for several commands), so it is not committed alone
    while the command before it runs. When its turn comes and no commit carried it, the worker commits it
    at once, with the final before it, instead of waiting out the company timer (made 30 s here)."""
    from agent.store import group

    with slow_engine(mqtt_vehicle, sim, backend) as service:
        sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "match": "F190", "pending": 100})])  # 2 s
        busy_elsewhere(sim, backend, service)
        worker = service.runtime.workers["engine"]
        blocker, first, second = command(), command(), command(params={"data": "oil_temp"})
        queue_behind(backend, worker, blocker, first, second)  # second is taken ahead at first's start
        monkeypatch.setattr(group, "COMPANY_WAIT_S", 30.0)
        wait_for(lambda: second["id"] in service._marked_ahead)
        time.sleep(0.3)
        assert worker.in_flight.id == first["id"]  # first runs for 2 s
        assert service.store.get(second["id"]).state == "queued"  # its mark waits for company
        assert backend.final(first["id"])["status"] == "completed"
        assert backend.final(second["id"], timeout=10)["status"] == "completed"  # not 30 s later
        assert service.store.get(second["id"]).state == "final"


def test_a_lone_busy_components_mark_ahead_is_committed_at_once_overlapping_the_command_before_it(
        mqtt_vehicle, sim, backend, monkeypatch):
    """With no other component busy there is no company to wait for: the mark of the command taken ahead
    is committed while the command before it runs (its fsync overlaps that exchange, as it must on an SD
    card where an fsync takes milliseconds), not when its turn comes (the company timer made 30 s here)."""
    from agent.store import group

    with slow_engine(mqtt_vehicle, sim, backend) as service:
        sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "match": "F190", "pending": 100})])  # 2 s
        worker = service.runtime.workers["engine"]
        blocker, first, second = command(), command(), command(params={"data": "oil_temp"})
        queue_behind(backend, worker, blocker, first, second)
        monkeypatch.setattr(group, "COMPANY_WAIT_S", 30.0)
        wait_for(lambda: running(worker, first))
        wait_for(lambda: service.store.get(second["id"]).state == "started")
        assert running(worker, first)  # stored while first runs
        assert backend.final(second["id"])["status"] == "completed"


def test_a_final_waiting_for_its_workers_next_mark_is_not_held_when_that_mark_was_carried_already(
        mqtt_vehicle, sim, backend, monkeypatch):
    """A final handed over with more commands queued waits for company: its worker's next start mark.
    When that mark is on the disk already (the command before it ran longer than COMPANY_WAIT_S, or
    another commit carried it), no mark of this worker comes before the next command ends, and with no
    other component busy no other commit comes either: the final is committed when the next command
    starts, not after it (the company timer made 30 s here; with the real 20 ms every final of a lone
    busy component with commands over 20 ms was 20 ms late). Found by an outside review; failed before
    the fix (the final came with the next command's end)."""
    from agent.store import group

    with slow_engine(mqtt_vehicle, sim, backend) as service:
        sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "match": "F190", "pending": 100})])  # 2 s
        worker = service.runtime.workers["engine"]
        blocker, first, second, third = command(), command(), command(), command()
        queue_behind(backend, worker, blocker, first, second, third)
        wait_for(lambda: running(worker, first))
        wait_for(lambda: service.store.get(second["id"]).state == "started")  # carried while first runs
        monkeypatch.setattr(group, "COMPANY_WAIT_S", 30.0)
        assert backend.final(first["id"], timeout=10)["status"] == "completed"
        assert running(worker, second)  # before second ends
        assert backend.final(second["id"], timeout=10)["status"] == "completed"


def test_a_command_whose_mark_ahead_is_stored_only_after_the_stop_gave_up_waiting_never_runs(
        mqtt_vehicle, sim, backend, monkeypatch):
    """The store hangs (its write lock held, as a stuck fsync holds it) while a worker waits for the mark
    of the command it took ahead, past the stop's grace: the stop queues that command again. When the
    store comes back, the mark and then the re-queue are committed, and the worker must not run the
    command, or it would run again after the restart (exactly-once). Found by an outside review."""
    import threading

    from agent.store import group

    with slow_engine(mqtt_vehicle, sim, backend, grace=0.3) as service:
        busy_elsewhere(sim, backend, service)  # so that ahead's mark waits for company, not committed at once
        store, worker = service.store, service.runtime.workers["engine"]
        blocker, first = command(), command()
        ahead = command(command="tester_present", params={})
        queue_behind(backend, worker, blocker, first, ahead)
        monkeypatch.setattr(group, "COMPANY_WAIT_S", 30.0)  # ahead's mark waits for its worker's turn
        wait_for(lambda: running(worker, first))
        wait_for(lambda: ahead["id"] in service._marked_ahead)
        store._lock.acquire()  # the store hangs from here on
        wait_for(lambda: worker.in_flight is None)  # first ended: its worker waits for ahead's mark
        released = threading.Event()

        def requeue_waits() -> bool:
            with store._waiting:
                return any("state = 'queued'" in repr(w.work) for w in store._pending)

        def release_when_the_stop_queues_it_again() -> None:
            wait_for(requeue_waits, 30)
            store._lock.release()
            released.set()

        threading.Thread(target=release_when_the_stop_queues_it_again, name="release-store", daemon=True).start()
    assert released.is_set()
    assert backend.final(first["id"])["status"] == "completed"
    assert sim.ecu("engine").server.executed[0x3E] == 0
    assert ledger_states(mqtt_vehicle, ahead["id"]) == ["queued"]


def test_a_command_marked_started_by_the_intake_that_never_ran_is_queued_again_at_a_clean_stop(
        mqtt_vehicle, sim, backend):
    """A collection reading holds the worker, which counts as idle (no command outstanding), so a read that
    arrives is marked started in the intake's commit and waits behind the reading. A clean stop before it
    runs puts it back to `queued`: it runs after the restart, not reported `interrupted` (only a crash may
    do that). Found by an outside review; failed before the fix (its final was `interrupted`)."""
    from agent.core.worker import Job
    from agent.wire.command import ReadData

    with slow_engine(mqtt_vehicle, sim, backend, grace=0.5) as service:
        worker = service.runtime.workers["engine"]
        ecu = service.config.ecu("engine")
        assert worker.offer(Job(ReadData((ecu.did_by_name("vin"),)), lambda outcome, seconds: None))
        wait_for(lambda: worker.busy_since is not None and worker.in_flight is None)  # the reading runs
        waiting = command(command="tester_present", params={})
        backend.send(waiting)
        wait_for(lambda: (e := service.store.get(waiting["id"])) is not None and e.state == "started")
        assert sim.ecu("engine").server.executed[0x3E] == 0
    assert ledger_states(mqtt_vehicle, waiting["id"]) == ["queued"]
    sim.ecu("engine").set_faults([])
    again = Service(mqtt_vehicle)
    again.start()
    try:
        assert backend.final(waiting["id"])["status"] == "completed"
        assert sim.ecu("engine").server.executed[0x3E] == 1
    finally:
        again.stop()


def test_a_final_is_not_held_when_its_workers_next_mark_is_in_a_commit_still_under_way_at_its_turn(
        mqtt_vehicle, sim, backend, monkeypatch):
    """The next command's mark ahead is committed (no other component busy: at once, by the writer
    thread), and that commit is still under way (its fsync, or its callbacks) when the command before
    it ends: its final is handed over after that commit took what waited, and the worker, at the next
    command's turn, finds the mark taken and waits for that commit instead of making its own. No mark
    of this worker comes before the next command ends, and no other component is busy: the final must
    be committed as the next command starts, not after it (the company timer made 30 s here; with the
    real 20 ms the final was 20 ms late whenever an exchange was shorter than an fsync). Found by an
    outside review; failed before the fix (the final came with the next command's end)."""
    import threading

    from agent.store import group

    with slow_engine(mqtt_vehicle, sim, backend) as service:
        sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "match": "F190", "pending": 100})])  # 2 s
        store, worker = service.store, service.runtime.workers["engine"]
        blocker, first, second = command(), command(), command()
        held, release, hurried = threading.Event(), threading.Event(), threading.Event()
        settle, hurry = store._settle, store.hurry

        def settle_slowly(writes):  # the commit carrying second's mark is not done before first ends
            if any(is_mark(w, second["id"]) for w in writes):
                held.set()
                assert release.wait(30)
            settle(writes)

        def is_mark(write, command_id):
            statements = getattr(write.work, "keywords", {}).get("statements", [])
            return [args[0] for _, args in statements] == ["started"] and command_id in repr(statements)

        def hurry_noted(write):
            try:
                return hurry(write)
            finally:
                hurried.set()

        monkeypatch.setattr(store, "_settle", settle_slowly)
        monkeypatch.setattr(store, "hurry", hurry_noted)
        queue_behind(backend, worker, blocker, first, second)
        monkeypatch.setattr(group, "COMPANY_WAIT_S", 30.0)
        assert held.wait(10)  # second's mark committed while first runs, its commit not finished
        wait_for(lambda: first["id"] in str([w.work for w in store._pending]))  # first ended: its final waits
        assert hurried.wait(10)  # second's turn: its worker found the mark taken by that commit
        release.set()
        assert backend.final(first["id"], timeout=10)["status"] == "completed"
        assert running(worker, second)  # before second ends
        assert backend.final(second["id"], timeout=10)["status"] == "completed"


def test_a_command_a_worker_takes_ahead_after_the_stop_queued_the_unrun_again_is_not_marked_started(
        mqtt_vehicle, sim, backend, monkeypatch):
    """A stop that gave up waiting for a worker queues again what was marked ahead; a worker that had
    decided to take the next command ahead just before the stop began (held here on its way to the
    mark, as a thread the scheduler leaves aside would be) must not mark it started after that: nothing
    would queue it again, it never runs (the worker is halting), and the restart would report it
    `interrupted` after a clean stop. Found by an outside review; failed before the fix (`started`)."""
    import threading

    with slow_engine(mqtt_vehicle, sim, backend, grace=0.3) as service:
        worker = service.runtime.workers["engine"]
        blocker, first, second = command(), command(), command(command="tester_present", params={})
        entered, release = threading.Event(), threading.Event()
        others_busy, requeue = service._others_busy, service._requeue_unrun

        def held_on_the_way(component):  # on the way to marking `second` ahead, as `first` starts
            if running(worker, first) and not entered.is_set():
                entered.set()
                assert release.wait(30)
            return others_busy(component)

        def requeue_then_release():
            requeue()
            release.set()
            wait_for(lambda: not worker.alive)  # it took `second` ahead, then left it unrun (halting)

        monkeypatch.setattr(service, "_others_busy", held_on_the_way)
        monkeypatch.setattr(service, "_requeue_unrun", requeue_then_release)
        queue_behind(backend, worker, blocker, first, second)
        assert entered.wait(10)
    assert release.is_set()
    assert sim.ecu("engine").server.executed[0x3E] == 0
    assert ledger_states(mqtt_vehicle, second["id"]) == ["queued"]


def test_a_command_marked_started_by_the_intake_that_the_stop_queued_again_before_its_turn_never_runs(
        mqtt_vehicle, sim, backend, monkeypatch):
    """A read marked started in the intake's commit (its worker counted as idle: a collection reading held
    it) is taken by its worker when the reading ends; the worker is held on its way to starting it (as a
    thread the scheduler leaves aside would be) while a stop gives up waiting and queues it again. It must
    not run then: the ledger says `queued`, so a crash before its final would run it again after the
    restart. Found by an outside review; failed before the fix (it ran, into the closed bus: `final`)."""
    import threading

    from agent.core.worker import Job
    from agent.wire.command import ReadData

    with slow_engine(mqtt_vehicle, sim, backend, grace=0.3) as service:
        worker = service.runtime.workers["engine"]
        entered, release = threading.Event(), threading.Event()
        on_start, requeue = worker._on_start, service._requeue_unrun

        def held_on_the_way(started):
            entered.set()
            assert release.wait(30)
            on_start(started)

        def requeue_then_release():
            requeue()
            release.set()
            wait_for(lambda: not worker.alive)

        monkeypatch.setattr(worker, "_on_start", held_on_the_way)
        monkeypatch.setattr(service, "_requeue_unrun", requeue_then_release)
        ecu = service.config.ecu("engine")
        assert worker.offer(Job(ReadData((ecu.did_by_name("vin"),)), lambda outcome, seconds: None))
        wait_for(lambda: worker.busy_since is not None and worker.in_flight is None)  # the reading runs
        waiting = command(command="tester_present", params={})
        backend.send(waiting)
        assert entered.wait(10)  # the reading ended; the worker took `waiting` and is on its way to start it
        assert waiting["id"] in service._started_at_intake
    assert release.is_set()
    assert sim.ecu("engine").server.executed[0x3E] == 0
    assert ledger_states(mqtt_vehicle, waiting["id"]) == ["queued"]
