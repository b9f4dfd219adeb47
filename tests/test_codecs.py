"""DID codecs, byte for byte."""

import pytest

from agent.config.model import DidSpec
from agent.wire import codecs

VIN = DidSpec("vin", 0xF190, "ascii", 17)
RPM = DidSpec("rpm", 0xF40C, "unsigned", 2, scale=0.25, unit="rpm")
TEMP = DidSpec("temp", 0xF405, "unsigned", 1, offset=-40)
SIGNED = DidSpec("torque", 0x1000, "signed", 2)
GEAR = DidSpec("gear", 0x1A00, "enum", 1, enum=((0, "park"), (3, "drive")))
RAW = DidSpec("blob", 0x0200, "raw", 4)


@pytest.mark.parametrize(("spec", "payload", "value"), [
    (VIN, b"WVWZZZ1JZXW000001", "WVWZZZ1JZXW000001"),
    (RPM, bytes.fromhex("0BB8"), 750.0),
    (TEMP, bytes([90]), 50.0),
    (SIGNED, bytes.fromhex("FF9C"), -100),
    (GEAR, bytes([3]), "drive"),
    (GEAR, bytes([7]), 7),
    (RAW, bytes.fromhex("DEADBEEF"), {"raw": "deadbeef"}),
])
def test_decode(spec, payload, value):
    assert codecs.decode(spec, payload) == value


def test_ascii_strips_nul_padding():
    assert codecs.decode(DidSpec("sn", 1, "ascii", 6), b"AB12\x00\x00") == "AB12"


def test_wrong_length_gives_raw_and_reason():
    assert codecs.decode(RPM, b"\x01") == {"raw": "01", "error": "expected 2 bytes, got 1"}


@pytest.mark.parametrize(("spec", "value", "payload"), [
    (RPM, 750, bytes.fromhex("0BB8")),
    (TEMP, 50, bytes([90])),
    (SIGNED, -100, bytes.fromhex("FF9C")),
    (GEAR, "drive", bytes([3])),
    (GEAR, 0, bytes([0])),
    (RAW, "deadbeef", bytes.fromhex("DEADBEEF")),
    (DidSpec("sn", 1, "ascii", 6), "AB", b"AB    "),
])
def test_encode(spec, value, payload):
    assert codecs.encode(spec, value) == payload


@pytest.mark.parametrize(("spec", "value", "message"), [
    (RPM, 20000, "outside 0..16383.8"),
    (RPM, "fast", "expected a number"),
    (RPM, True, "expected a number"),
    (SIGNED, 40000, "outside -32768..32767"),
    (GEAR, "reverse", "expected one of drive, park"),
    (RAW, "dead", "expected 4 bytes, got 2"),
    (RAW, "xyz", "hex string"),
    (VIN, "X" * 18, "at most 17 characters"),
    (VIN, "Ünïcode", "ASCII"),
])
def test_encode_rejects(spec, value, message):
    with pytest.raises(ValueError, match=message):
        codecs.encode(spec, value)


def test_udsoncan_codec_reports_length_or_reads_all():
    import udsoncan

    assert len(codecs.UdsoncanCodec(VIN)) == 17
    with pytest.raises(udsoncan.DidCodec.ReadAllRemainingData):
        len(codecs.UdsoncanCodec(codecs.anonymous(0x1234)))
    assert codecs.anonymous(0x1234).name == "0x1234"
