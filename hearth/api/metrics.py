"""Prometheus metrics for one app, in the app's own CollectorRegistry (never the process-global one, so two apps in
one process, as in tests, do not collide). Names follow vLLM's where one exists, with the `hearth_` prefix.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hearth.engine.protocol import EngineStats

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/health", "/metrics")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("hearth_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=registry)  # fmt: skip
        self.prompt_tokens = Counter("hearth_prompt_tokens", "Prompt tokens processed", registry=registry)
        self.generation_tokens = Counter("hearth_generation_tokens", "Tokens generated", registry=registry)
        self.time_to_first_token = Histogram("hearth_time_to_first_token_seconds", "Time to first token",
                                             buckets=TTFT_BUCKETS, registry=registry)  # fmt: skip
        self.time_per_output_token = Histogram("hearth_time_per_output_token_seconds", "Time between output tokens",
                                               buckets=TPOT_BUCKETS, registry=registry)  # fmt: skip
        self.num_requests_running = Gauge("hearth_num_requests_running", "Requests being decoded", registry=registry)
        self.num_requests_waiting = Gauge("hearth_num_requests_waiting", "Requests in the queue", registry=registry)
        self.kv_cache_usage = Gauge("hearth_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use",
                                    registry=registry)  # fmt: skip
        self.num_kvcache_blocks = Gauge("hearth_num_kvcache_blocks", "KV-cache blocks allocated", registry=registry)
        self.spec_draft_tokens = Counter("hearth_spec_decode_num_draft_tokens", "Speculative draft tokens scored",
                                         registry=registry)  # fmt: skip
        self.spec_accepted_tokens = Counter("hearth_spec_decode_num_accepted_tokens", "Speculative draft tokens kept",
                                            registry=registry)  # fmt: skip
        self._spec_seen: dict[Hashable, tuple[int, int]] = {}  # each engine's totals already counted

    def update_engines(self, engines: dict[Hashable, EngineStats]) -> None:
        """The gauges from the loaded engines' stats summed (KV usage over all their blocks); the speculative counters
        advance by what each engine (a key per engine instance) added since the last call, so a reloaded engine or
        an unloaded neighbour never makes another's totals count twice."""
        stats = list(engines.values())
        blocks = sum(e.num_kvcache_blocks for e in stats)
        self.num_requests_running.set(sum(e.num_running for e in stats))
        self.num_requests_waiting.set(sum(e.num_waiting for e in stats))
        self.kv_cache_usage.set(sum(e.kv_cache_usage * e.num_kvcache_blocks for e in stats) / blocks if blocks else 0.0)
        self.num_kvcache_blocks.set(blocks)
        seen = {}
        for key, e in engines.items():
            drafted, accepted = e.num_draft_tokens, e.num_accepted_tokens
            seen_drafted, seen_accepted = self._spec_seen.get(key, (0, 0))
            if drafted < seen_drafted or accepted < seen_accepted:  # totals that went back: counted from 0
                seen_drafted = seen_accepted = 0
            self.spec_draft_tokens.inc(drafted - seen_drafted)
            self.spec_accepted_tokens.inc(accepted - seen_accepted)
            seen[key] = (drafted, accepted)
        self._spec_seen = seen  # engines gone since the last call are forgotten

    def render(self) -> bytes:
        return generate_latest(self.registry)


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}/input_items" if path.endswith("/input_items") else "/v1/responses/{id}"
    return "other"  # unknown paths share one label, so scanners cannot grow the series without bound


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and status and logs one line per request (no bodies, ever)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def tracked_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(endpoint_label(path), str(status)).inc()
            if path not in ("/health", "/metrics"):
                logger.info("%s %s %d %.3fs", scope.get("method"), endpoint_label(path), status,
                            time.perf_counter() - start)  # fmt: skip
