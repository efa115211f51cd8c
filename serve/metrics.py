"""lorafleet's Prometheus metrics, served at /metrics by the front (vLLM's engine metrics are
off: `--disable-log-stats`; these count what the fleet adds: per-adapter traffic and loads)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        # `version`: which version of the adapter answered (the fleet file's version name, or the
        # adapter's content hash; empty for the base and for requests refused before one was chosen).
        self.requests = Counter("lorafleet_requests", "Requests by route, model, status and version",
                                ["route", "model", "status", "version"], registry=r)
        self.prompt_tokens = Counter("lorafleet_prompt_tokens", "Prompt tokens", ["model", "version"], registry=r)
        self.completion_tokens = Counter("lorafleet_completion_tokens", "Generated tokens", ["model", "version"],
                                         registry=r)
        self.latency = Histogram("lorafleet_request_seconds", "End-to-end request latency", ["route"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.version_latency = Histogram("lorafleet_model_request_seconds", "End-to-end latency by model and version",
                                         ["model", "version"], registry=r,
                                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.ttft = Histogram("lorafleet_time_to_first_token_seconds", "Time to the first streamed chunk",
                              ["model", "version"], registry=r, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.adapter_loads = Counter("lorafleet_adapter_loads", "Adapter loads into an engine", ["model"], registry=r)
        self.adapter_evictions = Counter("lorafleet_adapter_evictions", "Adapters evicted (LRU)", ["model"], registry=r)
        self.retries = Counter("lorafleet_replica_retries", "Requests sent again because their replica was gone "
                               "before answering", registry=r)
        self.in_flight = Gauge("lorafleet_requests_in_flight", "Requests being served", registry=r)
