"""The daemons' settings: every flag of ``aura-pg project``, ``relay`` and
``import nats`` has an environment variable, and a flag given wins over its
variable, which wins over the default (aura_pg.config.CommandSettings).

* the logging and metrics flags every daemon takes: ``AURA_PG_LOG_LEVEL``,
  ``AURA_PG_LOG_FORMAT``, ``AURA_PG_METRICS_PORT``, ``AURA_PG_METRICS_HOST``;
* ``aura-pg project`` (and the projector options of ``projections rebuild``
  and ``shadow``): ``AURA_PG_PROJECT_<FLAG>``, e.g. ``AURA_PG_PROJECT_POLL_INTERVAL``;
* ``aura-pg relay``: ``AURA_PG_RELAY_<FLAG>``; ``--webhook`` takes a JSON list
  there, ``AURA_PG_RELAY_WEBHOOK='["orders=https://example.com/hook"]'``;
* ``aura-pg import nats``: ``AURA_PG_IMPORT_<FLAG>``.

Numbers are checked by the same validators as the flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, PlainValidator, field_validator
from pydantic_settings import SettingsConfigDict

from aura_pg.config import CommandSettings, Port, PositiveCount, PositiveSeconds
from aura_pg.importer import nats as nats_import
from aura_pg.outbox import relay, sinks, webhook
from aura_pg.projection.settings import ProjectorSettings, WakeSource

LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
# The formats observability.command configures (LOG_FORMATS; a unit test
# keeps the two in step).
LogFormat = Literal["auto", "json", "console"]


def nats_name(value: object) -> str:
    """A JetStream stream or consumer name."""
    text = str(value)
    if not nats_import.is_jetstream_name(text):
        raise ValueError(
            f"{text!r} is not a JetStream name (no spaces, '.', '*', '>', '/' or '\\')"
        )
    return text


def webhook_target(value: object) -> tuple[str, str]:
    """``NAME=URL``: the topic a webhook takes and its http(s) URL."""
    if isinstance(value, tuple) and len(value) == 2:
        value = f"{value[0]}={value[1]}"
    text = str(value)
    name, sep, url = text.partition("=")
    if not sep or not name:
        raise ValueError(f"expected NAME=URL, not {text!r}")
    return name, webhook.check_webhook_url(url)


NatsName = Annotated[str, PlainValidator(nats_name)]
WebhookTarget = Annotated[tuple[str, str], PlainValidator(webhook_target)]


def flags_given(args: argparse.Namespace, settings: type[CommandSettings]) -> dict[str, Any]:
    """The options of ``args`` named like the fields of ``settings`` (None
    when not given)."""
    return {name: getattr(args, name, None) for name in settings.model_fields}


class LoggingSettings(CommandSettings):
    """``--log-level`` (``-v``: debug), ``--log-format``, ``--metrics-port``,
    ``--metrics-host``."""

    log_level: LogLevel = "info"
    log_format: LogFormat = "auto"
    metrics_port: Port | None = None
    metrics_host: str = "0.0.0.0"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


_PROJECTOR = ProjectorSettings()


class ProjectSettings(CommandSettings):
    """``aura-pg project`` and the projector options of ``rebuild`` and ``shadow``."""

    model_config = SettingsConfigDict(env_prefix="AURA_PG_PROJECT_")

    catalog: Path | None = None
    poll_interval: PositiveSeconds = _PROJECTOR.poll_interval
    shutdown_timeout: PositiveSeconds = _PROJECTOR.shutdown_timeout
    owner: str | None = None
    async_commit: bool = False
    wake: WakeSource = _PROJECTOR.wake


class RelaySettings(CommandSettings):
    """``aura-pg relay``."""

    model_config = SettingsConfigDict(env_prefix="AURA_PG_RELAY_")

    nats_server: str | None = None
    webhook: list[WebhookTarget] = Field(default_factory=list)
    batch_size: PositiveCount = relay.DEFAULT_BATCH_SIZE
    poll_interval: PositiveSeconds = relay.DEFAULT_POLL_INTERVAL
    max_attempts: PositiveCount = relay.DEFAULT_MAX_ATTEMPTS
    backoff_base: PositiveSeconds = relay.DEFAULT_BACKOFF_BASE
    backoff_max: PositiveSeconds = relay.DEFAULT_BACKOFF_MAX
    publish_timeout: PositiveSeconds = sinks.DEFAULT_PUBLISH_TIMEOUT
    shutdown_timeout: PositiveSeconds = relay.DEFAULT_SHUTDOWN_TIMEOUT
    once: bool = False


class ImportSettings(CommandSettings):
    """``aura-pg import nats``."""

    model_config = SettingsConfigDict(env_prefix="AURA_PG_IMPORT_")

    server: str | None = None
    stream: NatsName | None = None
    subject: str | None = None
    consumer: NatsName | None = None
    mapping: str | None = None
    mapping_file: str | None = None
    stream_prefix: str = ""
    until_end: bool = False
    ack_wait: PositiveSeconds = nats_import.DEFAULT_ACK_WAIT
    fetch_timeout: PositiveSeconds = nats_import.DEFAULT_FETCH_TIMEOUT
    lag_interval: PositiveSeconds = nats_import.DEFAULT_LAG_INTERVAL
    window: PositiveCount = nats_import.DEFAULT_WINDOW
