"""`vidya bench serve`: a load generator for any OpenAI-compatible server (vidya, vLLM, llama.cpp,
SGLang). It owns the flags, the arrival schedule (a fixed number of requests in flight, or Poisson
arrivals at a fixed rate and seed), the streaming client that times every request (TTFT, gaps
between content chunks, end to end) and the report: a table on stdout, optionally JSON."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import httpx

from vidya.bench.workload import Workload, load_workload, num_prompts_arg

DEFAULT_CONCURRENCY = 64


@dataclass(slots=True)
class RequestResult:
    start: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with content
    end: float = 0.0
    usage_tokens: int | None = None  # usage.completion_tokens from the final chunk, when sent
    prompt_tokens: int | None = None  # usage.prompt_tokens, when sent
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.chunk_times)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="the server: its root (http://127.0.0.1:8000) or its /v1 URL")
    p.add_argument("--model", default=None, help="model name to request (default: first id of GET /v1/models)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=None,
                      help=f"requests in flight at once (default {DEFAULT_CONCURRENCY})")
    mode.add_argument("--request-rate", type=float, default=None,
                      help="Poisson arrivals at this many requests/s, no cap on requests in flight")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrival times (default 0)")
    p.add_argument("--workload", default=None, help="workload JSON (default: the packaged tutor-64.json)")
    p.add_argument("--num-prompts", type=num_prompts_arg, default=None,
                   help="requests to send (default: the workload's; repeated to reach more)")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")


def normalize_base_url(url: str) -> str:
    base = url.strip().rstrip("/")
    parsed = httpx.URL(base) if "://" in base else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"--base-url {url!r} is not an http(s) URL; pass e.g. http://127.0.0.1:8000/v1")
    return base if base.endswith("/v1") else base + "/v1"


def percentile(xs: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def resolve_model(client: httpx.AsyncClient, base: str, model: str | None) -> str:
    """GET /models also checks the server is up before any load is sent."""
    try:
        resp = await client.get(f"{base}/models", timeout=30)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {base}: is the server running? ({type(e).__name__}: {e})") from None
    if resp.status_code == 401:
        raise ValueError(f"{base} refused the API key: pass --api-key or set OPENAI_API_KEY")
    if model:
        return model  # some servers lack /models; the name given is used as is
    try:
        resp.raise_for_status()
        ids = [m["id"] for m in resp.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"GET {base}/models gave no model list ({e}); pass --model") from None
    if not ids:
        raise ValueError(f"{base}/models lists no models; pass --model")
    return ids[0]


def request_body(workload: Workload, model: str, messages: list[dict]) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": workload.max_tokens,
            "temperature": workload.temperature, "stream": True, "stream_options": {"include_usage": True}}
    if workload.ignore_eos:
        body["ignore_eos"] = True  # vLLM / llama.cpp extras: every peer generates the same length
    if workload.min_tokens > 0:
        body["min_tokens"] = workload.min_tokens
    return body


async def read_stream(resp: httpx.Response, r: RequestResult) -> None:
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, `event:` lines
        now = time.perf_counter()
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if chunk.get("error"):
            raise RuntimeError(f"error event: {chunk['error']}")
        if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
            r.chunk_times.append(now)
        if chunk.get("usage"):
            r.usage_tokens = chunk["usage"].get("completion_tokens")
            r.prompt_tokens = chunk["usage"].get("prompt_tokens")
    raise RuntimeError("stream ended without data: [DONE]")


async def one_request(client: httpx.AsyncClient, url: str, body: dict, timeout: float) -> RequestResult:
    r = RequestResult(start=time.perf_counter())
    try:
        async with asyncio.timeout(timeout), client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace").strip()
                r.error = f"HTTP {resp.status_code}: {text[:200]}"
            else:
                await read_stream(resp, r)
    except TimeoutError:
        r.error = f"timed out after {timeout:g} s"
    except Exception as e:  # transport errors, bad JSON, error events: one failed request, not a dead run
        r.error = f"{type(e).__name__}: {e}"
    r.end = time.perf_counter()
    return r


async def run_load(client: httpx.AsyncClient, url: str, bodies: list[dict], concurrency: int | None,
                   rate: float | None, seed: int, timeout: float) -> list[RequestResult]:
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    rng = random.Random(seed)

    async def limited(body: dict) -> RequestResult:
        if sem is None:
            return await one_request(client, url, body, timeout)
        async with sem:
            return await one_request(client, url, body, timeout)

    tasks, t_next = [], time.perf_counter()
    for i, body in enumerate(bodies):
        if rate and i:  # absolute schedule, so oversleeping one gap does not delay all later arrivals
            t_next += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
        tasks.append(asyncio.create_task(limited(body)))
    return await asyncio.gather(*tasks)


async def bench(args, base: str, workload: Workload, concurrency: int | None) -> tuple[str, list[RequestResult]]:
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=args.timeout, http2=False) as client:
        model = await resolve_model(client, base, args.model)
        bodies = [request_body(workload, model, c) for c in workload.conversations]
        results = await run_load(client, f"{base}/chat/completions", bodies, concurrency,
                                 args.request_rate, args.seed, args.timeout)
        server = await server_metrics(client, base)
        server["backend"] = await server_backend(client, base)
    return model, results, server


async def server_backend(client: httpx.AsyncClient, base: str) -> dict | None:
    """What a vidya server runs (its /version `backend`: device, ISA, dtypes); None elsewhere."""
    try:
        r = await client.get(base.removesuffix("/v1") + "/version", timeout=10)
        return r.json().get("backend") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def backend_line(backend: dict | None) -> str:
    """A vidya server's backend (server_backend's dict) in one line; what another server runs is unknown."""
    if not backend:
        return "server backend: not reported (not a vidya server)"
    weights = f"{backend['quantization']} weights" if backend.get("quantization") else f"{backend['weight_dtype']} weights"
    return (f"server backend: {backend['device']} {backend['isa']} ({backend['backend']}): {backend['dtype']} math, "
            f"{weights}, {backend['kv_cache_dtype']} KV cache")


async def server_metrics(client: httpx.AsyncClient, base: str) -> dict:
    """vidya's own KV-cache waste and prefix-cache counters from /metrics, when the server has them."""
    try:
        text = (await client.get(base.removesuffix("/v1") + "/metrics", timeout=10)).text
    except httpx.HTTPError:
        return {}
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        key = name.split("{")[0].removeprefix("vidya:")
        if key in ("kv_cache_waste_perc", "prefix_cache_queries_total", "prefix_cache_hits_total"):
            found[key] = float(value)
    return found


def summarize(results: list[RequestResult]) -> dict:
    ok = [r for r in results if r.error is None]
    duration = max(r.end for r in results) - min(r.start for r in results)
    out_tokens = sum(r.output_tokens for r in ok)
    ms = {"ttft": [1e3 * (r.chunk_times[0] - r.start) for r in ok if r.chunk_times],
          "itl": [1e3 * (b - a) for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])],
          "e2e": [1e3 * (r.end - r.start) for r in ok]}
    report = {"duration_s": duration, "completed": len(ok), "failed": len(results) - len(ok),
              "output_tokens": out_tokens, "output_tok_s": out_tokens / duration if duration else 0.0,
              "requests_s": len(ok) / duration if duration else 0.0}
    for name, xs in ms.items():
        for q in (50, 90, 99):
            report[f"{name}_p{q}_ms"] = percentile(xs, q)
    report["errors"] = list(dict.fromkeys(r.error for r in results if r.error))[:5]
    return report


def print_report(report: dict) -> None:
    load = (f"concurrency {report['concurrency']}" if report["concurrency"]
            else f"Poisson {report['request_rate']:g} req/s, seed {report['seed']}")
    print(f"\nbench serve {report['base_url']}, model {report['model']}, workload {report['workload']}: "
          f"{report['num_requests']} requests, {load}")
    backend = report["server_metrics"].get("backend")
    if backend:
        print(backend_line(backend))
    print(f"{'duration':<20} {report['duration_s']:>10.2f} s")
    print(f"{'completed / failed':<20} {report['completed']:>6} / {report['failed']}")
    print(f"{'output tokens':<20} {report['output_tokens']:>10}")
    print(f"{'output tok/s':<20} {report['output_tok_s']:>10.1f}")
    print(f"{'requests/s':<20} {report['requests_s']:>10.2f}")
    if "kv_cache_waste_perc" in report["server_metrics"]:
        print(f"{'server KV waste':<20} {100 * report['server_metrics']['kv_cache_waste_perc']:>9.2f}% (since start)")
    print(f"{'latency (ms)':<20} {'p50':>10} {'p90':>10} {'p99':>10}")
    for name in ("ttft", "itl", "e2e"):
        cells = [report[f"{name}_p{q}_ms"] for q in (50, 90, 99)]
        print(f"{name.upper():<20} " + " ".join(f"{c:>10.1f}" if c is not None else f"{'-':>10}" for c in cells))


def main(args) -> int:
    base = normalize_base_url(args.base_url)
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.request_rate is not None and args.request_rate <= 0:
        raise ValueError(f"--request-rate must be positive, got {args.request_rate:g}")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout:g}")
    concurrency = None if args.request_rate else (args.concurrency or DEFAULT_CONCURRENCY)
    workload = load_workload(args.workload, args.num_prompts)
    if not workload.conversations:
        raise ValueError(f"workload {workload.name} has no requests; check --workload and --num-prompts")
    timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    model, results, server = asyncio.run(bench(args, base, workload, concurrency))
    report = {"timestamp": timestamp, "base_url": base, "model": model, "workload": workload.name,
              "num_requests": len(results), "concurrency": concurrency, "request_rate": args.request_rate,
              "seed": args.seed, **summarize(results), "server_metrics": server}
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if report["failed"]:
        print(f"{report['failed']} of {len(results)} requests failed:", file=sys.stderr)
        for e in report["errors"]:
            print(f"  {e}", file=sys.stderr)
    return 0 if report["completed"] and not report["failed"] else 1
