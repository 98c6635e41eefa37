"""Installing catalog entries in the database, and the check that the log
belongs to this cluster, both done before a daemon or a rebuild runs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psycopg

from aura_pg._resources import named_queries
from aura_pg.errors import CatalogError, ProjectionError
from aura_pg.projection.catalog import ProjectionSpec
from aura_pg.projection.connection import queries
from aura_pg.projection.shadows import shadow_name, shadow_params

log = logging.getLogger("aura_pg.projector")


def processor_params(spec: ProjectionSpec) -> dict[str, Any]:
    """The parameters of aura.register_processor for a Python processor."""
    policy = spec.error_handling
    return {
        "name": spec.name,
        "description": spec.description,
        "handler": spec.handler,
        "event_types": list(spec.source_events) if spec.source_events is not None else None,
        "partitions": spec.partitions,
        "batch_size": spec.batch_size,
        "max_retries": policy.max_retries,
        "retry_base_ms": policy.retry_base_ms,
        "retry_max_ms": policy.retry_max_ms,
        "circuit_failure_threshold": policy.circuit_breaker.failure_threshold,
        "circuit_recovery_seconds": policy.circuit_breaker.recovery_timeout_seconds,
    }


def spec_params(spec: ProjectionSpec) -> dict[str, Any]:
    """The parameters of aura.register_projection for ``spec``."""
    policy = spec.error_handling
    return {
        "name": spec.name,
        "description": spec.description,
        "schema": spec.read_model_schema,
        "handler": spec.handler,
        "handler_kind": spec.handler_kind,
        "event_types": list(spec.source_events) if spec.source_events is not None else None,
        "forget_handler": spec.forget_handler,
        "definition_sql": spec.definition_sql,
        "batch_size": spec.batch_size,
        "max_retries": policy.max_retries,
        "retry_base_ms": policy.retry_base_ms,
        "retry_max_ms": policy.retry_max_ms,
        "circuit_failure_threshold": policy.circuit_breaker.failure_threshold,
        "circuit_recovery_seconds": policy.circuit_breaker.recovery_timeout_seconds,
    }


async def register_projections(
    conn: psycopg.AsyncConnection[Any], specs: Sequence[ProjectionSpec]
) -> dict[str, str]:
    """Install or update the catalog entries in the database.

    Returns, per projection, 'created', 'unchanged' or 'changed' (a changed
    definition waits for a rebuild). A definition that fails to install is
    a CatalogError naming the projection.
    """
    outcomes: dict[str, str] = {}
    # Live entries first: a shadow entry (shadow_of) becomes the shadow of
    # one (aura.begin_shadow), under the name NAME__shadow.
    for spec in sorted(specs, key=lambda spec: spec.shadow_of is not None):
        try:
            async with conn.transaction():
                if spec.shadow_of is not None:
                    cur = await conn.execute(
                        named_queries("queries/shadows.sql")["begin_shadow"],
                        shadow_params(spec.shadow_of, spec),
                    )
                elif spec.is_python:
                    cur = await conn.execute(
                        named_queries("queries/processors.sql")["register"],
                        processor_params(spec),
                    )
                else:
                    cur = await conn.execute(queries()["register"], spec_params(spec))
                row = await cur.fetchone()
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            detail = (exc.diag.message_primary if exc.diag else None) or str(exc)
            hint = exc.diag.message_hint if exc.diag else None
            what = "registering the processor" if spec.is_python else f"installing {spec.sql}"
            raise CatalogError(
                f"projection {spec.name!r}: {what} failed: {detail}"
                + (f" ({hint})" if hint else "")
            ) from None
        outcome = str(row[0]) if row else "unchanged"
        outcomes[spec.name if spec.shadow_of is None else shadow_name(spec.shadow_of)] = outcome
        if outcome == "changed" and spec.is_python:
            log.warning(
                "processor %s: its handler or event types changed; in effect from its "
                "checkpoint on (`aura-pg projections reset %s` delivers every event again)",
                spec.name,
                spec.name,
            )
        elif outcome == "changed":
            log.warning(
                "projection %s: its definition changed; the live read model keeps the old one "
                "until `aura-pg projections rebuild %s` swaps the new one in",
                spec.name,
                spec.name,
            )
    return outcomes


async def check_log_origin(conn: psycopg.AsyncConnection[Any]) -> None:
    """Refuse to project a log restored from another cluster whose
    transaction ids run ahead of this one's: gap-free reads would hide the
    restored events and order new ones before the checkpoints."""
    cur = await conn.execute(queries()["log_origin"])
    row = await cur.fetchone()
    if row is not None and row[2]:
        raise ProjectionError(
            f"aura.events holds transaction ids up to {row[0]}, but this cluster's next "
            f"transaction id is {row[1]}: the log was restored from another cluster. Advance "
            "the transaction id counter past it (pg_resetwal -x, with -e if the source's ids had "
            "wrapped, while stopped) before appending or projecting; see docs/event-store.md"
        )
