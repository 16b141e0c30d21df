"""The OpenAI API of `vidya serve`, driven over HTTP with the official `openai` client and
httpx, against a live server on the embedded default model."""
from __future__ import annotations

import json

import httpx

SEED_MESSAGES = [{"role": "system", "content": "You are a Hindi study tutor."},
                 {"role": "user", "content": "प्रकाश संश्लेषण समझाइए"}]


def sse_events(server, path: str, body: dict) -> list[bytes]:
    """Raw `data:` payloads of a streamed response, as bytes."""
    events = []
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:].encode())
    return events


def test_seed_snippet_works_with_only_base_url_changed(client):
    resp = client.chat.completions.create(model="smollm2", messages=SEED_MESSAGES, temperature=0.7, max_tokens=400)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens >= 1
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

    stream = client.chat.completions.create(model="smollm2", messages=SEED_MESSAGES, temperature=0.7,
                                            max_tokens=400, stream=True)
    parts, reasons = [], []
    for chunk in stream:
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(parts) and reasons[-1] in ("stop", "length")


def test_stream_equals_whole_and_usage_counts_streamed_tokens(client, server):
    kwargs = dict(model="smollm2", messages=SEED_MESSAGES, temperature=0, max_tokens=48)
    client.chat.completions.create(**{**kwargs, "max_tokens": 1})  # same prefix-cache state for both (see below)
    whole = client.chat.completions.create(**kwargs, logprobs=True)
    events = sse_events(server, "/v1/chat/completions",
                        {**kwargs, "stream": True, "logprobs": True, "stream_options": {"include_usage": True}})
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e.decode("utf-8")) for e in events[:-1]]  # strict UTF-8: raises on a split character
    text, n_tokens, usage = "", 0, None
    for ch in chunks:
        if ch["choices"]:
            delta = ch["choices"][0]["delta"].get("content") or ""
            assert "\ufffd" not in delta
            text += delta
            n_tokens += len((ch["choices"][0]["logprobs"] or {}).get("content", []))
        else:
            usage = ch["usage"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == whole.choices[0].finish_reason
    assert text == whole.choices[0].message.content
    assert usage["completion_tokens"] == n_tokens == whole.usage.completion_tokens
    assert usage["prompt_tokens"] == whole.usage.prompt_tokens
    assert len(whole.choices[0].logprobs.content) == n_tokens


def test_hindi_stream_never_splits_a_character(server):
    body = {"prompt": "भारत की राजधानी नई दिल्ली है। भारत के प्रमुख त्योहार", "max_tokens": 64, "temperature": 0,
            "stream": True, "ignore_eos": True}
    # Warm the prefix cache first, so the streamed and the whole request compute exactly the same
    # way (bf16 results depend on how many prompt tokens a step computes: a cache hit changes that).
    httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 1}, timeout=120)
    events = sse_events(server, "/v1/completions", body)
    text = ""
    for e in events[:-1]:
        piece = json.loads(e.decode("utf-8"))["choices"][0]["text"]
        assert "\ufffd" not in piece
        text += piece
    whole = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=120).json()
    assert text == whole["choices"][0]["text"]
    assert any("\u0900" <= ch <= "\u097f" for ch in text), text


def test_stop_strings_and_n_and_echo(client):
    base = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    stop = text.strip().split(",")[1].strip()  # a number the model is about to write
    cut = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop], stream=True) if c.choices)
    assert streamed == cut.choices[0].text

    many = client.completions.create(model="smollm2", prompt=["Hello", "नमस्ते"], n=2, max_tokens=5,
                                     temperature=0.8, seed=7, echo=True, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    assert all(c.text.startswith("Hello") for c in many.choices[:2])
    assert all(c.text.startswith("नमस्ते") for c in many.choices[2:])
    assert many.usage.completion_tokens == 4 * 5
    assert all(c.finish_reason == "length" for c in many.choices)


def test_completion_logprobs_and_token_prompts(client, server):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "The sky is"}, timeout=30).json()["tokens"]
    a = client.completions.create(model="smollm2", prompt=ids, max_tokens=4, temperature=0, logprobs=3)
    b = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=4, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    lp = a.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == a.usage.completion_tokens
    assert all(len(t) == 3 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    chat = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    assert all(len(e.top_logprobs) == 2 for e in chat.choices[0].logprobs.content)


def test_models_version_tokenizer(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2"]
    assert models[0].model_extra["max_model_len"] == 2048
    assert client.models.retrieve("smollm2").id == "smollm2"
    version = httpx.get(server.url + "/version").json()
    assert version["version"]
    # what this machine runs, decided once at start-up, as the start-up line says it
    from vidya.platform import ISAS
    backend = version["backend"]
    assert backend["device"] == "cpu" and backend["isa"] in ISAS and backend["backend"] in ("cpu", "torch")
    assert backend["kv_cache_dtype"] in ("bfloat16", "float32")
    startup = next(line for line in server.log().splitlines() if line.startswith("vidya: serving"))
    assert f"cpu {backend['isa']}," in startup and f"{backend['kv_cache_dtype']} KV cache" in startup
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "नमस्ते दुनिया"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 2048
    back = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert back["prompt"] == "नमस्ते दुनिया"
    chat_tok = httpx.post(server.url + "/tokenize", json={"messages": SEED_MESSAGES}).json()
    whole = client.chat.completions.create(model="smollm2", messages=SEED_MESSAGES, max_tokens=1)
    assert chat_tok["count"] == whole.usage.prompt_tokens


def test_prefix_cache_shows_in_usage(client):
    system = "You are a Hindi study tutor. " * 20
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "What is a noun?"}]
    client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=1)
    again = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens >= 100


def test_text_parts_and_developer_role(client):
    resp = client.chat.completions.create(model="smollm2", max_tokens=4, temperature=0, messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "water?"}]}])
    same = client.chat.completions.create(model="smollm2", max_tokens=4, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is water?"}])
    assert resp.choices[0].message.content == same.choices[0].message.content


def reassembles(content: str, pieces: list[bytes], finish_reason: str) -> bool:
    """The logprob entries' bytes joined give the content's UTF-8; a reply cut by max_tokens may
    end inside a character, whose bytes the content does not show yet."""
    joined, text = b"".join(pieces), content.encode("utf-8")
    if finish_reason == "length":
        return joined.startswith(text) and len(joined) - len(text) < 4
    return joined == text


def test_logprob_bytes_reassemble_hindi_and_emoji_content(client, server):
    # greedy SmolLM2 echoes these: Devanagari (3-byte characters) and emoji (4 bytes), both split
    # across byte-level tokens
    for prompt, script in (("Repeat exactly: नमस्ते दुनिया, आप कैसे हैं?", "\u0928"),
                           ("Repeat these emoji: 😀🎉🚀👍", "\U0001F44D")):
        kwargs = dict(model="smollm2", messages=[{"role": "user", "content": prompt}], temperature=0,
                      max_tokens=40, logprobs=True, top_logprobs=2)
        whole = client.chat.completions.create(**kwargs)
        choice = whole.choices[0]
        assert script in choice.message.content  # the test runs the path it names
        entries = choice.logprobs.content
        assert any(bytes(e.bytes).decode("utf-8", "replace") != e.token or "\ufffd" in e.token for e in entries) \
            or any(len(e.bytes) % 3 for e in entries)  # at least one token holds part of a character
        assert reassembles(choice.message.content, [bytes(e.bytes) for e in entries], choice.finish_reason)
        for e in entries:  # greedy: the first alternative is the chosen token, with the same bytes
            assert e.top_logprobs[0].bytes == e.bytes and e.top_logprobs[0].logprob == e.logprob
            assert all(t.bytes or t.token == "<|im_end|>" for t in e.top_logprobs)  # a skipped special adds nothing

        events = sse_events(server, "/v1/chat/completions", {**kwargs, "stream": True})
        text, pieces, reason = "", [], None
        for ch in (json.loads(e) for e in events[:-1]):
            c = ch["choices"][0]
            text += c["delta"].get("content") or ""
            pieces += [bytes(e["bytes"]) for e in (c.get("logprobs") or {}).get("content") or []]
            reason = c["finish_reason"] or reason
        assert text == choice.message.content and reason == choice.finish_reason
        assert reassembles(text, pieces, reason)


def test_token_bytes_match_the_tokenizer_over_the_whole_vocabulary(smollm2_tokenizer):
    from vidya.engine.token_bytes import TokenBytes
    tb = TokenBytes(smollm2_tokenizer)
    special = set(smollm2_tokenizer.all_special_ids)
    partial = 0
    for i in range(len(smollm2_tokenizer)):
        raw = tb(i, skip_special_tokens=False)
        text = smollm2_tokenizer.decode([i])
        if "\ufffd" in text:  # part of a character: the raw bytes are not valid UTF-8 alone
            partial += 1
            assert raw.decode("utf-8", "replace") == text or b"\xef\xbf\xbd" not in raw
        else:
            assert raw == text.encode("utf-8"), (i, raw, text)
        if i in special:
            assert tb(i, skip_special_tokens=True) == b""
    assert partial > 100  # the vocabulary has byte tokens that split characters
