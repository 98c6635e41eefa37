-- The aura schema holds every object of the event store.
CREATE SCHEMA IF NOT EXISTS aura;

COMMENT ON SCHEMA aura IS 'aura-pg event store: events, streams, read functions and operator views';
