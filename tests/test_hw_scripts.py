"""The hw/ scripts as a field engineer runs them: every mistake in can-up's arguments is a usage error that
touches nothing, every run leaves the same interface state, whatever was set by hand before; vcan-up never
touches an interface that is not a vcan; and every script passes shellcheck.

This kernel has no CAN, so no CAN interface can exist here: a stand-in `ip` on PATH records what the
script asks of iproute2 (and refuses settings when told to). The script itself runs for real.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="hw/can-up checks for root before it asks ip")

FAKE_IP = """#!/bin/sh
echo "$*" >> "$IP_LOG"
case "$*" in
    *"type can"*) exit "${IP_REFUSE:-0}" ;;
esac
exit 0
"""


@pytest.fixture
def fake_ip(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ip").write_text(FAKE_IP)
    (bin_dir / "ip").chmod(0o755)
    log = tmp_path / "ip.log"
    log.touch()

    def run(*args, refuse=0):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "IP_LOG": str(log), "IP_REFUSE": str(refuse)}
        result = subprocess.run([str(ROOT / "hw/can-up"), *args], capture_output=True, text=True, env=env, timeout=30)
        return result, log.read_text().splitlines()

    return run


@needs_root
@pytest.mark.parametrize(("args", "says"), [
    (["can0", "500kbit"], "bitrate '500kbit' is not a bitrate in bit/s"),
    (["can0", "500000", "2000000"], "too many arguments"),
    (["can0", "500000", "--fd"], "--fd needs the data phase bitrate"),
    (["can0", "500000", "--fd", "fast"], "--fd 'fast' is not a bitrate"),
    (["can0", "2000000"], "above 1 Mbit/s"),
    (["--help"], "unknown option --help"),
    (["can0", "0"], "bitrate '0' is not a bitrate"),
])
def test_a_mistake_in_the_arguments_is_a_usage_error_that_touches_nothing(fake_ip, args, says):
    result, calls = fake_ip(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("usage: sudo hw/can-up [IFACE [BITRATE]] [--fd DATA_BITRATE]")
    assert says in result.stderr and result.stderr.count("\n") == 1
    assert calls == []  # the interface was never taken down


@needs_root
def test_every_run_leaves_the_same_state_whatever_was_set_before(fake_ip):
    # A listen-only trial (the README's "without ever disturbing the bus") or an earlier --fd stays set
    # unless the settings say otherwise: ip changes only the control modes it is given.
    result, calls = fake_ip("can0", "500k")
    assert result.returncode == 0, result.stderr
    assert calls[1:3] == ["link set can0 down",
                          "link set can0 type can bitrate 500000 restart-ms 100 fd off listen-only off"]
    assert calls[-2:] == ["link set can0 up", "-details link show can0"]
    result, calls = fake_ip("can0", "500000", "--fd", "2M")
    assert result.returncode == 0, result.stderr
    assert "link set can0 type can bitrate 500000 restart-ms 100 dbitrate 2000000 fd on listen-only off" in calls
    result, calls = fake_ip()
    assert "link set can0 type can bitrate 500000 restart-ms 100 fd off listen-only off" in calls


@needs_root
def test_settings_the_controller_refuses_leave_the_bus_up_as_it_was(fake_ip):
    result, calls = fake_ip("can0", "125000", refuse=2)
    assert result.returncode == 1
    assert calls[-1] == "link set can0 up"
    assert "can-up: can0 refused bitrate 125000" in result.stderr and "up again" in result.stderr


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) runs it as another user")
def test_without_root_it_says_so_with_77():
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             str(ROOT / "hw/can-up"), "can0", "500000"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 77 and result.stderr == "can-up: needs root: sudo hw/can-up can0 500000\n"


@needs_root
def test_vcan_up_leaves_an_interface_that_is_not_a_vcan_alone():
    # `sudo hw/vcan-up lo` (or eth0, or can0: a typo for can-up) set that interface's MTU to 72 where the kernel
    # has vcan: the loopback or the SSH session's link cut to 72 bytes. It is refused before anything is
    # looked up or loaded, so this runs on this kernel without vcan too.
    mtu = (Path("/sys/class/net/lo/mtu")).read_text()
    result = subprocess.run([str(ROOT / "hw/vcan-up"), "lo"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr == ("vcan-up: lo exists and is not a vcan interface; nothing changed "
                             "(a free name: sudo hw/vcan-up vcan0)\n")
    assert Path("/sys/class/net/lo/mtu").read_text() == mtu


SCRIPTS = ["hw/can-up", "hw/vcan-up", "hw/install", "hw/dev-setup", "tests/vm/run-vcan-suite", ".ci/run"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (hw/dev-setup --tests)")
def test_the_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", *SCRIPTS], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
