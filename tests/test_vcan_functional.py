"""The SocketCAN lane's functional-addressing test (see test_vcan.py), in a module of its own: its agent
must be the only one on vcan0 (with kernel ISO-TP, another agent's bound sockets would send flow control
too), and its first functional command must come before any physical one. test_vcan.py's shared agents
have stopped with their module before this one runs."""

import uuid

import pytest
from test_vcan import _backend_of, _start_agent, call, pytestmark, simulator  # noqa: F401 (fixture, marks)


@pytest.fixture(params=["kernel", "userspace"])
def fresh_agent(request, tmp_path, broker, simulator):  # noqa: F811 (the fixture imported above)
    """An agent of the test's own, for a test about what happens before any physical command."""
    process, port, vehicle = _start_agent(request.param, tmp_path, broker)
    yield from _backend_of(process, port, vehicle, broker)
    assert process.terminate(60) == 0
    process.ensure_stopped()


def test_functional_multi_frame_answers_over_socketcan(fresh_agent):
    """The 20-byte VIN answer to a functional read is multi-frame. With kernel ISO-TP the engine's
    CAN_ISOTP socket, once bound by a physical command, sends the flow control itself and the functional
    collector only listens; before that (and on the userspace path) the collector sends it. Each
    functional command after the first used to time out (every frame reached the collector twice). A fresh
    agent: its first functional command must come before any physical one."""
    _, backend, _ = fresh_agent
    for physical_before in (False, True, False):
        if physical_before:
            assert call(backend, "engine", "read_data", {"data": "vin"})["status"] == "completed"
        body = {"id": f"v-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "read_data",
                "params": {"data": "vin"}, "addressing": "functional"}
        backend.send(body)
        final = backend.final(body["id"], timeout=60)
        assert final["status"] == "completed", final
        assert final["result"] == {"responses": {"engine": {"values": {"vin": "VCAN0DEVVEHICLE01"}}}}
