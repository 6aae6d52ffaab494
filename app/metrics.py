"""Prometheus metrics (prometheus-client), one registry per app instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "voice_embed_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "voice_embed_request_duration_seconds", "request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.audio_seconds = Counter("voice_embed_audio_seconds", "seconds of audio processed", registry=r)
        self.clips = Counter("voice_embed_clips", "clips analysed, by outcome", ["outcome"], registry=r)
        self.pending = Gauge("voice_embed_pending_clips", "clips admitted and not yet finished", registry=r)
        self.rejected = Counter("voice_embed_overload_rejections", "requests refused with 503 (queue full)", registry=r)
        self.memory_rejected = Counter(
            "voice_embed_memory_rejections", "requests refused because they do not fit the memory budget", registry=r
        )
        self.memory_reserved = Gauge(
            "voice_embed_memory_reserved_bytes", "memory reserved by the requests in flight", registry=r
        )
        self.memory_budget = Gauge(
            "voice_embed_memory_budget_bytes",
            "MEMORY_BUDGET_MB, and the baseline taken by the model",
            ["part"],
            registry=r,
        )
        self.batch_size = Histogram(
            "voice_embed_batch_size", "clips per request", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.infer_batch = Histogram(
            "voice_embed_inference_batch_clips",
            "clips taken together by the inference worker",
            buckets=(1, 2, 4, 8, 16, 32),
            registry=r,
        )
        self.stage = Histogram(
            "voice_embed_stage_seconds",
            "time per clip in each server stage: decode (and checks), queue (waiting for the "
            "inference worker), inference (one worker pass, shared by the clips batched in it), search "
            "(/identify: the change-counter check, loading profiles when they changed, the cosine search)",
            ["stage"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.model = Info("voice_embed_model", "the loaded model", registry=r)
