"""Prometheus metrics, read from the engine at scrape time. Names mirror vLLM's under the
`vidya:` prefix (`vllm:num_requests_running` -> `vidya:num_requests_running`), with the same
`model_name` label; the families vLLM has are also exported under vLLM's own names (`vllm:`,
with its labels), so a vLLM autoscaler rule or dashboard reads vidya with no change at all."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# vLLM's own names for the families vLLM has (same kind, same meaning), exported beside vidya's
# so that a vLLM autoscaler rule, dashboard or endpoint picker reads a vidya pod unchanged. Its
# v1 engine labels each series with the engine's index too. `gpu_cache_usage_perc` is vLLM's
# older name for the KV-cache gauge, which the Gateway API Inference Extension still reads.
VLLM_NAMES = {"num_requests_running": ["num_requests_running"], "num_requests_waiting": ["num_requests_waiting"],
              "kv_cache_usage_perc": ["kv_cache_usage_perc", "gpu_cache_usage_perc"],
              "num_preemptions": ["num_preemptions"], "prompt_tokens": ["prompt_tokens"],
              "generation_tokens": ["generation_tokens"], "prefix_cache_queries": ["prefix_cache_queries"],
              "prefix_cache_hits": ["prefix_cache_hits"], "request_success": ["request_success"],
              "time_to_first_token_seconds": ["time_to_first_token_seconds"],
              "inter_token_latency_seconds": ["inter_token_latency_seconds"],
              "e2e_request_latency_seconds": ["e2e_request_latency_seconds"],
              "request_queue_time_seconds": ["request_queue_time_seconds"]}
VLLM_LABELS = {"engine": "0"}


class EngineCollector:
    def __init__(self, get_llm, model_name: str) -> None:
        self.get_llm = get_llm  # None while the model loads
        self.model_name = model_name

    def _families(self, llm):
        """(kind, vidya's name, help, value) for each family; `value` for a counter labelled by
        finish reason is a dict, for a histogram a stats.Histogram."""
        engine = llm.engine
        stats, kv = engine.stats, engine.kv
        yield "gauge", "num_requests_running", "Requests in the running batch.", llm.num_running()
        yield "gauge", "num_requests_waiting", "Requests waiting for a place in the batch.", llm.num_waiting()
        yield "gauge", "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", kv.pool.usage
        yield ("gauge", "kv_cache_waste_perc", "KV slots allocated but empty over slots allocated, averaged "
               "over steps since start (0 to 1; vidya's own, not a vLLM metric).", stats.kv_waste)
        yield "counter", "num_preemptions", "Requests preempted to free KV blocks.", engine.scheduler.num_preemptions
        yield "counter", "prompt_tokens", "Prompt tokens of requests that started generating.", stats.prompt_tokens
        yield "counter", "generation_tokens", "Generated tokens.", stats.generation_tokens
        yield "counter", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", kv.prefix_queries
        yield "counter", "prefix_cache_hits", "Prompt tokens found in the prefix cache.", kv.prefix_hits
        yield ("by_reason", "request_success", "Finished requests by finish reason.",
               {r: stats.finished_by_reason.get(r, 0) for r in ("stop", "length", "abort")})
        yield "histogram", "time_to_first_token_seconds", "Arrival to first generated token.", stats.ttft
        yield "histogram", "inter_token_latency_seconds", "Time between a request's tokens.", stats.inter_token
        yield "histogram", "e2e_request_latency_seconds", "Arrival to finish.", stats.e2e
        yield "histogram", "request_queue_time_seconds", "Arrival to first scheduled.", stats.queue_time

    def collect(self):
        llm = self.get_llm()
        if llm is None:
            return
        for kind, name, doc, value in self._families(llm):
            yield _family(kind, f"vidya:{name}", doc, {"model_name": self.model_name}, value)
            for alias in VLLM_NAMES.get(name, ()):
                yield _family(kind, f"vllm:{alias}", doc, {"model_name": self.model_name, **VLLM_LABELS}, value)


def _family(kind: str, name: str, doc: str, labels: dict, value):
    keys, values = list(labels), list(labels.values())
    if kind == "gauge":
        f = GaugeMetricFamily(name, doc, labels=keys)
        f.add_metric(values, value)
    elif kind == "counter":
        f = CounterMetricFamily(name, doc, labels=keys)
        f.add_metric(values, value)
    elif kind == "by_reason":
        f = CounterMetricFamily(name, doc, labels=[*keys, "finished_reason"])
        for reason, n in value.items():
            f.add_metric([*values, reason], n)
    else:
        counts = list(value.counts)  # one copy, so the buckets agree with each other and the count
        buckets, total = [], 0
        for bound, n in zip([*map(str, value.bounds), "+Inf"], counts):
            total += n
            buckets.append((bound, total))
        f = HistogramMetricFamily(name, doc, labels=keys)
        f.add_metric(values, buckets, value.sum)
    return f


def make_registry(get_llm, model_name: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(get_llm, model_name))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
