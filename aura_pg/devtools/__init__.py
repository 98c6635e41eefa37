"""Helpers for developing aura-pg, not for production: a private local
Postgres cluster (:mod:`aura_pg.devtools.localdb`) for ``aura-pg db``,
``aura-pg demo``, the tests and the load scenarios."""
