"""Start marks: a command is marked `started` in the ledger before it runs (by the intake's commit, at its
turn, or ahead of its turn while the command before it runs), and a clean stop queues again what was marked
(by the intake or ahead) but never ran. Part of `Service` (it inherits this and owns the store, audit trail
and intake these use, and the two id sets, their lock and the `_requeued` flag in its constructor); kept
apart because the started mark is what restart recovery trusts, and it deserves one place.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.core.worker import StartNotRecordedError, TakenBackError
from agent.policy.mutating import is_mutating
from agent.store.sqlite import StoreError
from agent.system.audit import AuditUnavailableError
from agent.wire.command import Command

if TYPE_CHECKING:
    from agent.core.runtime import Runtime
    from agent.fleet.intake import Intake
    from agent.store.sqlite import Store
    from agent.system.audit import AuditTrail

log = logging.getLogger(__name__)


class StartMarks:
    """The runtime's on_start and on_ahead hooks, and the stop's undoing of marks ahead."""

    # what Service owns and these methods use (set in its constructor)
    store: Store
    audit: AuditTrail
    intake: Intake
    runtime: Runtime
    _started_at_intake: set[str]
    _marked_ahead: set[str]
    _marks_lock: threading.Lock
    _requeued: bool

    def _on_start(self, command: Command) -> None:
        """Marks the command started before it runs (unless the intake's commit did); a StoreError here
        keeps it from running at all, and so does a stop that gave up waiting for its worker and queued
        the unrun again (TakenBackError: the worker neither runs nor answers it; it runs after the restart)."""
        with self._marks_lock:
            if self._requeued:
                raise TakenBackError(command.id)
            at_intake = command.id in self._started_at_intake
            self._started_at_intake.discard(command.id)
        if at_intake:
            self.intake.room()
            return
        batch = self.store.batch()
        try:
            self.audit.started(command, batch)  # a mutating command's record is on the disk before it runs
            batch.set_state(command.id, "started")
            batch.commit()
        except (StoreError, AuditUnavailableError) as err:  # the disk: "not now"; anything else is a bug
            raise StartNotRecordedError(str(err)) from err
        self.intake.room()  # its place in the queue is free: a waiting command may take it

    def _mark_ahead(self, command: Command) -> Callable[[], BaseException | None] | None:
        """A worker took `command` ahead of its turn: while another component is busy, its start mark
        waits for a commit made meanwhile to carry it, and the returned wait commits it if none did;
        otherwise it is committed at once, its fsync overlapping the exchange of the command before it
        (store docstring: a crash before it runs reports it `interrupted`). Not for a mutating command
        (its audit record is written when it starts) nor one whose mark the intake wrote."""
        if is_mutating(command.command) or command.id in self._started_at_intake:
            return None
        stored = threading.Event()
        outcome: list[BaseException | None] = []

        def done(error: BaseException | None) -> None:
            outcome.append(error)
            stored.set()

        batch = self.store.batch()
        batch.set_state(command.id, "started")
        company = self._others_busy(command.component)
        with self._marks_lock:
            if self._requeued:  # a stop that gave up waiting for this worker queued the unrun again already:
                return lambda: TakenBackError(command.id)  # nothing would queue it again, and it is not to run
            try:
                write = batch.commit_later(done, company=company)
            except StoreError:  # the store is closing: marked in its turn, or not run
                return None
            self._marked_ahead.add(command.id)
        self.intake.room()  # its place in the queue is free

        def wait() -> BaseException | None:
            # no other commit carried it meanwhile: commit it now, with what waits (the final before it)
            hurried = write is not None and not stored.is_set() and self.store.hurry(write)
            if not hurried and not self._others_busy(command.component):
                # carried already, or by a commit still under way when the command before it ended (its
                # final was handed over after that commit began), and no other component's commit is
                # coming: that final, waiting for this mark's company, is committed now, not after
                # COMPANY_WAIT_S
                self.store.soon()
            stored.wait()
            with self._marks_lock:  # a stop that gave up waiting may have queued it again meanwhile
                if command.id not in self._marked_ahead:
                    return TakenBackError(command.id)
                self._marked_ahead.discard(command.id)  # from here on it runs: a stop leaves it alone
            error = outcome[0]
            return StartNotRecordedError(str(error)) if isinstance(error, StoreError) else error

        return wait

    def _others_busy(self, component: str) -> bool:
        """A worker other than `component`'s has commands to run: its commits are company to wait for."""
        return any(not worker.idle for name, worker in self.runtime.workers.items() if name != component)

    def _requeue_unrun(self) -> None:
        """A clean stop: commands marked started that never ran — ahead of their turn, or by the intake's
        commit while a collection reading held their worker — are queued again: they run after the restart,
        like any other queued command, instead of being reported `interrupted` (only a crash may do that).
        Call once the workers have stopped, or gave up waiting for them: a command that started running
        has left both sets, and one whose mark ahead is still being stored will not run (`TakenBackError`)."""
        with self._marks_lock:
            self._requeued = True  # a worker the stop gave up waiting for starts nothing from here on
            ids = sorted(self._marked_ahead | self._started_at_intake)
            self._marked_ahead.clear()
            self._started_at_intake.clear()
        if not ids:
            return
        batch = self.store.batch()
        for command_id in ids:
            batch.requeue(command_id)
        try:
            batch.commit(defer=True)
        except StoreError as err:
            log.error("commands marked started that never ran could not be queued again (%s): they are "
                      "reported interrupted after the restart", err, extra={"ids": ids})
