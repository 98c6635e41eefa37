"""``aura-pg relay``: publish the transactional outbox (aura_pg.outbox) to
NATS JetStream and webhooks; docs/outbox.md."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys

import psycopg

from aura_pg._runtime import serve_until_signal
from aura_pg.cli import exit_codes
from aura_pg.cli._argtypes import argtype
from aura_pg.cli._connection import add_connection_options, connection
from aura_pg.cli._daemon import (
    add_logging_options,
    configure_logging,
    logging_settings,
    observed,
)
from aura_pg.cli.settings import RelaySettings, flags_given, webhook_target
from aura_pg.config import ConfigurationError, positive_count, positive_seconds
from aura_pg.outbox import Backoff, NatsSink, Relay, RelayStats, Sink, WebhookSink

log = logging.getLogger("aura_pg.relay")

PROG = "aura-pg relay"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "relay",
        help="publish the transactional outbox to NATS JetStream and webhooks",
        description="Publish aura.outbox rows to NATS JetStream and HTTP webhooks, at least "
        "once; see docs/outbox.md. Every option has an AURA_PG_RELAY_* variable "
        "(e.g. AURA_PG_RELAY_POLL_INTERVAL); a flag wins over it.",
    )
    add_connection_options(p)
    p.add_argument(
        "--nats-server",
        metavar="URL",
        help="NATS server URL(s), comma-separated: enables the 'nats' sink (JetStream)",
    )
    p.add_argument(
        "--webhook",
        metavar="NAME=URL",
        type=argtype(webhook_target),
        action="append",
        help="POST rows of sink 'webhook' and topic NAME to URL (repeatable)",
    )
    seconds, count = argtype(positive_seconds), argtype(positive_count)
    defaults = RelaySettings.model_fields
    for flag, kind, metavar, text in (
        ("--batch-size", count, "N", "rows per transaction"),
        ("--poll-interval", seconds, "SECONDS", "wait between polls when there is no work"),
        ("--max-attempts", count, "N", "attempts before a row becomes 'dead'"),
        ("--backoff-base", seconds, "SECONDS", "wait after a first failure; doubles each attempt"),
        ("--backoff-max", seconds, "SECONDS", "longest wait between attempts"),
        (
            "--publish-timeout",
            seconds,
            "SECONDS",
            "the longest a publish may take: a JetStream PubAck, or a whole webhook exchange "
            "from connect to the answer's body",
        ),
        (
            "--shutdown-timeout",
            seconds,
            "SECONDS",
            "after SIGTERM/SIGINT, how long the batch in flight may go on before the publish "
            "in flight is abandoned and the rest left pending",
        ),
    ):
        default = defaults[flag[2:].replace("-", "_")].default
        p.add_argument(flag, type=kind, metavar=metavar, help=f"{text} (default {default})")
    p.add_argument(
        "--once",
        action=argparse.BooleanOptionalAction,
        help="publish what is due now, print a summary, exit",
    )
    add_logging_options(p)
    p.set_defaults(handler=run, prog=PROG)


def _sinks(settings: RelaySettings) -> list[Sink]:
    try:
        sinks = _configured_sinks(settings)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if not sinks:
        raise ConfigurationError("no sink: give --nats-server and/or --webhook")
    return sinks


def _configured_sinks(settings: RelaySettings) -> list[Sink]:
    sinks: list[Sink] = []
    if settings.nats_server:
        servers = [url.strip() for url in settings.nats_server.split(",") if url.strip()]
        sinks.append(NatsSink(servers, timeout=settings.publish_timeout))
    if settings.webhook:
        urls: dict[str, str] = {}
        for name, url in settings.webhook:
            if name in urls:
                raise ValueError(f"--webhook {name} given twice")
            urls[name] = url
        sinks.append(WebhookSink(urls, timeout=settings.publish_timeout))
    return sinks


def run(args: argparse.Namespace) -> int:
    logs = logging_settings(args)
    settings = RelaySettings.resolve(**flags_given(args, RelaySettings))
    configure_logging(logs)
    sinks = _sinks(settings)
    connection_info = connection(args)
    dsn = connection_info.conninfo
    relay = Relay(
        dsn,
        sinks,
        batch_size=settings.batch_size,
        poll_interval=settings.poll_interval,
        max_attempts=settings.max_attempts,
        backoff=Backoff(
            base=min(settings.backoff_base, settings.backoff_max), cap=settings.backoff_max
        ),
        shutdown_timeout=settings.shutdown_timeout,
    )
    log.info(
        "relaying %s (batch %s, poll %s s, max attempts %s)",
        ", ".join(sorted(relay.sinks)), settings.batch_size, settings.poll_interval,
        settings.max_attempts,
    )  # fmt: skip

    async def publish(stop: asyncio.Event) -> RelayStats:
        async with relay:
            return await (relay.run_once(stop) if settings.once else relay.run(stop))

    try:
        with observed(dsn, logs, "relay") as heartbeat:
            stats = asyncio.run(serve_until_signal(publish, heartbeat=heartbeat))
    except psycopg.Error as exc:
        print(f"{PROG}: {connection_info.mask(str(exc).strip())}", file=sys.stderr)
        return exit_codes.ERROR
    if settings.once:
        print(json.dumps(dataclasses.asdict(stats)))
    log.info("stopped: %s", dataclasses.asdict(stats))
    return exit_codes.OK
