"""Start and stop a private local Postgres cluster (with TimescaleDB preloaded)
for development, the demo and the tests.

Postgres refuses to run as root; when this runs as root the server commands
run as the ``postgres`` user and the data directory belongs to it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

SERVER_USER = "postgres"
_CONF_MARK = "# aura-pg local cluster settings"


def find_bindir() -> Path:
    """The newest installed Postgres server's bin directory."""
    candidates = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "pg_ctl").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).parent
    raise FileNotFoundError("no Postgres server found (pg_ctl); run scripts/install-system.sh")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LocalCluster:
    """A Postgres cluster in ``data_dir`` listening on 127.0.0.1:``port`` and
    on a Unix socket in ``data_dir``'s sibling ``socket`` directory."""

    data_dir: Path
    port: int = 54329
    bindir: Path = field(default_factory=find_bindir)
    settings: dict[str, str] = field(default_factory=dict)
    preload_timescaledb: bool = True

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self.socket_dir = self.data_dir.parent / "socket"
        self.log_file = self.data_dir.parent / "postgres.log"

    @property
    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _command(self, *args: str) -> list[str]:
        if self._as_root:
            return ["runuser", "-u", SERVER_USER, "--", *args]
        return list(args)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self._command(*args), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            user = pwd.getpwnam(SERVER_USER)
            os.chown(path, user.pw_uid, user.pw_gid)

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        """Create the cluster (idempotent)."""
        if self.initialized:
            return
        self._own(self.data_dir.parent)
        self._own(self.data_dir)
        self._own(self.socket_dir)
        if self._as_root:
            reachable = subprocess.run(
                self._command("test", "-w", str(self.data_dir)), capture_output=True, check=False
            )
            if reachable.returncode != 0:
                raise RuntimeError(
                    f"the {SERVER_USER} user cannot write to {self.data_dir}: every directory "
                    "above it must be searchable by others (chmod o+x), e.g. use one under /tmp"
                )
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.data_dir),
            "-U", SERVER_USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        )  # fmt: skip
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "200",
            "timescaledb.telemetry_level": "off",
            **({"shared_preload_libraries": "'timescaledb'"} if self.preload_timescaledb else {}),
            **self.settings,
        }
        lines = [_CONF_MARK, *(f"{key} = {value}" for key, value in conf.items())]
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")

    def is_running(self) -> bool:
        result = subprocess.run(
            self._command(str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "status"),
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def start(self, timeout: float = 60.0) -> None:
        """Initialise if needed and start the server (idempotent)."""
        self.init()
        if self.is_running():
            return
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D", str(self.data_dir),
            "-l", str(self.log_file),
            "-o", f"-p {self.port}",
            "-w", "-t", str(int(timeout)),
            "start",
        )  # fmt: skip
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        if self.initialized and self.is_running():
            self._run(
                str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"
            )

    def destroy(self) -> None:
        """Stop the server and delete the cluster's files."""
        self.stop("immediate")
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={SERVER_USER} dbname={dbname}"


def benchmark_settings(commit: str) -> dict[str, str]:
    """Server settings of the load benchmarks' throw-away clusters: room for
    the working set, no checkpoint storms, and durable (``"durable"``) or
    asynchronous (anything else) commits."""
    return {
        "shared_buffers": "'512MB'",
        "max_wal_size": "'4GB'",
        "synchronous_commit": "on" if commit == "durable" else "off",
    }


@contextmanager
def temporary_cluster(
    settings: Mapping[str, str] | None = None,
    prefix: str = "aura-pg-",
    *,
    port: int | None = None,
    bindir: Path | None = None,
    preload_timescaledb: bool = True,
) -> Iterator[LocalCluster]:
    """A throw-away cluster on ``port`` (default: a free one), started, and
    removed afterwards; ``bindir``: the server's programs (default
    ``find_bindir()``).

    Its directory is readable by the server user, which may not be the
    caller (root runs the server as ``postgres``).
    """
    bindir = bindir or find_bindir()
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    workdir.chmod(0o755)
    cluster = LocalCluster(
        workdir / "data",
        port=port or free_port(),
        bindir=bindir,
        settings=dict(settings or {}),
        preload_timescaledb=preload_timescaledb,
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
