"""Fuzzing a live `vidya serve` (issue 14): at least 1,000 generated bodies, mostly valid requests
with one to three fields mutated (wrong types, huge and negative numbers, NaN, junk strings,
missing fields, nested junk), some whole junk. Every answer is a 200 or a 4xx with an OpenAI error
body, none takes more than a few seconds, the server's RSS stays within a stated bound, and a
greedy answer afterwards equals the one taken before.

The server runs a tiny random-weight Llama with the default model's tokenizer, so that the bodies
that are valid (about a third) generate quickly; the edge, the engine and its bounds are the same
code as on any model."""
from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from serverutil import LiveServer
from vidya.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

EXAMPLES = 1000
SLOWEST_S = 5.0  # no single answer (a stream read to its end included) may take longer
RSS_GROWTH_MIB = 512  # the server's RSS may not grow more than this over the warmed-up start
STATUSES = {200, 400, 404, 413}  # 404: an unknown model; 413: a body over --max-request-bytes

MAX_MODEL_LEN = 256
MESSAGES = [{"role": "system", "content": "You are a Hindi study tutor."},
            {"role": "user", "content": "प्रकाश संश्लेषण समझाइए"}]
BASES = {
    "/v1/chat/completions": ({"model": "tiny", "messages": MESSAGES, "max_tokens": 8}, ChatCompletionRequest),
    "/v1/completions": ({"model": "tiny", "prompt": "भारत की राजधानी", "max_tokens": 8}, CompletionRequest),
    "/tokenize": ({"model": "tiny", "prompt": "नमस्ते"}, TokenizeRequest),
    "/detokenize": ({"model": "tiny", "tokens": [1, 2, 3]}, DetokenizeRequest),
}
GREEDY = {"model": "tiny", "messages": MESSAGES, "max_tokens": 24, "temperature": 0, "ignore_eos": True}

EDGE_INTS = [0, 1, -1, 2, 20, 21, 127, 128, 129, 255, 256, 257, 1000, 2**31 - 1, 2**31, 2**32, 2**53 + 1,
             2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30, -10**30, 49151, 49152, 10**9]
EDGE_FLOATS = [0.0, -0.0, 1e-300, 0.5, 1.0, 1.0000001, 2.0, 2.0000001, 5.0, -2.5, 1e308, -1e308,
               float("nan"), float("inf"), float("-inf")]
EDGE_STRINGS = ["", "tiny", "smollm2", "gpt-9", "system", "user", "assistant", "wizard", "text", "image_url",
                "\x00", "\ud7ff", "नमस्ते", "😀" * 50, "<|im_end|>", "{{ raise_exception('x') }}", "x" * 5000, "1", "-1"]

scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(EDGE_INTS), st.integers(), st.sampled_from(EDGE_FLOATS),
    st.floats(), st.sampled_from(EDGE_STRINGS), st.text(max_size=40))
values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)),
    max_leaves=24)
# values that look like what a field wants but are out of range or of a near type
big_lists = st.builds(lambda v, k: [v] * k, scalars, st.sampled_from([0, 1, 4, 5, 64, 65, 129, 300, 301, 2049]))
big_dicts = st.builds(lambda v, k: {str(i): v for i in range(k)}, scalars, st.sampled_from([1, 16, 17, 300, 301]))
field_values = st.one_of(values, big_lists, big_dicts)


VOCAB = 49152
ids = st.integers(0, VOCAB - 1)
unit = st.floats(0, 1)
# values a field accepts (or nearly), so that mutated bodies also reach the engine and run
PLAUSIBLE = {
    "n": st.one_of(st.integers(1, 8), st.just(128)), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "max_tokens": st.integers(1, 300), "max_completion_tokens": st.integers(1, 300),
    "stop": st.one_of(st.text(min_size=1, max_size=8), st.lists(st.text(min_size=1, max_size=8), max_size=4)),
    "seed": st.integers(-(2**63), 2**63 - 1), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(ids.map(str), st.floats(-100, 100), max_size=5), "logprobs": st.one_of(st.booleans(), st.integers(0, 5)),
    "top_logprobs": st.integers(0, 20), "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "top_k": st.integers(-1, 100), "min_p": unit, "repetition_penalty": st.floats(0.5, 2), "min_tokens": st.integers(0, 50),
    "ignore_eos": st.booleans(), "stop_token_ids": st.lists(ids, max_size=4), "skip_special_tokens": st.booleans(),
    "user": st.text(max_size=10), "echo": st.booleans(), "add_generation_prompt": st.booleans(),
    "add_special_tokens": st.booleans(), "tokens": st.lists(ids, max_size=20),
    "prompt": st.one_of(st.text(max_size=30), st.lists(ids, min_size=1, max_size=20), st.lists(st.text(max_size=10), min_size=1, max_size=3)),
    "chat_template_kwargs": st.fixed_dictionaries({"enable_thinking": st.booleans()}),
}


def _fields(model) -> list[str]:
    return sorted(model.model_fields)


@st.composite
def mutated(draw, path: str) -> dict:
    base, model = BASES[path]
    body = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["plausible", "plausible", "plausible", "set", "set", "delete", "message", "junk key"]))
        if op == "plausible":
            field = draw(st.sampled_from([f for f in _fields(model) if f in PLAUSIBLE]))
            body[field] = draw(PLAUSIBLE[field])
        elif op == "set":
            body[draw(st.sampled_from(_fields(model)))] = draw(field_values)
        elif op == "delete" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif op == "message" and isinstance(body.get("messages"), list) and body["messages"]:
            i = draw(st.integers(0, len(body["messages"]) - 1))
            msg = body["messages"][i]
            if isinstance(msg, dict):
                msg[draw(st.sampled_from(["role", "content", "name", "tool_calls"]))] = draw(
                    st.one_of(field_values, st.lists(st.fixed_dictionaries(
                        {"type": st.sampled_from(["text", "image_url", "x"]), "text": scalars}), max_size=4)))
            else:
                body["messages"][i] = draw(values)
        elif op == "junk key":
            body[draw(st.text(min_size=1, max_size=20))] = draw(values)
    return body


requests_ = st.one_of(
    *[st.tuples(st.just(p), mutated(p)) for p in BASES for _ in range(3)],  # mostly mutated valid bodies
    st.tuples(st.sampled_from(sorted(BASES)), values),  # whole junk JSON
    st.tuples(st.sampled_from(sorted(BASES)), st.binary(max_size=200)),  # not JSON at all
)


def check_answer(r: httpx.Response, body_text: bytes) -> None:
    assert r.status_code in STATUSES, (r.status_code, body_text[:300], r.text[:500])
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in body_text.decode("utf-8").splitlines() if line.startswith("data: ")]
            assert events and events[-1] == "[DONE]", body_text[-300:]
            for e in events[:-1]:
                assert "error" not in json.loads(e), e
        else:
            json.loads(body_text)
        return
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert "code" in err and "param" in err
    assert "Traceback" not in err["message"]


@pytest.fixture(scope="module")
def fuzz_server(tiny_models):
    model_dir, _ = tiny_models["llama"]
    s = LiveServer("--model", model_dir, "--served-model-name", "tiny", "--dtype", "float32",
                   "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "128", "--kv-cache-memory", "0.25",
                   "--max-request-bytes", str(1 << 20))  # (the tutor warm-up on: its prompts do not fit 256)
    yield s
    s.terminate()


def test_fuzzed_bodies_get_200_or_an_openai_4xx_and_change_nothing(fuzz_server):
    s = fuzz_server
    # a server whose context is shorter than the tutor's system prompts still starts: the warm-up
    # leaves them out (it failed the load before)
    assert re.search(r"tutor system prompts in the prefix cache \(0 tokens, [\d.]+ s; (\d+) of \1 left out", s.log()), \
        s.log()[-2000:]
    client = httpx.Client(base_url=s.url, timeout=60)
    # warm up every path a valid body can take (n = 128, streams, logprobs) before the RSS baseline
    for body in ({**GREEDY, "n": 128, "temperature": 1, "max_tokens": 128, "ignore_eos": True},
                 {**GREEDY, "stream": True, "logprobs": True, "top_logprobs": 20}):
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    before = client.post("/v1/chat/completions", json=GREEDY).json()["choices"][0]["message"]["content"]
    start = s.rss_mib()
    seen = {"count": 0, "slowest": 0.0, "peak": start, "statuses": {}}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(requests_)
    def one(req):
        path, body = req
        raw = body if isinstance(body, bytes) else \
            json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
        t0 = time.monotonic()
        with client.stream("POST", path, content=raw, headers={"content-type": "application/json"}) as r:
            text = r.read()
        took = time.monotonic() - t0
        check_answer(r, text)
        assert took < SLOWEST_S, (took, raw[:300])
        assert s.proc.poll() is None, s.log()[-3000:]
        seen["count"] += 1
        seen["slowest"] = max(seen["slowest"], took)
        seen["statuses"][r.status_code] = seen["statuses"].get(r.status_code, 0) + 1
        if seen["count"] % 25 == 0:
            seen["peak"] = max(seen["peak"], s.rss_mib())
            assert seen["peak"] - start < RSS_GROWTH_MIB, (seen, raw[:300])

    one()
    seen["peak"] = max(seen["peak"], s.rss_mib())
    print(f"\nfuzz: {seen['count']} bodies, statuses {seen['statuses']}, slowest {seen['slowest']:.2f} s, "
          f"RSS {start:.0f} MiB at start, peak {seen['peak']:.0f} MiB")
    assert seen["count"] >= EXAMPLES
    assert seen["statuses"].get(200, 0) >= EXAMPLES // 10  # the valid path ran, not only rejections
    assert seen["peak"] - start < RSS_GROWTH_MIB
    assert client.get("/health").status_code == 200
    after = client.post("/v1/chat/completions", json=GREEDY).json()["choices"][0]["message"]["content"]
    assert after == before
