"""Prometheus metrics, read from the engine at scrape time. Names mirror vLLM's under the
`vidya:` prefix (`vllm:num_requests_running` -> `vidya:num_requests_running`), with the same
`model_name` label, so a vLLM dashboard or autoscaler rule needs one rename."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from vidya.engine.stats import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineCollector:
    def __init__(self, get_llm, model_name: str) -> None:
        self.get_llm = get_llm  # None while the model loads
        self.labels = {"model_name": model_name}

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(f"vidya:{name}", doc, labels=list(self.labels))
        g.add_metric(list(self.labels.values()), value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(f"vidya:{name}", doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), value)
        return c

    def _histogram(self, name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
        counts = list(h.counts)  # one copy, so the buckets agree with each other and the count
        buckets, total = [], 0
        for bound, n in zip([*map(str, h.bounds), "+Inf"], counts):
            total += n
            buckets.append((bound, total))
        m = HistogramMetricFamily(f"vidya:{name}", doc, labels=list(self.labels))
        m.add_metric(list(self.labels.values()), buckets, h.sum)
        return m

    def collect(self):
        llm = self.get_llm()
        if llm is None:
            return
        engine = llm.engine
        stats, kv = engine.stats, engine.kv
        yield self._gauge("num_requests_running", "Requests in the running batch.", llm.num_running())
        yield self._gauge("num_requests_waiting", "Requests waiting for a place in the batch.", llm.num_waiting())
        yield self._gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", kv.pool.usage)
        yield self._gauge("kv_cache_waste_perc", "KV slots allocated but empty over slots allocated, averaged "
                          "over steps since start (0 to 1; vidya's own, not a vLLM metric).", stats.kv_waste)
        yield self._counter("num_preemptions", "Requests preempted to free KV blocks.", engine.scheduler.num_preemptions)
        yield self._counter("prompt_tokens", "Prompt tokens of requests that started generating.", stats.prompt_tokens)
        yield self._counter("generation_tokens", "Generated tokens.", stats.generation_tokens)
        yield self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", kv.prefix_queries)
        yield self._counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", kv.prefix_hits)
        success = CounterMetricFamily("vidya:request_success", "Finished requests by finish reason.",
                                      labels=[*self.labels, "finished_reason"])
        for reason in ("stop", "length", "abort"):
            success.add_metric([*self.labels.values(), reason], stats.finished_by_reason.get(reason, 0))
        yield success
        yield self._histogram("time_to_first_token_seconds", "Arrival to first generated token.", stats.ttft)
        yield self._histogram("inter_token_latency_seconds", "Time between a request's tokens.", stats.inter_token)
        yield self._histogram("e2e_request_latency_seconds", "Arrival to finish.", stats.e2e)
        yield self._histogram("request_queue_time_seconds", "Arrival to first scheduled.", stats.queue_time)


def make_registry(get_llm, model_name: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(get_llm, model_name))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
