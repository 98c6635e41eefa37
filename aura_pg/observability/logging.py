"""structlog for the ``aura-pg`` command: JSON lines when the output is not a
terminal (production: one object per line, for a log shipper), readable
colour on a terminal. The library itself logs through the stdlib
``logging`` module and never configures it; the command routes every
stdlib record (aura-pg's, psycopg's, alembic's) through structlog here.

Each line carries the context bound with :func:`bind` (the projection, the
event id) and, inside a span, its trace and span ids. Connection-string
passwords are masked in every value.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog
from opentelemetry import trace

from aura_pg.config import mask_text


def _mask_value(value: Any) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, BaseException):
        return mask_text(repr(value))
    return value


def _mask_processor(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event.items():
        event[key] = _mask_value(value)
    return event


def _trace_processor(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", format(context.trace_id, "032x"))
        event.setdefault("span_id", format(context.span_id, "016x"))
    return event


def configure_logging(
    level: int | str = logging.INFO, *, json_lines: bool | None = None, stream: TextIO | None = None
) -> None:
    """Configure structlog and the stdlib root logger. ``json_lines`` None:
    JSON unless ``stream`` (default stderr) is a terminal."""
    out = stream if stream is not None else sys.stderr
    if json_lines is None:
        json_lines = not out.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _trace_processor,
    ]
    renderer: Any
    final: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if json_lines:
        final += [structlog.processors.format_exc_info, _mask_processor]
        renderer = structlog.processors.JSONRenderer()
    else:
        final += [_mask_processor]
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=[*final, renderer])
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # psycopg's and alembic's own loggers propagate to the root handler.
    for name in ("psycopg", "alembic"):
        logging.getLogger(name).propagate = True


@contextmanager
def bound(**values: Any) -> Iterator[None]:
    """Bind values (projection, event_id, ...) to every log line written in
    this context (the current thread or asyncio task) until the block ends."""
    with structlog.contextvars.bound_contextvars(**values):
        yield


def bind(**values: Any) -> None:
    """Bind values for the rest of the current context (an asyncio task's
    copy of it, for a task)."""
    structlog.contextvars.bind_contextvars(**values)
