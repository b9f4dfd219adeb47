"""SAE J2012 DTC text, ISO 14229 status bits, snapshot record parsing."""

import pytest

from agent.config.model import DidSpec
from agent.wire.dtc import STATUS_BITS, fault_dict, format_code, parse_code, split_snapshot_records, status_dict


@pytest.mark.parametrize(("dtc", "code"), [
    (0x030100, "P0301"), (0x042000, "P0420"), (0x4035FF, "C0035"), (0x9234AB, "B1234"),
    (0xC10087, "U0100"), (0xFFFF00, "U3FFF"), (0x000000, "P0000"), (0x3ABC00, "P3ABC"),
])
def test_format_code(dtc, code):
    assert format_code(dtc) == code
    assert parse_code(code) == dtc & 0xFFFF00


def test_parse_code_with_failure_type():
    assert parse_code("U0100-87") == 0xC10087
    assert parse_code("p030112") == 0x030112


@pytest.mark.parametrize("bad", ["X0301", "P4301", "P03", "P0301-1", "P0301-GG", ""])
def test_parse_code_rejects(bad):
    with pytest.raises(ValueError):
        parse_code(bad)


def test_status_bits_named_in_iso_order():
    status = status_dict(0x2F)
    assert status["raw"] == "0x2F"
    assert [status[name] for name in STATUS_BITS] == [True, True, True, True, False, True, False, False]
    assert status_dict(0x80)["warning_indicator_requested"] is True


def test_fault_dict():
    assert fault_dict(0xC10087, 0x09) == {
        "code": "U0100", "failure_type": "0x87", "dtc": "0xC10087", "status": status_dict(0x09),
    }


def test_snapshot_records_decode_known_dids_and_keep_unknown_raw():
    rpm = DidSpec("rpm", 0xF40C, "unsigned", 2, scale=0.25)
    data = bytes.fromhex("01 01 F40C 0C80".replace(" ", "")) + bytes.fromhex("02 01 1234 AABB".replace(" ", ""))
    assert split_snapshot_records(data, {0xF40C: rpm}) == [
        {"record": 1, "values": {"rpm": 800.0}},
        {"record": 2, "values": {}, "raw": "1234aabb"},
    ]


def test_snapshot_records_empty_and_truncated():
    assert split_snapshot_records(b"", {}) == []
    assert split_snapshot_records(b"\x01", {}) == [{"raw": "01"}]
