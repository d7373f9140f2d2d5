"""Prometheus metrics of one server: request counts and latencies, TTFT, chunk hits per tier, misses,
recompute fraction, queue depth, rejections and retrievals that found nothing. Each app gets its own
registry (tests build several).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engine.answer import Answer
from ..storage.health import remote_status

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The server's collectors, registered in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ragkv_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "ragkv_request_seconds",
            "HTTP request latency (full response)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "ragkv_ttft_seconds",
            "time to first token inside the engine",
            ["strategy"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.hits = Counter("ragkv_chunk_hits", "chunk KV found in the store, by tier", ["tier"], registry=r)
        self.misses = Counter("ragkv_chunk_misses", "chunk KV precomputed because the store lacked it", registry=r)
        self.recompute = Histogram(
            "ragkv_recompute_fraction",
            "fraction of prompt tokens recomputed per request",
            buckets=(0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0),
            registry=r,
        )
        self.tokens = Counter("ragkv_tokens", "prompt and completion tokens", ["kind"], registry=r)
        self.queue_depth = Gauge(
            "ragkv_queue_depth", "requests admitted to the model worker (running + waiting)", registry=r
        )
        self.rejected = Counter("ragkv_rejected", "requests refused because the model queue was full", registry=r)
        self.degraded = Counter(
            "ragkv_degraded_answers", "answers served while a shared cache tier was unreachable", registry=r
        )
        self.remote_up = Gauge("ragkv_remote_tier_up", "1 if the shared cache tier answers", ["tier"], registry=r)
        self.remote_outages = Gauge(
            "ragkv_remote_tier_outages", "times the shared cache tier became unreachable", ["tier"], registry=r
        )
        self.duplicates = Gauge(
            "ragkv_duplicate_precomputes", "chunks precomputed here that another sidecar had computed", registry=r
        )
        self.leases = Gauge(
            "ragkv_compute_leases",
            "what the compute-once protocol did here: computed, arrived (computed by another sidecar while "
            "waiting), timeouts, duplicates, unleased (Redis unreachable), outage_duplicates",
            ["outcome"],
            registry=r,
        )
        self.catalog_up = Gauge(
            "ragkv_catalog_up", "1 if every network document catalog (PostgreSQL) answers", registry=r
        )
        self.catalog_outages = Gauge(
            "ragkv_catalog_outages", "times a network document catalog became unreachable", registry=r
        )
        self.corrupt = Gauge(
            "ragkv_corrupt_entries",
            "entries dropped because they failed their checks (never served)",
            ["tier"],
            registry=r,
        )
        self.empty_retrievals = Counter(
            "ragkv_empty_retrievals", "retrievals (in a completion or /v1/retrieve) that found no chunks", registry=r
        )

    def observe_answer(self, answer: Answer, empty_retrieval: bool = False) -> None:
        """Record one generation's TTFT, cache accounting and token counts (and a retrieval that found nothing)."""
        if empty_retrieval:
            self.empty_retrievals.inc()
        self.ttft.labels(answer.strategy).observe(answer.ttft_ms / 1e3)
        for tier, n in answer.hits.items():
            self.hits.labels(tier).inc(n)
        self.misses.inc(answer.misses)
        self.recompute.observe(answer.recompute_fraction)
        self.tokens.labels("prompt").inc(answer.prompt_tokens)
        self.tokens.labels("completion").inc(len(answer.token_ids))
        if answer.warnings:
            self.degraded.inc()

    def observe_store(self, store) -> None:
        """Refresh the corrupt-entry and shared-tier gauges (up, outages, duplicate precomputes) from the store."""
        for tier in getattr(store, "tiers", ()):
            self.corrupt.labels(tier.name).set(getattr(tier, "corrupt", 0))
        for name, s in remote_status(store).items():
            self.remote_up.labels(name).set(1 if s.get("up") else 0)
            self.remote_outages.labels(name).set(s.get("outages", 0))
            leases = s.get("leases") or {}
            self.duplicates.set(leases.get("duplicates", 0))
            for outcome, n in leases.items():
                self.leases.labels(outcome).set(n)

    def observe_catalogs(self, links: dict) -> None:
        """Refresh the catalog gauges from the Engine's catalog links ({url: CatalogLink})."""
        self.catalog_up.set(1 if all(link.up for link in links.values()) else 0)
        self.catalog_outages.set(sum(link.outages for link in links.values()))

    def render(self) -> bytes:
        """The Prometheus text exposition of every collector."""
        return generate_latest(self.registry)
