"""Choosing the ISO-TP transport: kernel sockets on socketcan when the kernel has them, else userspace."""

import socket

import pytest

from agent.bus.kernel_isotp import kernel_isotp_available
from agent.config.model import BusConfig
from agent.core.runtime import choose_transport


def kernel_can_open_isotp():
    try:
        socket.socket(socket.AF_CAN, socket.SOCK_DGRAM, socket.CAN_ISOTP).close()
        return True
    except (OSError, AttributeError):
        return False


def test_detection_matches_what_the_kernel_can_open():
    assert kernel_isotp_available() is kernel_can_open_isotp()


@pytest.mark.parametrize(("interface", "isotp", "expected"), [
    ("virtual", "auto", "userspace"),
    ("socketcand", "auto", "userspace"),
    ("socketcan", "userspace", "userspace"),
    ("socketcan", "kernel", "kernel"),
])
def test_explicit_choices(interface, isotp, expected):
    assert choose_transport(BusConfig(interface=interface, channel="x", isotp=isotp)) == expected


def test_auto_on_socketcan_follows_the_kernel():
    expected = "kernel" if kernel_can_open_isotp() else "userspace"
    assert choose_transport(BusConfig(interface="socketcan", channel="can0")) == expected


def test_kernel_max_pdu_from_the_module_parameter(tmp_path):
    from agent.bus.kernel_isotp import kernel_isotp_max_pdu

    parameter = tmp_path / "max_pdu_size"
    assert kernel_isotp_max_pdu(parameter) == 4095  # older kernels have no parameter: 4095
    parameter.write_text("8300\n")
    assert kernel_isotp_max_pdu(parameter) == 8300
