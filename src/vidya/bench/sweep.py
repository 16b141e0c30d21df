"""`vidya bench sweep`: the tutor workload against any OpenAI-compatible server at rising
concurrency, one level after another, recording per level what `vidya plan` needs: output tok/s,
requests/s, TTFT / inter-token / end-to-end latency p50/p90/p99, errors, the tokens a request
spends, and on a vidya server the peak KV-cache use and the preemptions during the level.

A level runs as serving does, not in waves: answer lengths are spread around the workload's
(`--length-spread`, the mean kept), so requests finish at different times and each next one joins
a running batch alone; the opening wave (the level's first `concurrency` requests, which arrive
together) counts for throughput but not for latency."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from datetime import datetime, timezone

import httpx

from vidya.bench.serve import (backend_line, normalize_base_url, request_body, resolve_model, run_load, server_backend,
                               summarize)
from vidya.bench.workload import load_workload

DEFAULT_LEVELS = "1,8,16,32,64,128,256"
SWEEP_VERSION = 2  # 2: spread answer lengths, latency after the opening wave
DEFAULT_LENGTH_SPREAD = 0.5


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="the server: its root (http://127.0.0.1:8000) or its /v1 URL")
    p.add_argument("--model", default=None, help="model name to request (default: first id of GET /v1/models)")
    p.add_argument("--workload", default=None, help="workload JSON (default: the packaged tutor-64.json)")
    p.add_argument("--levels", default=DEFAULT_LEVELS, help=f"concurrency levels, comma-separated (default {DEFAULT_LEVELS})")
    p.add_argument("--requests-per-level", type=int, default=None,
                   help="requests at each level (default: 2 x the level, at least 16)")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--json", default=None, help="write the sweep here (the input of `vidya plan --sweep`)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--length-spread", type=float, default=DEFAULT_LENGTH_SPREAD,
                   help="answer lengths spread evenly within +-this fraction of the workload's max_tokens, the "
                        "mean kept, so that a level reaches serving's steady state instead of sending waves "
                        f"(0: every answer the same length; default {DEFAULT_LENGTH_SPREAD:g})")


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--levels must be comma-separated integers, got {text!r}") from None
    if not levels or any(n < 1 for n in levels) or levels != sorted(set(levels)):
        raise ValueError(f"--levels must be rising positive integers, got {text!r}")
    return levels


async def vidya_gauges(client: httpx.AsyncClient, root: str) -> dict[str, float]:
    """KV use and preemptions from a vidya server's /metrics; {} from other servers."""
    try:
        text = (await client.get(root + "/metrics", timeout=10)).text
    except httpx.HTTPError:
        return {}
    out = {}
    for key in ("kv_cache_usage_perc", "num_preemptions_total"):
        m = re.search(rf"^vidya:{key}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
        if m:
            out[key] = float(m.group(1))
    return out


def spread_lengths(max_tokens: int, n: int, spread: float, seed: int) -> list[int]:
    """n answer lengths evenly spaced within max_tokens x (1 +- spread), in a shuffled order
    fixed by the seed; their mean is max_tokens (up to rounding)."""
    if n == 1 or spread == 0:
        return [max_tokens] * n
    lengths = [max(1, round(max_tokens * (1 - spread + 2 * spread * i / (n - 1)))) for i in range(n)]
    random.Random(seed).shuffle(lengths)
    return lengths


def with_length(body: dict, n: int) -> dict:
    """The request asking for exactly n tokens where the workload fixes its length (min_tokens)."""
    return {**body, "max_tokens": n, **({"min_tokens": n} if "min_tokens" in body else {})}


async def run_level(client: httpx.AsyncClient, base: str, bodies: list[dict], level: int, timeout: float) -> dict:
    root = base.removesuffix("/v1")
    before = await vidya_gauges(client, root)
    peak_kv = [before.get("kv_cache_usage_perc")]

    async def watch() -> None:
        while True:
            await asyncio.sleep(0.1)
            peak_kv.append((await vidya_gauges(client, root)).get("kv_cache_usage_perc"))

    watcher = asyncio.create_task(watch())
    try:
        results = await run_load(client, f"{base}/chat/completions", bodies, level, None, 0, timeout)
    finally:
        watcher.cancel()
    after = await vidya_gauges(client, root)
    ok = [r for r in results if r.error is None]
    # latency from the requests after the opening wave (they joined a running batch one by one,
    # as students do); throughput, errors and tokens from all of them
    steady = results[level:] if len(results) > level else results
    latency = {k: v for k, v in summarize(steady).items() if k.startswith(("ttft_", "itl_", "e2e_"))}
    row = {"concurrency": level, "num_requests": len(results), **summarize(results), **latency,
           "latency_requests": len(steady),
           "prompt_tokens_per_request": (sum(r.prompt_tokens or 0 for r in ok) / len(ok)) if ok else None,
           "output_tokens_per_request": (sum(r.output_tokens for r in ok) / len(ok)) if ok else None,
           "output_tokens_range": [min(r.output_tokens for r in ok), max(r.output_tokens for r in ok)] if ok else None}
    seen = [x for x in peak_kv + [after.get("kv_cache_usage_perc")] if x is not None]
    row["kv_cache_usage_peak"] = max(seen) if seen else None
    row["preemptions"] = (after["num_preemptions_total"] - before["num_preemptions_total"]
                          if "num_preemptions_total" in after and "num_preemptions_total" in before else None)
    return row


async def sweep(args, base: str, levels: list[int]) -> dict:
    from tqdm import tqdm
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    workload = load_workload(args.workload)
    rows = []
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=args.timeout) as client:
        model = await resolve_model(client, base, args.model)
        backend = await server_backend(client, base)
        bar = tqdm(levels, desc="sweep", unit=" level", file=sys.stderr)
        for level in bar:
            n = args.requests_per_level or max(16, 2 * level)
            convs = (workload.conversations * (n // len(workload.conversations) + 1))[:n]
            convs = [as_new_question(c, f"{level}.{i}") for i, c in enumerate(convs)]
            lengths = spread_lengths(workload.max_tokens, n, args.length_spread, seed=level)
            bar.set_postfix_str(f"concurrency {level}, {n} requests")
            bodies = [with_length(request_body(workload, model, c), m) for c, m in zip(convs, lengths)]
            row = await run_level(client, base, bodies, level, args.timeout)
            rows.append(row)
            bar.write(format_row(row))
    return {"version": SWEEP_VERSION, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_url": base, "model": model, "workload": workload.name, "backend": backend,
            "length_spread": args.length_spread, "levels": rows}


def as_new_question(messages: list[dict], tag: str) -> list[dict]:
    """The conversation with a tag unique to this request at the start of its first user message:
    as with real students, the prefix cache then hits the shared system prompt and nothing after
    it. (Replayed as they are, a level would find the conversations an earlier level computed in
    the cache and look faster than a real load: the first sweeps here did, 64 streams beating 32.)"""
    out, tagged = [], False
    for m in messages:
        if m["role"] == "user" and not tagged and isinstance(m.get("content"), str):
            m, tagged = {**m, "content": f"({tag}) {m['content']}"}, True
        out.append(m)
    return out


def format_row(r: dict) -> str:
    f = lambda v, spec=".0f": "-" if v is None else format(v, spec)  # noqa: E731
    kv = "-" if r.get("kv_cache_usage_peak") is None else f"{100 * r['kv_cache_usage_peak']:.1f}%"
    why = f" ({r['errors'][0]})" if r["failed"] and r.get("errors") else ""
    return (f"concurrency {r['concurrency']:>4}: {r['output_tok_s']:8.1f} tok/s {r['requests_s']:6.2f} req/s  "
            f"TTFT p50/p99 {f(r['ttft_p50_ms'])}/{f(r['ttft_p99_ms'])} ms  e2e p99 {f(r['e2e_p99_ms'])} ms  "
            f"failed {r['failed']}{why}  KV peak {kv}  preemptions {f(r.get('preemptions'))}")


def main(args) -> int:
    base = normalize_base_url(args.base_url)
    levels = parse_levels(args.levels)
    if args.requests_per_level is not None and args.requests_per_level < 1:
        raise ValueError(f"--requests-per-level must be at least 1, got {args.requests_per_level}")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout:g}")
    if not 0 <= args.length_spread < 1:
        raise ValueError(f"--length-spread must be in [0, 1), got {args.length_spread:g}")
    if args.json:  # before the sweep, not after it: a path that cannot be written would lose it
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK) or os.path.isdir(args.json):
            raise ValueError(f"--json {args.json}: cannot write there (does {folder} exist?)")
    t0 = time.perf_counter()
    result = asyncio.run(sweep(args, base, levels))
    print(f"sweep of {base} ({result['model']}, {result['workload']}): {len(levels)} levels in "
          f"{time.perf_counter() - t0:.0f} s; {backend_line(result['backend'])}")
    rows = result["levels"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"written to {args.json}" + ("" if not any(r["completed"] for r in rows)
                                            else f"; next: vidya plan --sweep {args.json}"))
    if not any(r["completed"] for r in rows):
        first = next((e for r in rows for e in r.get("errors") or []), "no error recorded")
        print(f"every request failed, at every level: {first}", file=sys.stderr)
    failed = sum(r["failed"] for r in rows)
    return 0 if not failed else 1
