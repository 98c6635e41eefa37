"""The projection engine: catalog, runner, isolation state machine, wake-ups,
daemon, operator functions, rebuild and shadows.

Nothing is imported here, so that ``import aura_pg.projection.catalog`` (or
any one part) loads only that part.
"""
