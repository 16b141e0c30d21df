"""Tensor parallelism on CPU (gloo, two processes): greedy outputs at TP=2 equal TP=1 token for
token on tiny random Llama, Qwen2 and Gemma 3 (its hybrid KV cache) models in fp32 (plain batch, prefill chunked by 7, prefix
hits), each rank holds half the weights and half the KV cache, and a model whose heads do not
divide is refused with the numbers."""
from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

from conftest import make_engine, run_to_completion
from vidya import SamplingParams

NEW = 10


def prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(11)
    system = [rng.randrange(3, vocab) for _ in range(12)]
    return ([[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 5, 17, 40)]
            + [system + [rng.randrange(3, vocab) for _ in range(k)] for k in (3, 9)])


def greedy_run(engine, batch: list[list[int]], stagger: bool = False) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW, min_tokens=NEW)
    ids = []
    for p in batch:
        ids.append(engine.add_request(None, p, params))
        if stagger:  # the later prompts find the earlier ones' blocks in the prefix cache
            engine.step()
    done = run_to_completion(engine)
    return [done[i].outputs[0].token_ids for i in ids]


@pytest.mark.parametrize("arch", ("llama", "qwen2", "gemma3"))  # gemma3: the hybrid KV cache, window 8
def test_tp2_equals_tp1_token_for_token(arch, tiny_models):
    model_dir, hf = tiny_models[arch]
    batch = prompts(hf.config.vocab_size)
    one = make_engine(model_dir, backend="torch")
    want_plain, want_staggered = greedy_run(one, batch), greedy_run(one, batch, stagger=True)
    for kwargs in ({}, {"max_num_batched_tokens": 7}):
        two = make_engine(model_dir, tensor_parallel_size=2, **kwargs)
        try:
            assert two.platform.backend == "torch"
            assert greedy_run(two, batch) == want_plain
            hits = two.kv.prefix_hits
            assert greedy_run(two, batch, stagger=True) == want_staggered
            assert two.kv.prefix_hits > hits, "the staggered run was meant to hit the prefix cache"
        finally:
            two.close()


def test_each_rank_holds_half_the_weights_and_kv_cache(tiny_models):
    model_dir, _ = tiny_models["llama"]
    one = make_engine(model_dir, backend="torch", num_gpu_blocks_override=64)
    two = make_engine(model_dir, tensor_parallel_size=2, num_gpu_blocks_override=64)
    try:
        size = lambda e: sum(p.numel() * p.element_size() for p in e.runner.model.parameters())
        kv = lambda e: sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in e.runner.kv_caches)
        norms = sum(p.numel() * 4 for n, p in one.runner.model.named_parameters() if n.endswith("norm.weight"))
        assert size(two) == (size(one) - norms) / 2 + norms  # only the norms are kept whole on each rank
        assert kv(two) == kv(one) / 2
    finally:
        two.close()


def test_heads_that_do_not_divide_are_refused_with_the_numbers(tiny_models):
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the model's attention heads 4, "
                                         "KV heads 2, intermediate size 128"):
        make_engine(tiny_models["llama"][0], tensor_parallel_size=3)
    with pytest.raises(ValueError, match="runs on the torch ops"):
        make_engine(tiny_models["llama"][0], tensor_parallel_size=2, backend="cpu")
    assert torch.distributed.is_available()


def tp_workers(pid: int) -> list[int]:
    """The server's tensor-parallel ranks: its children started by multiprocessing's spawn (not
    its resource tracker)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(c) for c in f.read().split()]
    out = []
    for c in children:
        try:
            with open(f"/proc/{c}/cmdline", "rb") as f:
                cmd = f.read()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmd:
            out.append(c)
    return out


def test_served_tp2_answers_stops_on_sigterm_and_exits_non_zero_when_a_rank_dies(tiny_models):
    import openai
    from serverutil import LiveServer
    args = ("--model", tiny_models["llama"][0], "--served-model-name", "tiny", "--dtype", "float32",
            "--max-model-len", "256", "--no-tutor-warmup", "--tensor-parallel-size", "2")
    s = LiveServer(*args)
    try:
        workers = tp_workers(s.proc.pid)
        assert len(workers) == 1
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        r = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5
        assert s.terminate() == 0  # SIGTERM: drained, every rank stopped
        assert not os.path.exists(f"/proc/{workers[0]}") or open(f"/proc/{workers[0]}/stat").read().split()[2] == "Z"
    finally:
        s.terminate()
    s = LiveServer(*args)
    try:
        (worker,) = tp_workers(s.proc.pid)
        os.kill(worker, signal.SIGKILL)  # a rank dies: /health 503 at once, then a non-zero exit
        code = s.proc.wait(timeout=60)
        assert code != 0
        assert "a tensor-parallel rank died" in s.log() and "Traceback" not in s.log()
    finally:
        s.terminate()


def test_an_idle_tp2_server_outlives_every_timeout_and_answers_the_same(tiny_models):
    """Issue 31: a worker waited for the next step inside a collective, which gloo ends after its
    timeout (120 s): the server died after two idle minutes. Here the timeout is 4 s (a collective
    inside a step has that long: room for a loaded CI machine) and the server idles 2.5x that; it
    must still be up and answer the same greedy text."""
    import httpx
    import openai
    from serverutil import LiveServer
    timeout = 4
    s = LiveServer("--model", tiny_models["llama"][0], "--served-model-name", "tiny", "--dtype", "float32",
                   "--max-model-len", "256", "--no-tutor-warmup", "--tensor-parallel-size", "2",
                   env={"VIDYA_TP_TIMEOUT_S": str(timeout)})
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        ask = lambda: client.completions.create(model="tiny", prompt="w5 w6", max_tokens=8, temperature=0).choices[0].text  # noqa: E731
        before = ask()
        time.sleep(2.5 * timeout)
        assert httpx.get(s.url + "/health").status_code == 200, s.log()[-2000:]
        assert ask() == before
        assert len(tp_workers(s.proc.pid)) == 1
        assert s.terminate() == 0
        log = open(s.log_path).read()
        assert "rank died" not in log and "Traceback" not in log, log[-2000:]
    finally:
        s.terminate()


UNGUARDED = """
from vidya import LLM, SamplingParams
llm = LLM(model={model!r}, dtype="float32", max_model_len=128, tensor_parallel_size=2)
print("TEXT", llm.generate(["w5 w6"], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].text)
"""


def test_a_script_without_the_main_guard_fails_at_once_with_the_fix(tiny_models, tmp_path):
    """Issue 31: LLM(tensor_parallel_size=2) at a script's top level: the spawned rank re-ran the
    script and rank 0 waited for it in the rendezvous until the timeout. Now it fails as soon as
    the rank exits, naming the guard; with the guard the same script runs."""
    import subprocess
    import sys
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED.format(model=tiny_models["llama"][0]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VIDYA_TP_TIMEOUT_S": "3600"}  # (a hang would be an hour)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    assert 'if __name__ == "__main__":' in r.stderr and "could not start" in r.stderr, r.stderr[-3000:]
    guarded = "if __name__ == \"__main__\":\n" + "".join(f"    {line}\n" for line in UNGUARDED.strip().splitlines())
    script.write_text(guarded.format(model=tiny_models["llama"][0]))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "TEXT" in r.stdout, r.stderr[-3000:]
