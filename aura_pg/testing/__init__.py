"""Testing services built on aura-pg.

``aura_pg.testing.plugin`` is a pytest plugin (loaded through the
``pytest11`` entry point wherever aura-pg is installed): a fresh migrated
database per test, event stores, a projection runner and given/when/then
scenarios for aggregates. ``AggregateScenario`` works without pytest and
without a database too. See docs/testing.md.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aura_pg.testing.projections import ProjectionsNotCaughtUp, run_until_caught_up
    from aura_pg.testing.scenarios import AggregateScenario, scenario

# Loaded on first use: pytest loads the plugin in every session, and most
# sessions need neither the aggregates nor the projector.
_NAMES = {
    "AggregateScenario": "aura_pg.testing.scenarios",
    "scenario": "aura_pg.testing.scenarios",
    "ProjectionsNotCaughtUp": "aura_pg.testing.projections",
    "run_until_caught_up": "aura_pg.testing.projections",
}

__all__ = ["AggregateScenario", "ProjectionsNotCaughtUp", "run_until_caught_up", "scenario"]


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(module), name)
