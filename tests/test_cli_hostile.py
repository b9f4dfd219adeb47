"""A hostile newcomer's review of `sovd-edge`: files that are not configs, configs with the wrong shapes, a
full disk, Ctrl-C and SIGTERM mid-command. Each case is the real CLI in a subprocess; what it must do is
one line on stderr that says what is wrong, a documented exit code, and nothing half-written left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from agent.cli import check_config, commands, demo, keygen, run, simulate, uds

DEMO = ROOT / "config/demo.yaml"
SIM = ROOT / "config/sim/demo-vehicle.yaml"


def cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env)


def one_line(result: subprocess.CompletedProcess[str], code: int, module: object) -> str:
    """The single line on stderr, after checking the exit code is `code` and that `module` documents it."""
    assert result.returncode == code, (result.stdout or "") + result.stderr
    assert code in module.EXITS  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def demo_copy(tmp_path: Path, **changes: object) -> Path:
    """config/demo.yaml with its state_dir in tmp_path and its simulator file by absolute path."""
    config = yaml.safe_load(DEMO.read_text())
    config.update({"state_dir": str(tmp_path / "state"), "simulate": [str(SIM)], **changes})
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---- files that are not configs -----------------------------------------------------------------

def test_check_config_of_a_binary_file_says_it_is_not_text(tmp_path):
    blob = tmp_path / "firmware.bin"
    blob.write_bytes(b"vehicle: V\n\x89PNG\r\n\x1a\n\xff\xfe")
    line = one_line(cli("check-config", "-c", str(blob)), 78, check_config)
    assert line == (f"sovd-edge check-config: invalid configuration: {blob}: line 2: not UTF-8 text (byte 0x89); "
                    "is it a YAML file?")


def test_check_config_of_deeply_nested_yaml_is_a_config_error_not_a_crash(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 5000 + "]" * 5000 + "\n")
    line = one_line(cli("check-config", "-c", str(deep)), 78, check_config)
    assert line == (f"sovd-edge check-config: invalid configuration: {deep}: not valid YAML: "
                    "nested deeper than any config is")


def test_check_config_of_a_huge_file_stops_reading_at_the_limit(tmp_path):
    """A wrong path to a disk image or a log must not be read whole into a 1 GB Pi's memory."""
    huge = tmp_path / "huge.yaml"
    with huge.open("w") as out:
        line = "# " + "x" * 1000 + "\n"
        for _ in range(4 * 1024 * 1024 // len(line) + 2):
            out.write(line)
    line = one_line(cli("check-config", "-c", str(huge)), 78, check_config)
    assert line == (f"sovd-edge check-config: invalid configuration: {huge}: larger than 4 MiB: not a config "
                    "file (wrong path?)")


def test_check_config_with_a_control_character_names_its_line_in_one_line(tmp_path):
    nul = tmp_path / "nul.yaml"
    nul.write_text("vehicle: V\nbus: \x00\n")
    line = one_line(cli("check-config", "-c", str(nul)), 78, check_config)
    assert line == (f"sovd-edge check-config: invalid configuration: {nul}: line 2: not valid YAML: "
                    "unacceptable character #x0000: special characters are not allowed")


# ---- wrong shapes where a list of names is expected ---------------------------------------------

def test_check_config_with_a_list_in_a_keys_commands_list_reports_its_path(tmp_path):
    config = demo_copy(tmp_path, security={"keys": {"workshop": {"public_key": "w.pub", "commands": [["read_data"]]}}})
    line = one_line(cli("check-config", "-c", str(config)), 78, check_config)
    assert line.startswith(f"sovd-edge check-config: invalid configuration: {config}: "
                           "security.keys.workshop.commands[0]: a list is not a command (known: ")


def test_check_config_with_a_nameless_ecu_and_a_key_limited_to_components_lists_both(tmp_path):
    ecus = yaml.safe_load(DEMO.read_text())["ecus"]
    ecus[2].pop("name")
    config = demo_copy(tmp_path, ecus=ecus,
                       security={"keys": {"workshop": {"public_key": "w.pub", "components": ["adas"]}}})
    result = cli("check-config", "-c", str(config))
    assert result.returncode == 78, result.stderr
    assert "  ecus[2].name: required field is missing" in result.stderr
    assert ("  security.keys.workshop.components[0]: string 'adas' is not a component of this config "
            "(known: abs, engine)") in result.stderr


@pytest.mark.parametrize("did, problem", [
    ("{id: 0xF190, ascii: }", "ecus[0].dids[0].ascii: expected a string, got nothing"),
    ("{id: 0x4000, fill: }", "ecus[0].dids[0].fill: expected a mapping {length, byte}, got nothing"),
], ids=["ascii", "fill"])
def test_simulate_with_an_empty_did_value_reports_its_path(tmp_path, did, problem):
    sim = tmp_path / "sim.yaml"
    sim.write_text("ecus:\n  - name: engine\n    addressing: {mode: normal_11bit, request_id: 0x7E0, "
                   f"response_id: 0x7E8}}\n    dids:\n      - {did}\n")
    result = cli("simulate", "-c", str(sim), "--interface", "virtual", "--channel", "hostile")
    assert one_line(result, 78, simulate) == f"sovd-edge simulate: invalid simulator configuration: {sim}: {problem}"


# ---- the simulated-ECU files a config names ------------------------------------------------------

@pytest.fixture
def broken_sim_config(tmp_path: Path) -> tuple[Path, Path]:
    """A valid agent config whose `simulate:` file has an unknown key (run refuses it with 78)."""
    sim = tmp_path / "sim.yaml"
    sim.write_text(SIM.read_text() + "bogus: 1\n")
    config = demo_copy(tmp_path, simulate=[str(sim)])
    return config, sim


def test_uds_with_an_invalid_simulator_file_is_a_config_error(broken_sim_config):
    config, sim = broken_sim_config
    line = one_line(cli("uds", "-c", str(config), "engine", "read_data", "data=vin"), 78, uds)
    assert line == f"sovd-edge uds: invalid configuration: {sim}: bogus: unknown key"


def test_demo_local_with_an_invalid_simulator_file_is_a_config_error(broken_sim_config):
    config, sim = broken_sim_config
    line = one_line(cli("demo", "--local", "-c", str(config)), 78, demo)
    assert line == f"sovd-edge demo: invalid configuration: {sim}: bogus: unknown key"


def test_check_config_reads_the_simulator_files_as_run_does(broken_sim_config):
    config, sim = broken_sim_config
    line = one_line(cli("check-config", "-c", str(config)), 78, check_config)
    assert line == f"sovd-edge check-config: invalid configuration: {sim}: bogus: unknown key"


# ---- Ctrl-C and SIGTERM in the middle of a one-shot subcommand --------------------------------

def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_call_interrupted_by_ctrl_c_says_so_in_one_line_and_ends_by_the_signal(broker):
    from agent.config.model import MqttConfig
    from agent.fleet.caller import Caller

    vehicle = f"CTRLC{os.getpid()}"
    with Caller(MqttConfig(broker=broker.url), vehicle) as watcher:
        watcher.subscribe(watcher.topics.commands)
        call = subprocess.Popen([sys.executable, "-m", "agent", "call", "-c", str(DEMO), "--broker", broker.url,
                                 "--vehicle", vehicle, "--wait", "60", "engine", "read_data", "data=vin"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            watcher.wait_for(lambda s: s.topic == watcher.topics.commands, 30)  # it waits for the answer now
            call.send_signal(signal.SIGINT)
            out, err = call.communicate(timeout=30)
        finally:
            call.kill()
    assert call.returncode == -signal.SIGINT, err
    assert (out, err) == ("", "sovd-edge call: interrupted by SIGINT (Ctrl-C)\n")


def test_demo_stopped_by_sigterm_leaves_no_broker_agent_or_temp_dir_behind(tmp_path):
    """systemd, a CI job's timeout or `kill` sends SIGTERM to the demo alone: it must stop its Mosquitto
    and its agent and remove its temporary directory, not orphan them."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    demo_run = subprocess.Popen([sys.executable, "-m", "agent", "demo"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp)})
    try:
        _wait_until(lambda: list(tmp.glob("sovd-demo-*/state/agent.lock")), 60, "the demo's agent to start")
        children = _children(demo_run.pid)
        assert len(children) >= 2, children  # its Mosquitto and its agent
        demo_run.send_signal(signal.SIGTERM)
        _, err = demo_run.communicate(timeout=60)
    finally:
        demo_run.kill()
    assert demo_run.returncode == -signal.SIGTERM, err
    assert err.splitlines() == ["sovd-edge demo: interrupted by SIGTERM"]
    assert [pid for pid in children if _alive(pid)] == []
    assert list(tmp.iterdir()) == []


# ---- a full disk ----------------------------------------------------------------------------

def _disk_full_after(limit: int):
    """A file-size limit stands in for a full disk (no filesystem of our own can be mounted here): a write
    past `limit` bytes fails with EFBIG, as one fails with ENOSPC on a full SD card."""
    def preexec() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_keygen_on_a_full_disk_leaves_no_half_written_key_and_can_be_run_again(tmp_path):
    """The private key PEM is 119 bytes: at 64 its write is cut short, as on a disk that fills up."""
    keys = tmp_path / "keys"
    result = subprocess.run([sys.executable, "-m", "agent", "keygen", "--key-id", "k1", "--dir", str(keys)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60, preexec_fn=_disk_full_after(64))
    line = one_line(result, 73, keygen)
    assert line.startswith(f"sovd-edge keygen: cannot write {keys}/k1.") and line.endswith(": File too large")
    assert list(keys.iterdir()) == []
    assert cli("keygen", "--key-id", "k1", "--dir", str(keys)).returncode == 0  # room again: it just works


# ---- numbers a flag cannot mean ------------------------------------------------------------------

@pytest.mark.parametrize("args, error", [
    (["discover", "--interface", "virtual", "--channel", "hostile", "--obd-wait-ms", "-5"],
     "argument --obd-wait-ms: '-5' is not a number of milliseconds (a whole number, 0 or more)"),
    (["discover", "--interface", "virtual", "--channel", "hostile", "--listen", "nan"],
     "argument --listen: 'nan' is not a number of seconds (0 or more)"),
    (["call", "-c", str(DEMO), "--broker", "mqtt://127.0.0.1:1", "--wait", "nan", "--status"],
     "argument --wait: 'nan' is not a number of seconds (0 or more)"),
    (["run", "-c", str(DEMO), "--grace", "-1"], "argument --grace: '-1' is not a number of seconds (0 or more)"),
], ids=["discover-negative-ms", "discover-nan-listen", "call-nan-wait", "run-negative-grace"])
def test_a_time_flag_that_is_negative_or_nan_is_a_usage_error(args, error):
    """Before: discover blamed the bus for -5 ms (69, "sleep length must be non-negative"), a nan listen
    printed "--listen 0" in its report, and call --wait nan waited forever."""
    result = cli(*args, timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == f"sovd-edge {args[0]}: error: {error}"


@pytest.mark.parametrize("args", [["commands"], ["check-config", "-c", str(DEMO)]], ids=["commands", "check-config"])
def test_output_redirected_to_a_full_disk_is_73_in_one_line_not_a_bug(tmp_path, args):
    """`sovd-edge discover ... > discovered.yaml` on a full SD card: the write fails (here past a 64-byte
    file-size limit, standing in for the full disk), in print() for a long output or in the final flush for
    a short one. Before: 'internal error (a bug)' with a traceback (70)."""
    with (tmp_path / "out.txt").open("w") as out:
        result = subprocess.run([sys.executable, "-m", "agent", *args], stdout=out, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT, timeout=60, preexec_fn=_disk_full_after(64))
    module = commands if args[0] == "commands" else check_config
    assert one_line(result, 73, module) == f"sovd-edge {args[0]}: cannot write the output: File too large"


def test_run_with_a_sim_journal_it_cannot_open_is_73_in_one_log_line(tmp_path):
    journal = tmp_path / "no-such-dir" / "journal.txt"
    result = cli("run", "-c", str(demo_copy(tmp_path)), "--broker", "mqtt://127.0.0.1:1", "--metrics-listen",
                 "127.0.0.1:0", "--sim-journal", str(journal), "--log-format", "human", timeout=60)
    line = one_line(result, 73, run)
    assert line.endswith(f"ERROR   agent.run: cannot open --sim-journal {journal}: No such file or directory"), line


@pytest.mark.parametrize("flag, value", [("--scan-29bit", "0x00-0x1FF"), ("--scan-11bit", "0x700-0x800")])
def test_a_scan_range_past_its_addresses_is_a_usage_error_naming_the_right_bound(flag, value):
    """A 29-bit normal-fixed target address is one byte: the flag said `<= 0x7FF` (the 11-bit bound) and then
    dropped whatever was above 0xFF without a word."""
    result = cli("discover", "--interface", "virtual", "--channel", "x", "--scan", flag, value)
    assert result.returncode == 2
    assert ("TO <= 0xFF" if flag == "--scan-29bit" else "TO <= 0x7FF") in result.stderr


def test_import_odx_of_a_directory_says_it_is_a_directory(tmp_path):
    """It said "no such file" of a directory that plainly exists."""
    pytest.importorskip("odxtools")
    result = cli("import-odx", str(tmp_path))
    assert result.returncode == 2
    assert "a directory, not a .pdx file" in result.stderr and "no such file" not in result.stderr


def test_keygen_with_a_file_for_its_dir_says_so(tmp_path):
    """It said "File exists: '<the file>'", naming neither the flag nor what was wrong with it."""
    pytest.importorskip("cryptography")
    afile = tmp_path / "keys"
    afile.write_text("")
    result = cli("keygen", "--key-id", "k1", "--dir", str(afile))
    assert result.returncode == 73
    assert f"--dir {afile} is a file, not a directory" in result.stderr


def test_output_a_plain_ascii_terminal_cannot_show_is_escaped_not_a_crash(tmp_path):
    """A serial console or a service with LANG=C: a file name with an é must not turn an OK into exit 70."""
    config = demo_copy(tmp_path)
    odd = config.rename(tmp_path / "démo.yaml")
    result = cli("check-config", "-c", str(odd), env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert "d\\xe9mo.yaml: OK" in result.stdout


def test_a_closed_stdout_ends_quietly_by_sigpipe():
    # `sovd-edge commands | head -1`: the reader goes away, the writer ends without a word, as a pipeline
    # expects (the shell shows 141). Here the pipe has no reader from the start, so the first write fails.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "agent", "commands"], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT, timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == -signal.SIGPIPE and result.stderr == ""
