"""OBD-II decoding against the SAE J1979 formulas, with known byte vectors; requests and response splitting."""

import pytest

from agent.wire import obd

# (PID, data bytes, J1979 formula over the bytes A, B, C, D as the standard writes it, unit)
J1979 = [
    (0x04, "80", lambda a: a * 100 / 255, "%"),
    (0x04, "FF", lambda a: a * 100 / 255, "%"),
    (0x05, "7B", lambda a: a - 40, "degC"),
    (0x05, "00", lambda a: a - 40, "degC"),
    (0x06, "80", lambda a: a * 100 / 128 - 100, "%"),
    (0x07, "00", lambda a: a * 100 / 128 - 100, "%"),
    (0x08, "FF", lambda a: a * 100 / 128 - 100, "%"),
    (0x09, "8C", lambda a: a * 100 / 128 - 100, "%"),
    (0x0A, "64", lambda a: 3 * a, "kPa"),
    (0x0B, "21", lambda a: a, "kPa"),
    (0x0C, "1AF8", lambda a, b: (256 * a + b) / 4, "rpm"),
    (0x0C, "FFFF", lambda a, b: (256 * a + b) / 4, "rpm"),
    (0x0D, "32", lambda a: a, "km/h"),
    (0x0E, "8E", lambda a: a / 2 - 64, "deg"),
    (0x0F, "46", lambda a: a - 40, "degC"),
    (0x10, "0191", lambda a, b: (256 * a + b) / 100, "g/s"),
    (0x11, "33", lambda a: a * 100 / 255, "%"),
    (0x1F, "0E10", lambda a, b: 256 * a + b, "s"),
    (0x21, "0005", lambda a, b: 256 * a + b, "km"),
    (0x22, "0100", lambda a, b: 0.079 * (256 * a + b), "kPa"),
    (0x23, "01F4", lambda a, b: 10 * (256 * a + b), "kPa"),
    (0x2C, "1A", lambda a: a * 100 / 255, "%"),
    (0x2D, "90", lambda a: a * 100 / 128 - 100, "%"),
    (0x2F, "C0", lambda a: a * 100 / 255, "%"),
    (0x30, "0C", lambda a: a, "count"),
    (0x31, "04D2", lambda a, b: 256 * a + b, "km"),
    (0x33, "65", lambda a: a, "kPa"),
    (0x3C, "1234", lambda a, b: (256 * a + b) / 10 - 40, "degC"),
    (0x42, "3A98", lambda a, b: (256 * a + b) / 1000, "V"),
    (0x43, "00C8", lambda a, b: (256 * a + b) * 100 / 255, "%"),
    (0x44, "8000", lambda a, b: 2 / 65536 * (256 * a + b), "ratio"),
    (0x45, "10", lambda a: a * 100 / 255, "%"),
    (0x46, "3C", lambda a: a - 40, "degC"),
    (0x49, "2A", lambda a: a * 100 / 255, "%"),
    (0x4C, "7F", lambda a: a * 100 / 255, "%"),
    (0x4D, "003C", lambda a, b: 256 * a + b, "min"),
    (0x4E, "0100", lambda a, b: 256 * a + b, "min"),
    (0x52, "19", lambda a: a * 100 / 255, "%"),
    (0x59, "0102", lambda a, b: 10 * (256 * a + b), "kPa"),
    (0x5A, "4D", lambda a: a * 100 / 255, "%"),
    (0x5B, "E6", lambda a: a * 100 / 255, "%"),
    (0x5C, "82", lambda a: a - 40, "degC"),
    (0x5D, "6900", lambda a, b: (256 * a + b) / 128 - 210, "deg"),
    (0x5E, "0064", lambda a, b: (256 * a + b) / 20, "L/h"),
    (0x61, "96", lambda a: a - 125, "%"),
    (0x62, "7D", lambda a: a - 125, "%"),
    (0x63, "0190", lambda a, b: 256 * a + b, "Nm"),
    (0xA6, "0001E240", lambda a, b, c, d: (a * 2**24 + b * 2**16 + c * 2**8 + d) / 10, "km"),
]


@pytest.mark.parametrize(("pid", "data", "formula", "unit"), J1979, ids=[f"{p:02X}-{d}" for p, d, _, _ in J1979])
def test_linear_pids_follow_the_j1979_formula(pid, data, formula, unit):
    raw = bytes.fromhex(data)
    entry = obd.pid_value(pid, raw)
    assert entry["value"] == pytest.approx(formula(*raw), abs=1e-6)
    assert entry["unit"] == unit and entry["pid"] == f"0x{pid:02X}"


def test_the_table_covers_the_common_pids_by_name():
    names = {"engine_speed", "vehicle_speed", "coolant_temperature", "engine_load", "fuel_level",
             "throttle_position", "maf_air_flow", "intake_air_temperature", "control_module_voltage",
             "intake_manifold_pressure", "timing_advance", "run_time", "barometric_pressure",
             "ambient_air_temperature", "engine_oil_temperature", "engine_fuel_rate", "odometer",
             "short_term_fuel_trim_bank1", "long_term_fuel_trim_bank1", "fuel_pressure", "distance_with_mil",
             "distance_since_clear", "commanded_egr", "absolute_load", "accelerator_pedal_position_d",
             "fuel_type", "obd_standard", "monitor_status", "fuel_system_status"}
    assert names <= set(obd.PIDS_BY_NAME)
    decoded = [p for p in obd.PIDS.values() if p.kind != "bitmap"]
    assert len(decoded) >= 25
    assert len({p.name for p in obd.PIDS.values()}) == len(obd.PIDS)  # names are unique


def test_round_trip_of_every_linear_pid_through_the_simulators_encoder():
    for spec in obd.PIDS.values():
        if spec.kind != "linear":
            continue
        for raw in (0, 1, (1 << (8 * spec.length)) - 1):
            data = raw.to_bytes(spec.length, "big")
            assert obd.encode_pid(spec.pid, obd.decode_pid(spec.pid, data)) == data, spec.name


def test_supported_bitmaps():
    # J1979 example: 0xBE1FA813 from PID 0x00 lists 01 03 04 05 06 07 0C 0D 0E 0F 10 11 13 15 1C 1F 20
    assert obd.decode_pid(0x00, bytes.fromhex("BE1FA813")) == [
        0x01, 0x03, 0x04, 0x05, 0x06, 0x07, 0x0C, 0x0D, 0x0E, 0x0F, 0x10, 0x11, 0x13, 0x15, 0x1C, 0x1F, 0x20]
    assert obd.supported_from_bitmap(0x20, bytes.fromhex("80000001")) == [0x21, 0x40]
    assert obd.bitmap_for(0x00, {0x01, 0x0C, 0x20, 0x21}) == bytes.fromhex("80100001")
    assert obd.bitmap_for(0x20, {0x01, 0x21}) == bytes.fromhex("80000000")


def test_enums_monitor_status_and_fuel_system():
    assert obd.decode_pid(0x51, b"\x04") == "diesel"
    assert obd.decode_pid(0x1C, b"\x06") == "EOBD"
    assert obd.decode_pid(0x1C, b"\xfe") == 0xFE  # unknown values stay numbers
    assert obd.decode_pid(0x01, bytes.fromhex("83076504")) == {"mil": True, "dtc_count": 3, "ignition": "spark"}
    assert obd.decode_pid(0x01, bytes.fromhex("00080000"))["ignition"] == "compression"
    assert obd.decode_pid(0x03, bytes.fromhex("0200")) == {"system_1": "closed_loop", "system_2": "off"}
    assert obd.decode_pid(0x03, bytes.fromhex("0203")) == {"system_1": "closed_loop", "system_2": "0x03"}


def test_requests_and_multi_pid_responses_split_by_length():
    assert obd.pid_request([0x0C, 0x0D, 0x05]) == bytes.fromhex("010C0D05")
    split = obd.split_pid_response(bytes.fromhex("410C1AF80D32057B"), [0x0C, 0x0D, 0x05, 0x11])
    assert split == {0x0C: bytes.fromhex("1AF8"), 0x0D: b"\x32", 0x05: b"\x7b"}  # 0x11 left out: unsupported
    assert obd.split_pid_response(bytes.fromhex("419D0102"), [0x9D]) == {0x9D: b"\x01\x02"}
    assert obd.decode_pid(0x9D, b"\x01\x02") == {"raw": "0102"}
    with pytest.raises(ValueError, match="1 to 6"):
        obd.pid_request([1, 2, 3, 4, 5, 6, 7])
    with pytest.raises(ValueError, match="alone"):
        obd.pid_request([0x0C, 0x9D])


@pytest.mark.parametrize(("response", "why"), [
    ("410D", "truncated"),
    ("410C1A", "truncated"),
    ("41050A", "not asked"),
    ("410D320D33", "not asked"),
    ("420D32", "not a service 0x01"),
    ("", "not a service 0x01"),
])
def test_responses_that_cannot_belong_to_the_request(response, why):
    with pytest.raises(obd.ObdResponseError, match=why):
        obd.split_pid_response(bytes.fromhex(response), [0x0C, 0x0D])


def test_vehicle_information():
    vin = b"1G1JC5444R7252367"
    assert obd.decode_info("vin", bytes.fromhex("490201") + vin) == vin.decode()
    assert obd.decode_info("vin", bytes.fromhex("4902") + vin) == vin.decode()  # without the item count
    cal = bytes.fromhex("490402") + b"JMB*36761500\0\0\0\0" + b"JMB*47872611\0\0\0\0"
    assert obd.decode_info("calibration_ids", cal) == ["JMB*36761500", "JMB*47872611"]
    assert obd.decode_info("cvns", bytes.fromhex("49060217917BC01A2B3C4D")) == ["17917BC0", "1A2B3C4D"]
    assert obd.decode_info("ecu_name", bytes.fromhex("490A01") + b"ECM\0-EngineControl\0\0") == "ECM\x00-EngineControl"
    assert obd.decode_info("supported_info", bytes.fromhex("490054400000")) == [0x02, 0x04, 0x06, 0x0A]
    for bad in ("490301" + vin.hex(), "4902", "490202" + vin.hex(), "4904" + "00" * 5):
        with pytest.raises(obd.ObdResponseError):
            obd.decode_info("vin" if bad.startswith(("4902", "4903")) else "calibration_ids", bytes.fromhex(bad))


def test_dtc_lists_as_j2012_codes():
    # ISO 15765-4: count byte first; codes P0133, C0300, B1234, U0100; 0x0000 is padding
    response = bytes.fromhex("4305" "0133" "4300" "9234" "C100" "0000")
    codes = obd.decode_dtcs(0x03, response)
    assert [obd.dtc_entry(c)["code"] for c in codes] == ["P0133", "C0300", "B1234", "U0100"]
    assert obd.dtc_entry(0x0301) == {"code": "P0301", "dtc": "0x0301"}
    assert obd.decode_dtcs(0x07, bytes.fromhex("4700")) == []
    assert obd.decode_dtcs(0x0A, bytes.fromhex("4A0420")) == [0x0420]  # without a count byte
    with pytest.raises(obd.ObdResponseError):
        obd.decode_dtcs(0x03, bytes.fromhex("4701330420"))
    with pytest.raises(obd.ObdResponseError):
        obd.decode_dtcs(0x03, bytes.fromhex("43030133"))


def test_lookup_by_name_or_number():
    assert obd.lookup_pid("engine_speed").pid == 0x0C
    assert obd.lookup_pid("0x0d").name == "vehicle_speed"
    assert obd.lookup_pid("0x9D") == 0x9D
    for bad in ("0x100", "0xZZ", "warp_speed"):
        with pytest.raises(ValueError):
            obd.lookup_pid(bad)
