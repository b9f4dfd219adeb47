"""Signed commands, the pure part: envelopes, keys (real Ed25519 through `cryptography`), roles, freshness,
the `security:` config, the gate's refusals and its rate-limited log, and the lazy import of `cryptography`."""

import base64
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from signing_support import make_keys, security

from agent.config import parse_config
from agent.config.model import SigningKey
from agent.errors import ConfigError
from agent.fleet.packets import Incoming
from agent.fleet.signed import SignatureGate
from agent.fleet.topics import Topics
from agent.policy import ed25519
from agent.policy.mutating import MUTATING, READ_ONLY, is_mutating
from agent.policy.signature import Passed, Refused, envelope, load_authenticator, needs_signature
from agent.store.sqlite import Store
from agent.wire.decode import Undecodable

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"), "backend-1", "backend-2", "workshop", "stranger")


@pytest.fixture(scope="module")
def auth(keys):
    config = security(keys["backend-1"].config(), keys["backend-2"].config(),
                      keys["workshop"].config(commands=["read_data", "clear_faults"], components=["engine"]))
    return load_authenticator(config)


def body(command="clear_faults", component="engine", expires=NOW + 60, **fields):
    found = {"id": f"c-{command}", "component": component, "command": command, **fields}
    if expires is not None:
        found["expires_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
    return found


def envelope_of(keys, key_id, raw: bytes, signer=None):
    """An envelope naming `key_id`, signed by `signer`'s key (default: the key named)."""
    private = ed25519.load_private_key(keys[signer or key_id].private)
    return envelope(raw, key_id, private.sign(raw))


def check(auth, message, now=NOW, clock_trusted=True):
    return auth.check(message, now, clock_trusted)


# ---- which commands need a signature ----------------------------------------------------------------

def test_mutating_is_everything_but_the_reads():
    assert frozenset({"read_data", "read_faults", "tester_present", "obd"}) == READ_ONLY
    assert {"write_data", "clear_faults", "reset", "set_session", "security_access", "operation", "io_control",
            "raw"} == MUTATING
    assert is_mutating("levitate") and is_mutating(None) and not is_mutating("read_faults")


@pytest.mark.parametrize(("mode", "message", "needed"), [
    ("none", {"command": "reset"}, False),
    ("mutating", {"command": "read_data"}, False),
    ("mutating", {"command": "tester_present"}, False),
    ("mutating", {"command": "reset"}, True),
    ("mutating", {"command": ["read_data"]}, True),
    # undecodable input is invalid input, answered as without signatures (review defect: it was `missing`)
    ("mutating", Undecodable("not JSON", "", "x-1"), False),
    ("all", Undecodable("not JSON", "", None), False),
    ("all", {"command": "read_data"}, True),
])
def test_needs_signature(mode, message, needed):
    assert needs_signature(mode, message) is needed


# ---- verdicts -----------------------------------------------------------------------------------------

def test_signed_command_passes_with_exactly_the_signed_bytes(auth, keys):
    raw = b'{"id": "c-1",  "component": "engine", "command": "reset", "params": {"type": "soft"},' \
          b' "expires_at": "2027-01-15T08:01:00Z"}'
    verdict = check(auth, envelope_of(keys, "backend-1", raw))
    assert verdict == Passed(json.loads(raw), "backend-1")


def test_no_canonicalisation_reserialised_bytes_fail(auth, keys):
    raw = json.dumps(body()).encode()
    signed = envelope_of(keys, "backend-1", raw)
    signed["signed"] = base64.b64encode(json.dumps(body(), indent=1).encode()).decode()  # same object, other bytes
    verdict = check(auth, signed)
    assert isinstance(verdict, Refused) and verdict.reason == "bad_signature" and verdict.key_id == "backend-1"
    assert verdict.command_id == "c-clear_faults"


def test_each_refusal_reason(auth, keys):
    raw = json.dumps(body()).encode()
    cases = {
        "missing": body(),
        "unknown_key": envelope_of(keys, "stranger", raw),
        "bad_signature": envelope_of(keys, "backend-1", raw, signer="backend-2"),
        "expired": envelope_of(keys, "backend-1", json.dumps(body(expires=None)).encode()),
        "not_allowed": envelope_of(keys, "workshop", json.dumps(body(command="reset")).encode()),
    }
    for reason, message in cases.items():
        verdict = check(auth, message)
        assert isinstance(verdict, Refused) and verdict.reason == reason, (reason, verdict)
        assert verdict.command_id is not None
        assert verdict.details()["reason"] == reason


@pytest.mark.parametrize(("expires", "trusted", "passes", "text"), [
    (NOW + 3600, True, True, ""),
    (NOW + 3601, True, False, "more than 3600 s ahead"),
    (NOW, True, False, "expired at"),
    (NOW - 100, True, False, "expired at"),
    (None, True, False, "must carry expires_at"),
    (NOW + 86400, False, True, ""),  # clock not trusted: the general expires_at rule decides, not this one
    (None, False, False, "must carry expires_at"),
])
def test_freshness_window(auth, keys, expires, trusted, passes, text):
    verdict = check(auth, envelope_of(keys, "backend-1", json.dumps(body(expires=expires)).encode()),
                    clock_trusted=trusted)
    assert isinstance(verdict, Passed) is passes
    if not passes:
        assert verdict.reason == "expired" and text in verdict.message


def test_roles_name_the_rule(auth, keys):
    allowed = check(auth, envelope_of(keys, "workshop", json.dumps(body()).encode()))
    assert allowed == Passed(body(), "workshop")
    command = check(auth, envelope_of(keys, "workshop", json.dumps(body(command="reset")).encode()))
    assert command.rule == "security.keys.workshop.commands" and "may not sign reset" in command.message
    component = check(auth, envelope_of(keys, "workshop", json.dumps(body(component="abs")).encode()))
    assert component.rule == "security.keys.workshop.components" and "for abs" in component.message


def test_plain_reads_pass_under_mutating_and_are_refused_under_all(keys):
    mutating = load_authenticator(security(keys["backend-1"].config()))
    read = body(command="read_data", params={"data": "vin"})
    assert mutating.check(read, NOW) == Passed(read, None)
    everything = load_authenticator(security(keys["backend-1"].config(), mode="all"))
    refused = everything.check(read, NOW)
    assert refused.reason == "missing" and "require_signature: all" in refused.message


@pytest.mark.parametrize(("message", "problem"), [
    ({"signed": "e30=", "key_id": "backend-1"}, "'sig' must be a non-empty string"),
    ({"signed": "e30=", "key_id": "backend-1", "sig": "AA==", "id": "x"}, "unknown envelope field 'id'"),
    ({"signed": "%%%", "key_id": "backend-1", "sig": "AA=="}, "must be base64"),
    ({"signed": "e30=", "key_id": 7, "sig": "AA=="}, "'key_id' must be a non-empty string"),
    ({"signed": "e30=", "key_id": "backend-1", "sig": "AA=="}, "does not match"),  # 1-byte signature
    ({"sig": None}, "'signed' must be a non-empty string"),
])
def test_malformed_envelopes_are_bad_signatures(auth, message, problem):
    verdict = check(auth, message)
    assert isinstance(verdict, Refused) and verdict.reason == "bad_signature" and problem in verdict.message


def test_malformed_envelope_still_answered_by_its_inner_id(auth):
    inner = base64.b64encode(json.dumps(body()).encode()).decode()
    verdict = check(auth, {"signed": inner, "key_id": "backend-1", "sig": "not base64!"})
    assert verdict.reason == "bad_signature" and verdict.command_id == "c-clear_faults"
    assert verdict.body["command"] == "clear_faults"


def test_a_signed_payload_that_is_not_a_command_goes_to_the_usual_invalid_path(auth, keys):
    verdict = check(auth, envelope_of(keys, "backend-1", b"[1, 2]"))
    assert isinstance(verdict, Passed) and isinstance(verdict.body, Undecodable) and verdict.key_id == "backend-1"


def test_unverified_key_id_is_bounded_in_what_is_echoed(auth, keys):
    raw = json.dumps(body()).encode()
    verdict = check(auth, envelope_of(keys, "x" * 500, raw, signer="stranger"))
    assert verdict.reason == "unknown_key" and len(verdict.key_id) <= 65


def test_rotation_old_and_new_then_old_removed(keys):
    raw = json.dumps(body()).encode()
    both = load_authenticator(security(keys["backend-1"].config(), keys["backend-2"].config()))
    assert isinstance(both.check(envelope_of(keys, "backend-1", raw), NOW), Passed)
    assert isinstance(both.check(envelope_of(keys, "backend-2", raw), NOW), Passed)
    new_only = load_authenticator(security(keys["backend-2"].config()))
    assert new_only.check(envelope_of(keys, "backend-1", raw), NOW).reason == "unknown_key"
    assert isinstance(new_only.check(envelope_of(keys, "backend-2", raw), NOW), Passed)


# ---- key files ----------------------------------------------------------------------------------------

def test_key_files_that_cannot_be_used_are_config_errors_with_paths(keys, tmp_path):
    (tmp_path / "garbage.pub").write_text("not a key")
    config = security(keys["backend-1"].config(), SigningKey("missing", tmp_path / "nope.pub"),
                      SigningKey("garbage", tmp_path / "garbage.pub"),
                      SigningKey("private", keys["backend-1"].private))
    with pytest.raises(ConfigError) as info:
        load_authenticator(config, "agent.yaml")
    problems = dict(info.value.problems)
    assert set(problems) == {"security.keys.missing.public_key", "security.keys.garbage.public_key",
                             "security.keys.private.public_key"}
    assert "No such file" in problems["security.keys.missing.public_key"]
    assert "not a PEM public key" in problems["security.keys.garbage.public_key"]


def test_a_public_key_file_with_several_keys_is_refused_not_cut_to_its_first(keys, tmp_path):
    """Appending the new key to the old key's file (a rotation done by hand) must not leave the new key
    silently unused: cryptography reads the first PEM block and ignores the rest."""
    both = tmp_path / "both.pub"
    both.write_bytes(keys["backend-1"].public.read_bytes() + keys["backend-2"].public.read_bytes())
    with pytest.raises(ConfigError) as info:
        load_authenticator(security(SigningKey("backend", both)), "agent.yaml")
    (problem,) = info.value.problems
    assert problem[0] == "security.keys.backend.public_key"
    assert "2 PEM blocks" in problem[1] and "one key per file" in problem[1]


def test_a_key_path_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path):
    """A device or FIFO given as a key would be read forever (/dev/zero) or block start-up (a FIFO)."""
    with pytest.raises(ed25519.KeyFileError, match="not a regular file"):
        ed25519.load_public_key(Path("/dev/zero"))
    fifo = tmp_path / "key.pub"
    os.mkfifo(fifo)
    with pytest.raises(ed25519.KeyFileError, match="not a regular file"):
        ed25519.load_public_key(fifo)
    big = tmp_path / "big.pub"
    big.write_bytes(b"-----BEGIN PUBLIC KEY-----\n" + b"A" * (ed25519.MAX_KEY_FILE_BYTES + 1))
    with pytest.raises(ed25519.KeyFileError, match="too large"):
        ed25519.load_public_key(big)


def test_a_public_key_file_others_may_write_is_refused(keys, tmp_path):
    """The public key is what decides which commands run: a file any local user may replace is no anchor."""
    for mode in (0o666, 0o646, 0o664):
        loose = tmp_path / f"loose-{mode:o}.pub"
        loose.write_bytes(keys["backend-1"].public.read_bytes())
        loose.chmod(mode)
        with pytest.raises(ed25519.KeyFileError, match="writable by"):
            ed25519.load_public_key(loose)
    fine = tmp_path / "fine.pub"
    fine.write_bytes(keys["backend-1"].public.read_bytes())
    fine.chmod(0o644)
    assert ed25519.load_public_key(fine).verify(b"x", b"\0" * 64) is False


def test_one_public_key_under_two_key_ids_is_refused(keys, tmp_path):
    """Review defect: the key_id of an envelope is outside the signature. With one key configured under two ids
    (a copy of the file, or the same path) with different roles, an envelope signed for the limited id was
    relabelled with the other id and passed: a workshop key that may only read could clear faults."""
    copy = tmp_path / "fleet.pub"
    copy.write_bytes(keys["workshop"].public.read_bytes())
    copy.chmod(0o644)
    config = security(keys["workshop"].config(commands=["read_data"]), SigningKey("fleet", copy),
                      keys["backend-1"].config())
    with pytest.raises(ConfigError) as info:
        load_authenticator(config, "agent.yaml")
    (problem,) = info.value.problems
    assert problem[0] == "security.keys.fleet.public_key"
    assert problem[1].startswith("the same public key as security.keys.workshop")


def test_a_world_readable_private_key_is_refused(keys, tmp_path):
    leaked = tmp_path / "leaked.key"
    leaked.write_bytes(keys["backend-1"].private.read_bytes())
    leaked.chmod(0o644)
    with pytest.raises(ed25519.KeyFileError, match="world-readable"):
        ed25519.load_private_key(leaked)


def test_keygen_writes_0600_and_refuses_to_overwrite(tmp_path):
    ed25519.generate(tmp_path / "k.key", tmp_path / "k.pub")
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "k.pub").stat().st_mode & 0o777 == 0o644
    with pytest.raises(ed25519.KeyFileError, match="refusing to overwrite"):
        ed25519.generate(tmp_path / "k.key", tmp_path / "other.pub")


# ---- config -------------------------------------------------------------------------------------------

MINIMAL = {
    "vehicle": "VIN1",
    "bus": {"interface": "virtual", "channel": "x"},
    "ecus": [{"name": "engine", "addressing": {"mode": "normal_11bit", "request_id": 0x7E0, "response_id": 0x7E8}}],
}


def test_security_defaults_keep_todays_behaviour():
    config = parse_config(MINIMAL).security
    assert config.require_signature == "none" and config.keys == () and config.max_expiry_ahead_s == 3600
    assert not config.signatures_configured


def test_security_config_parsed(tmp_path):
    data = {**MINIMAL, "security": {
        "require_signature": "mutating", "max_expiry_ahead_s": 600,
        "keys": {"backend-2026": {"public_key": "keys/b.pub"},
                 "workshop": {"public_key": "/k/w.pub", "commands": ["clear_faults"], "components": ["engine"]}},
        "audit": {"max_bytes": 65536, "keep": 2}}}
    config = parse_config(data, source=tmp_path / "agent.yaml").security
    assert config.require_signature == "mutating" and config.max_expiry_ahead_s == 600
    backend, workshop = config.keys
    assert backend.public_key == tmp_path / "keys/b.pub" and backend.commands is None and backend.components is None
    assert workshop.commands == {"clear_faults"} and workshop.components == {"engine"}
    assert (config.audit.max_bytes, config.audit.keep) == (65536, 2)


def test_security_errors_each_with_its_path():
    data = {**MINIMAL, "security": {
        "require_signature": "sometimes", "max_expiry_ahead_s": 0, "surprise": 1,
        "keys": {"bad id!": {"public_key": "x"}, "ok": {"commands": ["reset", "fly"], "components": ["abs"]},
                 "empty": {"public_key": "k", "commands": []}, "scalar": 3},
        "audit": {"keep": 0}}}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    problems = dict(info.value.problems)
    assert set(problems) == {
        "security.require_signature", "security.max_expiry_ahead_s", "security.surprise", "security.keys.bad id!",
        "security.keys.ok.public_key", "security.keys.ok.commands[1]", "security.keys.ok.components[0]",
        "security.keys.empty.commands", "security.keys.scalar", "security.audit.keep"}


def test_requiring_signatures_without_keys_is_an_error():
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, "security": {"require_signature": "all"}})
    assert dict(info.value.problems) == {"security.keys": "require_signature: all needs at least one key"}


# ---- the gate: refusals on the default topic, not remembered, logs rate-limited --------------------------

def incoming(payload: bytes) -> Incoming:
    return Incoming(payload, mid=1, qos=1, dup=False, received_at=NOW, response_topic="evil/replies")


def test_gate_refuses_on_the_default_topic_and_rate_limits_its_log(auth, tmp_path, caplog):
    store = Store(tmp_path / "agent.db")
    failures, clock = [], [100.0]
    gate = SignatureGate(auth, Topics("sovd", "V1"), lambda reason, rejected: failures.append(reason),
                         lambda command_id: command_id == "known", logs_per_minute=2, clock=lambda: clock[0])
    batch = store.batch()
    with caplog.at_level(logging.WARNING, logger="agent.fleet.signed"):
        for n in range(5):
            message = {**body(), "id": f"u-{n}"}
            assert gate(incoming(json.dumps(message).encode()), message, batch.publish) is None
        # a held id: counted, not answered
        assert gate(incoming(b"{}"), {**body(), "id": "known"}, batch.publish) is None
        clock[0] += 61
        gate(incoming(b"{}"), body(), batch.publish)
    batch.commit()
    sent = store.pending(0, 100)
    assert [p.message.topic for p in sent] == [f"sovd/V1/responses/u-{n}" for n in range(5)] + \
        ["sovd/V1/responses/c-clear_faults"]
    reply = json.loads(sent[0].message.payload)
    assert reply["status"] == "rejected" and reply["final"] is True
    assert reply["error"]["code"] == "unauthenticated" and reply["error"]["reason"] == "missing"
    assert failures == ["missing"] * 7
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and warnings[-1].suppressed_before == 4
    assert warnings[0].command_id == "u-0" and warnings[0].reason == "missing"
    store.close()


def test_gate_logs_the_key_id(auth, keys, tmp_path, caplog):
    store = Store(tmp_path / "agent.db")
    gate = SignatureGate(auth, Topics("sovd", "V1"), lambda reason, rejected: None, lambda command_id: False, 10)
    message = envelope_of(keys, "workshop", json.dumps(body(command="reset")).encode())
    with caplog.at_level(logging.WARNING, logger="agent.fleet.signed"):
        assert gate(incoming(b"{}"), message, store.batch().publish) is None
    (record,) = caplog.records
    assert record.key_id == "workshop" and record.reason == "not_allowed" and "may not sign reset" in record.message
    store.close()


def test_gate_passes_the_inner_command_and_its_key(auth, keys, tmp_path):
    store = Store(tmp_path / "agent.db")
    gate = SignatureGate(auth, Topics("sovd", "V1"), lambda reason, rejected: None, lambda command_id: False, 10)
    message = envelope_of(keys, "backend-2", json.dumps(body()).encode())
    assert gate(incoming(b"{}"), message, store.batch().publish) == (body(), "backend-2")
    store.close()


# ---- cryptography is loaded only where signatures are configured ------------------------------------------

PROBE = """
import json, sys, tempfile
from pathlib import Path
import agent.cli  # every subcommand module, as `sovd-edge run` loads them
from agent.config import parse_config
from agent.system.service import Service
data = json.loads(sys.argv[1])
data["state_dir"] = tempfile.mkdtemp()
service = Service(parse_config(data))
service.start(wait=2.0)
loaded = {"cryptography": "cryptography" in sys.modules, "envelopes": "agent.policy.signature" in sys.modules}
service.stop(0.5)
print(json.dumps(loaded))
"""


def run_probe(data):
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(data)], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_a_daemon_without_signatures_never_imports_cryptography(keys):
    base = {**MINIMAL, "bus": {"interface": "virtual", "channel": f"probe-{time.monotonic_ns()}"},
            "mqtt": {"broker": "mqtt://127.0.0.1:9"}, "metrics": {"enabled": False}}
    assert run_probe(base) == {"cryptography": False, "envelopes": False}
    # the probe can tell: the same daemon with a key configured has loaded it
    signed = {**base, "security": {"keys": {"k": {"public_key": str(keys["backend-1"].public)}}}}
    assert run_probe(signed) == {"cryptography": True, "envelopes": True}


@pytest.mark.parametrize("value", [["reset"], {"a": 1}, 7, None, True])
def test_unhashable_or_odd_command_fields_are_refused_not_raised(auth, keys, value):
    message = {**body(), "command": value, "component": value}
    assert check(auth, message).reason == "missing"
    signed = check(auth, envelope_of(keys, "workshop", json.dumps(message).encode()))
    assert signed.reason == "not_allowed"


def test_gate_answers_unencodable_unverified_fields_without_raising(auth, tmp_path, caplog):
    """Lone surrogates in an unverified key id, component or command are escaped in the answer, not raised."""
    store = Store(tmp_path / "agent.db")
    gate = SignatureGate(auth, Topics("sovd", "V1"), lambda reason, rejected: None, lambda command_id: False, 10)
    inner = json.dumps({"id": "s-1", "component": "\ud800", "command": "\udfff" * 100}).encode()
    message = {"signed": base64.b64encode(inner).decode(), "key_id": "\ud800x",
               "sig": base64.b64encode(bytes(64)).decode()}
    batch = store.batch()
    with caplog.at_level(logging.WARNING, logger="agent.fleet.signed"):
        assert gate(incoming(b"{}"), message, batch.publish) is None
        assert gate(incoming(b"{}"), json.loads(inner), batch.publish) is None  # plain, `missing`
    batch.commit()
    answers = [json.loads(p.message.payload) for p in store.pending(0, 10)]
    assert [a["error"]["reason"] for a in answers] == ["unknown_key", "missing"]
    # the inner command holds lone surrogates, so decoding refuses it: nothing of it is echoed
    assert answers[0]["error"]["key_id"] == "\\ud800x" and "component" not in answers[0]
    assert "command" not in answers[1]  # an overlong unverified name is not echoed at all
    store.close()


def test_gate_does_not_contradict_a_command_it_just_passed(auth, keys, tmp_path):
    """The genuine command and a forged twin in one intake group: the ledger does not hold the id yet."""
    store = Store(tmp_path / "agent.db")
    gate = SignatureGate(auth, Topics("sovd", "V1"), lambda reason, rejected: None, lambda command_id: False, 10)
    batch = store.batch()
    genuine = envelope_of(keys, "backend-1", json.dumps(body()).encode())
    assert gate(incoming(b"{}"), genuine, batch.publish) == (body(), "backend-1")
    assert gate(incoming(b"{}"), body(), batch.publish) is None  # unsigned twin: refused, not answered
    batch.commit()
    assert store.pending(0, 10) == []
    store.close()


def test_gate_leaves_freshness_to_the_clock_rule_while_the_clock_is_not_trusted(auth, keys, tmp_path):
    store = Store(tmp_path / "agent.db")
    far = envelope_of(keys, "backend-1", json.dumps(body(expires=NOW + 86400)).encode())
    trusted = SignatureGate(auth, Topics("sovd", "V1"), lambda reason, rejected: None, lambda command_id: False, 10)
    assert trusted(incoming(b"{}"), far, store.batch().publish) is None
    untrusted = SignatureGate(auth, Topics("sovd", "V1"), lambda reason, rejected: None, lambda command_id: False, 10,
                              clock_trusted=lambda: False)
    assert untrusted(incoming(b"{}"), far, store.batch().publish) == (body(expires=NOW + 86400), "backend-1")
    store.close()


@pytest.mark.parametrize("instant", ["0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59"])
def test_an_expires_at_that_cannot_be_represented_is_left_to_the_invalid_command_path(auth, keys, instant):
    """Review defect: the freshness check raised ValueError (year 0) formatting such an instant."""
    raw = json.dumps({**body(expires=None), "expires_at": instant}).encode()
    assert check(auth, envelope_of(keys, "backend-1", raw)) == Passed(json.loads(raw), "backend-1")


@pytest.mark.parametrize("message", [
    {"signed": "!!!", "key_id": "k", "sig": "AA=="},  # bad base64, nothing readable inside
    {"signed": base64.b64encode(b"[1, 2]").decode(), "key_id": "backend-1", "sig": "AA=="},
    {"command": "reset"},  # plain, needs a signature under `all`, and has no id
])
def test_gate_hands_a_refusal_without_a_readable_id_to_the_invalid_message_path(auth, keys, tmp_path, message):
    """Review defect: such a message was counted and logged only; without signatures it gets an invalid_message
    event. The gate counts the failure and hands intake an id-less Undecodable (intake publishes the event)."""
    failures = []
    everything = load_authenticator(security(keys["backend-1"].config(), mode="all"))
    gate = SignatureGate(everything, Topics("sovd", "V1"), lambda reason, rejected: failures.append(reason),
                         lambda command_id: False, 10)
    published = []
    passed = gate(incoming(b"{}"), message, published.append)
    assert passed is not None and passed[1] is None
    assert isinstance(passed[0], Undecodable) and passed[0].command_id is None
    assert "not authenticated" in passed[0].reason and failures and not published


def test_gate_passes_undecodable_plain_input_on_to_the_usual_invalid_path(keys, tmp_path):
    everything = load_authenticator(security(keys["backend-1"].config(), mode="all"))
    failures = []
    gate = SignatureGate(everything, Topics("sovd", "V1"), lambda reason, rejected: failures.append(reason),
                         lambda command_id: False, 10)
    garbage = Undecodable("params.x: NaN is not a number JSON allows", "params.x", "c-1")
    assert gate(incoming(b"{}"), garbage, lambda message: None) == (garbage, None)
    assert failures == []
