"""Prometheus metrics of one gateway process, in a registry of its own (so several
gateways in one test process never clash). The registry also holds the process's own
figures (``process_resident_memory_bytes``, CPU seconds, open files), read from /proc."""

from __future__ import annotations

from collections import Counter as PyCounter
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

HANDLER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # resident memory, CPU and descriptors of this process (what a live call costs);
        # where /proc is missing it reports nothing
        ProcessCollector(registry=r)
        self.decisions = Counter(
            "gateway_authorisations", "Call decisions by direction, decision and reason",
            ["direction", "decision", "reason"], registry=r)
        self.decision_latency = Histogram(
            "gateway_authorisation_seconds", "Time to decide and reserve one call",
            ["direction"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.live_calls = Gauge("gateway_live_calls",
                                "Calls this process follows (authorised, not yet ended), "
                                "by PBX", ["pbx"], registry=r)
        self.pbx_owned = Gauge("gateway_pbx_owned",
                               "1 while this process holds the PBX's lease (serves it)",
                               ["pbx"], registry=r)
        self.pbx_lease_changes = Counter("gateway_pbx_lease_changes",
                                         "PBX leases gained or lost by this process",
                                         ["pbx"], registry=r)
        self.reservations = Counter("gateway_reservations", "Slices reserved, by outcome",
                                    ["outcome"], registry=r)
        self.settlements = Counter("gateway_settlements", "Call endings by path and outcome",
                                   ["by", "outcome"], registry=r)
        self.settle_lag = Histogram(
            "gateway_settle_lag_seconds", "From the PBX's hangup report to the settlement",
            registry=r, buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 3600))
        self.ami_reconnects = Gauge("gateway_ami_reconnects", "AMI reconnections since start",
                                    registry=r)
        self.ami_event_backlog = Gauge(
            "gateway_ami_event_backlog", "AMI events received and not yet handled (the "
            "handlers run one at a time), by PBX", ["pbx"], registry=r)
        # the database pool: connections open and in use now, and the most it opens
        # (in use at the most means requests queue for a connection)
        self.db_pool_size = Gauge("gateway_db_pool_connections",
                                  "Database connections the pool holds open", registry=r)
        self.db_pool_in_use = Gauge("gateway_db_pool_connections_in_use",
                                    "Database connections lent out to a statement now",
                                    registry=r)
        self.db_pool_max = Gauge("gateway_db_pool_connections_max",
                                 "The most database connections the pool opens", registry=r)
        self.deadline_moves = Counter("gateway_deadline_moves",
                                      "PBX hangup deadlines moved, by result", ["result"],
                                      registry=r)
        self.cutoff_warnings = Counter(
            "gateway_cutoff_warnings", "Warnings played to callers before a funded cut-off "
            "(AMI Originate into [gateway-warning]), by result", ["result"], registry=r)
        self.ami_events_dropped = Counter(
            "gateway_ami_events_dropped", "AMI events dropped because the backlog was full "
            "(each overflow is followed by a re-sync from the PBX), by event", ["event"],
            registry=r)
        # How long the PBX waits on us: a slow AGI route delays the call's setup, a slow
        # AMI handler delays every event queued behind it (they run one at a time).
        self.agi_handler_latency = Histogram(
            "gateway_agi_handler_seconds", "Time one AGI route handler ran, by route",
            ["route"], registry=r, buckets=HANDLER_BUCKETS)
        self.ami_handler_latency = Histogram(
            "gateway_ami_handler_seconds", "Time the handlers of one AMI event ran, by event",
            ["event"], registry=r, buckets=HANDLER_BUCKETS)
        # the rater's statements for pool-paid authorisations and settlements, and the
        # requests they carried: more requests than statements is coalescing at work
        # (set to read the rater's own counts when the gateway starts)
        self.pool_statements = Gauge(
            "gateway_pool_statements", "Statements sent for pool-paid authorisations and "
            "settlements (one pool's concurrent requests share one)", registry=r)
        self.pool_requests = Gauge(
            "gateway_pool_requests", "Pool-paid authorisations and settlements sent",
            registry=r)
        # the same counts, kept as plain numbers for /status
        self.reason_counts: PyCounter[tuple[str, str, str]] = PyCounter()

    def count_decision(self, direction: str, decision: str, reason: str, seconds: float) -> None:
        self.decisions.labels(direction, decision, reason).inc()
        self.decision_latency.labels(direction).observe(seconds)
        self.reason_counts[(direction, decision, reason)] += 1

    def observe_agi_handler(self, route: str, seconds: float) -> None:
        """One AGI route handler ran for ``seconds`` (the AGI server reports it)."""
        self.agi_handler_latency.labels(route).observe(seconds)

    def observe_ami_handler(self, event: str, seconds: float) -> None:
        """The handlers of one AMI event ran for ``seconds`` (the AMI client reports it)."""
        self.ami_handler_latency.labels(event).observe(seconds)

    def count_ami_event_dropped(self, event: str) -> None:
        """The AMI client dropped ``event``: its backlog was full."""
        self.ami_events_dropped.labels(event).inc()

    def render(self, names: Iterable[str] = ()) -> bytes:
        """The text exposition; with ``names``, only the samples of those names (as
        Prometheus' own client serves ``/metrics?name[]=...``: a cheap poll of a few
        gauges)."""
        names = list(names)
        registry = self.registry.restricted_registry(names) if names else self.registry
        return generate_latest(registry)
