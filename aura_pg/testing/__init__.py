"""Testing services built on aura-pg.

``aura_pg.testing.plugin`` is a pytest plugin (loaded through the
``pytest11`` entry point wherever aura-pg is installed): a fresh migrated
database per test, event stores, and a projection runner. See docs/testing.md.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aura_pg.testing.projections import ProjectionsNotCaughtUp, run_until_caught_up

# Loaded on first use: pytest loads the plugin in every session, and most
# sessions need no projector.
_NAMES = {
    "ProjectionsNotCaughtUp": "aura_pg.testing.projections",
    "run_until_caught_up": "aura_pg.testing.projections",
}

__all__ = ["ProjectionsNotCaughtUp", "run_until_caught_up"]


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(module), name)
