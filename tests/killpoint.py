"""`python -m agent run` with a SIGKILL aimed at one durable step: the process kills itself there.

Usage: python tests/killpoint.py POINT COMMAND_ID run -c ... (the rest as for `python -m agent`).

A SIGKILL sent from outside cannot be aimed at the moment between two writes; here the daemon sends it
to itself at the named step, for the command whose id is COMMAND_ID, and for nothing else. Nothing is
mocked: the wrapped methods run unchanged up to the kill, and the kill is a real SIGKILL (no atexit, no
finally, no flush: the OS page cache keeps what was written, exactly as after `kill -9`).

Points (the order a command goes through; agent/store/sqlite.py says why each write comes before the next):
  intake_committed   the command's ledger row is committed; its PUBACK not yet sent
  marked_started     its start mark (and audit record) committed; its first request not yet sent to the ECU
  ecu_answered       the ECU answered; the final response not yet stored
  final_stored       the final response committed to the outbox; not yet published
  final_published    the final response published and PUBACKed by the broker; its outbox row not yet deleted
  collection_write   inside the transaction queueing a telemetry batch, before its COMMIT (any batch)
  commit_round       right after the store's Nth commit round since the broker connection came up
                     (COMMAND_ID is N), whatever it carried
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

POINTS = ("intake_committed", "marked_started", "ecu_answered", "final_stored", "final_published",
          "collection_write", "commit_round")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def final_of(payload: bytes, command_id: str) -> bool:
    return f'"id":"{command_id}"'.encode() in payload and b'"final":true' in payload


def install(point: str, command_id: str) -> None:
    if point == "intake_committed":
        from agent.fleet.intake import Intake

        record = Intake._record

        def _record(self: Intake, decisions: list[Any]) -> None:
            record(self, decisions)
            if any(command_id.encode() in d.item.payload for d in decisions):
                die()

        Intake._record = _record  # type: ignore[method-assign]
    elif point == "marked_started":
        from agent.system.startmarks import StartMarks

        on_start = StartMarks._on_start

        def _on_start(self: StartMarks, command: Any) -> None:
            on_start(self, command)
            if command.id == command_id:
                die()

        StartMarks._on_start = _on_start  # type: ignore[method-assign]
    elif point == "ecu_answered":
        from agent.system.finals import Finals

        finish = Finals._finish

        def _finish(self: Finals, entry: Any, result: Any) -> None:
            if entry.id == command_id:
                die()
            finish(self, entry, result)

        Finals._finish = _finish  # type: ignore[method-assign]
    elif point == "final_stored":
        from agent.fleet.link import MqttLink

        publish = MqttLink.publish

        def _publish(self: MqttLink, message: Any, on_mid: Any = None) -> int | None:
            if final_of(message.payload, command_id):
                die()
            return publish(self, message, on_mid)

        MqttLink.publish = _publish  # type: ignore[method-assign]
    elif point == "final_published":
        from agent.store.sqlite import Store

        acknowledge = Store.acknowledge

        def _acknowledge(self: Store, numbers: list[int]) -> None:
            for row in self.pending(min(numbers, default=1) - 1, len(numbers) + 1000):
                if row.n in numbers and final_of(row.message.payload, command_id):
                    die()
            acknowledge(self, numbers)

        Store.acknowledge = _acknowledge  # type: ignore[method-assign]
    elif point == "collection_write":
        from agent.store import writer

        one = writer._one_transaction

        def _one_transaction(db: Any, synchronous: Any, writes: list[Any]) -> list[Any]:
            if any(w.operation == "queue telemetry" for w in writes):
                original = db.execute

                class Dying:  # the transaction's statements run; COMMIT is where the process dies
                    def __getattr__(self, name: str) -> Any:
                        return getattr(db, name)

                    def execute(self, sql: str, *args: Any) -> Any:
                        if sql == "COMMIT":
                            die()
                        return original(sql, *args)

                return one(Dying(), synchronous, writes)
            return one(db, synchronous, writes)

        writer._one_transaction = _one_transaction  # type: ignore[assignment]
    elif point == "commit_round":  # COMMAND_ID is N: right after the Nth commit round once connected
        from agent.fleet.link import MqttLink
        from agent.store.group import GroupCommit

        commit_round = GroupCommit._commit_round
        set_connected = MqttLink._set_connected
        rounds = [0]
        connected = [False]

        def _set_connected(self: MqttLink, up: bool) -> None:
            set_connected(self, up)
            connected[0] = connected[0] or up

        def _commit_round(self: GroupCommit) -> list[Any]:
            done = commit_round(self)
            if done and connected[0]:
                rounds[0] += 1
                if rounds[0] == int(command_id):
                    die()
            return done

        GroupCommit._commit_round = _commit_round  # type: ignore[method-assign]
        MqttLink._set_connected = _set_connected  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown kill point {point!r}: one of {', '.join(POINTS)}")


if __name__ == "__main__":
    install(sys.argv[1], sys.argv[2])
    from agent.cli import main

    sys.exit(main(sys.argv[3:]))
