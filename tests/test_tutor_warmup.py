"""The first tutor question never pays for the system prompt: `vidya serve` computes the tutor's
system prompts into the prefix cache before it reports ready, so the first conversation's
request finds them cached (`usage.prompt_tokens_details.cached_tokens`)."""
from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from serverutil import LiveServer


@pytest.fixture(scope="module")
def fresh_server():
    s = LiveServer("--max-model-len", "2048", "--kv-cache-memory", "0.5")
    yield s
    s.terminate()


def test_first_tutor_request_finds_its_system_prompt_cached(fresh_server):
    assert "tutor system prompts in the prefix cache" in fresh_server.log()
    client = OpenAI(base_url=fresh_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    system = httpx.get(fresh_server.url + "/tutor/system-prompt", params={"subject": "maths", "klass": "6"}).json()
    system_turn = {"role": "system", "content": system["prompt"]}
    question = {"role": "user", "content": "भिन्न क्या होती है?"}
    reply = client.chat.completions.create(model="smollm2", messages=[system_turn, question], max_tokens=1)
    with_prompt = httpx.post(fresh_server.url + "/tokenize", json={"messages": [system_turn]}).json()["count"]
    cached = reply.usage.prompt_tokens_details.cached_tokens
    # everything of the system turn but its last partial block of 16 (and the generation prompt
    # /tokenize adds) comes from the cache; the question itself does not
    assert with_prompt - 16 - 8 <= cached < reply.usage.prompt_tokens, (cached, with_prompt, reply.usage)
    # a system prompt the tutor does not use was not warmed
    other = client.chat.completions.create(
        model="smollm2", max_tokens=1,
        messages=[{"role": "system", "content": "You answer in one word. " * 8}, question])
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_prefix_waves_compute_each_shared_block_once():
    from vidya.engine.prefix_waves import prefix_waves
    base = list(range(100, 132))  # two blocks of 16 every prompt shares
    a1, a2 = base + [1] * 16 + [7] * 5, base + [1] * 16 + [8] * 5  # share a third block
    b1, b2 = base + [2] * 16 + [7] * 5, base + [2] * 16 + [8] * 5
    lone = [9] * 20
    waves = prefix_waves([a1, a2, b1, b2, lone], 16)
    # the shared blocks first, once; then prompts whose uncached parts differ, together
    assert waves == [[a1, lone], [a2, b1], [b2]]
    assert prefix_waves([], 16) == []


def test_a_system_prompt_longer_than_the_context_is_left_out_of_the_warm_up(tiny_models):
    """`vidya serve --max-model-len 512` on a model whose tutor prompts are longer (SmolLM2's are
    ~1,300 tokens) must still start: the warm-up computes the prompts that fit and leaves out the
    rest, rather than failing the load with a context-length error."""
    from conftest import make_engine
    engine = make_engine(tiny_models["llama"][0], max_model_len=64)
    fits, too_long = list(range(3, 3 + 40)), list(range(3, 3 + 64))  # 64 + 1 new token > 64
    assert engine.warm_prefix_cache([too_long, fits]) == (40, 1)  # ten blocks of 4; one left out
    assert engine.warm_prefix_cache([too_long]) == (0, 1)
    assert not engine.has_unfinished_requests()
    engine.check()
