"""The server's Prometheus metrics: requests, tokens, latency, queue depth, running batch, adapters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from .engine import Engine
from .registry import AdapterRegistry


class Metrics:
    """Prometheus metrics of one app: requests, tokens, latency, queue depth, running batch, adapters."""

    def __init__(self, engine: Engine, adapters: AdapterRegistry) -> None:
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorakit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("lorakit_completion_tokens", "tokens generated", registry=r)
        self.latency = Histogram(
            "lorakit_request_latency_seconds",
            "time from arrival to the last token",
            ["endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.first_token = Histogram(
            "lorakit_time_to_first_token_seconds", "time from arrival to the first token", registry=r
        )
        Gauge("lorakit_queue_depth", "requests waiting for a batch slot", registry=r).set_function(
            lambda: engine.queue_depth
        )
        Gauge("lorakit_running_requests", "requests in the running batch", registry=r).set_function(
            lambda: engine.running
        )
        Gauge("lorakit_adapters_loaded", "adapters available", registry=r).set_function(lambda: len(adapters.names()))
        Gauge("lorakit_engine_steps", "forward passes run by the engine", registry=r).set_function(lambda: engine.steps)
