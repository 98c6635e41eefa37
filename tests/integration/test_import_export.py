"""``aura-pg export`` and ``aura-pg import jsonl``: a round trip between two
databases gives the same log, and an import killed with SIGKILL, run again,
finishes without importing anything twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from aura_pg import EventStore, NewEvent, StreamAppend, migrate
from aura_pg.cli import exit_codes, main
from tests.helpers.projections import query

REPO_ROOT = Path(__file__).resolve().parents[2]


def log(dsn: str) -> list[tuple[Any, ...]]:
    """Everything the log keeps of an event but where and when it was written."""
    return query(
        dsn,
        "SELECT stream_id, version, event_id, type, data, metadata, idempotency_key,"
        " idempotency_hash IS NULL FROM aura.events ORDER BY transaction_id, global_position",
    )


def fill(dsn: str, streams: int = 12, rounds: int = 5) -> None:
    """Interleaved streams, explicit and default keys, metadata, both append paths."""
    with EventStore.connect(dsn) as store:
        for r in range(rounds):
            for s in range(streams):
                store.append(
                    f"order-{s}",
                    [
                        NewEvent("PLACED", {"r": r, "s": s, "text": "é\u2028\x85\r\n"}, {"who": s}),
                        NewEvent("KEYED", {"r": r}, idempotency_key=f"key-{r}"),
                    ],
                )
        store.append_many([StreamAppend(f"bulk-{s}", [NewEvent("B", {"s": s})]) for s in range(5)])


@pytest.fixture
def target(empty_dsn: str) -> str:
    migrate.upgrade(empty_dsn)
    return empty_dsn


def test_round_trip_gives_the_same_log(dsn: str, target: str, tmp_path: Path) -> None:
    fill(dsn)
    exported = tmp_path / "log.jsonl"
    assert main(["export", "--dsn", dsn, "--output", str(exported)]) == exit_codes.OK
    lines = exported.read_text(encoding="utf-8").splitlines()  # every line break
    assert len(lines) == 12 * 5 * 2 + 5
    first = json.loads(lines[0])
    assert sorted(first) == sorted(
        ["stream_id", "version", "type", "data", "metadata", "event_id", "idempotency_key",
         "recorded_at"]
    )  # fmt: skip
    argv = ["import", "jsonl", str(exported), "--dsn", target, "--chunk-events", "7", "--quiet"]
    assert main(argv) == exit_codes.OK
    assert log(target) == log(dsn)
    # Run again: every chunk is found recorded, nothing is written.
    assert main([*argv[:-1]]) == exit_codes.OK
    assert log(target) == log(dsn)
    # And the target exports the same file, but for the recording times.
    again = tmp_path / "again.jsonl"
    assert main(["export", "--dsn", target, "-o", str(again)]) == exit_codes.OK

    def timeless(path: Path) -> list[dict[str, Any]]:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        return [{k: v for k, v in row.items() if k != "recorded_at"} for row in rows]

    assert timeless(again) == timeless(exported)


def test_export_after_a_checkpoint(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(dsn, streams=2, rounds=1)
    assert main(["export", "--dsn", dsn, "-o", str(tmp_path / "a.jsonl")]) == exit_codes.OK
    checkpoint = capsys.readouterr().err.split("--after ")[1].strip()
    with EventStore.connect(dsn) as store:
        store.append("later", NewEvent("LATE", {}))
    assert main(["export", "--dsn", dsn, "--after", checkpoint]) == exit_codes.OK
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["stream_id"] for line in out] == ["later"]


def test_a_bad_line_stops_the_import_after_the_chunks_before_it(
    dsn: str, target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(dsn, streams=2, rounds=2)
    exported = tmp_path / "log.jsonl"
    main(["export", "--dsn", dsn, "-o", str(exported)])
    lines = exported.read_text(encoding="utf-8").splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([*lines[:4], '{"stream_id": 1}', *lines[4:]]) + "\n")
    argv = ["import", "jsonl", str(broken), "--dsn", target, "--chunk-events", "2", "--quiet"]
    assert main(argv) == exit_codes.ERROR
    assert "line 5: missing version" in capsys.readouterr().err
    assert log(target) == log(dsn)[:4]
    # A gap in a stream's versions is refused too.
    gap = tmp_path / "gap.jsonl"
    gap.write_text("\n".join([lines[0], lines[4]]) + "\n")  # order-0 v1, order-0 v3
    assert main(["import", "jsonl", str(gap), "--dsn", target, "--quiet"]) == exit_codes.ERROR
    assert "follows version" in capsys.readouterr().err


def test_an_import_killed_mid_file_resumes_and_imports_nothing_twice(
    dsn: str, target: str, tmp_path: Path
) -> None:
    streams, per_stream = 100, 200
    with EventStore.connect(dsn) as store:
        for start in range(0, per_stream, 20):
            store.append_many(
                [
                    StreamAppend(
                        f"s-{s}",
                        [NewEvent("E", {"s": s, "n": n}) for n in range(start, start + 20)],
                    )
                    for s in range(streams)
                ]
            )
    exported = tmp_path / "log.jsonl"
    assert main(["export", "--dsn", dsn, "-o", str(exported)]) == exit_codes.OK
    total = streams * per_stream
    command = [
        sys.executable, "-m", "aura_pg.cli", "import", "jsonl", str(exported),
        "--dsn", target, "--chunk-events", "50", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    importer = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while query(target, "SELECT count(*) FROM aura.events")[0][0] < total // 4:
            assert importer.poll() is None, "the import ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        importer.send_signal(signal.SIGKILL)
        importer.wait()
    finally:
        if importer.poll() is None:
            importer.kill()
            importer.wait()
    assert importer.returncode == -signal.SIGKILL
    done_before = query(target, "SELECT count(*) FROM aura.events")[0][0]
    assert 0 < done_before < total
    assert done_before % 50 == 0  # whole chunks only
    rerun = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, check=True)
    summary = json.loads(rerun.stdout)
    assert summary["duplicates"] == done_before
    assert summary["appended"] == total - done_before
    assert log(target) == log(dsn)


def test_unreadable_and_unwritable_files_are_clear_errors(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "missing.jsonl")
    assert main(["import", "jsonl", missing, "--dsn", dsn]) == exit_codes.ERROR
    assert f"cannot read {missing}" in capsys.readouterr().err
    nowhere = str(tmp_path / "no" / "such" / "dir.jsonl")
    assert main(["export", "--dsn", dsn, "-o", nowhere]) == exit_codes.ERROR
    assert f"cannot write {nowhere}" in capsys.readouterr().err
