"""What a reactive debate agent says and votes (aura_pg.domain.reactive):
pure functions of the topic, the agent's character (drawn from its id)
and the others' arguments in completed rounds, so an agent decides the
same whenever, and in whichever process, it decides."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Final

from aura_pg.domain.debate import Debate, Stance
from aura_pg.domain.events import Vote

_STANCE_VALUE: Final[Mapping[Stance, float]] = {"for": 1.0, "neutral": 0.5, "against": 0.0}
_REASONS: Final = (
    "the evidence from production points this way",
    "the operational cost is the deciding factor",
    "the failure modes are better understood",
    "it keeps the system simpler to reason about",
    "the migration risk is acceptable",
    "the team has the experience for it",
)


@dataclass(frozen=True, slots=True)
class Character:
    """An agent's temperament, the same in every debate (drawn from its id)."""

    lean: float
    """Towards approving, -0.25 to 0.25."""
    confidence: float
    """Base confidence, 0.5 to 0.9."""
    openness: float
    """How far a round of the others' arguments moves its opinion, 0.1 to 0.4."""


@cache
def character(agent_id: str) -> Character:
    # random.Random seeded with a str hashes it with SHA-512: the same
    # numbers in every process (Python's hash() of a str is not).
    rng = random.Random(f"aura-agent:{agent_id}")
    return Character(rng.uniform(-0.25, 0.25), rng.uniform(0.5, 0.9), rng.uniform(0.1, 0.4))


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))


def opinion(debate: Debate, agent_id: str, heard_rounds: int) -> float:
    """How much ``agent_id`` favours the proposal, 0 to 1, once it has heard
    the others' arguments of rounds 1 to ``heard_rounds``: a pure function
    of the topic, the agent and those arguments, so an agent decides the
    same whenever it decides, whatever order the events landed in."""
    temper = character(agent_id)
    merit = random.Random(f"aura-topic:{debate.topic}").random()
    impression = random.Random(f"aura-topic:{debate.topic}:{agent_id}").uniform(-0.2, 0.2)
    value = _clamp(merit + temper.lean + impression)
    for round_ in range(1, heard_rounds + 1):
        heard = sorted(
            (agent, argument)
            for agent, argument in debate.arguments.get(round_, {}).items()
            if agent != agent_id
        )
        weight = sum(argument.confidence for _, argument in heard)
        if weight > 0:
            others = sum(_STANCE_VALUE[a.stance] * a.confidence for _, a in heard) / weight
            value += temper.openness * (others - value)
    return value


def _confidence(agent_id: str, value: float) -> float:
    """Surer the further its opinion is from undecided."""
    return round(_clamp(character(agent_id).confidence + 0.4 * (abs(value - 0.5) - 0.25)), 3)


def argument_for(debate: Debate, agent_id: str, round_: int) -> tuple[Stance, str, float]:
    """What ``agent_id`` argues in ``round_``: stance, text and confidence,
    from what it heard in the rounds before."""
    value = opinion(debate, agent_id, round_ - 1)
    stance: Stance = "for" if value > 0.6 else "against" if value < 0.4 else "neutral"
    rng = random.Random(f"aura-topic:{debate.topic}:{agent_id}:{round_}")
    text = f"{stance}: {_REASONS[rng.randrange(len(_REASONS))]}"
    if round_ > 1:
        previous = [
            a for agent, a in debate.arguments.get(round_ - 1, {}).items() if agent != agent_id
        ]
        swayed = (
            sum(a.stance == "for" for a in previous),
            sum(a.stance == "against" for a in previous),
        )
        text += f" (after round {round_ - 1}: {swayed[0]} for, {swayed[1]} against)"
    return stance, text, _confidence(agent_id, value)


def vote_for(debate: Debate, agent_id: str) -> tuple[Vote, float]:
    """How ``agent_id`` votes once it has heard every round: its opinion,
    and second thoughts of its own in the booth."""
    booth = random.Random(f"aura-topic:{debate.topic}:{agent_id}:vote").uniform(-0.15, 0.15)
    value = _clamp(opinion(debate, agent_id, debate.rules.max_rounds) + booth)
    return ("approve" if value >= 0.5 else "reject"), _confidence(agent_id, value)
