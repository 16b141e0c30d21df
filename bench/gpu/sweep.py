"""bench/gpu/run.py's `sweep_24gb` section: the tutor's load at rising concurrency (16, 64, 128, 256) against `vidya
serve` on the GPU, an 8B-shaped Llama (dummy weights) held to 24 GB as on an A10, then `vidya plan`
on that sweep, both through the CLI as a user runs them. The sweep file is written beside the
results (`gpu-sweep-24gb.json`, the input of `vidya plan --sweep`).

No tokenizer for the model is at hand on the GPU machine, so the workload is the tutor's own
(src/vidya/bench/tutor-64.json) stored as SmolLM2 token ids (tutor-64-ids.json, made once from it)
and spoken in words: id t is the word w<t+3> of a word-level tokenizer, so prompts keep their
token counts and what they share (the system prompt), and the sweep's per-request tags stay
distinct (numbers and brackets are words of their own).

What it measures is the engine on this GPU within the A10's memory: the concurrency where the KV
room fills and requests start to queue is the A10's, its speed is not (this GPU reads memory ~8x
faster); the README's A10 projection scales the latter."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
IDS = os.path.join(HERE, "tutor-64-ids.json")
EXTRA = ["(", ")", ".", "system", "user", "assistant"] + [str(i) for i in range(1000)]
TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant{% endif %}")


def tokenizer(vocab_size: int):
    """Words w3 .. then the EXTRA words at the top of the vocabulary; punctuation split off."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = vocab_size - 3 - len(EXTRA)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 3 + words)},
             **{w: 3 + words + i for i, w in enumerate(EXTRA)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out.chat_template = TEMPLATE
    return out


def word_workload(vocab_size: int, path: str, max_tokens: int | None = None) -> str:
    with open(IDS) as f:
        data = json.load(f)
    words = vocab_size - 3 - len(EXTRA)
    say = lambda ids: " ".join(f"w{3 + t % words}" for t in ids)  # noqa: E731
    data["requests"] = [{"messages": [{"role": m["role"], "content": say(m["ids"])} for m in r["messages"]]}
                        for r in data["requests"]]
    if max_tokens is not None:
        data["max_tokens"] = data["min_tokens"] = max_tokens
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vidya.cli", *args], capture_output=True, text=True, timeout=timeout)


def sweep_24gb(model_path: str, vocab_size: int, device, workdir: str, out_dir: str, smoke: bool,
                flags: tuple[str, ...] = (), name: str = "gpu-sweep-24gb") -> dict:
    import httpx
    import torch
    port = free_port()
    parent_bytes = 0
    if device.type == "cuda":
        # the server sizes its KV cache from the device's free memory, so what this process still
        # holds (its CUDA context, the allocator's cache) is added back: the server gets 24 GB
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        parent_bytes = total - free
        util = (24 * 2**30 + parent_bytes) / total
        engine = ["--dtype", "bfloat16", "--device", str(device), "--gpu-memory-utilization", f"{util:.4f}"]
    else:
        engine = ["--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "0.1"]
    levels, per_level = ("1,2", "2") if smoke else ("16,64,128,256", None)
    workload = word_workload(vocab_size, os.path.join(workdir, "tutor-64-words.json"), 8 if smoke else None)
    log_path = os.path.join(workdir, "serve.log")
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "vidya.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                                   "--model", model_path, "--served-model-name", "llama3-8b-shape", "--load-format", "dummy",
                                   "--max-model-len", "1024", "--max-num-seqs", "256", "--no-tutor-warmup",
                                   "--disable-uvicorn-access-log", *engine, *flags], stdout=log, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vidya serve exited with {server.returncode}: {open(log_path).read()[-3000:]}")
            try:
                if httpx.get(root + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - t0 > 240:
                raise RuntimeError(f"vidya serve not ready in 240 s: {open(log_path).read()[-3000:]}")
            time.sleep(0.5)
        startup = time.perf_counter() - t0
        sweep_path = os.path.join(out_dir, f"{name}.json")
        sweep = cli("bench", "sweep", "--base-url", root + "/v1", "--workload", workload, "--levels", levels,
                    *(["--requests-per-level", per_level] if per_level else []), "--json", sweep_path, timeout=300)
        if sweep.returncode != 0:
            raise RuntimeError(f"vidya bench sweep exited with {sweep.returncode}: {sweep.stderr[-3000:]}")
        plan = cli("plan", "--sweep", sweep_path, "--json", timeout=60)
        if plan.returncode not in (0, 3):  # 3: no level meets the targets, a plan all the same
            raise RuntimeError(f"vidya plan exited with {plan.returncode}: {plan.stdout[-2000:]} {plan.stderr[-2000:]}")
    finally:
        server.terminate()
        server.wait(60)
    with open(sweep_path) as f:
        levels_out = json.load(f)["levels"]
    return {"flags": list(flags), "startup_s": startup, "parent_gpu_bytes": parent_bytes, "sweep_file": sweep_path, "levels": levels_out,
            "plan": json.loads(plan.stdout)}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
