"""A bug on a command's path still ends it with one final `failed`/`internal`, an ERROR log line and a
metric, never with silence until the next restart reports it `interrupted`. The agent on a real
Mosquitto and the simulated vehicle; the bugs are injected (monkeypatch: none is known to exist)."""

import logging
import uuid

from agent.system import finals as finals_module
from agent.wire.command import Status


def command(component="engine"):
    return {"id": f"ie-{uuid.uuid4().hex[:10]}", "component": component, "command": "read_data",
            "params": {"data": "vin"}}


def test_an_executor_that_raises_ends_the_command_failed_internal_and_the_worker_goes_on(service, backend, caplog):
    """Once, the worker logged the exception and went on: the command stayed `started`, with no final."""
    worker = service.runtime.workers["engine"]
    execute = worker.executor.execute

    def broken(*args, **kwargs):
        worker.executor.execute = execute
        raise KeyError("a bug")

    worker.executor.execute = broken
    first, second = command(), command()
    backend.send(first)
    final = backend.final(first["id"], timeout=15)
    assert (final["status"], final["error"]["code"]) == ("failed", "internal")
    assert final["seq"] == 2 and service.store.get(first["id"]).state == "final"
    backend.send(second)
    assert backend.final(second["id"], timeout=15)["status"] == "completed"
    assert [r for r in caplog.records if r.levelno == logging.ERROR and "executing" in r.getMessage()]


def test_a_final_that_cannot_be_built_is_answered_failed_internal_once(service, backend, monkeypatch, caplog):
    """The response for this result raises while it is built (as an encoder bug would): the command is
    answered failed/internal, counted, logged; the same id sent again gets that final, not a second run."""
    build = finals_module.response_message
    broken_id = command()

    def response_message(result, seq):
        if result.command_id == broken_id["id"] and result.status is Status.COMPLETED:
            raise ValueError("a bug")
        return build(result, seq=seq)

    monkeypatch.setattr(finals_module, "response_message", response_message)
    backend.send(broken_id)
    final = backend.final(broken_id["id"], timeout=15)
    assert (final["status"], final["error"]["code"]) == ("failed", "internal")
    assert service.registry.get_sample_value("sovd_finish_errors_total") == 1
    assert [r for r in caplog.records if r.levelno == logging.ERROR and "building the final" in r.getMessage()]
    backend.send(broken_id)
    again = backend.wait_for(lambda s: s.topic == backend.topics.responses(broken_id["id"])
                             and s.json().get("duplicate") is True, 15)[0].json()
    assert (again["status"], again["seq"]) == ("failed", final["seq"])
    assert service.runtime.workers["engine"].executor is not None
    assert sum(1 for s in backend.replies(broken_id["id"]) if s["final"] and not s.get("duplicate")) == 1


def test_a_bug_recording_a_start_is_failed_internal_not_a_full_disk(service, backend, caplog):
    """The start hook's exceptions were all answered `storage_unavailable` (transient: forgotten, "send it
    again later") and logged without a traceback, so a bug there looked like a full disk. Only the store's
    and the audit log's failures are "not now"; a bug is failed/internal, logged with its traceback."""
    worker = service.runtime.workers["engine"]
    on_start = worker._on_start

    def broken(command):
        worker._on_start = on_start
        raise AttributeError("a bug")

    worker._on_start = broken
    first, second = command(), command()
    with caplog.at_level(logging.ERROR):
        backend.send(first)
        final = backend.final(first["id"], timeout=15)
    assert (final["status"], final["error"]["code"]) == ("failed", "internal"), final
    assert service.store.get(first["id"]).state == "final"  # remembered: not a "send it again" refusal
    logged = [r for r in caplog.records if "recording the start" in r.getMessage()]
    assert logged and logged[0].exc_info[0] is AttributeError
    backend.send(second)
    assert backend.final(second["id"], timeout=15)["status"] == "completed"
