"""aura_pg.config: DSN masking and the CLI's settings (no database)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict
from pydantic_settings import SettingsConfigDict

from aura_pg.config import (
    MASK,
    CommandSettings,
    ConfigurationError,
    Connection,
    PositiveCount,
    PositiveSeconds,
    Settings,
    describe_dsn,
    mask_dsn,
    mask_text,
    non_negative_count,
    non_negative_seconds,
    port_number,
    positive_count,
    positive_seconds,
    statement_timeout,
)
from aura_pg.errors import AuraPgError


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("host=db password=secret dbname=aura", "host=db password=*** dbname=aura"),
        ("host=db password = secret user=u", "host=db password = *** user=u"),
        ("host=db password='with space\\' quote' user=u", "host=db password=*** user=u"),
        ("postgresql://bob:secret@db:5432/aura", "postgresql://bob:***@db:5432/aura"),
        ("postgres://bob:sec%40ret@db/aura?sslmode=require", "postgres://bob:***@db/aura?sslmode=require"),
        ("postgresql://:secret@db/aura", "postgresql://:***@db/aura"),
        ("postgresql://bob:secret@h1:5432,h2:5433/aura", "postgresql://bob:***@h1:5432,h2:5433/aura"),
        ("postgresql://db/aura?password=secret&application_name=x", "postgresql://db/aura?password=***&application_name=x"),
        ("postgresql://db/aura?application_name=x&password=secret", "postgresql://db/aura?application_name=x&password=***"),
        # No password: unchanged.
        ("host=db dbname=aura", "host=db dbname=aura"),
        ("postgresql://bob@db/aura", "postgresql://bob@db/aura"),
        ("", ""),
    ],
)  # fmt: skip
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked
    assert "secret" not in mask_dsn(dsn)


def test_mask_dsn_keeps_everything_else() -> None:
    dsn = "host=db port=5433 user=bob password=secret dbname=aura sslmode=require"
    params = conninfo_to_dict(mask_dsn(dsn))
    assert params == {**conninfo_to_dict(dsn), "password": MASK}


def test_mask_dsn_normalizes_what_the_pattern_misses() -> None:
    # The pattern also hits "password=" inside another value and breaks its
    # quoting: the parsed form decides, and the key=value form is printed.
    dsn = "application_name='a password=b' password=secret host=db"
    masked = mask_dsn(dsn)
    assert "secret" not in masked
    assert conninfo_to_dict(masked) == {**conninfo_to_dict(dsn), "password": MASK}
    assert mask_dsn("host=db password=ab&cd user=u") == "host=db password=*** user=u"


def test_mask_dsn_unparseable_falls_back_to_patterns() -> None:
    assert mask_dsn("host=db password=secret port") == "host=db password=*** port"
    assert mask_dsn("postgresql://bob:secret@db:notaport/x") == "postgresql://bob:***@db:notaport/x"


def test_mask_text_for_error_messages() -> None:
    text = (
        'connection to "postgresql://bob:hunter2@db/aura" failed (password=hunter2); '
        "password authentication failed for user bob"
    )
    masked = mask_text(text)
    assert "hunter2" not in masked
    assert "password authentication failed for user bob" in masked
    assert mask_text("the password is p4ss and so on", secrets=["p4ss"]) == (
        "the password is *** and so on"
    )
    assert mask_text("nothing here", secrets=[""]) == "nothing here"


def test_describe_dsn() -> None:
    assert describe_dsn("host=db password=x") == "host=db password=***"
    assert describe_dsn("").startswith("libpq defaults (")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("AURA_PG_DSN", "AURA_PG_PASSWORD_FILE", "AURA_PG_STATEMENT_TIMEOUT", "PGOPTIONS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_settings_flags_win_over_environment(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings.resolve().dsn == ""  # libpq decides
    assert "dsn" not in Settings.resolve().model_fields_set
    clean_env.setenv("AURA_PG_DSN", "host=from-env")
    clean_env.setenv("AURA_PG_STATEMENT_TIMEOUT", "5s")
    assert Settings.resolve().dsn == "host=from-env"
    assert Settings.resolve(dsn="host=from-flag").dsn == "host=from-flag"
    assert Settings.resolve(dsn="").dsn == ""  # an explicit empty flag too
    assert Settings.resolve().statement_timeout == "5s"
    assert Settings.resolve(statement_timeout="250ms").statement_timeout == "250ms"
    # Unrelated AURA_PG_* variables (the tests' own) are not settings.
    clean_env.setenv("AURA_PG_TEST_HOST", "x")
    assert Settings.resolve().dsn == "host=from-env"


def test_settings_statement_timeout_is_checked(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(AuraPgError, match="invalid configuration: statement_timeout"):
        Settings.resolve(statement_timeout="5s; DROP")
    clean_env.setenv("AURA_PG_STATEMENT_TIMEOUT", "")
    assert Settings.resolve().statement_timeout is None


def test_password_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3 cret'\n")
    settings = Settings.resolve(dsn="host=db user=bob password=old", password_file=secret)
    connection = settings.connection()
    assert conninfo_to_dict(connection.conninfo)["password"] == "s3 cret'"
    assert "s3 cret" not in connection.display and "old" not in connection.display
    assert connection.mask("failed with s3 cret' here") == "failed with *** here"

    clean_env.setenv("AURA_PG_PASSWORD_FILE", str(secret))
    from_env = Settings.resolve().connection()
    assert conninfo_to_dict(from_env.conninfo) == {"password": "s3 cret'"}

    uri = Settings.resolve(dsn="postgresql://bob@db/aura").connection().conninfo
    assert conninfo_to_dict(uri)["password"] == "s3 cret'"

    with pytest.raises(AuraPgError, match="does not exist"):
        Settings.resolve(password_file=tmp_path / "missing").connection()
    (tmp_path / "blank").write_text("\n")
    with pytest.raises(AuraPgError, match="is empty"):
        Settings.resolve(password_file=tmp_path / "blank").connection()
    with pytest.raises(AuraPgError, match="cannot read password file"):
        Settings.resolve(password_file=tmp_path).connection()  # a directory


def test_statement_timeout_only_when_bounded(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings.resolve(dsn="host=db", statement_timeout="30s")
    assert "options" not in conninfo_to_dict(settings.connection().conninfo)
    bounded = conninfo_to_dict(settings.connection(bounded=True).conninfo)
    assert bounded["options"] == "-c statement_timeout=30s"
    # Options given in the DSN, or else PGOPTIONS, are kept.
    clean_env.setenv("PGOPTIONS", "-c aura.writer_role=w")
    merged = conninfo_to_dict(settings.connection(bounded=True).conninfo)
    assert merged["options"] == "-c aura.writer_role=w -c statement_timeout=30s"
    own = Settings.resolve(dsn="host=db options='-c work_mem=8MB'", statement_timeout="1min")
    assert conninfo_to_dict(own.connection(bounded=True).conninfo)["options"] == (
        "-c work_mem=8MB -c statement_timeout=1min"
    )


@pytest.mark.parametrize(
    ("text", "dsn"),
    [
        ('missing "=" after "hunter2" in connection info string', "password hunter2"),
        ("password=hunter2 host=x", ""),
        ("password = 'hunter2 with spaces' host=x", ""),
        ("postgresql://me:hunter2@db:5432/x failed", ""),
        ("FATAL: auth failed for hunter2", "host=x password=hunter2"),
    ],
)
def test_error_text_of_a_connection_hides_its_password(text: str, dsn: str) -> None:
    """Error messages (libpq quotes what it could not parse) lose the password."""
    assert "hunter2" not in Connection.of(dsn).mask(text)


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (
            positive_seconds,
            [("0.5", 0.5), ("2", 2.0), (3, 3.0)],
            ["0", "-1", "x", "inf", "nan", ""],
        ),
        (non_negative_seconds, [("0", 0.0), ("1e3", 1000.0)], ["-0.1", "x", "inf"]),
        (positive_count, [("1", 1), (7, 7)], ["0", "-3", "1.5", "x", "", True]),
        (non_negative_count, [("0", 0), ("9", 9)], ["-1", "x"]),
        (port_number, [("0", 0), ("65535", 65535)], ["65536", "-1", "http"]),
        (statement_timeout, [("30s", "30s"), (" 500ms ", "500ms")], ["soon", "5s; DROP"]),
    ],
)
def test_the_validators_flags_and_variables_share(
    check: Callable[[object], object], good: list[tuple[object, object]], bad: list[object]
) -> None:
    for value, expected in good:
        assert check(value) == expected
    for value in bad:
        with pytest.raises(ValueError, match=r"not|must|is 0 to|a port"):
            check(value)


class _Example(CommandSettings):
    model_config = SettingsConfigDict(env_prefix="AURA_PG_EXAMPLE_")

    interval: PositiveSeconds = 1.0
    size: PositiveCount = 10


def test_command_settings_name_the_variable_that_is_wrong(clean_env: pytest.MonkeyPatch) -> None:
    assert (_Example.resolve().interval, _Example.resolve().size) == (1.0, 10)
    clean_env.setenv("AURA_PG_EXAMPLE_INTERVAL", "0.25")
    assert _Example.resolve().interval == 0.25  # the variable over the default
    assert _Example.resolve(interval=4).interval == 4.0  # the flag over the variable
    assert _Example.resolve(interval=None).interval == 0.25  # None: not given
    clean_env.setenv("AURA_PG_EXAMPLE_SIZE", "0")
    with pytest.raises(ConfigurationError) as refused:
        _Example.resolve()
    assert str(refused.value) == (
        "invalid configuration: AURA_PG_EXAMPLE_SIZE: must be at least 1, not 0"
    )
    assert _Example.resolve(size=3).size == 3  # a flag given hides the bad variable
    clean_env.setenv("AURA_PG_EXAMPLE_SIZE", "")
    assert _Example.resolve().size == 10  # an empty variable counts as not set
    with pytest.raises(ConfigurationError, match=r"^invalid configuration: size: must be"):
        _Example.resolve(size=-2)
