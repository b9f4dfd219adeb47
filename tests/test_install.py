"""The device side: the systemd unit checked by systemd's own tools, the installer, networkd files, doctor."""

import configparser
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import DATA, ROOT

from agent.bus.canstate import parse_ip_link
from agent.config import load_config
from agent.system.doctor import FAIL, OK, SKIP, WARN, render, run_checks

UNIT = ROOT / "systemd/sovd-edge.service"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the installer creates users and chowns: needs root")


def test_unit_exposure_is_at_most_2():
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)], capture_output=True,
                            text=True, timeout=60)
    match = re.search(r"Overall exposure level for sovd-edge.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


def test_unit_essentials():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["Type"] == "notify" and service["WatchdogSec"] and service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "78 65"  # a bad config; a newer agent's store (a rollback)
    assert "ConfigurationDirectory" in service and "StateDirectory" in service
    assert "LoadCredential" in service and service["User"] == "sovd-edge"
    assert "AF_CAN" in service["RestrictAddressFamilies"] and "AF_NETLINK" in service["RestrictAddressFamilies"]
    assert "BindsTo" in unit["Unit"] and "network-online.target" in unit["Unit"]["After"]
    # an unattended agent never stops retrying for good (nobody is there to reset it)
    assert unit["Unit"]["StartLimitIntervalSec"] == "0" and "StartLimitBurst" not in unit["Unit"]
    text = UNIT.read_text()
    for omitted in ("PrivateNetwork", "IPAddressDeny", "DynamicUser"):
        assert re.search(rf"^# - {omitted}=", text, re.M) or re.search(rf"^# .*{omitted}=", text, re.M), omitted


def syscall_groups() -> dict[str, list[str]]:
    """systemd's own syscall groups (`systemd-analyze syscall-filter`), each as its listed entries."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, timeout=60).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def unit_allowed_syscalls(unit_text: str) -> set[str]:
    """The syscalls the unit's SystemCallFilter= lines allow, merged as systemd.exec(5) says: the first line
    makes it an allow list, later `~` lines take names out of it and later plain lines put names back."""
    groups = syscall_groups()

    def expand(name: str) -> set[str]:
        return set().union(*(expand(n) for n in groups[name])) if name.startswith("@") else {name}

    allowed: set[str] = set(groups["@default"])
    lines = re.findall(r"^SystemCallFilter=(.*)$", unit_text, re.M)
    assert lines and not lines[0].startswith("~")
    for value in lines:
        names = value.removeprefix("~").split()
        names_set = set().union(*(expand(n) for n in names))
        allowed = allowed - names_set if value.startswith("~") else allowed | names_set
    return allowed


def test_unit_lets_the_agent_read_whether_the_clock_is_synchronized():
    # agent/clock.py asks adjtimex(2) (read-only: modes 0) whether NTP disciplines the clock, the only way to
    # know it under chrony or ntpd. A seccomp filter that denies the call makes it EPERM, and the agent then
    # never trusts its clock (signed commands refused, every message marked unsynchronized). ProtectClock=yes
    # denies @clock whatever the arguments (systemd issue #26413); CapabilityBoundingSet= (no CAP_SYS_TIME)
    # is what keeps the clock from being set.
    text = UNIT.read_text()
    assert not re.search(r"^ProtectClock=(yes|true|1|on)\s*$", text, re.M)
    allowed = unit_allowed_syscalls(text)
    assert {"adjtimex", "clock_adjtime", "clock_adjtime64"} <= allowed  # 64: glibc's call on 32-bit Pi OS
    assert not {"settimeofday", "clock_settime", "reboot", "init_module"} & allowed
    assert re.search(r"^CapabilityBoundingSet=\s*$", text, re.M)


SERVICE_METRICS = """
import dataclasses, sys, tempfile
from pathlib import Path
from prometheus_client import generate_latest
from agent.config import load_config
from agent.system.service import Service
config = load_config(Path("config/demo.yaml"))
config = dataclasses.replace(config, state_dir=Path(tempfile.mkdtemp()), simulate=(),
                             metrics=dataclasses.replace(config.metrics, enabled=False))
service = Service(config)
try:
    sys.stdout.write(generate_latest(service.registry).decode())
finally:
    service.store.close()
"""


def under_proc_subset_pid(*argv: str) -> subprocess.CompletedProcess:
    """Runs argv with /proc as ProcSubset=pid mounts it (a private mount namespace: nothing else sees it)."""
    script = 'mount -t proc -o subset=pid proc /proc && exec "$@"'
    return subprocess.run(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c", script, "sh", *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def proc_subset_pid_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = under_proc_subset_pid("sh", "-c", "test -e /proc/self/stat && test ! -e /proc/stat")
    return probe.returncode == 0


@pytest.mark.skipif(not proc_subset_pid_works(), reason="needs root and a kernel that mounts /proc with subset=pid")
def test_process_metrics_survive_the_units_proc_subset():
    # The unit has ProcSubset=pid: /proc/stat (boot time) is hidden, /proc/self is not. prometheus-client's
    # ProcessCollector reads the boot time from /proc/stat first and, failing that, exports nothing at all:
    # the process_* metrics the README lists (memory, CPU, open fds) were missing on every installed agent.
    assert re.search(r"^ProcSubset=pid$", UNIT.read_text(), re.M)
    result = under_proc_subset_pid(sys.executable, "-c", SERVICE_METRICS)
    assert result.returncode == 0, result.stderr
    found = {line.split()[0] for line in result.stdout.splitlines() if line and not line.startswith("#")}
    expected = {"process_resident_memory_bytes", "process_virtual_memory_bytes", "process_cpu_seconds_total",
                "process_start_time_seconds", "process_open_fds", "process_max_fds"}
    assert expected <= found, sorted(found)
    start = next(float(line.split()[1]) for line in result.stdout.splitlines()
                 if line.startswith("process_start_time_seconds "))
    assert abs(start - time.time()) < 600  # the process started moments ago, not at the epoch


def test_the_agent_starts_again_when_its_can_interface_comes_back(tmp_path):
    # BindsTo= stops the agent when the interface's device goes away (a USB adapter re-enumerating after a
    # brown-out); nothing started it again when the device came back, until the next boot.
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(UNIT.read_text())
    bound = unit["Unit"]["BindsTo"].split()
    assert bound == ["sys-subsystem-net-devices-can0.device"]
    assert set(bound) <= set(unit["Install"]["WantedBy"].split())
    # and systemctl makes the link from it, as `hw/install` enables the unit
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, tmp_path / "etc/systemd/system/sovd-edge.service")
    result = subprocess.run(["systemctl", f"--root={tmp_path}", "enable", "sovd-edge.service"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "etc/systemd/system/sys-subsystem-net-devices-can0.device.wants/sovd-edge.service").is_symlink()


def test_networkd_files():
    for name, fd in (("80-can.network", False), ("80-can-fd.network", True)):
        config = configparser.ConfigParser()
        config.optionxform = str
        config.read(ROOT / "hw/networkd" / name)
        assert config["Match"]["Name"] == "can0"
        assert config["CAN"]["BitRate"] == "500K" and config["CAN"]["RestartSec"] == "100ms"
        assert config["CAN"]["FDMode"] == ("yes" if fd else "no") and ("DataBitRate" in config["CAN"]) is fd
        # networkd changes only what is given: a listen-only trial by hand would outlive its restart
        assert config["CAN"]["ListenOnly"] == "no"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/gshadow").write_text("root:*::\n")
    litter = [ROOT / "build", *ROOT.glob("*.egg-info")]
    before = {path: path.stat().st_mtime_ns for path in litter if path.exists()}
    result = subprocess.run([str(ROOT / "hw/install"), "--root", str(root), "--no-apt"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    INSTALL_LEFT[:] = [path for path in [ROOT / "build", *ROOT.glob("*.egg-info")]
                       if path.exists() and before.get(path) != path.stat().st_mtime_ns]
    return root


INSTALL_LEFT: list = []  # what the installer's run made or changed in the checkout


@needs_root
def test_install_leaves_the_checkout_as_it_was(installed):
    # `sudo hw/install` from the operator's clone built the package in it: root-owned build/ and
    # sovd_edge_agent.egg-info that `hw/dev-setup` as that user could not write, and a build/ that kept
    # modules deleted since and packaged them again at the next install
    assert INSTALL_LEFT == []


def ids(root, name):
    uid = next(line.split(":")[2] for line in (root / "etc/passwd").read_text().splitlines()
               if line.startswith(f"{name}:"))
    gid = next(line.split(":")[2] for line in (root / "etc/group").read_text().splitlines()
               if line.startswith(f"{name}:"))
    return int(uid), int(gid)


@needs_root
def test_install_places_every_file_with_its_mode_and_owner(installed, pki):
    root = installed
    uid, gid = ids(root, "sovd-edge")
    assert uid < 1000  # a system user
    passwd = next(line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("sovd-edge:"))
    assert passwd.endswith(":/var/lib/sovd-edge:/usr/sbin/nologin")
    expected = {
        "etc/systemd/system/sovd-edge.service": (0o644, 0, 0),
        "etc/systemd/network/80-can.network": (0o644, 0, 0),
        "etc/sovd-edge": (0o750, 0, gid),
        "etc/sovd-edge/agent.yaml": (0o640, 0, gid),
        "etc/sovd-edge/credentials": (0o700, 0, 0),
        "etc/sovd-edge/credentials/mqtt-password": (0o600, 0, 0),
        "etc/sovd-edge/credentials/client-key": (0o600, 0, 0),
        "var/lib/sovd-edge": (0o750, uid, gid),
        "opt/sovd-edge": (0o755, 0, 0),
    }
    for path, (mode, owner, group) in expected.items():
        st = (root / path).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, owner, group), path
    assert (root / "etc/systemd/system/sovd-edge.service").read_text() == UNIT.read_text()
    assert (root / "etc/sovd-edge/agent.yaml").read_text() == (ROOT / "config/agent.example.yaml").read_text()
    link = root / "etc/systemd/system/multi-user.target.wants/sovd-edge.service"
    assert os.readlink(link) == "/etc/systemd/system/sovd-edge.service"
    link = root / "etc/systemd/system/sys-subsystem-net-devices-can0.device.wants/sovd-edge.service"
    assert os.readlink(link) == "/etc/systemd/system/sovd-edge.service"  # started again when can0 comes back
    tool = root / "opt/sovd-edge/venv/bin/sovd-edge"
    assert subprocess.run([str(tool), "--version"], capture_output=True, text=True).stdout.startswith("sovd-edge 0.")
    # Fresh from the installer the example config names the backend's public keys, which only the operator
    # can put there: check-config says exactly that (as `run` would), then passes once they are in place.
    config = root / "etc/sovd-edge/agent.yaml"
    check = subprocess.run([str(tool), "check-config", "-c", str(config)], capture_output=True, text=True)
    assert check.returncode == 78 and "cannot read public key /etc/sovd-edge/keys/backend-2026.pub" in check.stderr
    keys = root / "etc/sovd-edge/keys"
    assert (keys.stat().st_mode & 0o7777, keys.stat().st_gid) == (0o750, gid)
    for key_id in ("backend-2026", "workshop"):
        subprocess.run([str(tool), "keygen", "--key-id", key_id, "--dir", str(keys)], check=True, capture_output=True)
    local = config.with_name("agent.local.yaml")  # the paths as seen from this root, not from /
    local.write_text(config.read_text().replace("/etc/sovd-edge/", f"{root}/etc/sovd-edge/"))
    check = subprocess.run([str(tool), "check-config", "-c", str(local)], capture_output=True, text=True)
    # then the broker's CA and the vehicle's certificate, which `run` loads before it connects
    assert check.returncode == 78 and f"mqtt.tls.ca_file: {root}/etc/sovd-edge/ca.pem is not a readable" in check.stderr
    for name, source in (("ca.pem", "ca.pem"), ("client.pem", "client.pem")):
        (root / "etc/sovd-edge" / name).write_bytes((pki / source).read_bytes())
    check = subprocess.run([str(tool), "check-config", "-c", str(local)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # the client key comes from systemd (LoadCredential=): named, not read
    assert "not checked here: mqtt.tls.key_file /run/credentials/sovd-edge.service/client-key" in check.stdout


@needs_root
def test_installed_unit_verifies(installed, tmp_path):
    # verify resolves ExecStart on this machine: point it at the venv inside the install root
    unit = tmp_path / "sovd-edge.service"
    text = (installed / "etc/systemd/system/sovd-edge.service").read_text()
    unit.write_text(text.replace("/opt/sovd-edge/", f"{installed}/opt/sovd-edge/"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stdout + result.stderr


@needs_root
def test_reinstall_keeps_an_edited_config(installed):
    config = installed / "etc/sovd-edge/agent.yaml"
    config.write_text(config.read_text().replace("WVWZZZ1JZXW000001", "EDITED0000000001"))
    (installed / "etc/sovd-edge/credentials/mqtt-password").write_text("secret")
    result = subprocess.run([str(ROOT / "hw/install"), "--root", str(installed), "--no-apt"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "keeping the existing /etc/sovd-edge/agent.yaml" in result.stdout
    assert "EDITED0000000001" in config.read_text()
    assert (installed / "etc/sovd-edge/credentials/mqtt-password").read_text() == "secret"
    assert sum(1 for line in (installed / "etc/passwd").read_text().splitlines() if line.startswith("sovd-edge:")) == 1


def recorded(name):
    return lambda interface: parse_ip_link((DATA / "iproute2" / f"{name}.json").read_text(), interface)


def doctor_config(tmp_path, broker_url, **bus):
    config = load_config(ROOT / "config/agent.example.yaml")
    config = dataclasses.replace(config, state_dir=tmp_path / "state",
                                 mqtt=dataclasses.replace(config.mqtt, broker=broker_url, tls=None))
    return dataclasses.replace(config, bus=dataclasses.replace(config.bus, **bus)) if bus else config


def results(checks):
    return {c.name: c.result for c in checks}


def test_doctor_healthy_can0(tmp_path, broker):
    checks = run_checks(doctor_config(tmp_path, broker.url), reader=recorded("error-active"))
    got = results(checks)
    assert got["config"] == got["interface"] == got["bitrate"] == got["bus state"] == got["broker"] == OK
    assert got["state dir"] == OK and got["kernel ISO-TP"] in (OK, WARN)
    assert "CHECK" in render(checks)


def test_doctor_failures_each_with_a_fix(tmp_path):
    config = doctor_config(tmp_path, "mqtt://127.0.0.1:9", bitrate=250_000)
    checks = run_checks(config, reader=recorded("bus-off"))
    failing = {c.name: c for c in checks if c.result == FAIL}
    assert set(failing) >= {"bitrate", "bus state", "broker"}
    assert all(c.fix for c in failing.values())
    missing = run_checks(config, reader=lambda interface: None)
    assert results(missing)["interface"] == FAIL and "dtoverlay" in missing[1].fix
    # without a HAT, a vcan named like the config's can0 would look like a real bus: say to change the config
    assert "sudo hw/vcan-up and bus.channel: vcan0" in missing[1].fix
    missing_vcan = run_checks(dataclasses.replace(config, bus=dataclasses.replace(config.bus, channel="vcan3")),
                              reader=lambda interface: None)
    assert missing_vcan[1].fix == "sudo hw/vcan-up vcan3"
    down = run_checks(config, reader=recorded("stopped"))
    assert results(down)["interface"] == FAIL and "hw/can-up" in down[1].fix
    vcan = run_checks(dataclasses.replace(config, bus=dataclasses.replace(config.bus, channel="vcan0")),
                      reader=recorded("vcan"))
    assert results(vcan)["bus state"] == SKIP


@needs_root
def test_doctor_finds_files_in_the_state_dir_that_lock_its_owner_out(tmp_path):
    # what an agent run as root leaves in the service's state directory: the service cannot lock it (exit 73)
    from agent.system.doctor import _state_dir

    state = tmp_path / "state"
    state.mkdir()
    (state / "agent.lock").write_text("1\n")
    (state / "clock.json").write_text("{}")
    os.chown(state, 65534, 65534)
    os.chown(state / "clock.json", 65534, 65534)
    check = _state_dir(state)
    assert check.result == FAIL and check.detail == f"agent.lock in {state} belong to another user than the " \
                                                    "directory's (nobody)"
    assert check.fix == f"sudo chown -R nobody: {state}"
    os.chown(state / "agent.lock", 65534, 65534)
    assert _state_dir(state).result == OK


def test_doctor_cli(tmp_path, broker):
    def doctor(*args):
        return subprocess.run([sys.executable, "-m", "agent", "doctor", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)

    ok = doctor("-c", "config/demo.yaml", "--broker", broker.url, "--state-dir", str(tmp_path))
    assert ok.returncode == 0, ok.stdout
    assert re.search(r"^broker\s+ok", ok.stdout, re.M) and re.search(r"^interface\s+skip", ok.stdout, re.M)
    bad = doctor("-c", "config/demo.yaml", "--broker", "mqtt://127.0.0.1:9", "--state-dir", str(tmp_path))
    assert bad.returncode == 1 and "fix:" in bad.stdout
    missing = doctor("-c", "nonexistent.yaml")
    assert missing.returncode == 78


@pytest.mark.slow
@needs_root
@pytest.mark.skipif(shutil.which("debootstrap") is None, reason="debootstrap is not installed (hw/dev-setup --tests)")
def test_install_in_a_clean_debian_12_chroot(tmp_path_factory, pki):
    """The installer inside a fresh Debian 12 made by debootstrap: apt, user, venv, unit; then the tool runs."""
    root = tmp_path_factory.mktemp("bookworm")
    boot = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root), "http://deb.debian.org/debian"],
                          capture_output=True, text=True, timeout=1500)
    assert boot.returncode == 0, boot.stdout[-3000:] + boot.stderr[-3000:]
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    env = carry_package_index_settings(root)
    for mount in ("proc", "sys", "dev"):
        subprocess.run(["mount", "--bind", f"/{mount}", str(root / mount)], check=True)
    try:
        result = subprocess.run([str(ROOT / "hw/install"), "--root", str(root)], capture_output=True, text=True,
                                timeout=1500, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        run = ["chroot", str(root), "/opt/sovd-edge/venv/bin/sovd-edge"]
        version = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=60)
        assert version.returncode == 0 and version.stdout.startswith("sovd-edge 0."), version.stderr
        for key_id in ("backend-2026", "workshop"):  # the operator's step: the backend's public keys
            subprocess.run([*run, "keygen", "--key-id", key_id, "--dir", "/etc/sovd-edge/keys"], check=True,
                           capture_output=True, timeout=60)
        for name in ("ca.pem", "client.pem"):  # and the broker's CA and the vehicle's certificate
            (root / "etc/sovd-edge" / name).write_bytes((pki / name).read_bytes())
        check = subprocess.run([*run, "check-config", "-c", "/etc/sovd-edge/agent.yaml"], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        assert (root / "etc/systemd/system/multi-user.target.wants/sovd-edge.service").is_symlink()
        assert (root / "etc/systemd/system/sys-subsystem-net-devices-can0.device.wants/sovd-edge.service").is_symlink()
    finally:
        for mount in ("dev", "sys", "proc"):
            subprocess.run(["umount", "-l", str(root / mount)], check=False)


def carry_package_index_settings(root):
    """The chroot's pip must reach the index this machine uses: the TLS trust the environment points at goes
    to a path Debian's ca-certificates does not rewrite, pip's config files to theirs. Returns the
    environment for the installer."""
    env = dict(os.environ)
    bundle = next((os.environ[v] for v in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
                   if os.path.isfile(os.environ.get(v, ""))), None)
    if bundle:
        (root / "etc/ssl").mkdir(parents=True, exist_ok=True)
        shutil.copy(bundle, root / "etc/ssl/host-trust.pem")
        for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE"):
            env[var] = "/etc/ssl/host-trust.pem"
        env.pop("SSL_CERT_DIR", None)
    for config in ("/etc/pip.conf", "/etc/xdg/pip"):
        if os.path.isdir(config):
            shutil.copytree(config, root / config.lstrip("/"), dirs_exist_ok=True)
        elif os.path.exists(config):
            shutil.copy(config, root / config.lstrip("/"))
    return env


def unit_dependencies(unit_text: str, *drop_ins: str) -> dict[str, list[str]]:
    """[Unit] BindsTo= and After= of the unit with its drop-ins applied as systemd does: a list setting adds
    to what is there, an empty assignment clears it."""
    found: dict[str, list[str]] = {"BindsTo": [], "After": []}
    for text in (unit_text, *drop_ins):
        section = ""
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("["):
                section = line
            elif section == "[Unit]" and "=" in line and not line.startswith("#"):
                key, value = line.split("=", 1)
                if key in found:
                    found[key] = found[key] + value.split() if value.strip() else []
    return found


def test_the_vcan0_drop_ins_the_docs_give_drop_can0():
    # Without the empty assignments the agent stays bound to can0 as well, and on a machine without can0
    # (a development machine with vcan0) systemd never starts it.
    unit = UNIT.read_text()
    header = [line[len("#   "):] for line in unit[:unit.index("\n[Unit]")].splitlines() if line.startswith("#   ")]
    hw_readme = (ROOT / "hw/README.md").read_text()
    readme_drop_in = hw_readme[hw_readme.index("```ini", hw_readme.index("systemctl edit sovd-edge")) + 6:]
    readme_drop_in = readme_drop_in[:readme_drop_in.index("```")]
    for drop_in in ("\n".join(header), readme_drop_in):
        deps = unit_dependencies(unit, drop_in)
        assert deps["BindsTo"] == ["sys-subsystem-net-devices-vcan0.device"], drop_in
        assert "sys-subsystem-net-devices-vcan0.device" in deps["After"] and "network-online.target" in deps["After"]
        assert not [d for d in deps["After"] if "can0" in d and "vcan0" not in d], drop_in
