"""Testing services built on aura-pg: a pytest plugin (``aura_pg.testing.plugin``,
loaded through the ``pytest11`` entry point) with a fresh migrated
database per test, event stores and a projection runner.
See docs/aggregates.md, "Testing your service"."""

from aura_pg.testing.projections import ProjectionsNotCaughtUp, run_until_caught_up

__all__ = ["ProjectionsNotCaughtUp", "run_until_caught_up"]
