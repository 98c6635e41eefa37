"""The systemd units under deploy/systemd/: the checks on the parsed files
always run; `systemd-analyze verify` runs where systemd is installed (it
also reports unknown or malformed settings, which it only warns about)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = REPO_ROOT / "deploy" / "systemd"
UNITS = sorted(SYSTEMD.glob("*.service"))
INSTALLED_COMMAND = "/opt/aura-pg/bin/aura-pg"
# unit: (the aura-pg command, its metrics port)
DAEMONS = {
    "aura-pg-project.service": ("project", 9187),
    "aura-pg-relay.service": ("relay", 9188),
    "aura-pg-import-nats.service": ("import nats", 9189),
}
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "CapabilityBoundingSet": "",
}

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(path: Path) -> Unit:
    """{section: [(key, value), ...]}: keys may repeat (EnvironmentFile=)."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, equals, value = line.partition("=")
        assert equals and current is not None, f"{path.name}:{number}: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [value for k, value in unit.get(section, []) if k == key]


def one(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}=: {found}"
    return found[0]


def test_a_unit_per_daemon() -> None:
    assert [path.name for path in UNITS] == sorted(DAEMONS)


@pytest.mark.parametrize("path", UNITS, ids=lambda path: path.name)
def test_the_unit_runs_the_daemon_with_its_metrics_port(path: Path) -> None:
    unit = parse_unit(path)
    command, port = DAEMONS[path.name]
    exec_start = one(unit, "Service", "ExecStart").split()
    assert exec_start[0] == INSTALLED_COMMAND
    assert " ".join(exec_start[1 : 1 + len(command.split())]) == command
    assert exec_start[exec_start.index("--metrics-port") + 1] == str(port)
    assert one(unit, "Service", "Type") == "exec"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("path", UNITS, ids=lambda path: path.name)
def test_the_unit_restarts_always_and_stops_gracefully(path: Path) -> None:
    unit = parse_unit(path)
    assert one(unit, "Service", "Restart") == "always"
    assert float(one(unit, "Service", "RestartSec")) > 0
    assert one(unit, "Unit", "StartLimitIntervalSec") == "0"  # never gives up
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    # Longer than a projector's shutdown (docker-compose.yml gives it 40 s).
    assert int(one(unit, "Service", "TimeoutStopSec")) >= 40


@pytest.mark.parametrize("path", UNITS, ids=lambda path: path.name)
def test_the_unit_reads_an_environment_file(path: Path) -> None:
    unit = parse_unit(path)
    files = values(unit, "Service", "EnvironmentFile")
    assert files[0] == "/etc/aura-pg/aura-pg.env"  # required: it holds the DSN
    assert files[1:] == [f"-/etc/aura-pg/{path.stem}.env"]  # optional, per service
    example = (SYSTEMD / "aura-pg.env.example").read_text()
    assert re.search(r"^AURA_PG_DSN=", example, re.MULTILINE)


@pytest.mark.parametrize("path", UNITS, ids=lambda path: path.name)
def test_the_unit_runs_with_least_privilege(path: Path) -> None:
    unit = parse_unit(path)
    dynamic = values(unit, "Service", "DynamicUser")
    user = values(unit, "Service", "User")
    assert dynamic == ["yes"] or (user and user[0] not in ("root", "0"))
    for key, expected in HARDENING.items():
        assert one(unit, "Service", key) == expected, key
    assert values(unit, "Service", "AmbientCapabilities") in ([], [""])
    families = one(unit, "Service", "RestrictAddressFamilies").split()
    assert set(families) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in values(unit, "Service", "SystemCallFilter")


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (no systemd on this machine)")
    command = Path(sys.executable).with_name("aura-pg")
    assert command.exists(), command
    # verify checks that ExecStart's program exists: this environment's aura-pg.
    for path in UNITS:
        text = path.read_text().replace(INSTALLED_COMMAND, str(command))
        (tmp_path / path.name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *sorted(str(p) for p in tmp_path.glob("*.service"))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0 and "Failed to" in output and ".service" not in output:
        pytest.skip(f"systemd-analyze cannot verify here: {output.strip()[:200]}")
    # A setting systemd cannot parse is only a warning ("..., ignoring"): none.
    assert result.returncode == 0 and output.strip() == "", output
