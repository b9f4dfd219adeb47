"""Parsing recorded `ip -details -statistics -json link show` outputs for every CAN state and iproute2 quirk."""

import pytest
from conftest import DATA

from agent.bus.canstate import bus_load, frame_bits, parse_ip_link

REC = DATA / "iproute2"


@pytest.mark.parametrize(("file", "state", "tec", "rec", "bus_off"), [
    ("error-active.json", "error-active", 0, 0, 0),
    ("error-warning.json", "error-warning", 96, 12, 0),
    ("error-passive.json", "error-passive", 136, 0, 0),
    ("bus-off.json", "bus-off", 248, 0, 3),
    ("stopped.json", "stopped", 0, 0, 0),
    ("old-iproute2-numeric-sample-point.json", "error-active", 0, 0, 0),
    ("old-iproute2-stats.json", "error-active", 0, 0, 0),
])
def test_states(file, state, tec, rec, bus_off):
    link = parse_ip_link((REC / file).read_text(), "can0")
    assert (link.state, link.tx_errors, link.rx_errors, link.bus_off) == (state, tec, rec, bus_off)
    assert link.bitrate == 500000 and link.sample_point == 0.875 and link.kind == "can"
    assert (link.rx_frames, link.tx_frames, link.rx_bytes, link.tx_bytes) == (10154, 5025, 81234, 40200)


def test_bus_off_restarts_and_up_flag():
    link = parse_ip_link((REC / "bus-off.json").read_text(), "can0")
    assert link.restarts == 2 and link.up
    assert not parse_ip_link((REC / "stopped.json").read_text(), "can0").up


def test_driver_without_error_counters():
    link = parse_ip_link((REC / "no-berr-counter.json").read_text(), "can0")
    assert link.state == "error-active" and link.tx_errors is None and link.rx_errors is None and link.restarts == 0


def test_vcan_has_no_controller_state():
    link = parse_ip_link((REC / "vcan.json").read_text(), "vcan0")
    assert (link.kind, link.state, link.up, link.bitrate, link.tx_frames) == ("vcan", "unknown", True, None, 16)


@pytest.mark.parametrize("text", ["", "not json", "[]", '[{"ifname": "can1"}]'])
def test_garbage_or_missing_interface(text):
    with pytest.raises(ValueError):
        parse_ip_link(text, "can0")


def test_bus_load_estimate():
    # 1000 frames of 8 bytes in one second on 500 kbit/s: (47 + 64) * 1.1 bits each -> about 24 %
    assert bus_load(frame_bits(1000, 8000), 1.0, 500_000) == pytest.approx(0.2442)
    assert bus_load(frame_bits(10**6, 8 * 10**6), 1.0, 500_000) == 1.0
    assert bus_load(100, 0, 500_000) == 0.0


def test_a_vcan_that_is_down_is_stopped():
    import json

    link = json.loads((REC / "vcan.json").read_text())
    link[0]["flags"] = ["NOARP"]
    link[0]["operstate"] = "DOWN"
    assert parse_ip_link(json.dumps(link), "vcan0").state == "stopped"
