"""A server's life: loading (503), API keys (401), a full queue (429), CORS, SIGTERM draining
(503, the stream in flight finishes, exit 0), and a wrong --model refused before the port opens."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from serverutil import LiveServer

KEYS = ("class-10-b", "teacher-key")
BODY = {"model": "smollm2", "messages": [{"role": "user", "content": "Count to five."}], "temperature": 0}


@pytest.fixture(scope="module")
def guarded():
    s = LiveServer("--max-num-seqs", "1", "--max-waiting", "1", "--no-tutor-warmup", "--api-key", *KEYS,
                   "--allowed-origins", "http://school.example", "--max-model-len", "1024",
                   "--shutdown-timeout", "60")
    yield s
    s.terminate()


def auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def test_health_is_503_while_loading(server):
    assert server.health_seen[0] == 503 and server.health_seen[-1] == 200


def test_api_keys(guarded):
    url = guarded.url
    assert "tutor system prompts in the prefix cache" not in guarded.log()  # --no-tutor-warmup
    for headers in ({}, auth("wrong"), {"authorization": KEYS[0]}):
        r = httpx.post(url + "/v1/chat/completions", json={**BODY, "max_tokens": 1}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models").status_code == 401
    for key in KEYS:
        r = httpx.post(url + "/v1/chat/completions", json={**BODY, "max_tokens": 1}, headers=auth(key))
        assert r.status_code == 200
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(url + path).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=url + "/v1", api_key=KEYS[1], max_retries=0).models.list().data[0].id == "smollm2"


def test_cors_only_for_allowed_origins(guarded, server):
    pre = {"origin": "http://school.example", "access-control-request-method": "POST",
           "access-control-request-headers": "authorization,content-type"}
    r = httpx.options(guarded.url + "/v1/chat/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://school.example"
    r = httpx.options(guarded.url + "/v1/chat/completions", headers={**pre, "origin": "http://evil.example"})
    assert r.headers.get("access-control-allow-origin") is None
    r = httpx.get(server.url + "/health", headers={"origin": "http://school.example"})
    assert "access-control-allow-origin" not in r.headers  # CORS is off unless origins are given


def start_stream(url: str, key: str, max_tokens: int, out: dict) -> threading.Thread:
    def run():
        text, reason = "", None
        with httpx.stream("POST", url + "/v1/chat/completions", headers=auth(key), timeout=120,
                          json={**BODY, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    import json
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["delta"].get("content") or ""
                    reason = choice["finish_reason"] or reason
                    out["started"] = True
        out["text"], out["reason"] = text, reason
    t = threading.Thread(target=run)
    t.start()
    return t


def wait_for(pred, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_full_queue_gets_429_with_retry_after(guarded):
    first, second = {}, {}
    t1 = start_stream(guarded.url, KEYS[0], 300, first)
    wait_for(lambda: first.get("started"))
    t2 = start_stream(guarded.url, KEYS[0], 2, second)  # max_num_seqs 1: this one waits
    wait_for(lambda: guarded.metric("num_requests_waiting") == 1)
    r = httpx.post(guarded.url + "/v1/chat/completions", json={**BODY, "max_tokens": 1}, headers=auth(KEYS[0]))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    t1.join()
    t2.join()
    assert first["reason"] == "length" and second["reason"] == "length"
    r = httpx.post(guarded.url + "/v1/chat/completions", json={**BODY, "max_tokens": 1}, headers=auth(KEYS[0]))
    assert r.status_code == 200


def test_sigterm_drains_the_stream_in_flight_then_exits_0(guarded):
    out = {}
    t = start_stream(guarded.url, KEYS[0], 100, out)
    wait_for(lambda: out.get("started"))
    guarded.proc.send_signal(15)
    wait_for(lambda: httpx.get(guarded.url + "/health").status_code == 503, timeout=5)
    r = httpx.post(guarded.url + "/v1/chat/completions", json={**BODY, "max_tokens": 1}, headers=auth(KEYS[0]))
    assert r.status_code == 503 and r.json()["error"]["message"]
    t.join()
    assert out["status"] == 200 and out["reason"] == "length"
    assert guarded.proc.wait(60) == 0


def test_wrong_model_is_refused_before_serving():
    r = subprocess.run([sys.executable, "-m", "vidya.cli", "serve", "--model", "/no/such/model", "--port", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
