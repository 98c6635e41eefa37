"""Fault injection for chaos experiments and the reliability suite: real
faults (killed processes, a stopped server, ended sessions, delayed or cut
connections, failing or slow read models, a full disk, capped memory), each
one undoable. See docs/reliability.md."""

from aura_pg.chaos.injector import ChaosUnavailable, FailureInjector, Fault
from aura_pg.chaos.proxy import LatencyProxy, measure_round_trip

__all__ = ["ChaosUnavailable", "FailureInjector", "Fault", "LatencyProxy", "measure_round_trip"]
