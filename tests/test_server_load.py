"""Many streams at once, and clients that go away: the running gauge sees them, and after a
wave of disconnects every request is aborted and every KV block is free again."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx

GREEDY = {"model": "smollm2", "messages": [{"role": "system", "content": "You are a Hindi study tutor."},
                                           {"role": "user", "content": "What is a prime number?"}],
          "max_tokens": 24, "temperature": 0}


def watch_gauge(server, stop: threading.Event, seen: list[float]) -> None:
    while not stop.is_set():
        seen.append(server.metric("num_requests_running"))
        time.sleep(0.1)


def wait_idle(server, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.metric("num_requests_running") == 0 and server.metric("kv_cache_usage_perc") == 0 \
                and server.metric("num_requests_waiting") == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"not idle: running {server.metric('num_requests_running')}, "
                         f"kv {server.metric('kv_cache_usage_perc')}")


async def stream_chat(http: httpx.AsyncClient, body: dict, read_chunks: int | None = None) -> tuple[str, str | None]:
    """Stream a chat; with read_chunks, hang up after that many content chunks."""
    text, reason, got = "", None, 0
    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["delta"].get("content") or ""
            reason = choice["finish_reason"] or reason
            got += bool(choice["delta"].get("content"))
            if read_chunks is not None and got >= read_chunks:
                return text, None  # leaving the block closes the connection mid-stream
    return text, reason


async def many(server, bodies: list[dict], read_chunks: int | None = None):
    async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                 limits=httpx.Limits(max_connections=300)) as http:
        return await asyncio.gather(*(stream_chat(http, b, read_chunks) for b in bodies))


async def hang_up_non_streaming(server, n: int) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=1.5) as http:
        async def one():
            try:
                await http.post("/v1/chat/completions", json={**GREEDY, "max_tokens": 1000, "ignore_eos": True})
            except httpx.TimeoutException:
                pass
        await asyncio.gather(*(one() for _ in range(n)))


def test_64_streams_then_a_wave_of_disconnects(server, client):
    before = client.chat.completions.create(**GREEDY).choices[0].message.content
    questions = [f"Question {i}: explain the number {i} to a class {6 + i % 7} student." for i in range(64)]
    bodies = [{**GREEDY, "messages": [GREEDY["messages"][0], {"role": "user", "content": q}],
               "max_tokens": 32, "ignore_eos": True} for q in questions]
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=watch_gauge, args=(server, stop, seen))
    watcher.start()
    try:
        results = asyncio.run(many(server, bodies))
    finally:
        stop.set()
        watcher.join()
    assert all(reason == "length" and text for text, reason in results)
    assert max(seen) == 64, f"running gauge peaked at {max(seen)}"
    wait_idle(server)

    long_bodies = [{**b, "max_tokens": 1000} for b in bodies[:32]]
    aborted_before = server.metric("request_success_total", finished_reason="abort")
    cut = asyncio.run(many(server, long_bodies, read_chunks=3))
    assert all(reason is None for _, reason in cut)
    asyncio.run(hang_up_non_streaming(server, 8))
    wait_idle(server, timeout=20)
    log = server.log()  # a whole answer whose client left is dropped quietly, not a 500 with a traceback
    assert "unexpected error" not in log and "Traceback" not in log, log[-3000:]
    assert server.metric("request_success_total", finished_reason="abort") - aborted_before == 32 + 8
    assert client.chat.completions.create(**GREEDY).choices[0].message.content == before


def test_256_concurrent_streams_all_complete(server):
    bodies = [{**GREEDY, "messages": [{"role": "user", "content": f"Name a fruit, number {i}."}],
               "max_tokens": 8, "ignore_eos": True} for i in range(256)]
    results = asyncio.run(many(server, bodies))  # max_num_seqs is 128 here: half of them queue
    assert len(results) == 256 and all(reason == "length" and text for text, reason in results)
    wait_idle(server)
