"""The engine's Prometheus metrics (prometheus_client, one registry per engine): requests, queue depth, tokens in and
out, time to first token and inter-token latency histograms, cache pages used / cached / free, prefix-cache hit
tokens, preemptions, speculative draft tokens proposed and accepted. `GET /metrics` (qcjax.serve) answers `text()`."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qcjax_requests", "Requests submitted", registry=r)
        self.finishes = Counter("qcjax_requests_finished", "Requests finished, by reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("qcjax_prompt_tokens", "Prompt tokens submitted", registry=r)
        self.generated_tokens = Counter("qcjax_generation_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("qcjax_prefix_cache_hit_tokens",
                                     "Prompt tokens taken from the prefix cache (not computed)", registry=r)
        self.preemptions = Counter("qcjax_preemptions", "Running requests preempted for pages (recomputed later)",
                                   registry=r)
        self.spec_draft = Counter("qcjax_spec_draft_tokens", "Speculative draft tokens proposed", registry=r)
        self.spec_accepted = Counter("qcjax_spec_accepted_tokens", "Speculative draft tokens accepted by the model",
                                     registry=r)
        self.ttft = Histogram("qcjax_time_to_first_token_seconds", "Submit to first token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("qcjax_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=_LATENCY, registry=r)
        self.queue = Gauge("qcjax_queue_depth", "Requests waiting for a row", registry=r)
        self.running = Gauge("qcjax_running_requests", "Requests prefilling or decoding", registry=r)
        self.pages = Gauge("qcjax_cache_pages", "KV cache pages by state", ["state"], registry=r)

    def submitted(self, prompt_tokens: int) -> None:
        self.requests.inc()
        self.prompt_tokens.inc(prompt_tokens)

    def prefix_hit(self, tokens: int) -> None:
        if tokens:
            self.cached_tokens.inc(tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generated_tokens.inc()

    def tokens(self, n: int, seconds_per_token: float | None) -> None:
        self.generated_tokens.inc(n)
        if seconds_per_token is not None:
            for _ in range(n):
                self.itl.observe(seconds_per_token)

    def preempted(self) -> None:
        self.preemptions.inc()

    def speculated(self, drafted: int, accepted: int) -> None:
        self.spec_draft.inc(drafted)
        self.spec_accepted.inc(accepted)

    def finished(self, reason: str) -> None:
        self.finishes.labels(reason=reason).inc()

    def gauges(self, engine) -> None:
        s = engine.pages
        self.queue.set(len(engine._waiting))
        self.running.set(len(engine._running) + len(engine._prefilling))
        self.pages.labels(state="used").set(s.used)
        self.pages.labels(state="cached").set(s.cached)
        self.pages.labels(state="free").set(len(s.free))

    def text(self) -> bytes:
        return generate_latest(self.registry)
