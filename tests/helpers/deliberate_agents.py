"""The reactive debate agents, slowed down, for killing their daemon in the
middle of a reaction: ``tests.helpers.deliberate_agents:agent_<id>`` runs
agent ``<id>``'s reactions (aura_pg.domain.reactive), then logs the keys of
the events it wrote to the file named by $AURA_TEST_REACTIONS_LOG, and
then thinks for THINK_SECONDS before its transaction commits. A key in the
log that never reaches the database is a reaction its daemon died in."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from functools import cache
from typing import Any

import psycopg

from aura_pg.domain.reactive import PROCESSOR_PREFIX, DebateAgent
from aura_pg.models import RecordedEvent

THINK_SECONDS = 0.15
LOG_VARIABLE = "AURA_TEST_REACTIONS_LOG"


@cache
def deliberate(agent_id: str) -> Callable[[list[RecordedEvent], psycopg.Connection[Any]], None]:
    agent = DebateAgent(agent_id)

    def handle(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
        written = [event for cause in events for event in agent.react(cause, conn)]
        if not written:
            return
        with open(os.environ[LOG_VARIABLE], "a", encoding="utf-8") as log:
            for event in written:
                log.write(json.dumps({"key": event.key, "type": event.type}) + "\n")
            log.flush()
            os.fsync(log.fileno())
        time.sleep(THINK_SECONDS)

    return handle


def __getattr__(name: str) -> Callable[[list[RecordedEvent], psycopg.Connection[Any]], None]:
    if name.startswith(PROCESSOR_PREFIX):
        return deliberate(name.removeprefix(PROCESSOR_PREFIX))
    raise AttributeError(name)
