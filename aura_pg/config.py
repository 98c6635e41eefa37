"""Configuration of the ``aura-pg`` command: flags, then ``AURA_PG_*``
environment variables, then defaults (for the connection: libpq's own).

* ``--dsn`` / ``AURA_PG_DSN``: a libpq connection string, key=value or URI.
  Empty (the default) lets libpq take everything from its ``PG*`` variables,
  ``PGPASSFILE`` and the service file.
* ``--password-file`` / ``AURA_PG_PASSWORD_FILE``: a file holding the
  password (a trailing newline is dropped); it is put into the connection
  string and wins over a password in the DSN.
* ``--statement-timeout`` / ``AURA_PG_STATEMENT_TIMEOUT``: a bound on each
  statement of the short operator commands (``status``, ``dlq``, ``stream``,
  ...), a Postgres duration such as ``30s``; never applied to ``migrate`` or
  the daemons.

The daemons' settings (aura_pg/cli/settings.py) follow the same rule through
:class:`CommandSettings`, and check numbers with the same types as their
flags (:data:`PositiveSeconds`, :data:`PositiveCount`, ...), so a bad value is
refused alike from a flag and from the environment.

Passwords never reach the terminal: :func:`mask_dsn` and :func:`mask_text`
hide them in everything the command prints or logs.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Self

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import PlainValidator, ValidationError, field_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict

from aura_pg.errors import AuraPgError

MASK = "***"

# key=value form: password=secret, password = 'with spaces\' and quotes'
_KEYWORD_PASSWORD = re.compile(
    r"(?<![?&\w])(password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)", re.IGNORECASE
)
# URI query parameter: ...?password=secret&...
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#\s]*)", re.IGNORECASE)
# URI form: scheme://user:secret@host (the userinfo ends at the last '@'
# before the path, query or fragment).
_URI_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)([^/?#\s]*)(@)", re.IGNORECASE)
# A quoted piece of an error message: libpq quotes the part of a connection
# string it could not parse, which may be the password.
_QUOTED = re.compile(r'"[^"]*"')
_DURATION = re.compile(r"^\d+\s*(?:us|ms|s|min|h|d)?$")


def mask_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every ``password=...``, every ``user:password@`` and
    each of ``secrets`` replaced by ``***``: for error messages and logs,
    which are not connection strings."""
    secrets = tuple(secrets)
    if not secrets and "://" not in text and "password" not in text.lower():
        return text  # the common case of a log line: nothing to look for
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    text = _QUERY_PASSWORD.sub(lambda m: m.group(1) + MASK, text)
    text = _KEYWORD_PASSWORD.sub(lambda m: m.group(1) + MASK, text)
    return _URI_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), text)


def mask_dsn(dsn: str) -> str:
    """The connection string with its password hidden, in key=value and
    URI form alike. Keeps the DSN's own form when it can; a string libpq
    cannot parse is masked by pattern."""
    masked = mask_text(dsn)
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return masked
    if params.get("password") is None:
        return masked
    try:
        # The pattern must have caught the password, or the normalized form
        # (key=value) is printed instead.
        if conninfo_to_dict(masked).get("password") == MASK:
            return masked
    except psycopg.Error:
        pass
    return make_conninfo("", **{**params, "password": MASK})


def describe_dsn(dsn: str) -> str:
    """The DSN for messages: masked, and for an empty one what libpq takes
    from its environment."""
    if dsn.strip():
        return mask_dsn(dsn)
    shown = []
    for option in pq.Conninfo.get_defaults():
        keyword = option.keyword.decode()
        if keyword in ("service", "host", "port", "user", "dbname") and option.val:
            shown.append(f"{keyword}={option.val.decode(errors='replace')}")
    return f"libpq defaults ({' '.join(shown) or 'none set'})"


class ConfigurationError(AuraPgError):
    """A setting (a flag or an ``AURA_PG_*`` variable) has a value that
    cannot be used: a usage error."""


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"not a number: {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"not a number: {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number, not {value}")
    return number


def _whole_number(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError(f"not a whole number: {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"not a whole number: {value!r}") from None


def positive_seconds(value: object) -> float:
    """A finite number > 0 (a number or its text)."""
    number = _number(value)
    if not number > 0:
        raise ValueError(f"must be a positive number, not {value}")
    return number


def non_negative_seconds(value: object) -> float:
    """A finite number >= 0."""
    number = _number(value)
    if not number >= 0:
        raise ValueError(f"must be a number >= 0, not {value}")
    return number


def positive_count(value: object) -> int:
    """A whole number >= 1."""
    number = _whole_number(value)
    if number < 1:
        raise ValueError(f"must be at least 1, not {value}")
    return number


def non_negative_count(value: object) -> int:
    """A whole number >= 0."""
    number = _whole_number(value)
    if number < 0:
        raise ValueError(f"must be 0 or more, not {value}")
    return number


def port_number(value: object) -> int:
    """A TCP port, 0 to 65535 (0: any free port)."""
    try:
        number = _whole_number(value)
    except ValueError:
        raise ValueError(f"not a port number: {value!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"a port is 0 to 65535, not {value}")
    return number


def statement_timeout(value: object) -> str:
    """A Postgres duration such as ``500ms``, ``30s`` or ``2min``."""
    text = str(value).strip()
    if not _DURATION.match(text):
        raise ValueError(f"statement timeout {text!r} is not a duration such as 500ms, 30s or 2min")
    return text


PositiveSeconds = Annotated[float, PlainValidator(positive_seconds)]
NonNegativeSeconds = Annotated[float, PlainValidator(non_negative_seconds)]
PositiveCount = Annotated[int, PlainValidator(positive_count)]
NonNegativeCount = Annotated[int, PlainValidator(non_negative_count)]
Port = Annotated[int, PlainValidator(port_number)]


def error_text(error: ErrorDetails) -> str:
    """What a validator said, without pydantic's "Value error, " prefix."""
    cause = error.get("ctx", {}).get("error")
    return str(cause) if isinstance(cause, ValueError) else error["msg"]


class CommandSettings(BaseSettings):
    """Settings of a command: keyword arguments (the flags given) win over
    the environment (``env_prefix`` + the field's name), which wins over
    the defaults. An empty variable counts as not set."""

    model_config = SettingsConfigDict(env_prefix="AURA_PG_", extra="ignore", env_ignore_empty=True)

    @classmethod
    def resolve(cls, **given: Any) -> Self:
        """Settings from the flags given (None: not given) over the
        environment; a :class:`ConfigurationError` naming what is wrong."""
        flags = {name: value for name, value in given.items() if value is not None}
        try:
            return cls(**flags)
        except ValidationError as exc:
            details = "; ".join(cls._describe(error, flags) for error in exc.errors())
            raise ConfigurationError(f"invalid configuration: {details}") from None

    @classmethod
    def _describe(cls, error: ErrorDetails, flags: dict[str, Any]) -> str:
        field = str(error["loc"][0]) if error["loc"] else ""
        if field and field not in flags and field in cls.model_fields:
            prefix = str(cls.model_config.get("env_prefix", ""))
            return f"{(prefix + field).upper()}: {error_text(error)}"
        return f"{'_'.join(str(p) for p in error['loc'])}: {error_text(error)}"


class Settings(CommandSettings):
    """What the CLI connects with."""

    dsn: str = ""
    password_file: Path | None = None
    statement_timeout: str | None = None

    @field_validator("password_file", mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("statement_timeout", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        if value is None or value == "":
            return None
        return statement_timeout(value)

    def password(self) -> str | None:
        """The password from the password file, None when there is none."""
        if self.password_file is None:
            return None
        path = self.password_file.expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise AuraPgError(f"password file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise AuraPgError(f"cannot read password file {str(path)!r}: {reason}") from None
        password = text.rstrip("\r\n")
        if not password:
            raise AuraPgError(f"password file {str(path)!r} is empty")
        return password

    def connection(self, *, bounded: bool = False) -> Connection:
        """The connection string to hand to psycopg (password included) and
        what may be shown of it. ``bounded`` applies the statement timeout."""
        conninfo = self.dsn
        secrets: list[str] = []
        password = self.password()
        if password is not None:
            conninfo = _with(conninfo, password=password)
            secrets.append(password)
        if bounded and self.statement_timeout is not None:
            conninfo = _with(conninfo, options=_options_with_timeout(conninfo, self))
        return Connection(conninfo, describe_dsn(self.dsn), tuple(secrets))


def _with(conninfo: str, **params: str) -> str:
    try:
        return make_conninfo(conninfo, **params)
    except psycopg.Error as exc:
        raise AuraPgError(
            f"invalid connection string {mask_dsn(conninfo)}: {mask_text(str(exc))}"
        ) from None


def _options_with_timeout(conninfo: str, settings: Settings) -> str:
    # A conninfo "options" replaces PGOPTIONS: keep what either says.
    try:
        current = conninfo_to_dict(conninfo).get("options")
    except psycopg.Error:
        current = None
    if current is None:
        current = os.environ.get("PGOPTIONS", "")
    timeout = str(settings.statement_timeout).replace(" ", "")
    return f"{current} -c statement_timeout={timeout}".strip()


@dataclass(frozen=True)
class Connection:
    """A resolved connection: ``conninfo`` for psycopg, ``display`` for
    people (password hidden), ``secrets`` to scrub from error text."""

    conninfo: str
    display: str
    secrets: tuple[str, ...] = ()

    @classmethod
    def of(cls, dsn: str) -> Connection:
        """A connection string as given, its password among the secrets."""
        try:
            password = conninfo_to_dict(dsn).get("password")
        except psycopg.Error:
            password = None
        return cls(dsn, describe_dsn(dsn), (str(password),) if password else ())

    def mask(self, text: str) -> str:
        """``text`` (an error message) with no password of this connection
        in it, and, when the connection string does not parse, none of the
        quoted pieces libpq's complaint may have copied from it."""
        try:
            conninfo_to_dict(self.conninfo)
        except psycopg.Error:
            text = _QUOTED.sub('"***"', text)
        return mask_text(text, self.secrets)
