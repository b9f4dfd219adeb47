"""`sovd-edge import-odx` on odxtools' published example (somersault.pdx, real ODX nobody here wrote) and on
a small PDX this test writes with odxtools' own API for what the example lacks (16-bit DIDs, routines,
security levels, DTC texts): the output validates, and the agent's codec and odxtools decode the same
bytes to the same value."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

odxtools = pytest.importorskip("odxtools")

from odxtools.compumethods.compuinternaltophys import CompuInternalToPhys  # noqa: E402
from odxtools.compumethods.compumethod import CompuCategory  # noqa: E402
from odxtools.compumethods.compurationalcoeffs import CompuRationalCoeffs  # noqa: E402
from odxtools.compumethods.compuscale import CompuScale  # noqa: E402
from odxtools.compumethods.identicalcompumethod import IdenticalCompuMethod  # noqa: E402
from odxtools.compumethods.limit import Limit  # noqa: E402
from odxtools.compumethods.linearcompumethod import LinearCompuMethod  # noqa: E402
from odxtools.dataobjectproperty import DataObjectProperty  # noqa: E402
from odxtools.decodestate import DecodeState  # noqa: E402
from odxtools.diagnostictroublecode import DiagnosticTroubleCode  # noqa: E402
from odxtools.diagservice import DiagService  # noqa: E402
from odxtools.dtcdop import DtcDop  # noqa: E402
from odxtools.odxlink import OdxLinkId, OdxLinkRef  # noqa: E402
from odxtools.odxtypes import DataType  # noqa: E402
from odxtools.parameters.codedconstparameter import CodedConstParameter  # noqa: E402
from odxtools.parameters.valueparameter import ValueParameter  # noqa: E402
from odxtools.physicaltype import PhysicalType  # noqa: E402
from odxtools.request import Request  # noqa: E402
from odxtools.response import Response, ResponseType  # noqa: E402
from odxtools.standardlengthtype import StandardLengthType  # noqa: E402
from odxtools.text import Text  # noqa: E402

from agent.config.model import DidSpec  # noqa: E402
from agent.config.parse import parse_config  # noqa: E402
from agent.odx.entries import Did, did_entry  # noqa: E402
from agent.odx.importer import _codec, import_layer, layers, load  # noqa: E402
from agent.wire import codecs  # noqa: E402

SOMERSAULT = ROOT.parent / "shared/data/odx/somersault.pdx"
needs_somersault = pytest.mark.skipif(not SOMERSAULT.is_file(), reason="shared/ with the ODX example is not beside "
                                                                        "the checkout")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "agent", "import-odx", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def odx_decode(dop, data):
    return dop.decode_from_pdu(DecodeState(coded_message=data))


def samples(length):
    """Byte strings across the range: zero, one, the top, the sign boundary and a mixed pattern."""
    top = (1 << (8 * length)) - 1
    values = {0, 1, top, top >> 1, (top >> 1) + 1, int.from_bytes(bytes((0x5A + 17 * i) & 0xFF for i in range(length)),
                                                                  "big")}
    return [v.to_bytes(length, "big") for v in sorted(values)]


def spec_of(did):
    return DidSpec(name=did.name, id=did.id, codec=did.codec, length=did.length, scale=did.scale,
                   offset=did.offset, unit=did.unit, enum=tuple(did.values.items()))


def assert_same_values(did, dop):
    """The agent's codec for an imported DID against odxtools' decoder for its DOP, on the same bytes."""
    spec = spec_of(did)
    table = dict(did.values)
    for data in samples(did.length) if did.codec != "ascii" else [b"WVWZZZ1JZXW000001"[:did.length].ljust(did.length)]:
        if did.codec == "enum" and int.from_bytes(data, "big") not in table:
            continue
        ours, theirs = codecs.decode(spec, data), odx_decode(dop, data)
        assert ours == pytest.approx(theirs) if isinstance(theirs, float) else ours == theirs, (did, data, ours, theirs)


# ---- the published example --------------------------------------------------------------------------

@needs_somersault
def test_somersault_imports_to_a_config_that_validates():
    result = cli(str(SOMERSAULT))
    assert result.returncode == 0, result.stderr
    config = parse_config(yaml.safe_load(result.stdout))
    (ecu,) = config.ecus
    assert ecu.name == "somersault_base_variant"
    assert (ecu.addressing.request_id, ecu.addressing.response_id) == (123, 456)  # CP_UniqueRespIdTable
    assert config.bus.bitrate == 500_000  # CP_Baudrate
    assert "ECU variants: somersault_lazy, somersault_assiduous" in result.stdout
    assert "not imported: report_status (service 0x22 without a 16-bit identifier)" in result.stdout
    one = cli(str(SOMERSAULT), "--ecu", "somersault_lazy")
    assert parse_config(yaml.safe_load(one.stdout)).ecus[0].name == "somersault_lazy"
    assert "do_backward_flips" not in one.stdout  # not inherited by this variant


@needs_somersault
def test_every_somersault_data_object_the_agent_can_express_decodes_the_same():
    database = odxtools.load_pdx_file(str(SOMERSAULT))
    expressed = 0
    for layer in database.diag_layers:
        spec = layer.diag_data_dictionary_spec
        for dop in spec.data_object_props if spec else []:
            did = Did(name=dop.short_name, id=0x1234)
            _codec(did, dop)
            if did.codec == "raw":
                assert did.note, dop.short_name  # why it stays raw is said
                continue
            assert_same_values(did, dop)
            expressed += 1
    assert expressed >= 20  # uint8/uint16 values, units, the boolean text table, in four layers


@needs_somersault
def test_errors():
    assert cli(str(SOMERSAULT), "--ecu", "nope").returncode == 2
    assert cli("missing.pdx").returncode == 2
    assert cli(str(ROOT / "README.md")).returncode == 65


# ---- a PDX written with odxtools' API ---------------------------------------------------------------

def _id(layer, name):
    return OdxLinkId(f"test.{name}", layer.odx_id.doc_fragments)


def _ref(odx_id):
    return OdxLinkRef.from_id(odx_id)


def _uint(bits, base=DataType.A_UINT32, highlow=None):
    return StandardLengthType(base_data_type=base, bit_length=bits, is_highlow_byte_order_raw=highlow)


def _const(name, value, bits, position):
    return CodedConstParameter(short_name=name, coded_value_raw=str(value), diag_coded_type=_uint(bits),
                               byte_position=position)


def _linear(offset, factor, denominator=1.0, physical=DataType.A_FLOAT64, internal=DataType.A_UINT32):
    coeffs = CompuRationalCoeffs(value_type=physical, numerators=[offset, factor], denominators=[denominator])
    scale = CompuScale(compu_rational_coeffs=coeffs, domain_type=internal, range_type=physical)
    return LinearCompuMethod(category=CompuCategory.LINEAR, compu_internal_to_phys=CompuInternalToPhys(
        compu_scales=[scale]), physical_type=physical, internal_type=internal)


def _texttable(table):
    from odxtools.compumethods.compuconst import CompuConst
    from odxtools.compumethods.texttablecompumethod import TexttableCompuMethod
    scales = [CompuScale(lower_limit=Limit(value_raw=str(k), value_type=DataType.A_UINT32),
                         upper_limit=Limit(value_raw=str(k), value_type=DataType.A_UINT32),
                         compu_const=CompuConst(vt=v, data_type=DataType.A_UNICODE2STRING),
                         domain_type=DataType.A_UINT32, range_type=DataType.A_UNICODE2STRING) for k, v in table.items()]
    return TexttableCompuMethod(category=CompuCategory.TEXTTABLE, compu_internal_to_phys=CompuInternalToPhys(
        compu_scales=scales), physical_type=DataType.A_UNICODE2STRING, internal_type=DataType.A_UINT32)


def _identical(base):
    return IdenticalCompuMethod(category=CompuCategory.IDENTICAL, physical_type=base, internal_type=base)


def write_test_pdx(path: Path) -> Path:
    """Somersault's base variant plus 16-bit DIDs of every codec kind, a write, a routine, security
    levels and DTCs with texts, written to a new PDX by odxtools' writer."""
    database = odxtools.load_pdx_file(str(SOMERSAULT))
    layer = database.diag_layers.somersault_base_variant
    raw = layer.diag_layer_raw
    dds = raw.diag_data_dictionary_spec
    celsius = _ref(dds.unit_spec.units.celsius.odx_id)
    dops = {
        "vin": (_uint(17 * 8, DataType.A_ASCIISTRING), _identical(DataType.A_UNICODE2STRING),
                DataType.A_UNICODE2STRING, None),
        "engine_speed": (_uint(16), _linear(0, 1, 4), DataType.A_FLOAT64, None),
        "coolant": (_uint(8), _linear(-40, 1, physical=DataType.A_INT32), DataType.A_INT32, celsius),
        "oil_temp": (_uint(8, DataType.A_INT32), _identical(DataType.A_INT32), DataType.A_INT32, celsius),
        "voltage": (_uint(16), _linear(0.5, 0.01, physical=DataType.A_FLOAT64), DataType.A_FLOAT64, None),
        "idle_mode": (_uint(8), _texttable({0: "normal", 1: "eco", 2: "high"}), DataType.A_UNICODE2STRING, None),
        "pressure_le": (_uint(16, highlow=False), _identical(DataType.A_UINT32), DataType.A_UINT32, None),
        "ratio": (_uint(32, DataType.A_FLOAT32), _identical(DataType.A_FLOAT32), DataType.A_FLOAT32, None),
    }
    dops["vin_again"] = dops["vin"]  # a second service reading the same DID
    ids = {"vin_again": 0xF190, "vin": 0xF190, "engine_speed": 0xF40C, "coolant": 0xF405, "oil_temp": 0xF40D,
           "voltage": 0xF442, "idle_mode": 0x0100, "pressure_le": 0x2000, "ratio": 0x2001}
    for name, (coded, compu, physical, unit) in dops.items():
        dop = DataObjectProperty(short_name=f"{name}_dop", odx_id=_id(layer, f"DOP.{name}"), compu_method=compu,
                                 diag_coded_type=coded, physical_type=PhysicalType(base_data_type=physical),
                                 unit_ref=unit)
        dds.data_object_props.append(dop)
        _add_read_service(layer, name, ids[name], dop)
    extra = {"write_idle_mode": [_const("sid", 0x2E, 8, 0), _const("did", 0x0100, 16, 1),
                                 ValueParameter(short_name="value", byte_position=3,
                                                dop_ref=_ref(dds.data_object_props.idle_mode_dop.odx_id))],
             "self_test_start": [_const("sid", 0x31, 8, 0), _const("sub", 1, 8, 1), _const("rid", 0x0203, 16, 2)],
             "self_test_results": [_const("sid", 0x31, 8, 0), _const("sub", 3, 8, 1), _const("rid", 0x0203, 16, 2)],
             "seed_level_1": [_const("sid", 0x27, 8, 0), _const("sub", 1, 8, 1)],
             "key_level_1": [_const("sid", 0x27, 8, 0), _const("sub", 2, 8, 1)],
             "seed_level_3": [_const("sid", 0x27, 8, 0), _const("sub", 3, 8, 1)]}
    for name, params in extra.items():
        request = Request(short_name=f"{name}_rq", odx_id=_id(layer, f"RQ.{name}"), parameters=params)
        raw.requests.append(request)
        raw.diag_comms_raw.append(DiagService(short_name=name, odx_id=_id(layer, f"service.{name}"),
                                              request_ref=_ref(request.odx_id)))
    dtcs = [DiagnosticTroubleCode(short_name=f"dtc_{code}", odx_id=_id(layer, f"DTC.{code}"), trouble_code=number,
                                  display_trouble_code=display, text=Text(text=text))
            for code, number, display, text in (
                ("p0301", 0x030100, "P0301", "Cylinder 1 misfire detected"),
                ("u0100", 0xC10087, "U0100-87", "Lost communication with ECM/PCM A"),
                ("flip", 0x000042, None, "Somersault landed badly"))]
    dds.dtc_dops.append(DtcDop(short_name="dtcs_dop", odx_id=_id(layer, "DOP.dtcs"), diag_coded_type=_uint(24),
                               physical_type=PhysicalType(base_data_type=DataType.A_UINT32),
                               compu_method=_identical(DataType.A_UINT32), dtcs_raw=dtcs))
    database.refresh()
    assert odxtools.write_pdx_file(str(path), database)
    return path


@pytest.fixture(scope="module")
def test_pdx(tmp_path_factory):
    if not SOMERSAULT.is_file():
        pytest.skip("shared/ with the ODX example is not beside the checkout")
    return write_test_pdx(tmp_path_factory.mktemp("odx") / "test.pdx")


def test_a_pdx_written_with_odxtools_imports_every_kind(test_pdx):
    result = cli(str(test_pdx))
    assert result.returncode == 0, result.stderr
    config = parse_config(yaml.safe_load(result.stdout))
    (ecu,) = config.ecus
    dids = {d.name: d for d in ecu.dids}
    assert dids["vin"] == DidSpec("vin", 0xF190, "ascii", 17)
    assert "not imported: Read_vin_again (reads DID 0xF190 too, imported as vin)" in result.stdout
    assert dids["engine_speed"] == DidSpec("engine_speed", 0xF40C, "unsigned", 2, scale=0.25)
    assert dids["coolant"] == DidSpec("coolant", 0xF405, "unsigned", 1, offset=-40, unit="°C")
    assert dids["oil_temp"] == DidSpec("oil_temp", 0xF40D, "signed", 1, unit="°C")
    assert dids["idle_mode"].enum == ((0, "normal"), (1, "eco"), (2, "high")) and dids["idle_mode"].writable
    assert dids["pressure_le"].codec == dids["ratio"].codec == "raw"
    assert "little-endian (low-high byte order): kept raw" in result.stdout
    assert "A_FLOAT32, 4 bytes: no codec for it in the agent, kept raw" in result.stdout
    assert ecu.routines[0].id == 0x0203 and ecu.routines[0].name == "self_test" and len(ecu.routines) == 1
    assert "security levels in the ODX: 1, 3" in result.stdout
    assert dict(ecu.dtc_texts) == {"P0301": "Cylinder 1 misfire detected",
                                   "U0100-87": "Lost communication with ECM/PCM A",
                                   "0x000042": "Somersault landed badly"}


def test_each_imported_did_decodes_like_odxtools(test_pdx):
    database = load(test_pdx)  # held here: odxtools links its objects weakly to the database
    (ecu,) = [import_layer(database, layer) for layer in layers(database, None)]
    checked = [d.name for d in ecu.dids if d.dop is not None and d.codec != "raw"]
    assert set(checked) >= {"vin", "engine_speed", "coolant", "oil_temp", "voltage", "idle_mode"}
    for did in ecu.dids:
        if did.dop is not None and did.codec != "raw":
            assert_same_values(did, did.dop)
            assert dataclasses.asdict(spec_of(did))["codec"] == did_entry(did)["codec"]


# ---- odd data objects: each stays raw with a note, the rest of the file is imported ----------------------

def _add_read_service(layer, name: str, did_id: int, dop) -> None:
    """A ReadDataByIdentifier service `Read_{name}` for DID `did_id` whose value is `dop`, in `layer`."""
    raw = layer.diag_layer_raw
    request = Request(short_name=f"read_{name}_rq", odx_id=_id(layer, f"RQ.{name}"),
                      parameters=[_const("sid", 0x22, 8, 0), _const("did", did_id, 16, 1)])
    response = Response(short_name=f"read_{name}_pr", odx_id=_id(layer, f"PR.{name}"),
                        response_type=ResponseType.POSITIVE,
                        parameters=[_const("sid", 0x62, 8, 0), _const("did", did_id, 16, 1),
                                    ValueParameter(short_name="value", byte_position=3, dop_ref=_ref(dop.odx_id))])
    raw.requests.append(request)
    raw.positive_responses.append(response)
    raw.diag_comms_raw.append(DiagService(short_name=f"Read_{name}", odx_id=_id(layer, f"service.{name}"),
                                          request_ref=_ref(request.odx_id), pos_response_refs=[_ref(response.odx_id)]))


def write_pdx_with(path: Path, dops: dict) -> Path:
    """Somersault's base variant plus one 16-bit read service per entry `name: (did, coded, compu, physical)`."""
    database = odxtools.load_pdx_file(str(SOMERSAULT))
    layer = database.diag_layers.somersault_base_variant
    raw = layer.diag_layer_raw
    dds = raw.diag_data_dictionary_spec
    for name, (did_id, coded, compu, physical) in dops.items():
        dop = DataObjectProperty(short_name=f"{name}_dop", odx_id=_id(layer, f"DOP.{name}"), compu_method=compu,
                                 diag_coded_type=coded, physical_type=PhysicalType(base_data_type=physical))
        dds.data_object_props.append(dop)
        _add_read_service(layer, name, did_id, dop)
    database.refresh()
    assert odxtools.write_pdx_file(str(path), database)
    return path


def imported(path):
    result = cli(str(path))
    assert result.returncode == 0, result.stderr
    (ecu,) = parse_config(yaml.safe_load(result.stdout)).ecus  # what it prints passes the config check
    return result.stdout, {d.name: d for d in ecu.dids}


@needs_somersault
def test_a_linear_method_with_a_zero_denominator_is_kept_raw_and_the_rest_imported(tmp_path):
    """Review defect: a COMPU-DENOMINATOR of 0 in one data object ended the whole import in a traceback."""
    path = write_pdx_with(tmp_path / "zero.pdx", {
        "speed": (0xF40C, _uint(16), _linear(0, 1, 4), DataType.A_FLOAT64),
        "broken": (0x1000, _uint(16), _linear(0, 1, 0), DataType.A_FLOAT64)})
    text, dids = imported(path)
    assert dids["speed"] == DidSpec("speed", 0xF40C, "unsigned", 2, scale=0.25)
    assert dids["broken"].codec == "raw"
    assert "# linear computation with a zero denominator: kept raw" in text


@needs_somersault
def test_a_non_finite_factor_is_kept_raw_not_printed_as_a_config_that_fails_its_check(tmp_path):
    """Review defect: a factor of INF (or NaN) was printed as `scale: inf`, which check-config refuses."""
    path = write_pdx_with(tmp_path / "inf.pdx", {
        "huge": (0x1001, _uint(16), _linear(0, float("inf"), 1), DataType.A_FLOAT64),
        "odd": (0x1002, _uint(16), _linear(float("nan"), 1, 1), DataType.A_FLOAT64)})
    text, dids = imported(path)
    assert dids["huge"].codec == dids["odd"].codec == "raw"
    assert text.count("# linear computation with a factor or offset that is not a finite number: kept raw") == 2


@needs_somersault
def test_text_tables_the_enum_codec_cannot_hold_are_kept_raw(tmp_path):
    """Review defect: a signed text table printed negative keys, which check-config refuses (and the enum
    codec reads the bytes unsigned: -1 arrives as 255)."""
    from odxtools.compumethods.compuconst import CompuConst
    from odxtools.compumethods.texttablecompumethod import TexttableCompuMethod

    def table(limits, internal):
        scales = [CompuScale(lower_limit=Limit(value_raw=k, value_type=internal),
                             upper_limit=Limit(value_raw=k, value_type=internal),
                             compu_const=CompuConst(vt=v, data_type=DataType.A_UNICODE2STRING),
                             domain_type=internal, range_type=DataType.A_UNICODE2STRING) for k, v in limits]
        return TexttableCompuMethod(category=CompuCategory.TEXTTABLE, compu_internal_to_phys=CompuInternalToPhys(
            compu_scales=scales), physical_type=DataType.A_UNICODE2STRING, internal_type=internal)

    path = write_pdx_with(tmp_path / "tables.pdx", {
        "gear": (0x1010, _uint(8, DataType.A_INT32), table([("-1", "reverse"), ("0", "neutral"), ("1", "first")],
                                                              DataType.A_INT32), DataType.A_UNICODE2STRING),
        "mode": (0x1012, _uint(8), _texttable({0: "normal", 1: "eco"}), DataType.A_UNICODE2STRING)})
    text, dids = imported(path)
    assert dids["mode"].enum == ((0, "normal"), (1, "eco"))
    assert dids["gear"].codec == "raw"
    assert "# text table with a negative value: kept raw" in text


def test_text_beyond_the_basic_multilingual_plane_survives_the_yaml_it_is_written_in():
    """Review defect: the emitter wrote JSON escapes, and a character above U+FFFF became a JSON surrogate pair
    ("\\ud83d\\ude00") that YAML reads back as two lone surrogates: the label or DTC text was garbled, and
    cannot even be encoded as UTF-8 when the agent publishes it."""
    from agent.config.emit import flow, scalar

    for text in ("Zündung 🔑 an", "\U0001d6fc > 3", 'quote " and \\ud83d backslash', "tab\tnewline\n°C", "plain"):
        assert yaml.safe_load(f"k: {scalar('text', text)}")["k"] == text
        assert yaml.safe_load(flow({"values": {1: text}, "unit": text})) == {"values": {1: text}, "unit": text}
    assert scalar("unit", "°C") == '"\\u00b0C"'  # the rest is written as before


@needs_somersault
def test_a_selection_that_cannot_make_one_valid_config_is_a_usage_error(tmp_path):
    """Review defect: `--ecu X --ecu X`, or two variants of one ECU, printed two entries with the same CAN ids
    and exit 0; the config it printed fails check-config (response_id already used)."""
    twice = cli(str(SOMERSAULT), "--ecu", "somersault_lazy", "--ecu", "somersault_lazy")
    assert twice.returncode == 0, twice.stderr
    assert [e.name for e in parse_config(yaml.safe_load(twice.stdout)).ecus] == ["somersault_lazy"]
    both = cli(str(SOMERSAULT), "--ecu", "somersault_lazy", "--ecu", "somersault_assiduous")
    assert both.returncode == 2 and both.stdout == ""
    assert ("somersault_lazy and somersault_assiduous answer on the same CAN id 0x1C8 (variants of one ECU?): "
            "import one of them") in both.stderr


def test_the_imported_config_reads_what_the_simulator_answers_as_odxtools_decodes_it(test_pdx, tmp_path):
    """End to end: the printed config, completed only where the output says to (vehicle id, bus), runs
    `sovd-edge uds read_data` against the simulator answering chosen bytes for each imported DID; every
    value that comes back is odxtools' decoding of those bytes."""
    import json
    import uuid

    result = cli(str(test_pdx))
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    (entry,) = config["ecus"]
    database = load(test_pdx)
    (ecu,) = [import_layer(database, layer) for layer in layers(database, None)]
    answered = {d.name: (d, (b"WVWZZZ1JZXW000001" if d.codec == "ascii" else samples(d.length)[-2]))
                for d in ecu.dids if d.dop is not None and d.codec != "raw"}
    answered["idle_mode"] = (answered["idle_mode"][0], b"\x02")  # a value its text table names
    sim = {"ecus": [{"name": "odx", "addressing": entry["addressing"],
                     "dids": [{"id": d.id, "hex": data.hex()} for d, data in answered.values()]}]}
    (tmp_path / "sim.yaml").write_text(yaml.safe_dump(sim))
    config.update(vehicle="ODX-TEST", bus={"interface": "virtual", "channel": f"odx-{uuid.uuid4().hex[:8]}"},
                  simulate=[str(tmp_path / "sim.yaml")], state_dir=str(tmp_path / "state"))
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    assert subprocess.run([sys.executable, "-m", "agent", "check-config", "-c", str(tmp_path / "agent.yaml")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120).returncode == 0
    read = subprocess.run([sys.executable, "-m", "agent", "uds", "-c", str(tmp_path / "agent.yaml"), entry["name"],
                           "read_data", f"data={','.join(answered)}"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert read.returncode == 0, read.stdout + read.stderr
    values = json.loads(read.stdout)["result"]["values"]
    assert set(values) == set(answered) >= {"vin", "engine_speed", "coolant", "oil_temp", "voltage", "idle_mode"}
    for name, (did, data) in answered.items():
        theirs = odx_decode(did.dop, data)
        assert values[name] == (pytest.approx(theirs) if isinstance(theirs, float) else theirs), (name, data)


@needs_somersault
def test_output_file_is_replaced_whole_or_left_as_it_was(tmp_path):
    """Review defect: the only way to keep the config was `> ecus.yaml`, which the shell empties before the
    import runs: a file that is not a PDX (exit 65) left the user's previous ecus.yaml empty. `-o FILE`
    writes the whole config beside FILE and renames it over FILE only after it is on the disk."""
    out = tmp_path / "ecus.yaml"
    out.write_text("previous: config\n")
    bad = cli(str(ROOT / "README.md"), "-o", str(out))
    assert bad.returncode == 65 and out.read_text() == "previous: config\n"
    good = cli(str(SOMERSAULT), "-o", str(out))
    assert good.returncode == 0 and good.stdout == "", good.stderr
    assert out.read_text() == cli(str(SOMERSAULT)).stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ecus.yaml"]  # no temporary file left behind
    (tmp_path / "repo").mkdir()
    (tmp_path / "linked.yaml").symlink_to(tmp_path / "repo" / "ecus.yaml")  # a config kept elsewhere
    assert cli(str(SOMERSAULT), "-o", str(tmp_path / "linked.yaml")).returncode == 0
    assert (tmp_path / "linked.yaml").is_symlink() and (tmp_path / "repo" / "ecus.yaml").read_text() == out.read_text()
    (tmp_path / "linked.yaml").unlink()
    (tmp_path / "repo" / "ecus.yaml").unlink()
    (tmp_path / "repo").rmdir()
    for target, problem in ((tmp_path / "no" / "dir.yaml", "No such file or directory"),
                            (tmp_path, "not a regular file"), (Path("/dev/null"), "not a regular file")):
        result = cli(str(SOMERSAULT), "-o", str(target))
        assert result.returncode == 73 and result.stdout == "", result.stderr
        assert result.stderr.startswith(f"sovd-edge import-odx: cannot write {target}: ") and problem in result.stderr
    assert Path("/dev/null").is_char_device()


@needs_somersault
def test_a_zip_without_an_ecu_layer_is_not_a_usable_pdx(tmp_path):
    """Review defect: any zip file odxtools could open (a comparam-only PDX, a zip of photos) printed a config
    with an empty `ecus:` and exit 0; check-config refuses that file."""
    import zipfile

    with zipfile.ZipFile(SOMERSAULT) as source, zipfile.ZipFile(tmp_path / "comparams.pdx", "w") as target:
        for name in source.namelist():
            if name != "somersault.odx-d":
                target.writestr(name, source.read(name))
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as target:
        target.writestr("holiday.jpg", b"\xff\xd8\xff")
    for path in (tmp_path / "comparams.pdx", tmp_path / "photos.zip"):
        result = cli(str(path))
        assert result.returncode == 65 and result.stdout == "", result.stdout
        assert result.stderr == f"sovd-edge import-odx: {path}: no ECU in it (no base variant or ECU variant layer)\n"


@needs_somersault
def test_a_layer_that_is_not_an_ecu_is_not_imported_as_one():
    """Review defect: `--ecu somersault_protocol` (the ISO 15765-3 protocol layer) printed an ECU entry for it
    with exit 0, and the list of names offered on a typo mixed protocol layers in with the ECUs."""
    result = cli(str(SOMERSAULT), "--ecu", "somersault_protocol")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("sovd-edge import-odx: somersault_protocol is a Protocol layer, not an ECU "
                             "(ECUs: somersault_assiduous, somersault_base_variant, somersault_lazy)\n")
    typo = cli(str(SOMERSAULT), "--ecu", "nope")
    assert typo.returncode == 2
    assert typo.stderr.endswith("no ECU named nope (has: somersault_assiduous, somersault_base_variant, "
                                "somersault_lazy)\n")


@needs_somersault
def test_a_data_object_of_zero_bits_is_kept_raw_without_a_length(tmp_path):
    """Review defect: BIT-LENGTH 0 passed the whole-bytes check (0 % 8 == 0) and was printed as a DID of
    length 0, which check-config refuses for every codec."""
    path = write_pdx_with(tmp_path / "zero-bits.pdx", {
        "empty": (0x1020, _uint(0), _identical(DataType.A_UINT32), DataType.A_UINT32),
        "mode": (0x1021, _uint(8), _texttable({0: "normal", 1: "eco"}), DataType.A_UNICODE2STRING)})
    text, dids = imported(path)
    assert dids["empty"].codec == "raw" and dids["empty"].length is None
    assert "# StandardLengthType of 0 bits: kept raw" in text
