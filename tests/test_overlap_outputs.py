"""Overlapped outputs (on by default on a GPU): a step's outputs are built while the next step's
forward runs, so a request ended by a stop string is found one step late and has been scheduled
once more. Forced on here on CPU, the engine must give exactly what it gives step by step: every
output of every request in the same order, a step later, and nothing left behind."""
from __future__ import annotations

from conftest import make_engine
from vidya.llm import LLM
from vidya.sampling_params import SamplingParams

PROMPTS = ["The river flows", "Once upon a time", "Water is", "In the morning", "Numbers: 1, 2,", "Hello"]


def _stream(engine, requests):
    """Every output each step() returns, per request id, as (text, token ids, finished, reason);
    and the index of the first step that returned anything."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    seen: dict[str, list] = {}
    first_output_step = None
    step = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        if outs and first_output_step is None:
            first_output_step = step
        for o in outs:
            seen.setdefault(o.request_id, []).append(
                [(c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs] + [o.finished])
        step += 1
    return seen, first_output_step


def _requests(stop: str):
    greedy = lambda **k: SamplingParams(temperature=0.0, **k)
    return [
        ("greedy", PROMPTS[0], greedy(max_tokens=12)),
        ("seeded", PROMPTS[1], SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=10)),
        ("stopped", PROMPTS[2], greedy(max_tokens=24, stop=[stop])),
        # (nearly greedy, so it meets the same stop string, but drawn from its own generator)
        ("seeded-stop", PROMPTS[2], SamplingParams(temperature=0.02, seed=5, max_tokens=24, stop=[stop])),
        ("n2", PROMPTS[3], SamplingParams(n=2, temperature=0.9, seed=3, max_tokens=8)),
        ("logprobs", PROMPTS[4], greedy(max_tokens=6, logprobs=2)),
        ("penalised", PROMPTS[5], greedy(max_tokens=9, min_tokens=4, repetition_penalty=1.3)),
    ]


def test_overlapped_outputs_are_the_step_by_step_outputs_a_step_later(tiny_models):
    d = tiny_models["llama"][0]
    sync = make_engine(d, backend="torch", overlap_outputs=False)
    # a stop string from the middle of a greedy answer: that request ends mid-stream, so the
    # overlapped engine has scheduled it once more when it finds the string
    text = LLM(d, dtype="float32", block_size=4, show_progress=False, max_model_len=512).generate(
        [PROMPTS[2]], SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0].outputs[0].text
    stop = text[len(text) // 3:len(text) // 3 + 3]
    assert stop.strip(), f"no usable stop string in {text!r}"
    expected, first_sync = _stream(sync, _requests(stop))
    for rid in ("stopped", "seeded-stop"):
        assert expected[rid][-1][0][2:4] == ("stop", stop), f"the stop string did not end {rid}"

    overlapped = make_engine(d, backend="torch", overlap_outputs=True)
    got, first_overlapped = _stream(overlapped, _requests(stop))
    assert first_overlapped == first_sync + 1, "outputs were not deferred by one step"
    assert got == expected
    overlapped.check()
    assert not overlapped.sample_of and not overlapped.states and overlapped._pending is None
    assert not overlapped.sampler.request_generators, "a discarded step left a seeded generator behind"
    assert not overlapped.scheduler.running and not overlapped.kv.req_blocks


def test_an_abort_with_outputs_pending_loses_nothing_else(tiny_models):
    engine = make_engine(tiny_models["llama"][0], backend="torch", overlap_outputs=True)
    for i, p in enumerate(PROMPTS[:3]):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=10, seed=i))
    for _ in range(3):
        engine.step()
    assert engine._pending is not None, "nothing pending: the abort would not test the overlap"
    assert engine.abort("r1")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert "r1" not in {o.request_id for o in outputs}
    finished = {o.request_id: o for o in outputs if o.finished}
    assert set(finished) == {"r0", "r2"} and all(len(o.outputs[0].token_ids) == 10 for o in finished.values())
    engine.check()
    assert not engine.sample_of and not engine.sampler.request_generators and not engine.kv.req_blocks


def test_llm_generate_with_overlap_matches(tiny_models):
    d = tiny_models["llama"][0]
    kw = dict(dtype="float32", block_size=4, show_progress=False, max_model_len=512)
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=7)
    a = LLM(d, overlap_outputs=False, **kw).generate(PROMPTS, params, use_tqdm=False)
    b = LLM(d, overlap_outputs=True, **kw).generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert [o.outputs[0].text for o in a] == [o.outputs[0].text for o in b]


def test_overlap_is_off_on_cpu_by_default(tiny_models):
    """On CPU the forward runs on the engine's thread: overlapping would only delay outputs."""
    assert make_engine(tiny_models["llama"][0], backend="torch").overlap_outputs is False
