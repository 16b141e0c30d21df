"""Sampling through the public API on a tiny random model: seeds, stop strings and ids,
min/max tokens, logprobs, penalties, and the errors bad arguments raise."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_all_blocks_free, make_engine, run_to_completion
from vidya import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["llama"][0], dtype="float32", block_size=4, show_progress=False, max_model_len=512)


PROMPTS = ["The river", "Photosynthesis is", "कक्षा दसवीं", "2 + 2 ="]  # mixed scripts and lengths


def test_same_seed_same_text_whatever_shares_the_batch(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=42, max_tokens=16)
    alone = llm.generate(["The river"], sp, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.3, max_tokens=20)
    batched = llm.generate(["2 + 2 =", "The river", "x"], [others, sp, others], use_tqdm=False)
    assert batched[1].outputs[0].token_ids == alone
    again = llm.generate(["The river"], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone
    other_seed = llm.generate(["The river"], SamplingParams(temperature=1.0, seed=43, max_tokens=16),
                              use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_samples_with_a_seed_differ_from_each_other_but_reproduce(llm):
    sp = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12)
    a = [c.token_ids for c in llm.generate(["The river"], sp, use_tqdm=False)[0].outputs]
    b = [c.token_ids for c in llm.generate(["The river"], sp, use_tqdm=False)[0].outputs]
    assert a == b and len({tuple(x) for x in a}) > 1


def test_stop_strings_are_cut_and_reported(llm):
    free = llm.generate(["The river"], SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0].outputs[0]
    assert len(free.text) > 6
    stop = free.text[4:7]  # a string the greedy text is known to contain
    out = llm.generate(["The river"], SamplingParams(temperature=0, max_tokens=30, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[:free.text.index(stop)]
    assert stop not in out.text


def test_stop_token_ids_and_min_tokens(llm):
    free = llm.generate(["The river"], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0].outputs[0]
    tid = free.token_ids[3]
    out = llm.generate(["The river"], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[tid]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == tid
    assert out.token_ids == free.token_ids[:free.token_ids.index(tid) + 1]
    longer = llm.generate(["The river"], SamplingParams(temperature=0, max_tokens=10, min_tokens=10,
                                                        stop_token_ids=[tid]), use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) == 10 and longer.finish_reason == "length"


def test_logprobs_have_the_sampled_token_and_top_k(llm):
    out = llm.generate(["The river"], SamplingParams(temperature=0, max_tokens=5, logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and entry[tok].rank == 1  # greedy: the sampled token is the top one
        assert len(entry) == 3
        assert all(lp.logprob <= 0 for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_logit_bias_and_frequency_penalty_through_the_api(llm):
    def run(**kw):
        sp = SamplingParams(temperature=0, max_tokens=40, **kw)
        return llm.generate(["The river"], sp, use_tqdm=False)[0].outputs[0].token_ids

    assert run(logit_bias={77: 30.0}) == [77] * 40
    penalised = run(logit_bias={77: 30.0}, frequency_penalty=2.0)
    assert 0 < penalised.count(77) < 40  # each use costs 2: after enough of them others win


def test_penalty_arithmetic_matches_openai_and_vllm():
    import torch
    from vidya.engine.request import Request
    from vidya.engine.sampler import Sampler

    def adjusted(**kw):
        r = Request("r", [1, 2], SamplingParams(temperature=0, max_tokens=9, **kw), None, 9)
        for t in (3, 3, 4):
            r.append_output_token(t)
        row = torch.tensor([1.0, 2.0, -2.0, 4.0, 8.0, 1.0])
        Sampler._adjust(row, r)
        return row.tolist()

    assert adjusted(frequency_penalty=0.5) == [1.0, 2.0, -2.0, 3.0, 7.5, 1.0]
    assert adjusted(presence_penalty=0.5) == [1.0, 2.0, -2.0, 3.5, 7.5, 1.0]
    # repetition penalty: prompt and output tokens; positive logits divided, negative multiplied
    assert adjusted(repetition_penalty=2.0) == [1.0, 1.0, -4.0, 2.0, 4.0, 1.0]


def test_top_k_one_is_greedy(llm):
    g = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    k1 = llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_k=1, max_tokens=8), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in g] == [o.outputs[0].token_ids for o in k1]


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=2), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n must"),
    (dict(min_p=1.5), "min_p"),
    (dict(stop=[""]), "stop"),
])
def test_bad_sampling_arguments_say_what_to_fix(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kwargs)


def test_too_long_request_is_rejected_with_the_numbers(llm):
    with pytest.raises(ValueError, match="maximum context length is 512"):
        llm.generate(["hello " * 300], SamplingParams(max_tokens=400), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_abort_frees_everything_at_any_time(tiny_models):
    engine = make_engine(tiny_models["llama"][0])
    ids = [engine.add_request(None, [5 + i] * (3 + 5 * i), SamplingParams(max_tokens=20, n=1 + i % 2))
           for i in range(6)]
    engine.step()
    engine.abort(ids[0])  # running
    engine.abort(ids[5])  # maybe waiting
    engine.check()
    engine.step()
    engine.abort(ids[2])
    engine.abort("no-such-request")
    engine.check()
    done = run_to_completion(engine)
    assert set(done) == {ids[1], ids[3], ids[4]}
    assert_all_blocks_free(engine)


def test_draws_follow_the_distribution_and_never_pick_masked_tokens():
    """The sampler's draw (one uniform number per row, the row's CDF inverted): token
    frequencies match softmax(logits / T) and top-k never lets a masked token through."""
    from vidya.engine.request import Request
    from vidya.engine.sampler import Sampler
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, -20.0, 1.5])
    sampler = Sampler(seed=11)
    free = [Request(f"r{i}", [1], SamplingParams(temperature=0.7), None, 8) for i in range(64)]
    top2 = [Request(f"k{i}", [1], SamplingParams(temperature=1.0, top_k=2), None, 8) for i in range(64)]
    counts = torch.zeros(8)
    for _ in range(150):
        out = sampler(logits.repeat(128, 1), free + top2)
        counts += torch.bincount(torch.tensor(out.token_ids[:64]), minlength=8)
        assert set(out.token_ids[64:]) <= {0, 7}  # the two largest logits
    want = torch.softmax(logits / 0.7, dim=-1)
    assert (counts / counts.sum() - want).abs().max() < 0.02, (counts / counts.sum(), want)
