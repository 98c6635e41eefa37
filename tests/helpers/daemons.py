"""Projector daemons and writers as real processes, for tests that kill
them: ``Daemons`` starts ``aura-pg project`` processes (and reaps every
process a test started), ``start_writer`` a steady writer
(tests/helpers/steady_writer.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.helpers.projections import FIXTURE_CATALOG, query

ROOT = Path(__file__).resolve().parents[2]
AURA_PG = str(Path(sys.executable).with_name("aura-pg"))
# The projections of the tests' catalog that the daemons run by default.
FIXTURE_PROJECTIONS = ("tally_set", "tally_each")


class Daemons:
    """Starts `aura-pg project` processes for ``projections`` of ``catalog``
    and cleans up after the test. ``rows`` are the checkpoint rows whose
    owners ``owners`` reports (the projections' own by default; a
    partitioned processor has one per partition). ``command`` runs the CLI:
    ``python -m aura_pg`` puts the repository on the daemon's import path,
    for catalogs whose handlers are modules of the tests."""

    def __init__(
        self,
        dsn: str,
        log_dir: Path,
        *,
        catalog: Path = FIXTURE_CATALOG,
        projections: Sequence[str] = FIXTURE_PROJECTIONS,
        rows: Sequence[str] | None = None,
        command: Sequence[str] = (AURA_PG,),
    ) -> None:
        self.dsn = dsn
        self.log_dir = log_dir
        self.catalog = catalog
        self.projections = tuple(projections)
        self.rows = tuple(rows if rows is not None else projections)
        self.command = tuple(command)
        self.processes: dict[str, subprocess.Popen[str]] = {}
        # Every process started for the test (daemons and writers).
        self.started: list[subprocess.Popen[str]] = []

    def start(self, owner: str, *extra: str) -> subprocess.Popen[str]:
        log_path = self.log_dir / f"daemon-{owner}-{len(self.started)}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [
                    *self.command,
                    "project",
                    *self.projections,
                    "--dsn",
                    self.dsn,
                    "--catalog",
                    str(self.catalog),
                    "--owner",
                    owner,
                    "--poll-interval",
                    "0.2",
                    "--shutdown-timeout",
                    "10",
                    *extra,
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
                text=True,
            )
        self.processes[owner] = process
        self.started.append(process)
        return process

    def kill(self, owner: str) -> None:
        process = self.processes[owner]
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def owner_of(self) -> dict[str, str | None]:
        """The owner of each watched row ("unregistered" before the first
        daemon has installed it)."""
        rows = dict(query(self.dsn, "SELECT name, owner FROM aura.projection_checkpoints"))
        return {name: rows.get(name, "unregistered") for name in self.rows}

    def owners(self) -> set[str | None]:
        """The owners of the watched rows."""
        return set(self.owner_of().values())

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def start_writer(
    dsn: str,
    daemons: Daemons,
    seconds: float,
    rate: float,
    seed: int,
    poison_at: int | None = None,
) -> subprocess.Popen[str]:
    """A steady writer process; `daemons` reaps it if the test fails first."""
    args = [
        sys.executable,
        "-m",
        "tests.helpers.steady_writer",
        dsn,
        str(seconds),
        str(rate),
        str(seed),
    ]
    if poison_at is not None:
        args.append(str(poison_at))
    writer = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, text=True)
    daemons.started.append(writer)
    return writer
