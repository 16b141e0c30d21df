"""Bad input gets its status and an OpenAI error body, never a 500 or a 422, and the server keeps
serving correctly afterwards."""
from __future__ import annotations

import httpx
import openai
import pytest

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0}
SECRET = "SECRET-INPUT-" + "x" * 5000  # must never come back in an error body

CASES = [
    # (name, path, body or raw bytes, headers, status, code, param)
    ("malformed json", "/v1/chat/completions", b'{"messages": [', None, 400, None, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", None, 400, None, None),
    ("wrong content type", "/v1/chat/completions", b"{}", {"content-type": "text/plain"}, 400, "invalid_content_type", None),
    ("missing messages", "/v1/chat/completions", {"model": "smollm2"}, None, 400, None, "messages"),
    ("empty messages", "/v1/chat/completions", {**CHAT, "messages": []}, None, 400, None, "messages"),
    ("unknown field", "/v1/chat/completions", {**CHAT, "frobnicate": SECRET}, None, 400, "unsupported_parameter", "frobnicate"),
    ("tools", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, None, 400, "unsupported_parameter", "tools"),
    ("json mode", "/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, None, 400, "unsupported_parameter", "response_format"),
    ("string temperature", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, None, 400, None, "temperature"),
    ("temperature range", "/v1/chat/completions", {**CHAT, "temperature": 500}, None, 400, None, "temperature"),
    ("top_p range", "/v1/chat/completions", {**CHAT, "top_p": 0}, None, 400, None, "top_p"),
    ("n zero", "/v1/chat/completions", {**CHAT, "n": 0}, None, 400, None, "n"),
    ("max_tokens zero", "/v1/chat/completions", {**CHAT, "max_tokens": 0}, None, 400, None, "max_tokens"),
    ("bool as int", "/v1/chat/completions", {**CHAT, "max_tokens": True}, None, 400, None, "max_tokens"),
    ("bad role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, None, 400, None, "messages[0].role"),
    ("image part", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": SECRET}}]}]}, None, 400, None, "messages[0].content"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}, None, 400, None, "top_logprobs"),
    ("logit_bias key", "/v1/chat/completions", {**CHAT, "logit_bias": {"abc": 1}}, None, 400, None, "logit_bias"),
    ("stream_options without stream", "/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, None, 400, None, "stream_options"),
    ("context length", "/v1/chat/completions", {**CHAT, "max_tokens": 5000}, None, 400, "context_length_exceeded", "messages"),
    ("context length, streamed", "/v1/chat/completions", {**CHAT, "max_tokens": 5000, "stream": True}, None, 400, "context_length_exceeded", "messages"),
    ("long prompt", "/v1/completions", {"prompt": "word " * 3000, "max_tokens": 1}, None, 400, "context_length_exceeded", "prompt"),
    ("unknown model", "/v1/chat/completions", {**CHAT, "model": "gpt-9"}, None, 404, "model_not_found", "model"),
    ("best_of", "/v1/completions", {"prompt": "x", "best_of": 3}, None, 400, "unsupported_parameter", "best_of"),
    ("suffix", "/v1/completions", {"prompt": "x", "suffix": "y"}, None, 400, "unsupported_parameter", "suffix"),
    ("echo with logprobs", "/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, None, 400, "unsupported_parameter", "echo"),
    ("empty prompt list", "/v1/completions", {"prompt": []}, None, 400, None, "prompt"),
    ("token id out of range", "/v1/completions", {"prompt": [10**9]}, None, 400, None, "prompt"),
    ("detokenize out of range", "/detokenize", {"tokens": [-1]}, None, 400, None, "tokens"),
    ("negative token id", "/v1/completions", {"prompt": [-1, 5], "max_tokens": 3}, None, 400, None, "prompt"),
    ("token id over 64 bits", "/v1/completions", {"prompt": [2**64]}, None, 400, None, "prompt"),
    ("negative token id in a batch", "/v1/completions", {"prompt": [[5, 6], [5, -2]]}, None, 400, None, "prompt"),
    ("detokenize over 64 bits", "/detokenize", {"tokens": [2**64]}, None, 400, None, "tokens"),
    ("lone surrogate", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', None, 400, None, "messages"),
    ("lone surrogate in a prompt", "/v1/completions", b'{"prompt": "\\udfff", "max_tokens": 1}', None, 400, None, "prompt"),
    ("empty stop string", "/v1/chat/completions", {**CHAT, "stop": [""]}, None, 400, None, "stop"),
    ("tokenize no messages", "/tokenize", {"messages": []}, None, 400, None, "messages"),
    ("tokenize both", "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, None, 400, None, "prompt"),
    # bounds at the edge, as OpenAI's (issue 14): each a 400 naming its field
    ("temperature above 2", "/v1/chat/completions", {**CHAT, "temperature": 5}, None, 400, None, "temperature"),
    ("temperature NaN", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None, 400, None, "temperature"),
    ("top_p above 1", "/v1/chat/completions", {**CHAT, "top_p": 1.5}, None, 400, None, "top_p"),
    ("n 2**63", "/v1/chat/completions", {**CHAT, "n": 2**63}, None, 400, None, "n"),
    ("n 129", "/v1/chat/completions", {**CHAT, "n": 129}, None, 400, None, "n"),
    ("n x prompts over the server's cap", "/v1/completions", {"prompt": ["a", "b"], "n": 100, "max_tokens": 1}, None, 400, None, "prompt"),
    ("129 prompts", "/v1/completions", {"prompt": ["a"] * 129, "max_tokens": 1}, None, 400, None, "prompt"),
    ("max_tokens 2**63", "/v1/chat/completions", {**CHAT, "max_tokens": 2**63}, None, 400, None, "max_tokens"),
    ("max_completion_tokens negative", "/v1/chat/completions", {**CHAT, "max_completion_tokens": -5}, None, 400, None, "max_completion_tokens"),
    ("min_tokens huge", "/v1/chat/completions", {**CHAT, "min_tokens": 10**12}, None, 400, None, "min_tokens"),
    ("top_logprobs 21", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, None, 400, None, "top_logprobs"),
    ("completion logprobs 21", "/v1/completions", {"prompt": "x", "logprobs": 21}, None, 400, None, "logprobs"),
    ("logprob entries over the server's cap", "/v1/chat/completions", {**CHAT, "n": 128, "max_tokens": 1000, "logprobs": True, "top_logprobs": 20}, None, 400, None, "top_logprobs"),
    ("logit_bias too many", "/v1/chat/completions", {**CHAT, "logit_bias": {str(i): 1 for i in range(301)}}, None, 400, None, "logit_bias"),
    ("logit_bias value", "/v1/chat/completions", {**CHAT, "logit_bias": {"5": 101}}, None, 400, None, "logit_bias"),
    ("logit_bias token out of vocabulary", "/v1/chat/completions", {**CHAT, "logit_bias": {"999999999": 1}}, None, 400, None, "logit_bias"),
    ("five stop strings", "/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, None, 400, None, "stop"),
    ("stop string too long", "/v1/chat/completions", {**CHAT, "stop": "s" * 257}, None, 400, None, "stop"),
    ("stop_token_ids out of vocabulary", "/v1/chat/completions", {**CHAT, "stop_token_ids": [10**8]}, None, 400, None, "stop_token_ids"),
    ("seed above 64 bits", "/v1/chat/completions", {**CHAT, "seed": 2**64}, None, 400, None, "seed"),
    ("top_k below -1", "/v1/chat/completions", {**CHAT, "top_k": -2}, None, 400, None, "top_k"),
    ("repetition_penalty zero", "/v1/chat/completions", {**CHAT, "repetition_penalty": 0}, None, 400, None, "repetition_penalty"),
    ("presence_penalty 3", "/v1/chat/completions", {**CHAT, "presence_penalty": 3}, None, 400, None, "presence_penalty"),
    ("2049 messages", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x"}] * 2049}, None, 400, None, "messages"),
    ("template kwargs", "/v1/chat/completions", {**CHAT, "chat_template_kwargs": {f"k{i}": i for i in range(17)}}, None, 400, None, "chat_template_kwargs"),
    ("nested too deeply", "/v1/chat/completions", b"[" * 100000, None, 400, None, None),
    ("body over the limit", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "' + b"x" * (5 << 20) + b'"}]}', None, 413, "request_too_large", None),
]


@pytest.mark.parametrize("name,path,body,headers,status,code,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_an_openai_error(server, name, path, body, headers, status, code, param):
    kw = {"content": body, "headers": headers or {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(server.url + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("invalid_request_error" if status in (400, 404) else err["type"])
    if code:
        assert err["code"] == code
    if param:
        assert err["param"] == param
    assert "SECRET-INPUT" not in r.text and len(r.text) < 2000


def test_a_field_of_several_forms_says_what_is_wrong_with_the_one_given(server):
    """`stop` is a string or a list, `prompt` a string, a list of them or token ids: the message
    is about the form sent (a list too long, an id out of range), not "should be a valid string"."""
    for path, body, words in (("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
                              ("/v1/chat/completions", {**CHAT, "stop": [""]}, "at least 1 character"),
                              ("/v1/completions", {"prompt": ["a"] * 129}, "at most 128"),
                              ("/v1/completions", {"prompt": [5, -1]}, "greater than or equal to 0")):
        err = httpx.post(server.url + path, json=body, timeout=60).json()["error"]
        assert words in err["message"], (body, err)


def test_null_means_the_default_as_openai_reads_it(server):
    """Clients that serialise unset fields send null: for n, stream, penalties and logprobs it is
    the default, as OpenAI and vLLM take it."""
    nulls = dict.fromkeys(("n", "stream", "presence_penalty", "frequency_penalty", "logprobs", "temperature",
                           "top_p", "seed", "stop", "min_tokens", "ignore_eos", "skip_special_tokens"))
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={**CHAT, **nulls})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 1 and "logprobs" not in r.json()["choices"][0] or \
            r.json()["choices"][0]["logprobs"] is None
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "n": None, "echo": None, "stream": None})
        assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
        # a 400 on a kept-alive connection leaves the connection serving
        assert http.post("/v1/completions", json={"prompt": [-1]}).status_code == 400
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_context_length_error_has_the_numbers(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=4000)
    msg = e.value.body["message"]
    assert "2048" in msg and "4000" in msg
    assert e.value.code == "context_length_exceeded"


def test_unknown_route_and_method_are_openai_errors(server):
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        from openai import OpenAI
        OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).models.retrieve("nope")


def test_server_still_serves_correctly_after_bad_input(server, client):
    before = client.chat.completions.create(**CHAT).choices[0].message.content
    for _, path, body, headers, *_ in CASES:
        kw = {"content": body, "headers": headers or {"content-type": "application/json"}} \
            if isinstance(body, bytes) else {"json": body}
        assert httpx.post(server.url + path, timeout=60, **kw).status_code < 500
    assert client.chat.completions.create(**CHAT).choices[0].message.content == before
    assert server.metric("num_requests_running") == 0
    assert httpx.get(server.url + "/health").status_code == 200
