"""Prometheus metrics served at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bakehouse_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.errors = Counter("bakehouse_errors", "Requests answered with an error, by type", ["type"], registry=r)
        self.tokens = Counter("bakehouse_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("bakehouse_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cancelled = Counter("bakehouse_generations_cancelled", "Generations stopped because the client went away", registry=r)
        self.queue_depth = Gauge("bakehouse_queue_depth", "Sequences waiting for a running slot", registry=r)
        self.batch_size = Histogram("bakehouse_batch_size", "Running requests in each decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.ttft = Histogram("bakehouse_time_to_first_token_seconds", "Time from request to first token", registry=r)
        self.load_seconds = Gauge("bakehouse_model_load_seconds", "Time to load the model", registry=r)
        self.warmup_seconds = Gauge("bakehouse_model_warmup_seconds", "Time of the warm-up generation", registry=r)
        self.verify_seconds = Gauge("bakehouse_model_verify_seconds", "Time of the quick verify before loading", registry=r)
        self.start_seconds = Gauge("bakehouse_model_start_seconds", "From a passed quick verify to ready: load, warm-up and all between", registry=r)
        self.ready = Gauge("bakehouse_ready", "1 when the model is loaded and warm", registry=r)
