"""The reactive agents without a database: their handlers import by the
names their catalog entries give, their ids must fit a processor's name,
and their minds decide the same in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from aura_pg.domain import agent_mind, reactive
from aura_pg.domain.debate import Debate, DebateRules
from aura_pg.models import NewEvent, RecordedEvent
from aura_pg.projection.catalog import load_catalog
from aura_pg.projection.processor import handler_of, load_handler

ROOT = Path(__file__).resolve().parents[2]


def test_each_agents_handler_imports_by_its_catalog_name(tmp_path: Path) -> None:
    catalog = tmp_path / "agents.yaml"
    catalog.write_text(yaml.safe_dump(reactive.agent_catalog(["ada", "agent_7"])), "utf-8")
    specs = load_catalog(catalog).projections
    assert [(s.name, s.kind, s.handler) for s in specs] == [
        ("agent_ada", "python", "aura_pg.domain.reactive:agent_ada"),
        ("agent_agent_7", "python", "aura_pg.domain.reactive:agent_agent_7"),
    ]
    assert specs[0].source_events == reactive.SOURCE_EVENTS
    assert specs[0].error_handling == reactive.REACTIVE_ERROR_HANDLING
    # The daemon (and dlq retry, replay) import the very function that the
    # in-code entry carries.
    in_code = reactive.agent_processor("ada")
    assert handler_of(in_code) is reactive.agent_handler("ada")
    assert load_handler(in_code.handler) is reactive.agent_handler("ada")
    assert load_handler(specs[1].handler) is reactive.agent_handler("agent_7")


@pytest.mark.parametrize(
    "agent_id", ["Ada", "agent-01", "a__b", "_a", "a_", "", "x" * 35, "ada.lovelace"]
)
def test_agent_ids_must_name_a_processor(agent_id: str) -> None:
    with pytest.raises(ValueError, match="reactive agent's id"):
        reactive.processor_name(agent_id)
    with pytest.raises(AttributeError):
        getattr(reactive, f"agent_{agent_id}")


def test_only_agent_names_are_made_on_demand() -> None:
    assert reactive.agent_ada is reactive.agent_handler("ada")
    assert reactive.processor_name("x" * 34) == "agent_" + "x" * 34
    with pytest.raises(AttributeError):
        _ = reactive.moderator_ada


def _fold(debate: Debate, events: list[NewEvent]) -> None:
    for event in events:
        debate.apply(
            RecordedEvent(
                debate.version + 1, 0, event.event_id, "debate-d", debate.version + 1,
                event.type, dict(event.data), dict(event.metadata or {}), event.key,
                datetime.now(UTC),
            )
        )  # fmt: skip


def _rehearse(agents: tuple[str, ...], order: list[int]) -> list[tuple[object, ...]]:
    """A two-round debate in memory, the agents of each round arguing in
    ``order``; what each said and voted."""
    debate = Debate("d")
    _fold(debate, debate.start("Adopt event sourcing", agents, agents[0], DebateRules(2)))
    said: list[tuple[object, ...]] = []
    for round_ in (1, 2):
        for index in order:
            agent = agents[index]
            stance, text, confidence = agent_mind.argument_for(debate, agent, round_)
            said.append((agent, round_, stance, text, confidence))
            _fold(debate, debate.add_argument(agent, round_, stance, text, confidence))
        _fold(debate, debate.complete_round(round_))
    said += [(agent, *agent_mind.vote_for(debate, agent)) for agent in agents]
    return sorted(said, key=str)


def test_an_agent_decides_the_same_whatever_order_the_others_spoke_in() -> None:
    agents = ("ada", "grace", "linus", "barbara")
    assert _rehearse(agents, [0, 1, 2, 3]) == _rehearse(agents, [3, 1, 0, 2])


def test_an_agent_decides_the_same_in_every_process() -> None:
    """The daemon that reacts may be another process than the last one:
    the mind must not hang on Python's per-process str hashing."""
    script = (
        "import json; from aura_pg.domain import agent_mind;"
        "from tests.unit.test_reactive_agents import _rehearse;"
        "print(json.dumps([agent_mind.character('ada').openness,"
        " _rehearse(('ada', 'grace', 'linus'), [0, 1, 2])]))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    here = [agent_mind.character("ada").openness, _rehearse(("ada", "grace", "linus"), [0, 1, 2])]
    assert json.loads(outputs.pop()) == json.loads(json.dumps(here))
